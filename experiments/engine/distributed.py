"""One run on several processes: ``torchrun --nproc_per_node=N experiments/<paper>.py with ...``.

torchrun starts N copies of the script with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set. Each copy joins one
process group (gloo for CPU tensors, NCCL for CUDA ones), takes the same run uid as rank 0, trains its shard of
every global batch (``data.batch_size`` is the global batch) under ``DistributedDataParallel``, and only rank 0
observes the run and writes its folder. Without torchrun everything here is a no-op: one process, rank 0.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map


def world_size() -> int:
    """Processes in this run (1 unless started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that observes the run and writes its files."""
    return rank() == 0


def active() -> bool:
    """A process group of more than one process is up."""
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def init() -> None:
    """Join torchrun's process group once (CPU tensors over gloo, CUDA tensors over NCCL when there is a GPU)."""
    if world_size() > 1 and not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)


def device_for(device: torch.device) -> torch.device:
    """Each process its own GPU (``cuda:LOCAL_RANK``) under torchrun; other devices as they are."""
    if active() and device.type == "cuda":
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return device


def same_on_all_ranks(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (the run uid, so all ranks name one run)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(batch: Any) -> Any:
    """This rank's slice of a global batch (every tensor in a pytree, along dim 0; ranks take equal contiguous
    parts, the first ones one more when the batch does not divide)."""
    if not active():
        return batch
    n, r = world_size(), rank()

    def part(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        size, extra = divmod(len(t), n)
        start = r * size + min(r, extra)
        return t[start:start + size + (r < extra)]

    return tree_map(part, batch)


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place; the tensor itself when alone)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks, so a statistic of each rank's shard becomes the global batch's (equal shards)."""
    return all_sum(t) / world_size() if active() else t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one (a stop request reaches ranks at different steps)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def share_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every rank: each rank's last forward moved its own,
    and evaluation must see the same network everywhere (rank 0's is the one saved)."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def group() -> Iterator[None]:
    """The process group for the body of a run started by torchrun, torn down afterwards."""
    init()
    try:
        yield
    finally:
        if active():
            dist.destroy_process_group()
