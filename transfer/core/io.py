"""Safe file writing: atomic replaces, permission modes that follow the umask, one writer per output, and
one-line errors for the OS conditions a user runs into (read-only folder, a file where a folder should be, full disk).

Every temp file or folder this tool makes is named `.NAME.<random>.transfer-tmp` beside `NAME`, so a later run
that holds NAME's lock can recognise and remove what a killed run left behind, and nothing else.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transfer.core.errors import TransferError

TEMP_SUFFIX = ".transfer-tmp"


class OutputError(TransferError):
    """An output path that cannot be written: read-only, under a file, disk full, or held by another writer."""


def os_error_message(exc: OSError, path: str | os.PathLike | None = None) -> str:
    """'PATH: reason' for an OSError, naming the path the OS complained about."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    return f"{display(where)}: {reason}" if where is not None else reason


def display(path) -> str:
    """A path as printable text: bytes of a name that is not valid UTF-8 show as \\xNN instead of crashing."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: how this tool names a model, a weights file or an image by its content
    (a path can be replaced under the same name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _new_temp_file(path: Path) -> Path:
    """Create an empty temp file beside `path` with mode 0666 less the umask (what `open()` would give)."""
    for _ in range(100):
        temp = temp_name(path)
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return temp
        except FileExistsError:
            continue
    raise OutputError(f"{path.parent}: cannot create a temp file")


def make_parent(path: Path, flag: str = "") -> None:
    """Create `path`'s folder, as a one-line `OutputError` when that is impossible."""
    prefix = f"{flag} {display(path)}: " if flag else ""
    blocking = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise OutputError(f"{prefix}{display(blocking)} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(prefix + os_error_message(exc, path.parent)) from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` (fsynced), on failure it is removed."""
    path = Path(path)
    make_parent(path)
    try:
        temp = _new_temp_file(path)
    except OSError as exc:
        raise OutputError(os_error_message(exc, path.parent)) from None
    mode = temp.stat().st_mode & 0o777  # 0666 less the umask, as the OS gave it
    try:
        yield temp
        if temp.stat().st_mode & 0o777 != mode:  # writers that recreate the file (safetensors) make it 0600
            os.chmod(temp, mode)
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except OSError as exc:  # disk full, quota, read-only remount: name the file that could not be written
        raise OutputError(f"cannot write {display(path)}: {os_error_message(exc).split(': ')[-1]}") from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)


@contextmanager
def temp_dir_beside(path: str | os.PathLike) -> Iterator[Path]:
    """A scratch folder beside `path` (same file system, so results move into place with `os.replace`)."""
    path = Path(path)
    make_parent(path)
    work = temp_name(path)
    try:
        work.mkdir()
    except OSError as exc:
        raise OutputError(os_error_message(exc, path.parent)) from None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_atomic(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call `writer(temp_path)`, then move the result onto `path` in one step."""
    with atomic_path(path) as temp:
        writer(temp)
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    """JSON, atomically; names that are not valid UTF-8 survive as \\udcXX escapes (os.fsencode restores them)."""
    return write_atomic(path, lambda temp: temp.write_text(json.dumps(data, indent=2) + "\n"))


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON object from `path`; {} when the file is missing, unreadable, not JSON or not an object (for
    optional files such as a run's report.json, whose absence is an answer, not an error)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Text as UTF-8, atomically; undecodable bytes of file names are written back as the original bytes."""
    return write_atomic(path, lambda temp: temp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def remove_stale_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Remove this tool's temp files and folders in `folder` (left by a killed run): those of output `name`, or
    all of them. Call only while holding the lock of what they belong to."""
    pattern = f".{glob.escape(name)}.*{TEMP_SUFFIX}" if name is not None else f".*{TEMP_SUFFIX}"
    try:
        candidates = list(folder.glob(pattern))
    except OSError:
        return []
    for stale in candidates:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
    return candidates


def probe_folder(folder: Path) -> None:
    """Create and remove a temp file in `folder`: the one test of writability that also holds for root (which
    ignores mode bits) and for read-only mounts. Raises the OSError."""
    _new_temp_file(folder / "probe").unlink()


def check_writable(path: str | os.PathLike, flag: str) -> Path:
    """Fail before any work when `path` cannot be written: its folder cannot be made or does not take files."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {display(path)}: is a folder; name a file")
    make_parent(path, flag)
    try:
        probe_folder(path.parent)
    except OSError as exc:
        raise OutputError(f"{flag} {os_error_message(exc, path.parent)}") from None
    return path


# --- one writer per output ---------------------------------------------------------------------------------------
class Lock:
    """An exclusive `fcntl.flock` on a lock file, released by the OS when the holder dies (so never stale).

    The file holds the holder's pid, host and command for the message a second writer gets.
    """

    def __init__(self, lock_path: Path, what: str):
        self.lock_path, self.what, self.handle = Path(lock_path), what, None

    def acquire(self) -> Lock:
        for _ in range(20):
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise OutputError(os_error_message(exc, self.lock_path.parent)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.what} is in use by another transfer process ({holder}); wait for it "
                                      f"to finish or choose another output") from None
                raise OutputError(os_error_message(exc, self.lock_path)) from None
            if _same_file(fd, self.lock_path):  # not unlinked by a releasing holder meanwhile
                os.ftruncate(fd, 0)
                os.write(fd, _holder_text().encode())
                self.handle = fd
                return self
            os.close(fd)
        raise OutputError(f"{self.what}: could not take its lock {self.lock_path}")

    def release(self, remove: bool = True) -> None:
        if self.handle is None:
            return
        if remove:
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        os.close(self.handle)
        self.handle = None

    def __enter__(self) -> Lock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _holder_text() -> str:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:3]]) if sys.argv and sys.argv[0] else "python"
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()}, '{command}', since {started}"


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 512).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


@contextmanager
def output_lock(path: str | os.PathLike, flag: str = "--output") -> Iterator[Path]:
    """Hold `path`'s lock (`.NAME.lock` beside it) while writing it; stale temps of a killed writer are removed."""
    path = Path(path)
    check_writable(path, flag)
    lock = Lock(path.with_name(f".{path.name}.lock"), f"{flag} {display(path)}")
    with lock:
        remove_stale_temps(path.parent, path.name)
        yield path
