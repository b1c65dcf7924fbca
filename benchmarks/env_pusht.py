"""Speed of dp/PushT-v0 / v1 and quality of the scripted expert, clean or with DART noise.

    MUJOCO_GL=egl python benchmarks/env_pusht.py                 # speeds + expert on seeds 0..99 (v1)
    MUJOCO_GL=egl python benchmarks/env_pusht.py --seeds 20 --no-speed
    MUJOCO_GL=egl python benchmarks/env_pusht.py --env-id dp/PushT-v0 --dart-noise 0.02 --no-speed

Environment steps per second on one core with random actions (resets included), for each
observation mode (image: 96x96 rendered by EGL on the CPU here). Then the expert (keypoint
observations) on seeds ``--start .. --start+--seeds-1`` of the collection range, driven by
``diffusion_policy.collect.run_episode`` exactly as ``dp-collect`` drives it (``--dart-noise``:
``dp-collect dart_noise=...``, every episode perturbed): success rate (coverage >= 0.95 within 300
steps) with its 95% Wilson interval, final coverage, steps of the successful episodes, seconds per
episode (expert planning + simulation), and where the block went:

- left the table: episodes in which some point of the block's outline was outside the table
  ``[-0.25, 0.25]^2`` at some step (on v0 nothing brings it back; v1's walls stop it there);
- pose cells: the distinct cells of a grid over the block's pose (x, y in 2 cm, angle in 15 degree
  bins) visited by all episodes together, a measure of the states the demonstrations cover; and
  the standard deviation of the visited block positions.

Results are recorded in benchmarks/env_pusht.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

from diffusion_policy.collect import make_env, run_episode
from diffusion_policy.config import COLLECT_SEED_BASE
from diffusion_policy.report import wilson_interval

from envbench import steps_per_second

TABLE = 0.25  # half-width of the table: v1's walls start here
CELL, ANGLE_BINS = 0.02, 24  # pose grid: 2 cm x 2 cm x 15 degrees


def block_poses(keypoints: np.ndarray) -> np.ndarray:
    """Block poses (x, y, angle) from flattened keypoints ``(T, 18)``: the rigid transform of the
    T's local keypoints that fits them (2-D Kabsch), ``(T, 3)``."""
    from envs.pusht import KEYPOINTS_LOCAL

    pts = keypoints.reshape(len(keypoints), -1, 2).astype(np.float64)
    local = KEYPOINTS_LOCAL - KEYPOINTS_LOCAL.mean(axis=0)
    centred = pts - pts.mean(axis=1, keepdims=True)
    # angle maximising sum <R(a) local_i, centred_i>: atan2 of the summed cross and dot products
    cross = (local[None, :, 0] * centred[..., 1] - local[None, :, 1] * centred[..., 0]).sum(axis=1)
    dot = (local[None] * centred).sum(axis=(1, 2))
    angle = np.arctan2(cross, dot)
    c, s = np.cos(angle), np.sin(angle)
    mean_local = KEYPOINTS_LOCAL.mean(axis=0)
    rotated = np.stack([c * mean_local[0] - s * mean_local[1], s * mean_local[0] + c * mean_local[1]], axis=1)
    return np.concatenate([pts.mean(axis=1) - rotated, angle[:, None]], axis=1)


