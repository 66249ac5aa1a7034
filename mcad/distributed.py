"""Data parallel through torchrun (NCCL on GPUs, gloo on CPUs). Each process encodes its slice of the global batch;
embeddings are gathered with gradient (open_clip's gather_with_grad), so the contrastive and
distillation losses see the whole global batch, and DDP's gradient averaging then equals the
single-process gradient of the global-batch loss (for BatchNorm students only with synchronised
statistics: SyncBatchNorm, GPUs only; distill.recipe converts them there).

Work without gradients (`mcad cache`, the unpaired tables) is shared out instead: each process takes
whole chunks of rows (`chunk_range`), the results are gathered (`all_gather_rows`,
`all_gather_objects`), and what one process decides for all (candidate lists) is broadcast."""
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


# -- sharded work without gradients (`mcad cache`, the unpaired tables) ----------------------------------
def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def chunk_range(n: int, chunk: int) -> tuple[int, int]:
    """This process's contiguous rows [start, stop) of n rows cut into chunks of `chunk` rows (the last
    shorter): whole chunks only, as evenly as they go. Every chunk is the one a single process would
    take, so per-chunk results (a batch's embeddings) are the ones it would compute."""
    chunks = -(-int(n) // int(chunk))
    r, w = rank(), world_size()
    return min(n, (r * chunks // w) * chunk), min(n, ((r + 1) * chunks // w) * chunk)


def _comm_device() -> torch.device:
    """Where collective tensors live: this process's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of `x` (any number each, the same trailing shape and dtype) concatenated in
    rank order, on the CPU, no gradient."""
    if not dist.is_initialized():
        return x
    dev = _comm_device()
    n = torch.tensor([len(x)], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=dev)
    pad[:len(x)] = x.detach().to(dev)
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:s].cpu() for p, s in zip(parts, sizes)])


def all_gather_objects(obj) -> list:
    """Every process's picklable `obj`, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Process `src`'s picklable `obj` on every process (what the others pass is ignored)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
