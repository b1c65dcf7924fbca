"""Windows per second on one CPU core, batch size 256.

    python benchmarks/data_windows.py [--repeats 5] [--seconds 2]

Two datasets, written to a temporary store and read back through :class:`EpisodeStore`:
- low-dim: 20-dim observation, 2-dim action, H=16, To=2, Ta=8, 200 episodes of 150-250 steps;
- image: one 96x96 RGB camera held in memory (``cache_images=True``) plus a 2-dim agent position,
  same horizons, 40 episodes of 100-150 steps.
- the same image store read lazily from disk (``cache_images=False``; informational, one path).
For each, three paths: ``WindowSampler.gather`` (numpy), ``WindowDataset.__getitems__`` (torch
tensors) and a full DataLoader pass from :func:`make_loader` (random batches, num_workers=0).
Each figure is the median of ``--repeats`` runs of ``--seconds`` seconds.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
import time

import numpy as np
import torch

from diffusion_policy.data.store import EpisodeStore
from diffusion_policy.data.windows import WindowDataset, WindowSampler, make_loader

B, H, TO, TA = 256, 16, 2, 8


def build(path, n_episodes, lo, hi, image: bool, seed=0):
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path)
    for _ in range(n_episodes):
        n = int(rng.integers(lo, hi))
        ep = {"action": rng.normal(size=(n, 2)).astype(np.float32)}
        if image:
            ep["agent_pos"] = rng.normal(size=(n, 2)).astype(np.float32)
            ep["image"] = rng.integers(0, 256, size=(n, 96, 96, 3), dtype=np.uint8)
        else:
            ep["state"] = rng.normal(size=(n, 20)).astype(np.float32)
        store.add_episode(ep)
    return EpisodeStore.open(path, cache_images=True)


def rate(fn, seconds: float) -> float:
    """Windows per second of fn() (one batch per call)."""
    fn()  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * B / (time.perf_counter() - t0)


def measure(store, obs_keys, seconds, lazy=False):
    sampler = WindowSampler(store.episode_ends, H, TO, TA)
    ds = WindowDataset(store, sampler, obs_keys)
    rng = np.random.default_rng(0)
    arrays = ds.arrays
    out = {
        "gather (numpy)": rate(lambda: sampler.gather(arrays, rng.integers(0, len(sampler), B),
                                                      obs_keys), seconds)}
    if lazy:
        return len(sampler), out
    out.update({
        "dataset.__getitems__ (torch)": rate(
            lambda: ds.__getitems__(rng.integers(0, len(ds), B).tolist()), seconds)})
    loader = make_loader(ds, batch_size=B, shuffle=True, seed=0)
    it = iter(loader)

    def next_batch():
        nonlocal it
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)

    out["DataLoader (make_loader)"] = rate(next_batch, seconds)
    return len(sampler), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in model.splitlines() if "Model name" in l), "?")
    print(f"# {platform.node()}: {model}, {os.cpu_count()} cores; pinned to 1, torch threads 1")
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "low-dim (20-dim obs, 2-dim action)": (build(f"{tmp}/low.zarr", 200, 150, 250, False),
                                                  ["state"]),
            "image 96x96 RGB in memory (+2-dim pos)": (build(f"{tmp}/img.zarr", 40, 100, 150, True),
                                                      ["image", "agent_pos"]),
        }
        cases["image read lazily from disk (Blosc lz4, 4 frames/chunk)"] = (
            EpisodeStore.open(f"{tmp}/img.zarr"), ["image", "agent_pos"])
        for name, (store, keys) in cases.items():
            lazy = not store.cache_images and "image" in keys
            runs = [measure(store, keys, args.seconds, lazy) for _ in range(args.repeats)]
            n_windows = runs[0][0]
            print(f"\n{name}: {store.n_episodes} episodes, {store.n_steps} steps, "
                  f"{n_windows} windows, B={B}, H={H}, To={TO}")
            for path in runs[0][1]:
                values = [r[1][path] for r in runs]
                print(f"  {path:32s} median {np.median(values):>12,.0f} windows/s  "
                      f"(runs: {', '.join(f'{v:,.0f}' for v in values)})")


if __name__ == "__main__":
    main()
