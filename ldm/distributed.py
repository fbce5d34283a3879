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
from pathlib import Path

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

    def owns(self, item) -> bool:
        """Whether this rank makes `item`: every world_size-th by global index, so shares are equal."""
        return item.index % self.world_size == self.rank

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

    def failures(self, error: BaseException | None) -> list[tuple[int, str]]:
        """(rank, message) of every rank that failed, each rank passing its own error or None.

        A collective: every rank calls it at the same points of the run, failed or not, so a
        failure reaches every rank at the next such point instead of leaving them waiting for
        a rank that is gone."""
        mine = None if error is None else (" ".join(str(error).split()) or type(error).__name__)
        if not self.active:
            return [] if mine is None else [(self.rank, mine)]
        every = [None] * self.world_size
        torch.distributed.all_gather_object(every, mine)
        return [(rank, message) for rank, message in enumerate(every) if message is not None]

    def max_over_ranks(self, n: int) -> int:
        """The largest of every rank's `n` (a collective), `n` alone."""
        if not self.active:
            return n
        every = [None] * self.world_size
        torch.distributed.all_gather_object(every, n)
        return max(every)

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
    # torch.distributed.nn's functions take `group=group.WORLD` as a default argument, evaluated when the
    # module is first imported (the model's libraries import it while loading): imported after the group
    # starts, ten default arguments hold the group, destroy_process_group cannot free it, and gloo's
    # threads live on into the interpreter's exit, where one of them freeing a finished gather's tensors
    # aborts the process ("terminate called without an active exception", about 1 run in 50 with
    # other work on the cores). Imported first, those defaults are None.
    import torch.distributed.nn  # noqa: F401

    torch.distributed.init_process_group(backend, timeout=TIMEOUT)
    log.info("rank %d of %d (%s backend)", world.rank, world.world_size, backend)
    return world


class Job:
    """A run whose samples are named by global image index (`samples/<k:05d>.png`), so that it can
    be split among torchrun's processes and resumed: the file of image k is the same whatever the
    number of processes, and `--resume` skips the images whose file is already a valid PNG."""

    def __init__(self, plan, sample_dir, resume, world, check_files=True):
        from . import images as imagelib

        self.world, self.sample_dir = world, sample_dir
        self.skipped = []  # items whose valid file was found (--resume)
        self.plan = []  # this rank's batches of the items still to make
        for items in plan:
            mine = []
            for item in items:
                path = self.path(item)
                if check_files and path.exists():
                    if not resume:
                        raise ValueError(f"{path} already exists: --resume finishes that job, or use a new --outdir")
                    if imagelib.is_valid_png(path):
                        self.skipped.append(item)
                        continue
                if world.owns(item):
                    mine.append(item)
            if mine:
                self.plan.append(mine)
        world.barrier()  # every rank has looked before any rank writes

    def path(self, item) -> Path:
        return self.sample_dir / f"{item.index:05d}.png"
