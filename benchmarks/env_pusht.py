"""Speed of dp/PushT-v0 and quality of its scripted expert.

    MUJOCO_GL=egl python benchmarks/env_pusht.py                 # speeds + expert on seeds 0..99
    MUJOCO_GL=egl python benchmarks/env_pusht.py --seeds 20 --no-speed

Environment steps per second on one core with random actions (resets included), for each
observation mode (image: 96x96 rendered by EGL on the CPU here). Then the expert (``task=pusht``,
keypoint observations) on seeds ``--start .. --start+--seeds-1`` of the collection range, driven
by ``diffusion_policy.collect.run_episode`` exactly as ``dp-collect`` drives it: success rate
(coverage >= 0.95 within 300 steps), final and best coverage, steps of the successful episodes and
seconds per episode (expert planning + simulation). Results are recorded in benchmarks/env_pusht.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

from diffusion_policy.collect import make_env, run_episode
from diffusion_policy.config import COLLECT_SEED_BASE
from envbench import steps_per_second


def expert_quality(start: int, n_seeds: int, verbose: bool) -> dict:
    from envs.experts import make_expert

    env = make_env("dp/PushT-v0", {"obs_mode": "keypoints"}, 300)
    expert = make_expert("pusht")
    rows = []
    for i in range(start, start + n_seeds):
        r = run_episode(env, expert, COLLECT_SEED_BASE + i)
        u = env.unwrapped
        cov = u.coverage()
        rows.append({"seed": i, "success": r["success"], "steps": r["steps"],
                     "seconds": r["seconds"], "coverage": cov, "strategy": expert.strategy})
        if verbose:
            print(f"seed {i:4d} {expert.strategy:16s} success={r['success']!s:5s} "
                  f"steps={r['steps']:3d} coverage={cov:.3f} {r['seconds']:.2f}s", flush=True)
    env.close()
    ok = [r for r in rows if r["success"]]
    names = sorted({r["strategy"] for r in rows})
    strategies = {s: sum(r["strategy"] == s for r in rows) for s in names}
    return {
        "n": n_seeds, "success": len(ok) / n_seeds,
        "coverage": float(np.mean([r["coverage"] for r in rows])),
        "steps": float(np.mean([r["steps"] for r in ok])) if ok else float("nan"),
        "steps_max": max(r["steps"] for r in ok) if ok else 0,
        "seconds": float(np.mean([r["seconds"] for r in rows])),
        "seconds_max": float(np.max([r["seconds"] for r in rows])),
        "failed": [r["seed"] for r in rows if not r["success"]],
        "strategies": strategies,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="env steps timed per low-dim mode")
    p.add_argument("--image-steps", type=int, default=500, help="env steps timed in image mode")
    p.add_argument("--start", type=int, default=0, help="first seed (offset in the collect range)")
    p.add_argument("--seeds", type=int, default=100, help="expert episodes")
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
        print("| obs_mode | env steps/s (1 core) |\n| --- | --- |")
        modes = (("state", args.steps), ("keypoints", args.steps), ("image", args.image_steps))
        for mode, n in modes:
            print(f"| {mode} | {steps_per_second('dp/PushT-v0', {'obs_mode': mode}, n):.0f} |", flush=True)
    if args.seeds > 0:
        t0 = time.perf_counter()
        q = expert_quality(args.start, args.seeds, args.verbose)
        print(f"\nexpert pusht, seeds {args.start}..{args.start + args.seeds - 1} "
              f"({time.perf_counter() - t0:.0f} s in all)")
        print("| episodes | success | mean final coverage | steps (successes, mean / max) "
              "| s / episode (mean / max) | strategies |\n| --- | --- | --- | --- | --- | --- |")
        print(f"| {q['n']} | {q['success']:.2f} | {q['coverage']:.3f} | {q['steps']:.0f} / "
              f"{q['steps_max']} | {q['seconds']:.2f} / {q['seconds_max']:.2f} "
              f"| {q['strategies']} |")
        if q["failed"]:
            print("failed seeds:", q["failed"])


if __name__ == "__main__":
    main()
