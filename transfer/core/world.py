"""Running under `torchrun`, torch-free: who this process is and how work is split among the processes.

torchrun (or any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK, as torch.distributed's env:// rendezvous
expects) starts the processes; `World.from_env` reads them without importing torch, so the ONNX runtime's
`predict` can shard too. Joining the process group and the collectives (sum, gather, barrier) are torch's and live
in `transfer.training.collectives`.

The split rules, the same everywhere so that outputs never depend on the number of processes:
- a list of N items (images to extract or predict, validation images) is cut into `size` contiguous blocks,
  rank r taking block r, so concatenating the blocks in rank order gives the input order back;
- a global training batch (the 1-process run's batch, same seed, same order) is cut the same way, so
  `--batch-size` is the global batch and the learning rate means what it means in one process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from transfer.core.errors import OptionError

DEFAULT_TIMEOUT_S = 600.0  # how long a collective waits for the other processes (NCCL's own default)


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started (rank 0 of 1 when run plainly)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> World:
        """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them; a plain process is rank 0 of 1."""
        env = os.environ if environ is None else environ
        try:
            size = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise OptionError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
        if size < 1 or not 0 <= rank < size:
            raise OptionError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {size})")
        return cls(rank, size, local_rank)

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes outputs and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def block(self, count: int, rank: int | None = None) -> range:
        """Indices of rank's contiguous block of `count` items (blocks differ in length by at most one)."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(count, self.size)
        start = rank * base + min(rank, extra)
        return range(start, start + base + (1 if rank < extra else 0))

    def batch_block(self, count: int, batch_size: int) -> range:
        """This rank's items as a contiguous run of whole batches: every batch is the one a single process would
        run (same items, same batch shape), so outputs are the same bytes at any number of processes."""
        batches = self.block(-(-count // batch_size))
        return range(min(batches.start * batch_size, count), min(batches.stop * batch_size, count))

    def take(self, items: Sequence) -> list:
        """This rank's block of `items`."""
        span = self.block(len(items))
        return list(items[span.start:span.stop])


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`--shard K/N` -> (K, N): shard K (counted from 0, like RANK and SLURM_ARRAY_TASK_ID from 0) of N."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise OptionError(f"--shard {text!r}: give K/N, for example 0/4 (shard K of N, K from 0)") from None
    if count < 1 or not 0 <= index < count:
        raise OptionError(f"--shard {text}: K must be in 0..N-1")
    return index, count
