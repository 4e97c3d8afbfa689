"""Predictions written as they are made, and a killed `predict` continued where it stopped.

`-o` receives each chunk of rows (in input order) as soon as it is predicted: CSV (a header, then one row per image),
JSON Lines (one record per line) or JSON (one list, closed when the run ends). Beside it, `.NAME.transfer-resume`
records the job (a fingerprint of the model's content, the inputs and the settings), how many rows and bytes are
written and the SHA-256 of those bytes; it is replaced after every chunk and removed when the file is complete.
Run again with the same arguments, `predict` finds that record, checks that the file still starts with exactly the
recorded bytes, cuts off whatever a kill left after them (half a row) and predicts only the rest: rows already
written are kept, not recomputed, and as chunks start at whole batches the finished file is byte for byte the one
an uninterrupted run writes. A record of another job (another model, inputs or settings) or a file changed since is
never continued: the run starts over and says why. Memory holds one chunk, whatever the number of images.
Imports no torch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

from exporters.runtime import Prediction
from transfer.core.io import OutputError, display, os_error_message

RESUME_SUFFIX = ".transfer-resume"


def label_columns(classes: int, top_k: int, multilabel: bool) -> int:
    """How many (label, probability) column pairs the CSV has: top-k, or with several labels per image every
    class (an image may pass every threshold); known before the first row, so the header comes first."""
    return classes if multilabel else max(1, min(top_k, classes))


def csv_header(columns: int) -> str:
    return _csv_line(["path", *(f"{kind}_{rank}" for rank in range(1, columns + 1)
                                for kind in ("label", "probability")), "error"])


def csv_row(item: Prediction, columns: int) -> str:
    """One image: its path, (label, probability) pairs padded to `columns`, and the error of an unreadable one."""
    ranked = [value for label, p in zip(item.labels, item.probabilities, strict=True) for value in (label, f"{p:.6f}")]
    return _csv_line([item.path, *ranked, *([""] * (2 * columns - len(ranked))), item.error or ""])


def _csv_line(cells: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


def _json_item(item: Prediction, first: bool) -> str:
    """One record of the JSON list, indented as json.dumps(list, indent=2) writes it."""
    body = json.dumps(item.__dict__, indent=2).replace("\n", "\n  ")
    return ("\n  " if first else ",\n  ") + body


def render(suffix: str, items: list[Prediction], columns: int, first: bool) -> str:
    """The text of `items` in the file's format; `first`: nothing has been written yet (the CSV header, the JSON
    list's opening)."""
    if suffix == ".csv":
        return (csv_header(columns) if first else "") + "".join(csv_row(item, columns) for item in items)
    if suffix == ".jsonl":
        return "".join(json.dumps(item.__dict__) + "\n" for item in items)
    text = "[" if first else ""
    for position, item in enumerate(items):
        text += _json_item(item, first and position == 0)
    return text


def closing(suffix: str, rows: int) -> str:
    """What ends a complete file: the JSON list's closing bracket."""
    return ("\n]\n" if rows else "]\n") if suffix == ".json" else ""


class PredictionsFile:
    """`-o` written chunk by chunk with its resume record beside it (see the module doc). Use under the output's
    lock: `start()` (rows to skip), `write(chunk)` as chunks finish, `finish()` at the end."""

    def __init__(self, path: str | os.PathLike, fingerprint: str, columns: int):
        self.path, self.fingerprint, self.columns = Path(path), fingerprint, columns
        self.record_path = self.path.with_name(f".{self.path.name}{RESUME_SUFFIX}")
        self.rows, self.size, self.digest, self.handle = 0, 0, hashlib.sha256(), None
        self.not_continued: str | None = None  # why a resume record found was not followed

    def start(self) -> int:
        """Open `-o`: continue the run its resume record describes when it matches, else start it empty. Returns
        how many input rows are already written (0 for a fresh start)."""
        state = self._matching_state()
        if state is None:
            self.handle = open(self.path, "wb")
            self._save_state()
            return 0
        self.handle = open(self.path, "r+b")
        self.handle.truncate(state["bytes"])  # half a chunk a kill left after the last whole one
        self.handle.seek(state["bytes"])
        self.rows, self.size = state["rows"], state["bytes"]
        return self.rows

    def _matching_state(self) -> dict | None:
        try:
            state = json.loads(self.record_path.read_text())
            if not isinstance(state, dict):
                raise ValueError
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            self.not_continued = f"{display(self.record_path.name)} is unreadable"
            return None
        if state.get("fingerprint") != self.fingerprint:
            self.not_continued = "it was written by another model, inputs or settings"
            return None
        try:
            digest = _head_digest(self.path, state["bytes"])
            unchanged = os.path.getsize(self.path) >= state["bytes"] and digest.hexdigest() == state["sha256"]
        except (OSError, KeyError, TypeError):
            unchanged = False
        if not unchanged:
            self.not_continued = f"{display(self.path)} changed since the interrupted run wrote it"
            return None
        self.digest = digest
        return state

    def write(self, items: list[Prediction]) -> None:
        """Append one finished chunk and record it (a kill after this keeps it)."""
        data = render(self.path.suffix, items, self.columns, first=self.size == 0).encode("utf-8", "surrogateescape")
        self.handle.write(data)
        self.handle.flush()
        self.digest.update(data)
        self.rows, self.size = self.rows + len(items), self.size + len(data)
        self._save_state()

    def finish(self) -> None:
        """Close the file whole (the JSON list's end; with no rows at all, what `render` opens a file with: the CSV
        header, the JSON list's opening), then drop the record."""
        if self.size == 0:
            self.handle.write(render(self.path.suffix, [], self.columns, first=True).encode())
        self.handle.write(closing(self.path.suffix, self.rows).encode())
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.record_path.unlink(missing_ok=True)
        self.record_path.with_name(self.record_path.name + ".next").unlink(missing_ok=True)

    def close(self) -> None:
        """Stop without finishing (an error or a kill): the file and its record stay, to be continued."""
        if self.handle is not None and not self.handle.closed:
            self.handle.close()

    def _save_state(self) -> None:
        """The record replaced whole (a new file renamed over it) after every chunk. Not fsynced: a kill leaves the
        page cache, so record and file agree; after a power loss that lost the file's tail, the recorded SHA-256
        no longer matches and the run starts over, which is safe."""
        state = {"fingerprint": self.fingerprint, "rows": self.rows, "bytes": self.size,
                 "sha256": self.digest.hexdigest(), "written_by": "transfer predict"}
        fresh = self.record_path.with_name(self.record_path.name + ".next")
        try:
            fresh.write_text(json.dumps(state) + "\n")
            os.replace(fresh, self.record_path)
        except OSError as exc:
            raise OutputError(f"cannot write {display(self.record_path)}: {os_error_message(exc)}") from None


def _head_digest(path: Path, size: int):
    """SHA-256 (a running hash, to go on with) of the first `size` bytes of `path`, read 4 MB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while size > 0:
            block = handle.read(min(size, 1 << 22))
            if not block:
                break
            digest.update(block)
            size -= len(block)
    return digest
