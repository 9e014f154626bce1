"""torch.distributed for ``torchrun``: start/stop the process group, rank facts, gathering Python objects.

One process per device; ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``.
NCCL on CUDA, gloo on CPU. Without those variables everything here is a single-process no-op.
Not here: the loop (``train``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world_size``; ``local_rank`` picks its GPU;
    ``local_world_size`` processes run on this machine (torchrun's ``--nproc-per-node``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def machines(self) -> int:
        """Machines (torchrun nodes) taking part, each with ``local_world_size`` processes."""
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """True on the process that writes files and prints."""
        return self.rank == 0


def setup(device_type: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a single-process Dist."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))),
    )


def teardown(state: Dist) -> None:
    """Leave the process group (if this module joined one)."""
    if state.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def all_gather_objects(state: Dist, obj) -> list:
    """Every process's ``obj`` (picklable plain data), in rank order; ``[obj]`` when single-process."""
    if not state.enabled:
        return [obj]
    import torch.distributed as dist

    out = [None] * state.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(state: Dist, values: list[float]) -> list[float]:
    """The mean over processes of a few floats (losses for the log)."""
    if not state.enabled:
        return values
    return [sum(parts) / state.world_size for parts in zip(*all_gather_objects(state, values), strict=True)]


def broadcast_buffers(state: Dist, model) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics), so that all ranks hold one model."""
    if state.enabled:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def barrier(state: Dist) -> None:
    """Wait for every process."""
    if state.enabled:
        import torch.distributed as dist

        dist.barrier()
