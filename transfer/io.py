"""Atomic file writes: a temp file in the same folder, then `os.replace`, so readers never see half a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp)
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call `writer(temp_path)`, then move the result onto `path` in one step."""
    with atomic_path(path) as temp:
        writer(temp)
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    return write_atomic(path, lambda temp: temp.write_text(json.dumps(data, indent=2) + "\n"))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda temp: temp.write_text(text))
