"""Run by the distributed tests under `torchrun --nproc-per-node N`: a few steps of fine-tuning through the library.

`python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_job.py DATA RUN [STOP_AFTER]`
fine-tunes efficientnet_lite0 at 32 px with augmentation and dropout off (the settings under which any number of
processes gives the same weights); with STOP_AFTER it is interrupted after that epoch, as Ctrl-C would.
`... DATA RUN STOP_AFTER stall TIMEOUT`: instead, rank 1 stops itself (SIGSTOP, as a hung or suspended process)
after that epoch, and the others wait at most TIMEOUT seconds for it. With TRANSFER_TEST_LABELS=FILE in the
environment the labels come from that file (several labels per image when it has them); with TRANSFER_TEST_LOG=NAME
the run logs to that tracker (`--log NAME`).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import replace  # noqa: E402

from tests.distributed_settings import CONFIG  # noqa: E402
from transfer.core.errors import PeerLostError  # noqa: E402
from transfer.training import finetune  # noqa: E402


def main() -> int:
    data, run = sys.argv[1], sys.argv[2]
    stop_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
    stall = len(sys.argv) > 4 and sys.argv[4] == "stall"
    timeout = float(sys.argv[5]) if stall else 600.0

    def stop(row: dict) -> None:
        if stop_after is None or row["epoch"] < stop_after:
            return
        if not stall:
            raise KeyboardInterrupt
        if os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGSTOP)

    labels = os.environ.get("TRANSFER_TEST_LABELS")
    config = replace(CONFIG, labels={"path": labels}) if labels else CONFIG
    if os.environ.get("TRANSFER_TEST_LOG"):
        config = replace(config, log=[os.environ["TRANSFER_TEST_LOG"]])
    try:
        finetune(data, config, output=run, device="cpu", log=lambda _: None, on_epoch_end=stop, dist_timeout=timeout)
    except KeyboardInterrupt:
        return 130
    except PeerLostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
