"""One error hierarchy: the CLI turns every `TransferError` into exit code 2 and a one-line message."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class TransferError(Exception):
    """An error the user caused (bad flag, bad file, bad name); reported without a traceback."""



def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (or its type's name when it has none), terminal colour codes
    removed (the dynamo exporter colours its messages): one-line errors."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UnknownNameError(TransferError, KeyError):
    """A backbone or layer name that does not exist; the message lists the closest valid names."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name = kind, name
        self.suggestions = closest(name, valid)
        hint = f"; did you mean {', '.join(repr(s) for s in self.suggestions)}?" if self.suggestions else ""
        super().__init__(f"unknown {kind} {name!r}{hint}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class WeightsError(TransferError):
    """Pretrained weights are missing, unreadable, unsafe or do not fit the model."""


class DataError(TransferError):
    """A data folder or image that cannot be used (missing, empty class, single class, unreadable in strict mode)."""


class ExportError(TransferError):
    """An ONNX export request that cannot be honoured."""


class DeviceError(TransferError):
    """A requested device or execution provider is not available."""


class OptionError(TransferError):
    """A flag or argument out of range, of the wrong kind, or contradicting another one."""


class ResourceError(TransferError):
    """The machine lacks what a request needs (memory for a model's weights, say); the message says how much."""


class RunDamagedError(TransferError):
    """A run directory whose files cannot be read back (truncated, corrupt, unsafe or malformed)."""

    def __init__(self, run_dir, file: str, reason: str):
        super().__init__(f"{run_dir} is damaged: {file}: {reason}")


class VerificationError(Exception):
    """An exported model disagrees with PyTorch beyond the tolerance: a defect, exit code 1."""


class PeerLostError(Exception):
    """Under torchrun, another process stopped answering within the timeout: exit code 1, checkpoints kept."""


class NonFiniteLossError(Exception):
    """Training produced a NaN or infinite loss: exit code 1, the last good checkpoint is kept."""


def closest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The valid names nearest to `name`, best first (case-insensitive)."""
    valid = list(valid)
    by_lower = {v.lower(): v for v in valid}
    matches = difflib.get_close_matches(name.lower(), list(by_lower), n=n, cutoff=0.6)
    return [by_lower[m] for m in matches]
