"""torch.distributed set-up: single process by default, DDP when launched by ``torchrun``.

gloo: distributed training runs on the CPU (a CUDA device trains in one process). Data is sharded by taking every world-th sample of each
global batch, so a run on N processes takes the same optimizer steps as one process (the loss is a
per-sample mean, DDP averages gradients, and the model has no batch statistics).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch of sample indices."""
        return batch[self.rank::self.size]

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world() -> World:
    """Join the process group torchrun describes in the environment (or run alone)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return World(dist.get_rank(), dist.get_world_size())


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
