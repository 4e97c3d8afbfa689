"""Folder scan: a user's messy folder -> classes, samples per split, and every skipped file with its reason.

Layouts: one sub-folder per class; or `train/`, `val/` (or `validation/`), `test/` each holding class folders; or
a flat folder of unlabelled images. Hidden entries (names starting with '.', `__MACOSX`, `Thumbs.db`, ...) are
ignored; symlinked folders are followed once; files are judged by decoding them, not by their extension.
Nothing here writes to the user's folder. Uses PIL and numpy only.
"""

from __future__ import annotations

import errno
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from transfer.core.errors import DataError
from transfer.core.images import DEFAULT_MAX_PIXELS, BadImageError, open_image, read_header
from transfer.core.progress import SILENT, Progress

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini", "__pycache__"}


@dataclass(frozen=True)
class Sample:
    """One usable image: its path, class index (None when unlabelled, or with several labels), split (None when not
    pre-split) and, for several labels per image, their class indices."""

    path: Path
    label: int | None
    split: str | None = None
    labels: tuple[int, ...] = ()

    @property
    def label_set(self) -> tuple[int, ...]:
        """Every class this image belongs to: its labels, or its one label."""
        return self.labels or (() if self.label is None else (self.label,))


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class ScanReport:
    """What a folder holds: ordered classes, usable samples, skipped files with reasons, empty classes."""

    root: Path
    layout: str  # "classes" | "splits" | "flat" | "csv" (a labels file, `transfer.data.labels`)
    classes: list[str]
    samples: list[Sample]
    skipped: list[Skipped] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    task: str = "single"  # "single": one label per image; "multilabel": several (from a labels file)
    labels_file: str | None = None
    notes: list[str] = field(default_factory=list)  # one line each, for the user: what looks unintended

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: images}}; the split is 'all' when the data is not pre-split. With several labels per
        image, an image counts once under each of its labels."""
        table: dict[str, dict[str, int]] = {}
        for sample in self.samples:
            split = sample.split or "all"
            names = [self.classes[i] for i in sample.label_set] or ["(unlabelled)"]
            for name in names:
                table.setdefault(split, {}).setdefault(name, 0)
                table[split][name] += 1
        return table

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def check_trainable(self) -> None:
        """Raise `DataError` unless the folder can train a classifier: labelled, >= 2 classes, none empty."""
        if self.layout == "flat":
            raise DataError(f"{self.root}: no class sub-folders; training needs one folder per class (or --labels "
                            "FILE.csv)")
        if self.empty_classes:
            raise DataError(f"{self.root}: empty class(es) with no usable image: {', '.join(self.empty_classes)}")
        if len(self.classes) < 2:
            found = self.classes[0] if self.classes else "none"
            raise DataError(f"{self.root}: training needs at least 2 classes, found 1 ({found})")

    def to_dict(self) -> dict:
        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": self.classes,
            "counts": self.counts(),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "empty_classes": self.empty_classes,
            "task": self.task,
            "labels_file": self.labels_file,
            "notes": self.notes,
        }


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def _visible_entries(folder: Path, skipped: list[Skipped] | None = None) -> list[os.DirEntry]:
    """The folder's non-hidden entries, sorted; an unreadable folder is reported in `skipped` (or raised)."""
    try:
        with os.scandir(folder) as entries:
            return sorted((e for e in entries if not is_hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        if skipped is None:
            raise
        skipped.append(Skipped(str(folder), f"unreadable folder ({exc.strerror or exc})"))
        return []


def _entry_kind(entry: os.DirEntry) -> tuple[str, str | None]:
    """'dir', 'file' or 'bad' (with the reason) for one entry, following symlinks."""
    try:
        if entry.is_dir(follow_symlinks=True):
            return "dir", None
        if entry.is_file(follow_symlinks=True):
            return "file", None
        if entry.is_symlink():
            return "bad", "broken symbolic link (its target does not exist)"
        return "bad", "not a regular file"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "bad", "symbolic link loop (the link points back to itself)"
        return "bad", f"unreadable ({exc.strerror or exc})"


def _walk_files(folder: Path, visited: set[str], skipped: list[Skipped]) -> list[Path]:
    """Every visible file under folder, sorted, following symlinked folders once (cycles are cut).

    Entries that cannot be used (unreadable folders, symlink loops, broken links) land in `skipped`.
    """
    real = os.path.realpath(folder)
    if real in visited:
        return []
    visited.add(real)
    files: list[Path] = []
    for entry in _visible_entries(folder, skipped):
        path = Path(entry.path)
        kind, reason = _entry_kind(entry)
        if kind == "dir":
            files.extend(_walk_files(path, visited, skipped))
        elif kind == "file":
            files.append(path)
        else:
            skipped.append(Skipped(str(path), reason or "unusable"))
    return files


def _subfolders(folder: Path, skipped: list[Skipped] | None = None) -> list[Path]:
    return [Path(e.path) for e in _visible_entries(folder, skipped) if _entry_kind(e)[0] == "dir"]


def check_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True) -> str | None:
    """None when `path` decodes fully as an image (with `decode` off: when its header is an image's within the
    limits, see `read_header`), else the reason it cannot be used."""
    try:
        if decode:
            open_image(path, max_pixels=max_pixels, draft_size=(64, 64))
        else:
            read_header(path, max_pixels=max_pixels)
    except BadImageError as exc:
        return exc.reason
    return None


def check_images(paths: list[Path], description: str, workers: int = 4, progress: Progress = SILENT,
                 max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = True) -> list[str | None]:
    """`check_image` of every path, in `workers` threads with one progress task: the reasons, in order."""
    reasons: list[str | None] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            progress.task(description, total=len(paths), unit="files") as advance:
        for reason in pool.map(lambda path: check_image(path, max_pixels, decode), paths):
            reasons.append(reason)
            advance(1)
    return reasons


def scan_folder(
    root: str | os.PathLike,
    strict: bool = False,
    labelled: bool | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    progress: Progress = SILENT,
    decode: bool = True,
) -> ScanReport:
    """Scan `root`; every file is decoded once (in threads) to sort usable images from bad ones, or with `decode`
    off only its header is read (for work that decodes every image anyway and skips, with the same reasons, one
    that fails then: `extract` and `index`).

    `labelled=None` infers the layout; `strict` turns any skipped file into a `DataError`.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")

    visited: set[str] = set()
    candidates: list[tuple[Path, str | None, str | None]] = []  # path, class name, split
    skipped: list[Skipped] = []
    top = _subfolders(root, skipped)
    splits = {SPLIT_NAMES[p.name.lower()]: p for p in top if p.name.lower() in SPLIT_NAMES}
    if splits and labelled is not False:
        layout = "splits"
        for split, folder in sorted(splits.items()):
            for class_dir in _subfolders(folder, skipped):
                candidates += [(p, class_dir.name, split) for p in _walk_files(class_dir, visited, skipped)]
            skipped += [Skipped(str(p), "outside any class folder") for p in _loose_files(folder)]
        class_names = sorted({d.name for f in splits.values() for d in _subfolders(f)})
    elif top and labelled is not False:
        layout = "classes"
        for class_dir in top:
            candidates += [(p, class_dir.name, None) for p in _walk_files(class_dir, visited, skipped)]
        class_names = [d.name for d in top]
    else:
        layout = "flat"
        candidates = [(p, None, None) for p in _walk_files(root, visited, skipped)]
        class_names = []
    if layout != "flat":
        skipped += [Skipped(str(p), "outside any class folder") for p in _loose_files(root)]
        skipped += _bad_entries(root) if layout == "classes" else []

    reasons = check_images([c[0] for c in candidates], f"scanning {root}", workers, progress, max_pixels, decode)
    index = {name: i for i, name in enumerate(class_names)}
    samples = []
    for (path, class_name, split), reason in zip(candidates, reasons, strict=True):
        if reason is None:
            samples.append(Sample(path, index[class_name] if class_name is not None else None, split))
        else:
            skipped.append(Skipped(str(path), reason))
    skipped.sort(key=lambda s: s.path)
    used = {s.label for s in samples}
    empty = [name for name, i in index.items() if i not in used]
    report = ScanReport(root, layout, class_names, samples, skipped, empty)
    if strict and skipped:
        first = skipped[0]
        raise DataError(f"{len(skipped)} unusable file(s) (--strict); first: {first.path}: {first.reason}")
    return report


def _loose_files(folder: Path) -> list[Path]:
    return [Path(e.path) for e in _visible_entries(folder, []) if _entry_kind(e)[0] == "file"]


def _bad_entries(folder: Path) -> list[Skipped]:
    """Top-level entries that are neither folders nor files (loops, broken links), reported with their reason."""
    bad = []
    for entry in _visible_entries(folder, []):
        kind, reason = _entry_kind(entry)
        if kind == "bad":
            bad.append(Skipped(entry.path, reason or "unusable"))
    return bad


def expand_inputs(items: list[str | os.PathLike]) -> list[Path]:
    """Files, folders (walked, hidden entries ignored) and glob patterns -> an ordered list of files.

    A path that does not exist, or a pattern that matches no file, is a `DataError` naming it: a typo must not
    end in an empty, successful run.
    """
    import glob

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        text = os.fspath(item)
        if path.is_dir():
            paths.extend(_walk_files(path, set(), []))
        elif path.exists():
            paths.append(path)
        elif any(ch in text for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            matches = [m for m in matches if m.is_file() and not is_hidden(m.name)]
            if not matches:
                raise DataError(f"no file matches {text!r}")
            paths.extend(matches)
        elif path.is_symlink():
            raise DataError(f"{text}: broken symbolic link or link loop")
        else:
            raise DataError(f"not found: {text}")
    return list(dict.fromkeys(paths))


def usable_images(folder: str | os.PathLike, flag: str) -> list[Path]:
    """The usable images under `folder` (a folder scan), or a `DataError` naming `flag` and the first bad file when
    there is none: for folders a command reads whole before it works (int8's --calibration)."""
    report = scan_folder(folder)
    if not report.samples:
        first = f" ({len(report.skipped)} file(s) skipped, first: {report.skipped[0].path}: " \
                f"{report.skipped[0].reason})" if report.skipped else ""
        raise DataError(f"{flag} {folder}: no usable images{first}")
    return [sample.path for sample in report.samples]