def expert_quality(env_id: str, start: int, n_seeds: int, dart_noise: float, verbose: bool) -> dict:
    from envs.experts import make_expert

    env = make_env(env_id, {"obs_mode": "keypoints"}, 300)
    expert = make_expert("pusht")
    rows, poses = [], []
    for i in range(start, start + n_seeds):
        r = run_episode(env, expert, COLLECT_SEED_BASE + i, dart_noise=dart_noise)
        u = env.unwrapped
        cov = u.coverage()
        kp = np.concatenate([r["data"]["keypoint"], u.keypoints().reshape(1, -1)])  # every step + last
        extent = float(np.abs(kp).max())  # the outline's corners are among the keypoints
        poses.append(block_poses(kp))
        rows.append({"seed": i, "success": r["success"], "steps": r["steps"], "seconds": r["seconds"],
                     "coverage": cov, "strategy": expert.strategy, "extent": extent,
                     "left_table": extent > TABLE})
        if verbose:
            print(f"seed {i:4d} {expert.strategy:16s} success={r['success']!s:5s} steps={r['steps']:3d} "
                  f"coverage={cov:.3f} extent={extent:.3f} {r['seconds']:.2f}s", flush=True)
    env.close()
    ok = [r for r in rows if r["success"]]
    names = sorted({r["strategy"] for r in rows})
    allp = np.concatenate(poses)
    cells = {(int(np.floor(x / CELL)), int(np.floor(y / CELL)),
              int(np.floor((a + np.pi) / (2 * np.pi) * ANGLE_BINS)) % ANGLE_BINS) for x, y, a in allp}
    lo, hi = wilson_interval(len(ok), n_seeds)
    return {
        "env_id": env_id, "dart_noise": dart_noise, "n": n_seeds, "successes": len(ok),
        "success": len(ok) / n_seeds, "wilson95": [lo, hi],
        "coverage": float(np.mean([r["coverage"] for r in rows])),
        "steps": float(np.mean([r["steps"] for r in ok])) if ok else float("nan"),
        "steps_median": float(np.median([r["steps"] for r in ok])) if ok else float("nan"),
        "steps_max": max(r["steps"] for r in ok) if ok else 0,
        "seconds": float(np.mean([r["seconds"] for r in rows])),
        "seconds_max": float(np.max([r["seconds"] for r in rows])),
        "left_table": sum(r["left_table"] for r in rows),
        "max_extent": max(r["extent"] for r in rows),
        "pose_cells": len(cells), "pose_steps": len(allp),
        "xy_std": [float(v) for v in allp[:, :2].std(axis=0)],
        "failed": [r["seed"] for r in rows if not r["success"]],
        "strategies": {s: sum(r["strategy"] == s for r in rows) for s in names},
        "episodes": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="dp/PushT-v1", help="dp/PushT-v1 (walls) or dp/PushT-v0")
    p.add_argument("--steps", type=int, default=3000, help="env steps timed per low-dim mode")
    p.add_argument("--image-steps", type=int, default=500, help="env steps timed in image mode")
    p.add_argument("--start", type=int, default=0, help="first seed (offset in the collect range)")
    p.add_argument("--seeds", type=int, default=100, help="expert episodes")
    p.add_argument("--dart-noise", type=float, default=0.0,
                   help="DART execution noise, fraction of the action range (dp-collect dart_noise)")
    p.add_argument("--json", default="", help="also write the expert's figures to this JSON file")
    p.add_argument("--no-speed", action="store_true", help="skip the steps-per-second timings")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per episode")
    args = p.parse_args()
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, MUJOCO_GL={os.environ.get('MUJOCO_GL')}")
    if not args.no_speed:
        print(f"{args.env_id}\n| obs_mode | env steps/s (1 core) |\n| --- | --- |")
        modes = (("state", args.steps), ("keypoints", args.steps), ("image", args.image_steps))
        for mode, n in modes:
            print(f"| {mode} | {steps_per_second(args.env_id, {'obs_mode': mode}, n):.0f} |", flush=True)
    if args.seeds > 0:
        t0 = time.perf_counter()
        q = expert_quality(args.env_id, args.start, args.seeds, args.dart_noise, args.verbose)
        q["seconds_total"] = time.perf_counter() - t0
        print(f"\nexpert pusht on {args.env_id}, DART noise {args.dart_noise}, seeds {args.start}.."
              f"{args.start + args.seeds - 1} ({q['seconds_total']:.0f} s in all)")
        print("| episodes | success [95% Wilson] | mean final coverage | steps (successes, mean / median / max) "
              "| s / episode (mean / max) | left the table | pose cells | block x, y std (m) |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| {q['n']} | {q['success']:.2f} [{q['wilson95'][0]:.2f}, {q['wilson95'][1]:.2f}] "
              f"| {q['coverage']:.3f} | {q['steps']:.0f} / {q['steps_median']:.0f} / {q['steps_max']} "
              f"| {q['seconds']:.2f} / {q['seconds_max']:.2f} | {q['left_table']} (max extent "
              f"{q['max_extent']:.3f}) | {q['pose_cells']} of {q['pose_steps']} steps "
              f"| {q['xy_std'][0]:.3f}, {q['xy_std'][1]:.3f} |")
        print("strategies:", q["strategies"])
        if q["failed"]:
            print("failed seeds:", q["failed"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(q, f, indent=1)


if __name__ == "__main__":
    main()
