"""Inference inside evaluation: batched vs one-call-per-environment sampling, and a dp-eval run.

    python benchmarks/eval_inference.py --device cuda --task pusht --policy unet --method ddim

The controller gives every episode its own sampler generator so that results do not depend on
``n_envs``. ``torch.randn`` takes one generator, so unless the method draws its noise with
diffusers' ``randn_tensor`` (which takes a list, one per row) the controller calls ``predict`` once
per environment. This measures what that costs against one batched call, then runs dp-eval with an
untrained policy of the chosen size (episodes run to the time limit, so every step is exercised).

Results are recorded in benchmarks/eval_rollouts.md with the machine they ran on.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_policy.config import compose
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.evaluate import evaluate
from diffusion_policy.policy import Policy


def build(task: str, policy: str, method: str, root: Path) -> Path:
    """An untrained policy for ``task`` saved as dp-train lays it out; returns the run dir."""
    import gymnasium as gym

    import envs  # noqa: F401

    cfg = compose("train", [f"task={task}", f"policy={policy}", f"method={method}"])
    env = gym.make(cfg.task.env_id, **cfg.task.env_kwargs)
    shapes = {k: tuple(env.observation_space[k].shape) for k in cfg.task.obs_keys}
    low, high = env.action_space.low, env.action_space.high
    env.close()
    rng = np.random.default_rng(0)
    arrays = {k: rng.normal(size=(256, *shapes[k])).astype(np.float32)
              for k in cfg.task.obs_keys if k not in cfg.task.image_keys}
    arrays["action"] = rng.uniform(low, high, (256, len(low))).astype(np.float32)
    modes = {k: "minmax" for k in arrays} | {k: "image" for k in cfg.task.image_keys}
    pol = Policy.build(cfg.task, cfg.policy, cfg.method, Normalizer.fit(arrays, modes), shapes,
                       len(low))
    pol.save(root / "checkpoints" / "step_0000000" / "policy")
    (root / "checkpoints" / "latest").write_text("step_0000000\n")
    return root


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def latency(policy: Policy, device: str, batch: int, per_row: bool, reps: int = 10) -> float:
    obs = {k: torch.zeros(batch, policy.n_obs_steps, *policy.shapes[k], device=device,
                          dtype=torch.uint8 if k in policy.image_keys else torch.float32)
           for k in policy.obs_keys}
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]

    def once():
        if per_row:
            for b in range(batch):
                policy.predict({k: v[b:b + 1] for k, v in obs.items()}, generator=gens[b])
        else:
            policy.predict(obs, generator=gens[0])

    once()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        once()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--task", default="pusht")
    ap.add_argument("--policy", default="unet")
    ap.add_argument("--method", default="ddim")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--episodes", type=int, default=16)
    ap.add_argument("--n-envs", type=int, default=0)
    ap.add_argument("--videos", type=int, default=1)
    ap.add_argument("--no-eval", action="store_true", help="only the latency table")
    ap.add_argument("--eval-modes", nargs="+", default=["true", "false"],
                    help="episode_generators values to run dp-eval with")
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, GPU {gpu}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as d:
        run = build(args.task, args.policy, args.method, Path(d) / "run")
        pol = Policy.load(run / "checkpoints" / "step_0000000" / "policy", device=args.device)
        n_params = sum(p.numel() for p in pol.parameters()) / 1e6
        print(f"\n{args.task} {args.policy} ({n_params:.1f}M) {args.method} "
              f"{pol.method_cfg.num_inference_steps} steps on {args.device}")
        print("\n| envs replanning together | one batched call, ms | one call per env, ms |")
        print("| --- | --- | --- |")
        for b in args.batches:
            print(f"| {b} | {latency(pol, args.device, b, False):.1f} | "
                  f"{latency(pol, args.device, b, True):.1f} |", flush=True)
        del pol
        if args.no_eval:
            return
        for mode in args.eval_modes:
            t0 = time.perf_counter()
            m = evaluate(compose("eval", [f"checkpoint={run}", f"episodes={args.episodes}",
                                          f"videos={args.videos}", f"n_envs={args.n_envs}",
                                          f"device={args.device}", f"episode_generators={mode}",
                                          f"out={Path(d) / ('out-' + mode)}"]))
            wall = time.perf_counter() - t0
            steps = m["mean_episode_length"] * m["episodes"]
            print(f"\ndp-eval episode_generators={mode}: {m['episodes']} episodes x "
                  f"{m['mean_episode_length']:.0f} steps, n_envs={m['n_envs']}: {wall:.1f} s, "
                  f"{steps / wall:.0f} env steps/s, predict p50 {m['latency_p50_ms']:.1f} ms "
                  f"p99 {m['latency_p99_ms']:.1f} ms over {m['predict_calls']} calls", flush=True)


if __name__ == "__main__":
    main()
