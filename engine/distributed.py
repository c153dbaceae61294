"""Thin helpers over ``torch.distributed`` for runs launched with ``torchrun``.

No distribution layer of our own: ``torchrun`` sets the environment, PyTorch's process
group does the work (NCCL on CUDA, gloo on CPU); these only answer "am I rank 0?" and
degrade to no-ops in a single process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "init_distributed",
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_main_process",
    "barrier",
    "all_gather_object",
    "broadcast_object",
    "all_reduce_min",
    "cleanup",
]


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine, as set by ``torchrun`` (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """True on rank 0: the one process that logs and writes files."""
    return rank() == 0


def init_distributed(device: str) -> torch.device:
    """Join the process group when launched by ``torchrun``; pick this rank's device.

    Args:
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        The device this process should use (``cuda:LOCAL_RANK`` on GPUs).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available; use --device cpu")
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if device == "cuda":
        torch.cuda.set_device(local_rank())
        target = torch.device("cuda", local_rank())
    else:
        target = torch.device("cpu")
    if launched and not is_distributed():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return target


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_min(value: int) -> int:
    """The minimum of an integer over all ranks."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_distributed():
        dist.destroy_process_group()
