"""Ranks and devices under ``torchrun``, shared by dp-train and dp-eval: every process reads
its place from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and takes the GPU
of its local rank."""
from __future__ import annotations

import os

import torch


def rank_world() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)``: from torch.distributed when it is initialized, else
    from torchrun's variables (``(0, 1, 0)`` for a plain process)."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), local_rank


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU if CUDA is there, else the CPU; ``cuda`` -> this rank's GPU;
    ``cpu`` or ``cuda:N`` as given. Asking for CUDA where there is none is an error."""
    from diffusion_policy.config import ConfigError

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; expected device=cpu or auto")
    if name == "cuda":
        name = f"cuda:{local_rank % torch.cuda.device_count()}"
    return torch.device(name)
