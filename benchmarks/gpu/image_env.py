"""A stand-in for the lent card's Python image on this machine, so the GPU run is rehearsed against what the card has.

`python benchmarks/gpu/image_env.py DIR` (with the project's .venv python) builds

- DIR/venv: a virtual environment without pip whose site-packages holds only the packages the card's image has
  (image_packages.txt), and what those need, linked from this .venv;
- DIR/carried: the packages of wheels.txt, what `run.sh` carries to the card, linked likewise, each at its pinned
  version.

`run.sh rehearse` runs the GPU tests and suite with DIR/venv's python and DIR/carried on PYTHONPATH, so an import
that neither the image nor wheels.txt provides fails here, on CPU, instead of on the card's scarce minutes.
Versions are this .venv's (its Python and CPU torch), not the image's: the stand-in checks which packages are
there, not their versions.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import sysconfig
import venv
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
NOT_ON_CARD = {"nncf": "int8 export (`export --int8`), which the GPU run does not exercise; an int8 file runs with "
                       "onnxruntime alone"}  # dependencies the card needs neither in its image nor carried


def canonical(name: str) -> str:
    """A distribution name as pip compares them: lower case, runs of - _ . as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: Path) -> dict[str, str | None]:
    """name -> pinned version (None when unpinned) of a list file; '#' starts a comment."""
    entries = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            entries[canonical(name)] = version or None
    return entries


def closure(names: set[str]) -> set[str]:
    """`names` and every distribution they require here (environment markers evaluated, extras left out); names
    this .venv lacks (the image's JAX, say) are kept, with nothing to follow."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        dist = installed(name)
        for text in (dist.requires or []) if dist else []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def link(names: set[str], target: Path) -> list[str]:
    """Link each installed distribution's top-level files and folders into `target` (what `pip install --target`
    would have put there); returns the names this .venv does not have."""
    target.mkdir(parents=True, exist_ok=True)
    absent = []
    for name in sorted(names):
        dist = installed(name)
        if dist is None:
            absent.append(name)
            continue
        base = Path(dist.locate_file(""))
        for top in sorted({file.parts[0] for file in dist.files or [] if file.parts[0] not in ("..", "bin")}):
            if (base / top).exists() and not (target / top).exists():
                os.symlink(base / top, target / top)
    return absent


def build(folder: Path) -> None:
    image = set(listed(HERE / "image_packages.txt"))
    pins = listed(HERE / "wheels.txt")
    other = [f"{name}=={pin} (this .venv has {version(name)})" for name, pin in pins.items() if version(name) != pin]
    if other:  # the stand-in checks names; the card gets the pins
        print(f"note: linking this .venv's versions, not wheels.txt's, of {', '.join(other)}")
    shutil.rmtree(folder, ignore_errors=True)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder / "venv")
    site = Path(sysconfig.get_path("purelib", vars={"base": str(folder / "venv"), "platbase": str(folder / "venv")}))
    needed = closure(image)
    link(needed, site)
    link(set(pins), folder / "carried")
    print(f"{folder}/venv: the image's {len(image)} packages ({len(needed - image)} more that they need here: "
          f"{', '.join(sorted(needed - image)) or 'none'}); {folder}/carried: {len(pins)} from wheels.txt")


def installed(name: str) -> Distribution | None:
    """This .venv's distribution of `name`, or None."""
    try:
        return distribution(name)
    except PackageNotFoundError:
        return None


def version(name: str) -> str | None:
    dist = installed(name)
    return dist.version if dist else None


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/transfer-image"))
