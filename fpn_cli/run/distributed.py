"""Sharding for job arrays and torchrun: which images this process owns, and the final barrier.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment, WORLD_SIZE > 1) each rank
is one shard; torch.distributed (gloo on the CPU, nccl on GPUs) provides the final barrier, after
which rank 0 merges the shards' reports. Job arrays without torch.distributed (``--shard I/N``)
merge when the last shard finishes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_launch() -> Launch | None:
    """The torchrun environment of this process, or None when not launched by torchrun. A job of
    one process runs as any other (process group, barrier, merged report)."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    if world < 1:
        return None
    return Launch(rank, world, int(os.environ.get("LOCAL_RANK", "0")))


def is_rank_zero() -> bool:
    """False only in a torchrun rank other than 0: what one process of a job shows (the progress
    bar) is shown once."""
    launch = torchrun_launch()
    return launch is None or launch.rank == 0


def combine(shard: tuple[int, int] | None, launch: Launch | None) -> tuple[int, int] | None:
    """``--shard I/N`` under torchrun splits shard I further among the ranks: (I*W + rank, N*W)."""
    if launch is None:
        return shard
    index, count = shard or (0, 1)
    return index * launch.world_size + launch.rank, count * launch.world_size


class ProcessGroup:
    """torch.distributed for the length of a run: opened on entry, a barrier, closed on exit."""

    def __init__(self, launch: Launch, device: torch.device, timeout_s: float = 3600) -> None:
        self.rank = launch.rank
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.timeout = timedelta(seconds=timeout_s)
        self.device = device

    def __enter__(self) -> ProcessGroup:
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=self.timeout)
        return self

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def __exit__(self, *exc) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
