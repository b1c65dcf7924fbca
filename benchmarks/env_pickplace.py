"""Benchmark of dp/PickPlace-v0: simulation speed and the scripted expert's success rate.

Measures, in one process (MuJoCo steps on one thread):
1. env steps per second with random actions, ``obs_mode="state"`` and ``obs_mode="image"``
   (two 96x96 cameras rendered every step through MUJOCO_GL, EGL here);
2. the expert over seeds ``0 .. n-1`` (env seed i; the expert's stream as dp-collect seeds it)
   with state observations:
   success rate, steps per episode, wall seconds per episode;
3. the expert with image observations on the first few seeds: seconds per episode, i.e. what
   collecting image demonstrations costs.

Run: ``MUJOCO_GL=egl LP_NUM_THREADS=1 taskset -c 0 python benchmarks/env_pickplace.py``
(``LP_NUM_THREADS=1`` keeps Mesa's software rasteriser on the same single core).
Results are recorded in ``benchmarks/env_pickplace.md``.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from diffusion_policy.collect import make_env, run_episode  # noqa: E402
from envs.experts import make_expert  # noqa: E402

from envbench import steps_per_second  # noqa: E402


def expert_rollouts(obs_mode: str, seeds: range) -> dict:
    """The expert driven by ``diffusion_policy.collect.run_episode``, exactly as dp-collect drives
    it (same expert seed stream), on env seeds ``seeds``."""
    env = make_env("dp/PickPlace-v0", {"obs_mode": obs_mode}, 200)
    t0 = time.perf_counter()
    runs = [run_episode(env, make_expert("pickplace"), seed) for seed in seeds]
    dt = time.perf_counter() - t0
    env.close()
    lengths = [r["steps"] for r in runs]
    return {"success_rate": float(np.mean([r["success"] for r in runs])),
            "failed_seeds": [r["seed"] for r in runs if not r["success"]],
            "mean_len": float(np.mean(lengths)), "max_len": int(np.max(lengths)),
            "s_per_episode": dt / len(runs), "steps_per_s": float(np.sum(lengths)) / dt}


def gl_renderer_name() -> str:
    """The OpenGL renderer string (e.g. llvmpipe = Mesa on the CPU)."""
    try:
        import mujoco
        from OpenGL import GL

        ctx = mujoco.GLContext(8, 8)
        ctx.make_current()
        name = GL.glGetString(GL.GL_RENDERER).decode()
        ctx.free()
        return name
    except Exception as e:  # informational only
        return f"unknown ({e})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="random-action steps per obs mode")
    p.add_argument("--seeds", type=int, default=100, help="expert episodes, seeds 0..n-1")
    p.add_argument("--image-seeds", type=int, default=10, help="expert episodes with images")
    args = p.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"affinity {sorted(os.sched_getaffinity(0))}, python {platform.python_version()}")
    print(f"MUJOCO_GL={os.environ['MUJOCO_GL']}, GL renderer: {gl_renderer_name()}, "
          f"LP_NUM_THREADS={os.environ.get('LP_NUM_THREADS', 'unset')}")
    for mode, n in (("state", args.steps), ("image", args.steps // 4)):
        sps = steps_per_second("dp/PickPlace-v0", {"obs_mode": mode}, n)
        print(f"random actions, obs_mode={mode}: {sps:.0f} env steps/s")
    r = expert_rollouts("state", range(args.seeds))
    print(f"expert, obs_mode=state, seeds 0..{args.seeds - 1}: success {r['success_rate']:.1%} "
          f"(failed: {r['failed_seeds']}), steps/episode mean {r['mean_len']:.1f} max "
          f"{r['max_len']}, {r['s_per_episode']:.3f} s/episode, {r['steps_per_s']:.0f} steps/s")
    r = expert_rollouts("image", range(args.image_seeds))
    print(f"expert, obs_mode=image, seeds 0..{args.image_seeds - 1}: success "
          f"{r['success_rate']:.1%}, {r['s_per_episode']:.2f} s/episode, "
          f"{r['steps_per_s']:.0f} steps/s")


if __name__ == "__main__":
    main()
