"""Labels from a CSV or TSV file (Kaggle-style `image,label`, fastai's `is_valid`, annotation-tool exports):
images anywhere under a folder, one label per image or several in one cell, an optional split column.

`scan_data` is what every command that takes a data folder calls: a class-folder scan, or `read_labels` when a
labels file is given. Both return the same `ScanReport`, so splitting, training and reports do not care where the
labels came from. Every unusable row is a `Skipped` entry naming its line and reason (missing file, unreadable
image, duplicate row, empty label, unknown split); a file that cannot be read as a table at all is one `DataError`.
Nothing here writes to the user's folder. Uses the standard library, PIL and numpy only.
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from transfer.core.errors import DataError, OptionError
from transfer.core.io import display
from transfer.core.progress import SILENT, Progress
from transfer.data.scan import SPLIT_NAMES, Sample, ScanReport, Skipped, check_images, scan_folder

PATH_COLUMNS = ("image", "images", "path", "file", "filename", "fname", "image_id", "name", "id")
LABEL_COLUMNS = ("label", "labels", "tags", "class", "category", "target")
SPLIT_COLUMNS = ("split", "is_valid", "is_val", "subset", "set")
DETECTED_SEPARATORS = (";", "|")  # a label cell holding one of these means several labels per image
TRUE_WORDS, FALSE_WORDS = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f"}
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")  # tried for ids written without one


@dataclass(frozen=True)
class LabelsFile:
    """Where the labels are and how to read them; saved in a run's config.json so every later command agrees."""

    path: str
    path_column: str | None = None  # default: the first of PATH_COLUMNS present, else the first column
    label_column: str | None = None  # default: the first of LABEL_COLUMNS present, else the second column
    split_column: str | None = None  # default: the first of SPLIT_COLUMNS present, else none
    label_sep: str | None = None  # several labels per cell, split on this; default: detected (";" or "|")
    multi_label: bool | None = None  # None: multi-label when a separator is given or detected

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> LabelsFile | None:
        return cls(**data) if data else None


def scan_data(root: str | os.PathLike, labels: LabelsFile | None = None, strict: bool = False,
              progress: Progress = SILENT, workers: int = 4, decode: bool = True) -> ScanReport:
    """The data a command trains or evaluates on: `root`'s class folders, or `labels` read against `root`.
    `decode` off: headers only (see `scan_folder`)."""
    if labels is None:
        return scan_folder(root, strict=strict, workers=workers, progress=progress, decode=decode)
    return read_labels(root, labels, strict=strict, progress=progress, workers=workers, decode=decode)


