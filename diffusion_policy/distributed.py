"""Ranks, devices and gathering under ``torchrun``, shared by dp-train and dp-eval: every
process reads its place from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), takes
the GPU of its local rank, and hands its part of a result to rank 0 through :func:`gather`."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

PART_WAIT_S = 3600.0  # how long rank 0 waits for the other ranks' part files


class GatherError(RuntimeError):
    """Parts that cannot be collected; the message says which and where they were expected."""


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


def gather(part: dict, rank: int, world: int, part_dir: Path | None = None, since: float = 0.0,
           wait_s: float = PART_WAIT_S) -> list | None:
    """Every rank's ``part`` (a JSON-able dict), in rank order.

    One rank: ``[part]``. torch.distributed initialized: ``all_gather_object``, and every rank
    gets the list. Otherwise through files (ranks started without a process group, e.g. one
    ``dp-eval`` per GPU by hand): each rank writes ``part_dir/rank<r>.json`` atomically, rank 0
    waits for all of them (written at or after ``since`` - 60 s, so a crashed earlier run's files
    are not taken), reads and removes them and returns the list; the other ranks get None.
    """
    if world == 1:
        return [part]
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, part)
        return parts
    if part_dir is None:
        raise GatherError(f"world={world} needs torch.distributed initialized (or a folder for part files)")
    part_dir = Path(part_dir)
    part_dir.mkdir(parents=True, exist_ok=True)
    tmp = part_dir / f".rank{rank:03d}.json.tmp"
    tmp.write_text(json.dumps(part))
    tmp.replace(part_dir / f"rank{rank:03d}.json")  # atomic: rank 0 never reads half a file
    if rank != 0:
        return None
    paths = [part_dir / f"rank{r:03d}.json" for r in range(world)]
    deadline = time.time() + wait_s
    while not all(p.is_file() and p.stat().st_mtime >= since - 60 for p in paths):
        if time.time() > deadline:
            missing = [p.name for p in paths if not p.is_file()]
            raise GatherError(f"rank 0 waited {wait_s:.0f} s for parts {missing} in {part_dir}")
        time.sleep(0.5)
    parts = [json.loads(p.read_text()) for p in paths]
    for p in paths:
        p.unlink()
    try:
        part_dir.rmdir()
    except OSError:  # something else is in there: leave it
        pass
    return parts
