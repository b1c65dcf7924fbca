"""Speed and expert quality of the Avoid task (and of any task config, e.g. MetaWorld's).

    MUJOCO_GL=egl python benchmarks/env_avoid.py                       # Avoid, state and image
    MUJOCO_GL=egl python benchmarks/env_avoid.py --tasks metaworld_push --seeds 100 --collect 20

For each task config: env steps per second on one core with random actions (reset excluded), the
expert's success rate and episode length over ``--seeds`` seeds of the collection range, and the
wall-clock seconds per collected episode of ``collect`` (``--workers``, default 1 and 2: the spawn
start-up of the workers is included, as a user sees it). Results go in benchmarks/envs.md.

``--probe`` also measures how learnable and how multimodal a state task's demonstrations are,
without training anything: a k-nearest-neighbour policy on the last To=2 states replays the mean
of the k nearest demonstrated action chunks (Ta=8 executed, then replan). k=1 commits to one
demonstration (one mode); a large k averages the modes, as a regression policy does.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np

from diffusion_policy.collect import make_env, run_episode
from diffusion_policy.config import COLLECT_SEED_BASE, EVAL_SEED_BASE, CollectConfig, compose

from envbench import steps_per_second


def expert_quality(task, n_seeds: int) -> dict:
    """Success rate, mean length of the successes, seconds per episode and, for experts that
    choose a side (Avoid), the fraction of right-hand routes."""
    from envs.experts import make_expert

    env = make_env(task.env_id, dict(task.env_kwargs), task.max_episode_steps)
    expert = make_expert(task.expert)
    results, sides = [], []
    for i in range(n_seeds):
        results.append(run_episode(env, expert, COLLECT_SEED_BASE + i))
        sides.append(getattr(expert, "side", 0))  # the route of the episode just run
    env.close()
    ok = [r for r in results if r["success"]]
    return {"success": len(ok) / n_seeds, "n": n_seeds,
            "steps": float(np.mean([r["steps"] for r in ok])) if ok else float("nan"),
            "right": float(np.mean(np.array(sides) > 0)) if any(sides) else None}


def knn_probe(task, n_demos: int, ks: list[int], n_eval: int, ta: int = 8) -> dict[int, tuple[int, int]]:
    """{k: (successes, collisions)} over ``n_eval`` evaluation seeds (module docstring)."""
    from envs.experts import make_expert

    env = make_env(task.env_id, dict(task.env_kwargs), task.max_episode_steps)
    expert = make_expert(task.expert)
    key = task.obs_keys[0]
    X, Y = [], []
    for i in range(n_demos):
        r = run_episode(env, expert, COLLECT_SEED_BASE + i)
        if not r["success"]:
            continue
        obs, act = r["data"][key], r["data"]["action"]
        T = len(act)
        for t in range(T):  # (obs[t-1], obs[t]) -> action[t : t+Ta], edges repeated
            X.append(np.concatenate([obs[max(t - 1, 0)], obs[t]]))
            Y.append(act[np.minimum(np.arange(t, t + ta), T - 1)])
    X, Y = np.asarray(X), np.asarray(Y)
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Xn = (X - mu) / sd
    out = {}
    for k in ks:
        ok = coll = 0
        for i in range(n_eval):
            obs, _ = env.reset(seed=EVAL_SEED_BASE + i)
            prev, done, info = obs[key], False, {}
            while not done:
                q = (np.concatenate([prev, obs[key]]) - mu) / sd
                chunk = Y[np.argsort(((Xn - q) ** 2).sum(1))[:k]].mean(0)
                for a in chunk:
                    prev = obs[key]
                    obs, _, terminated, truncated, info = env.step(a.astype(np.float32))
                    done = terminated or truncated
                    if done:
                        break
            ok += bool(info.get("success"))
            coll += bool(info.get("collision"))
        out[k] = (ok, coll)
    env.close()
    return out


def collect_seconds(task, episodes: int, workers: int) -> float:
    from diffusion_policy.collect import collect

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        collect(CollectConfig(task=task, episodes=episodes, out=f"{tmp}/b.zarr", workers=workers))
        return (time.perf_counter() - t0) / episodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["avoid", "avoid_image"])
    p.add_argument("--steps", type=int, default=2000, help="env steps timed per task")
    p.add_argument("--seeds", type=int, default=100, help="expert episodes per task")
    p.add_argument("--collect", type=int, default=50, help="episodes collected per timing")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--probe", action="store_true", help="k-NN learnability/multimodality probe")
    p.add_argument("--probe-demos", type=int, default=200)
    p.add_argument("--probe-k", type=int, nargs="+", default=[1, 20, 100, 400])
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="metaworld")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}")
    print("| task | env steps/s (1 core) | expert success | steps/episode | right route | "
          + " | ".join(f"s/collected episode ({w} worker{'s' * (w > 1)})" for w in args.workers) + " |")
    print("| --- " * (5 + len(args.workers)) + "|")
    for name in args.tasks:
        task = compose("collect", [f"task={name}"]).task
        sps = steps_per_second(task.env_id, task.env_kwargs, args.steps)
        q = expert_quality(task, args.seeds)
        split = q["right"]
        coll = [collect_seconds(task, args.collect, w) for w in args.workers]
        print(f"| {name} | {sps:.0f} | {100 * q['success']:.0f}% of {q['n']} | {q['steps']:.1f} | "
              f"{'-' if split is None else f'{100 * split:.0f}%'} | "
              + " | ".join(f"{c:.3f}" for c in coll) + " |", flush=True)
    if args.probe:
        print("\n| task | demos | " + " | ".join(f"k={k}: success / collision" for k in args.probe_k) + " |")
        print("| --- " * (2 + len(args.probe_k)) + "|")
        for name in args.tasks:
            task = compose("collect", [f"task={name}"]).task
            if task.image_keys:
                continue
            res = knn_probe(task, args.probe_demos, args.probe_k, n_eval=50)
            print(f"| {name} | {args.probe_demos} | "
                  + " | ".join(f"{ok}/50 / {c}/50" for ok, c in res.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