def read_labels(root: str | os.PathLike, labels: LabelsFile, strict: bool = False, progress: Progress = SILENT,
                workers: int = 4, decode: bool = True) -> ScanReport:
    """Rows of `labels` whose image exists under `root` and decodes (with `decode` off: whose header is an
    image's); every other row skipped with its reason."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder not found: {root}")
    header, rows = _read_table(Path(labels.path))
    path_col = _column(header, labels.path_column, PATH_COLUMNS, 0, "--path-column", labels.path)
    label_col = _column(header, labels.label_column, LABEL_COLUMNS, 1, "--label-column", labels.path)
    if label_col == path_col:
        raise DataError(f"--labels {display(labels.path)}: the path and label columns are the same column "
                        f"({header[path_col]!r}); name them with --path-column and --label-column")
    split_col = _column(header, labels.split_column, SPLIT_COLUMNS, None, "--split-column", labels.path)
    separator = _separator(labels, [row[label_col] for _, row in rows if len(row) > label_col])
    multi = separator is not None
    skipped: list[Skipped] = []
    entries: list[tuple[Path, tuple[str, ...], str | None]] = []
    seen: dict[str, tuple[int, tuple[str, ...]]] = {}  # by the file itself: one image, however its rows spell it
    where = display(labels.path)
    files = _RowFiles(root)
    for line, row in rows:
        if len(row) != len(header):
            skipped.append(Skipped(f"{where}:{line}", f"{len(row)} fields, the header has {len(header)}"))
            continue
        cell, label_cell = row[path_col].strip(), row[label_col].strip()
        names = tuple(dict.fromkeys(n.strip() for n in label_cell.split(separator) if n.strip())) if multi else \
            ((label_cell,) if label_cell else ())
        split, split_problem = _split_of(row[split_col].strip() if split_col is not None else None)
        problem = ("empty path" if not cell else "empty label" if not names else
                   _unprintable(label_cell, "label") or split_problem)
        path, key = (None, None)
        if problem is None:
            path, key, problem = files.find(cell)
        if problem is None and key in seen:
            first_line, first_names = seen[key]
            problem = (f"duplicate of line {first_line}" if set(first_names) == set(names)
                       else f"labelled again: line {first_line} says {', '.join(first_names)}; "
                            "the first row is kept")
        if problem is not None:
            skipped.append(Skipped(f"{where}:{line}" + (f" ({cell})" if cell else ""), problem))
            continue
        seen[key] = (line, names)
        entries.append((path, names, split))
    classes = sorted({name for _, names, _ in entries for name in names})
    index = {name: i for i, name in enumerate(classes)}
    reasons = check_images([entry[0] for entry in entries], f"checking the images of {where}", workers, progress,
                           decode=decode)
    samples = []
    for (path, names, split), reason in zip(entries, reasons, strict=True):
        if reason is not None:
            skipped.append(Skipped(str(path), reason))
        elif multi:
            samples.append(Sample(path, None, split, tuple(sorted(index[n] for n in names))))
        else:
            samples.append(Sample(path, index[names[0]], split))
    used = {i for s in samples for i in (s.labels if multi else (s.label,))}
    report = ScanReport(root, "csv", classes, samples, skipped, [c for c in classes if index[c] not in used],
                        task="multilabel" if multi else "single", labels_file=str(labels.path),
                        notes=[] if multi else _tag_note(classes, labels))
    if strict and skipped:
        raise DataError(f"{len(skipped)} unusable row(s) (--strict); first: {skipped[0].path}: {skipped[0].reason}")
    return report


def _tag_note(classes: list[str], labels: LabelsFile) -> list[str]:
    """A note when one-label values look like space-separated tags: half of them or more hold spaces, and most of
    their words recur across values ('0 1', '0 2', '1 2': three classes made of three tags; in 'golden retriever',
    'labrador retriever', 'tabby cat' one word of five does), which fastai and Kaggle files mean as several labels
    per image. Each value stays one class (what the user asked for) and the note says how to get tags."""
    spaced = [name for name in classes if " " in name.strip()]
    uses = Counter(word for name in spaced for word in set(name.split()))
    words = set(uses)
    recurring = sum(count > 1 for count in uses.values())
    if len(spaced) < 2 or 2 * len(spaced) < len(classes) or 2 * recurring < len(words):
        return []
    return [f"--labels {display(labels.path)}: {len(spaced)} of the {len(classes)} label values hold spaces and "
            f"share {len(words)} words (e.g. {spaced[0]!r}), so each combination is a class of its own; if they are "
            "tags, add --multi-label (space-separated, as fastai and Kaggle write them)"]


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows with their line numbers; tab-separated for .tsv/.tab or a tab-only header."""
    if not path.is_file():
        raise DataError(f"--labels {display(path)}: file not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"--labels {display(path)}: not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV") from None
    except OSError as exc:
        raise DataError(f"--labels {display(path)}: unreadable ({exc.strerror or exc})") from None
    first = text.split("\n", 1)[0]
    tabbed = path.suffix.lower() in (".tsv", ".tab") or ("\t" in first and "," not in first)
    numbered = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tabbed else ",")
    try:
        line = 1  # a row's first line: a quoted cell may hold line breaks, so rows and lines differ
        for row in reader:
            if any(cell.strip() for cell in row):
                numbered.append((line, row))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"--labels {display(path)}: not a readable CSV (line {reader.line_num}: {exc})") from None
    if not numbered:
        raise DataError(f"--labels {display(path)}: empty; it needs a header row (for example image,label) and rows")
    header = [cell.strip() for cell in numbered[0][1]]
    if len(header) < 2:
        raise DataError(f"--labels {display(path)}: the header has {len(header)} column ({header[0]!r}); it needs a "
                        "path column and a label column" + ("" if tabbed else " (comma-separated, or a .tsv file)"))
    doubled = sorted({name for name in header if header.count(name) > 1})
    if doubled:
        raise DataError(f"--labels {display(path)}: column name(s) {', '.join(map(repr, doubled))} appear twice")
    if len(numbered) == 1:
        raise DataError(f"--labels {display(path)}: a header and no rows")
    return header, numbered[1:]


