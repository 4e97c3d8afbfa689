"""Recipe files: the knobs `transfer tune` found best (`recipe.json`), read back by `finetune --recipe FILE`.

A recipe holds only the settings the search varies (`tune.RECIPE_KNOBS`); anything else in it is refused by name,
so a file edited by hand cannot slip in a setting the user did not see.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transfer.core.errors import DataError

KNOBS = ("lr_head", "lr_finetune", "epochs_head", "epochs_finetune", "unfreeze", "augment", "augmentation",
         "mixup", "label_smoothing", "ema")


def read_recipe(path: str | os.PathLike) -> dict:
    """The recipe's settings, checked to be known knobs (their values are checked with the rest of the config)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"--recipe: file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"--recipe {path}: not a readable JSON file ({exc})") from None
    recipe = data.get("recipe") if isinstance(data, dict) else None
    if not isinstance(recipe, dict):
        raise DataError(f"--recipe {path}: no \"recipe\" object (write one with `transfer tune`)")
    unknown = sorted(set(recipe) - set(KNOBS))
    if unknown:
        raise DataError(f"--recipe {path}: unknown setting {unknown[0]!r}; a recipe holds {', '.join(KNOBS)}")
    return recipe
