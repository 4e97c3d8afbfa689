"""Checks of user options at the boundary, before any work: ranges, choices, sizes the backbone can run.

Each failure is an `OptionError` (exit code 2) whose one line names the flag and what it accepts. The library
functions call these too, so a notebook user gets the same answer as the command line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from transfer.core.errors import OptionError


def check_int(value: int, flag: str, low: int, high: int | None = None) -> int:
    """`low <= value <= high` (no upper bound when `high` is None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(f"{flag} {value!r}: must be an integer")
    if value < low or (high is not None and value > high):
        allowed = f"{low}..{high}" if high is not None else f"at least {low}"
        raise OptionError(f"{flag} {value}: must be {allowed}")
    return value


def check_float(value: float, flag: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in [low, high] ((low, high] with `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(f"{flag} {value!r}: must be a finite number")
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise OptionError(f"{flag} {value:g}: must be in {interval}")
    return float(value)


def check_choice(value: str, flag: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    if value not in choices:
        raise OptionError(f"{flag} {value!r}: use one of {', '.join(choices)}")
    return value


def parse_batch_sizes(text: str, flag: str = "--batch-sizes") -> list[int]:
    """'1,8,32' -> [1, 8, 32]; every size a positive integer."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OptionError(f"{flag} {text!r}: give positive integers such as 1,8,32") from None
    if not sizes or any(size < 1 for size in sizes):
        raise OptionError(f"{flag} {text!r}: give positive integers such as 1,8,32")
    return sizes


def parse_unfreeze(text: str | int, group_names: list[str], flag: str = "--unfreeze") -> str:
    """'all' or an integer 0..len(groups): how many unfreeze groups stage 2 trains, from the head backwards."""
    text = str(text).strip()
    if text == "all":
        return text
    if not text.isdigit() or int(text) > len(group_names):
        raise OptionError(f"{flag} {text!r}: use 0..{len(group_names)} or all (groups from the top: "
                          f"{', '.join(group_names)})")
    return str(int(text))
