"""A run's weights and checkpoint on disk, written atomically (temp file, then `os.replace`) as timm's saver does.

best.safetensors holds the best weights (safetensors: no code runs on load); last.ckpt holds everything --resume
needs and is read with `weights_only=True`. A damaged file is a `RunDamagedError` naming it, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from transfer.core.errors import RunDamagedError, TransferError, first_line
from transfer.core.io import atomic_path, display


def save_weights(model: nn.Module, path: Path) -> None:
    save_tensors(model.state_dict(), path)


def save_tensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = _unshared({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    with atomic_path(path) as temp:
        save_file(tensors, str(temp))


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tied weights (CoaT shares one convolution between stages) copied apart: safetensors refuses shared memory."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        result[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return result


def load_weights(model: nn.Module, path: Path) -> None:
    """best.safetensors into `model`; unreadable or mismatched weights are a `RunDamagedError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=str(next(model.parameters()).device))
        model.load_state_dict(state)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise RunDamagedError(display(path.parent), path.name, first_line(exc)) from None



STATE_KEYS = ("stage_index", "stage_epoch", "epoch", "best_val_loss", "best_val_acc", "bad_epochs")


def checkpoint_payload(model: nn.Module, optimizer, scheduler, state: dict, ema: nn.Module | None = None) -> dict:
    """What last.ckpt holds: weights, optimizer, scheduler, position in the schedule, RNG, and the EMA weights with
    --ema (references to the live tensors: write it, or copy it, before training goes on)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(), **{key: state[key] for key in STATE_KEYS},
            "best_source": state.get("best_source", "model"), **({"ema": ema.state_dict()} if ema else {})}


def write_checkpoint(path: Path, payload: dict) -> None:
    """last.ckpt, atomically; readable with weights_only=True."""
    with atomic_path(path) as temp:
        torch.save(payload, temp)


def load_checkpoint(path: Path) -> dict:
    """last.ckpt with `weights_only=True`; a truncated, corrupt or unsafe file is a `RunDamagedError`."""
    import pickle

    run_dir = display(path.parent)
    if not path.is_file():
        raise TransferError(f"--resume {run_dir}: no checkpoint ({path.name}); the run never finished an epoch, so "
                            "start it again without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RunDamagedError(run_dir, path.name, "not a plain checkpoint: it holds Python objects besides tensors, "
                                                  "and loading it could run code, so it is refused") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
        detail = first_line(exc).split(". ")[0]
        raise RunDamagedError(run_dir, path.name, f"truncated or corrupt ({detail})") from None
    missing = [key for key in ("model", "optimizer", "scheduler", *STATE_KEYS) if not isinstance(state, dict)
               or key not in state]
    if missing:
        raise RunDamagedError(run_dir, path.name, f"missing {', '.join(missing)}")
    return state

