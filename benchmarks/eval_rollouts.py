"""Speed of evaluation: the controller's own overhead, and dp-eval's throughput.

    python benchmarks/eval_rollouts.py                      # controller + expert rollouts
    python benchmarks/eval_rollouts.py --checkpoint runs/avoid/<run> --episodes 8

1. Controller overhead: ``act()`` with a policy that costs nothing (a constant chunk), so what is
   measured is the history, batching and chunk bookkeeping per control step.
2. Rollout throughput of the scripted expert (no inference): env steps per second, in-process
   (n_envs=1) and in worker processes (n_envs=2, ...).
3. With ``--checkpoint``: the same through a policy, with predict latency p50/p99.

Results are recorded in benchmarks/eval_rollouts.md with the machine they ran on.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from diffusion_policy.config import EvalConfig, compose
from diffusion_policy.control import RecedingHorizonController
from diffusion_policy.evaluate import evaluate


class FreePolicy:
    horizon, n_obs_steps, n_action_steps, obs_keys = 16, 2, 8, ["state"]

    def predict(self, obs, num_steps=None, generator=None):
        return torch.zeros(obs["state"].shape[0], self.horizon, 2)


def controller_overhead(n_envs: int, smoothing: str, steps: int = 2000) -> float:
    ctl = RecedingHorizonController(FreePolicy(), n_envs, smoothing=smoothing,
                                    n_action_steps=1 if smoothing == "ensemble" else None)
    obs = {"state": np.zeros((n_envs, 20), np.float32)}
    ctl.act(obs)
    t0 = time.perf_counter()
    for _ in range(steps):
        ctl.act(obs)
    return (time.perf_counter() - t0) / steps * 1e6


def rollouts(cfg: EvalConfig) -> dict:
    with tempfile.TemporaryDirectory() as d:
        cfg.out = d
        t0 = time.perf_counter()
        m = evaluate(cfg)
        wall = time.perf_counter() - t0
    steps = m["mean_episode_length"] * m["episodes"]
    return {"wall_s": wall, "steps_per_s": steps / wall, "p50": m["latency_p50_ms"],
            "length": m["mean_episode_length"],
            "p99": m["latency_p99_ms"], "success": m["success_rate"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="avoid")
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--n-envs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MUJOCO_GL", "egl")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    print("\n| n_envs | smoothing | controller overhead (us per act) |\n| --- | --- | --- |")
    for n in (1, 8, 32):
        for sm in ("none", "ensemble", "blend"):
            print(f"| {n} | {sm} | {controller_overhead(n, sm):.0f} |")

    task = compose("eval", ["checkpoint=expert", f"task={args.task}"]).task
    runs = [("expert", EvalConfig(checkpoint="expert", task=task, episodes=args.episodes, videos=0))]
    for n in args.n_envs:
        if args.checkpoint:
            runs.append((f"policy n_envs={n}", EvalConfig(checkpoint=args.checkpoint,
                                                          episodes=args.episodes, n_envs=n,
                                                          videos=0, device="cpu")))
    print("\n| run | episodes | mean length | wall s | env steps/s | predict p50 / p99 ms | success |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, cfg in runs:
        r = rollouts(cfg)
        lat = "-" if r["p50"] is None else f"{r['p50']:.1f} / {r['p99']:.1f}"
        print(f"| {name} | {args.episodes} | {r['length']:.1f} | {r['wall_s']:.1f} | {r['steps_per_s']:.0f} | {lat} | "
              f"{r['success']:.2f} |")


if __name__ == "__main__":
    main()
