"""Seconds to check a 200-episode Push-T-shaped store at each depth of dp-data validate.

    python benchmarks/data_validate.py --episodes 200 --repeats 3

Builds two stores in a temporary directory with the keys and shapes of Push-T (``task=pusht``:
keypoint (9, 2), agent_pos (2,), action (2,), episode_seed; ``task=pusht_image``: image
(96, 96, 3) uint8, agent_pos, action, episode_seed), episode lengths drawn uniformly from
[100, 200] steps, written by EpisodeStore with its default chunking and codecs. Images are
synthetic (a smooth background and a moving block, compressible like a render), so compressed
sizes differ from rendered frames. Then times ``scan_store`` fast, full and with checksums
(median of ``--repeats``) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from diffusion_policy.data.cli import disk_usage
from diffusion_policy.data.integrity import scan_store
from diffusion_policy.data.store import EpisodeStore


def build(path, n_episodes: int, image: bool, seed: int = 0) -> EpisodeStore:
    rng = np.random.default_rng(seed)
    store = EpisodeStore.create(path)
    yy, xx = np.mgrid[0:96, 0:96]
    background = np.stack([xx * 2, yy * 2, np.full_like(xx, 200)], -1).astype(np.uint8)
    for i in range(n_episodes):
        n = int(rng.integers(100, 201))
        pos = np.cumsum(rng.normal(0, 3, (n, 2)), 0).astype(np.float32) + 256
        ep = {"agent_pos": pos, "action": np.roll(pos, -1, 0),
              "episode_seed": np.full(n, 10_000 + i, np.int64)}
        if image:
            frames = np.repeat(background[None], n, 0)
            for t in range(n):
                x, y = (np.clip(pos[t] / 512 * 96, 0, 80)).astype(int)
                frames[t, y:y + 16, x:x + 16] = (40, 40, 40)
            ep["image"] = frames
        else:
            ep["keypoint"] = (pos[:, None, :] + rng.normal(0, 20, (1, 9, 2))).astype(np.float32)
        store.add_episode(ep)
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("| store | steps | chunk files | on disk | fast s | full s | checksums s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, image in (("Push-T low-dim", False), ("Push-T image 96x96", True)):
            path = f"{tmp}/{'img' if image else 'low'}.zarr"
            t0 = time.perf_counter()
            store = build(path, args.episodes, image)
            built = time.perf_counter() - t0
            times, chunks = {}, 0
            for mode, kw in (("fast", {}), ("full", {"full": True}), ("checksums", {"checksums": True})):
                runs = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    report = scan_store(path, **kw)
                    runs.append(time.perf_counter() - t)
                    assert report.ok, report.errors
                    chunks = report.chunks
                times[mode] = float(np.median(runs))
            size = disk_usage(path) / 2**20
            print(f"| {name} | {store.n_steps} | {chunks} | {size:.1f} MiB | {times['fast']:.3f} | "
                  f"{times['full']:.3f} | {times['checksums']:.3f} |  (built in {built:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
