"""Many images across processes, GPUs and machines, on PyTorch's own distributed runtime.

Launched under `torchrun`, every process (rank) loads the model once on its own device
(`cuda:<LOCAL_RANK>` with the NCCL backend, or the CPU with gloo), takes its share of the run's
work items and writes its images. An image's seed, file name and pixels depend only on its
global index k, so the output is the same whatever the number of processes: a job's files are
named `samples/<k:05d>.png`, never by counting what is in the folder.

Without torchrun the same code runs as a world of one.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waits this long for a slow rank, no longer


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (or another launcher setting WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is up (more than one process, or a launcher asked for one)."""
        return self.launched and torch.distributed.is_available() and torch.distributed.is_initialized()

    def shard(self, items):
        """This rank's items: every world_size-th, by global index, so ranks get equal shares."""
        return [item for item in items if item.index % self.world_size == self.rank]

    def device(self, requested: str | None) -> torch.device | None:
        """The device of this rank: cuda:<local_rank> when CUDA is used, else what was requested."""
        if not self.launched:
            return torch.device(requested) if requested else None
        if requested in (None, "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device(requested or "cpu")

    def barrier(self):
        if self.active:
            torch.distributed.barrier()

    def gather(self, obj):
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); [obj] alone."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def close(self):
        if self.active:
            torch.distributed.destroy_process_group()


def world_from_env(device: str | None = None) -> World:
    """The World that the launcher's environment describes, with its process group started."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    try:
        world = World(int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"]),
                      int(os.environ.get("LOCAL_RANK", 0)), launched=True)
    except ValueError:
        raise ValueError("malformed RANK / WORLD_SIZE / LOCAL_RANK in the environment") from None
    dev = world.device(device)
    backend = "nccl" if dev is not None and dev.type == "cuda" else "gloo"
    if dev is not None and dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    log.info("rank %d of %d (%s backend)", world.rank, world.world_size, backend)
    return world
