"""Data parallel through torchrun (NCCL on GPUs, gloo on CPUs). Each process encodes its slice of the global batch;
embeddings are gathered with gradient (open_clip's gather_with_grad), so the contrastive and
distillation losses see the whole global batch, and DDP's gradient averaging then equals the
single-process gradient of the global-batch loss."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def backend(device: torch.device | str | None = None) -> str:
    """nccl for processes on GPUs, gloo on CPUs."""
    return "nccl" if torch.device(device or "cpu").type == "cuda" else "gloo"


def init(device: torch.device | str | None = None) -> tuple[int, int]:
    """(rank, world_size); initialises the process group (`backend(device)`) when launched by
    torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.device(device or "cpu").type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend(device))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def local_device(device: torch.device | str) -> torch.device:
    """This process's device: under torchrun each process takes the GPU of its LOCAL_RANK."""
    device = torch.device(device)
    if device.type == "cuda" and dist.is_initialized() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def local_slice(n: int) -> slice:
    if not dist.is_initialized():
        return slice(0, n)
    r, w = dist.get_rank(), dist.get_world_size()
    per = n // w
    if per * w != n:
        raise ValueError(f"global batch {n} is not divisible by {w} processes")
    return slice(r * per, (r + 1) * per)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows, keeping the gradient path to the local rows."""
    if not dist.is_initialized():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
