"""Run by the distributed tests under `torchrun --nproc-per-node N`: a few steps of fine-tuning through the library.

`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_job.py DATA RUN [STOP_AFTER]`
fine-tunes efficientnet_lite0 at 32 px with augmentation and dropout off (the settings under which any number of
processes gives the same weights); with STOP_AFTER it is interrupted after that epoch, as Ctrl-C would.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.distributed_settings import CONFIG  # noqa: E402
from transfer.train import finetune  # noqa: E402


def main() -> int:
    data, run = sys.argv[1], sys.argv[2]
    stop_after = int(sys.argv[3]) if len(sys.argv) > 3 else None

    def stop(row: dict) -> None:
        if stop_after is not None and row["epoch"] >= stop_after:
            raise KeyboardInterrupt

    try:
        finetune(data, CONFIG, output=run, device="cpu", log=lambda _: None, on_epoch_end=stop)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
