"""Benchmark of dp/PickPlace-v0: simulation speed and the scripted expert's success rate.

Measures, in one process (MuJoCo steps on one thread):
1. env steps per second with random actions, ``obs_mode="state"`` and ``obs_mode="image"``
   (two 96x96 cameras rendered every step through MUJOCO_GL, EGL here);
2. the expert over seeds ``0 .. n-1`` (env seed i, expert rng seed i) with state observations:
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

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402,F401  (registers dp/*)
from envs.experts import make_expert  # noqa: E402


def steps_per_second(obs_mode: str, n_steps: int) -> float:
    """Random actions, resetting whenever an episode ends; reset time is included."""
    env = gym.make("dp/PickPlace-v0", obs_mode=obs_mode)
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    env.step(env.action_space.sample())  # warm-up: renderer creation, first contact allocation
    t0 = time.perf_counter()
    for _ in range(n_steps):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 5).astype(np.float32))
        if terminated or truncated:
            env.reset()
    dt = time.perf_counter() - t0
    env.close()
    return n_steps / dt


def expert_rollouts(obs_mode: str, seeds: range) -> dict:
    env = gym.make("dp/PickPlace-v0", obs_mode=obs_mode)
    expert = make_expert("pickplace")
    successes, lengths, failed = 0, [], []
    t0 = time.perf_counter()
    for seed in seeds:
        env.reset(seed=seed)
        expert.reset(env, np.random.default_rng(seed))
        steps = 0
        while True:
            _, _, terminated, truncated, info = env.step(expert.act(env))
            steps += 1
            if terminated or truncated:
                break
        successes += info["success"]
        lengths.append(steps)
        if not info["success"]:
            failed.append(seed)
    dt = time.perf_counter() - t0
    env.close()
    n = len(seeds)
    return {"success_rate": successes / n, "failed_seeds": failed,
            "mean_len": float(np.mean(lengths)), "max_len": int(np.max(lengths)),
            "s_per_episode": dt / n, "steps_per_s": float(np.sum(lengths)) / dt}


def gl_renderer_name() -> str:
    """The OpenGL renderer string (e.g. llvmpipe = Mesa on the CPU)."""
    try:
        from OpenGL import GL

        import mujoco

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
        print(f"random actions, obs_mode={mode}: {steps_per_second(mode, n):.0f} env steps/s")
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