def _column(header: list[str], chosen: str | None, defaults: tuple[str, ...], fallback: int | None, flag: str,
            source: str) -> int | None:
    """The index of the chosen column, else of the first default name present (any case), else `fallback`."""
    if chosen is not None:
        if chosen not in header:
            raise OptionError(f"{flag} {chosen!r}: {display(source)} has no such column (columns: "
                              f"{', '.join(header)})")
        return header.index(chosen)
    lowered = [name.lower() for name in header]
    for name in defaults:
        if name in lowered:
            return lowered.index(name)
    return fallback


def _separator(labels: LabelsFile, cells: list[str]) -> str | None:
    """The separator of several labels per cell, or None for one label per image."""
    if labels.multi_label is False:
        if labels.label_sep is not None:
            raise OptionError("--label-sep splits a cell into several labels; it contradicts --single-label")
        return None
    if labels.label_sep is not None:
        if not labels.label_sep.strip() and labels.label_sep != " ":
            raise OptionError(f"--label-sep {labels.label_sep!r}: use one character such as ';', '|' or ' '")
        return labels.label_sep
    for separator in DETECTED_SEPARATORS:
        if any(separator in cell for cell in cells):
            return separator
    if labels.multi_label:
        return " "  # fastai's and Kaggle's convention: space-separated tags
    return None


def _split_of(value: str | None) -> tuple[str | None, str | None]:
    """(split, problem) of a split cell: train/val/test by name, or an is_valid-style truth value."""
    if value is None:
        return None, None
    word = value.lower()
    if word in SPLIT_NAMES:
        return SPLIT_NAMES[word], None
    if word in TRUE_WORDS:
        return "val", None
    if word in FALSE_WORDS:
        return "train", None
    shown = repr(value) if value else "empty"
    return None, f"unknown split {shown} (use train, val or test, or true/false as in is_valid)"


class _RowFiles:
    """The file each path cell names under `root`, spelled one way (`a/../b.png`, an absolute path inside `root`
    and `./b.png` are all `root/b.png`); an id without an extension finds `id.jpg`, `id.png`, ...

    Each file's identity is its real path, so two spellings of one image (or a symlink to a listed file) are the
    same row. A cell that leaves `root` (`../x.png`, an absolute path elsewhere) is refused: the data folder is the
    whole dataset. Symlinks inside `root` are followed, as the folder scan follows them. Each folder is listed once
    and each file resolved once, so a million rows cost a million dictionary look-ups, not a million stat calls.
    """

    def __init__(self, root: Path):
        self.root, self.top, self.shown = root, os.path.abspath(root), display(root)
        self.listings: dict[str, dict[str, bool]] = {}  # folder -> {name: is a file (links followed)}
        self.found: dict[str, tuple[Path, str]] = {}  # full path -> (path under root, identity)

    def find(self, cell: str) -> tuple[Path | None, str | None, str | None]:
        """(path, identity, problem) of one path cell."""
        joined = os.path.normpath(os.path.join(self.top, cell))
        if not joined.startswith(self.top + os.sep):
            return None, None, f"outside the data folder {display(self.root)}: {cell}"
        if joined in self.found:
            return (*self.found[joined], None)
        folder, _, name = joined.rpartition(os.sep)
        listing = self._listing(folder)
        if not listing.get(name) and "." in name:
            return None, None, f"file not found: {self.shown}{display(joined[len(self.top):])}"
        found = next((candidate for candidate in (name, *(name + ext for ext in EXTENSIONS)) if listing.get(candidate)),
                     None)
        if found is None:
            return None, None, f"file not found: {self.shown}{display(joined[len(self.top):])}"
        full = f"{folder}{os.sep}{found}"
        if full not in self.found:
            self.found[full] = (self.root / full[len(self.top) + 1:], os.path.realpath(full))
        self.found[joined] = self.found[full]
        return (*self.found[full], None)

    def _listing(self, folder: str) -> dict[str, bool]:
        if folder not in self.listings:
            try:
                with os.scandir(folder) as entries:
                    self.listings[folder] = {entry.name: _is_file(entry) for entry in entries}
            except OSError:  # missing or unreadable: its rows are "file not found"
                self.listings[folder] = {}
        return self.listings[folder]


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:
        return False


def _unprintable(cell: str, what: str) -> str | None:
    """A problem when a cell holds a line break or another control character (U+2028, form feed, ...)."""
    bad = next((ch for ch in cell if not ch.isprintable()), None)
    return None if bad is None else f"{what} holds a line break or control character (U+{ord(bad):04X})"
