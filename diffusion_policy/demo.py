"""dp-demo: the main job, end to end on the default task, on a CPU.

    dp-demo                                  # collect, train, evaluate the default task (Avoid)
    dp-demo steps=4000 eval_episodes=100     # a longer run

1. collect ``episodes`` demonstrations with the task's scripted expert (``data/<task>.zarr``);
2. train a diffusion policy (``policy``/``method`` configs, ``steps`` optimizer steps);
3. train the MLP behaviour-cloning baseline (MSE on the same windows) when ``baseline=true``;
4. evaluate the expert, the policy and the baseline on the same ``eval_episodes`` test seeds and
   write videos, metrics and reports under ``rollouts/<task>/``.
Every stage resumes: re-running skips what is already done (collection appends up to
``episodes``; a finished training run is reused).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from diffusion_policy import checkpoint as ckpt
from diffusion_policy.checkpoint import CheckpointError
from diffusion_policy.config import ConfigError, compose
from diffusion_policy.data.store import StoreError
from diffusion_policy.evaluate import EvalError


@dataclass
class DemoConfig:
    """``dp-demo key=value ...``: the whole job on one task, on a CPU by default."""

    task: str = "avoid"
    """Task config name (``configs/task/<task>.yaml``)."""
    episodes: int = 200
    """Demonstrations to collect."""
    policy: str = "unet_small"
    """Network config of the diffusion policy (``configs/policy/``)."""
    method: str = "ddim"
    """Method config of the diffusion policy (``configs/method/``)."""
    steps: int = 3000
    """Optimizer steps for the diffusion policy (benchmarks/demo.md: how long the whole job takes)."""
    batch_size: int = 64
    """Batch size of both trainings."""
    lr: float = 3e-4
    """Learning rate of both trainings."""
    baseline: bool = True
    """Also train and evaluate the MLP behaviour-cloning baseline."""
    baseline_steps: int = 3000
    """Optimizer steps for the baseline."""
    eval_episodes: int = 50
    """Test episodes per policy (the evaluation seed range)."""
    videos: int = 4
    """Videos of the first K test episodes of each policy."""
    data_dir: str = "data"
    """Where the store goes (``<data_dir>/<task>.zarr``)."""
    runs_dir: str = "runs"
    """Where the training runs go."""
    rollouts_dir: str = "rollouts"
    """Where the evaluations write their reports."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``auto`` for training and evaluation."""


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def _train(cfg: DemoConfig, name: str, overrides: list) -> Path:
    from diffusion_policy.train import train

    run_dir = Path(cfg.runs_dir) / cfg.task / name
    args = [f"task={cfg.task}", f"data={cfg.data_dir}/{cfg.task}.zarr", f"run_dir={run_dir}",
            f"device={cfg.device}", "log_every=100", "val_every=500", "checkpoint_every=500", *overrides]
    if ckpt.has_latest(run_dir):
        done = int(ckpt.read_latest(run_dir).split("_")[-1])
        target = compose("train", args).steps
        if done >= target:
            print(f"{run_dir}: already trained ({done} steps)", flush=True)
            return run_dir
        args.append("resume=true")
    train(compose("train", args))
    return run_dir


def _evaluate(cfg: DemoConfig, checkpoint: str, label: str, extra: list = ()) -> dict:
    from diffusion_policy.evaluate import evaluate

    out = Path(cfg.rollouts_dir) / cfg.task / label
    m = evaluate(compose("eval", [f"checkpoint={checkpoint}", f"episodes={cfg.eval_episodes}",
                                  f"out={out}", f"videos={cfg.videos}", f"device={cfg.device}", *extra]))
    lo, hi = m["success_ci"]
    print(f"{label}: success {m['success_rate']:.2f} (95% CI {lo:.2f}-{hi:.2f}) over "
          f"{m['episodes']} test episodes; report {out}/report.md", flush=True)
    return m


def demo(cfg: DemoConfig) -> dict:
    from diffusion_policy.collect import collect

    t0 = time.time()
    _banner(f"1/4 collect {cfg.episodes} expert demonstrations of task {cfg.task}")
    collect(compose("collect", [f"task={cfg.task}", f"episodes={cfg.episodes}",
                                f"out={cfg.data_dir}/{cfg.task}.zarr"]))

    _banner(f"2/4 train a diffusion policy ({cfg.policy} + {cfg.method}, {cfg.steps} steps, {cfg.device})")
    run = _train(cfg, f"demo_{cfg.policy}_{cfg.method}",
                 [f"policy={cfg.policy}", f"method={cfg.method}", f"steps={cfg.steps}",
                  f"batch_size={cfg.batch_size}", f"lr={cfg.lr}", "warmup_steps=100"])
    base = None
    if cfg.baseline:
        _banner(f"3/4 train the MLP behaviour-cloning baseline (MSE, {cfg.baseline_steps} steps)")
        base = _train(cfg, "demo_mlp_regression",
                      ["policy=mlp", "method=regression", f"steps={cfg.baseline_steps}",
                       f"batch_size={cfg.batch_size}", f"lr={cfg.lr}", "warmup_steps=100"])

    _banner(f"4/4 evaluate on {cfg.eval_episodes} test seeds (disjoint from the demonstrations)")
    results = {"expert": _evaluate(cfg, "expert", "expert", [f"task={cfg.task}"])}
    results["diffusion"] = _evaluate(cfg, str(run), f"demo_{cfg.policy}_{cfg.method}")
    if base is not None:
        results["mlp_bc"] = _evaluate(cfg, str(base), "demo_mlp_regression")

    _banner(f"done in {(time.time() - t0) / 60:.1f} min")
    print("| policy | success | 95% CI | mean max reward | inference p50 ms |\n|---|---|---|---|---|")
    for name, m in results.items():
        lo, hi = m["success_ci"]
        p50 = m.get("latency_p50_ms")
        print(f"| {name} | {m['success_rate']:.2f} | {lo:.2f}-{hi:.2f} | {m['mean_max_reward']:.3f} | "
              f"{'-' if p50 is None else f'{p50:.1f}'} |")
    print(f"videos, metrics and reports: {cfg.rollouts_dir}/{cfg.task}/", flush=True)
    return results


def _bool(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(value)


def main(argv: list[str] | None = None) -> int:
    """``dp-demo key=value ...`` with the keys of DemoConfig."""
    from dataclasses import fields

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    cfg = DemoConfig()
    types = {f.name: f.type for f in fields(DemoConfig)}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in types:
            print(f"dp-demo: {arg!r} is not key=value with a key of {', '.join(types)}", file=sys.stderr)
            return 2
        kind = {"int": int, "float": float, "bool": _bool}.get(types[key], str)
        try:
            setattr(cfg, key, kind(value))
        except ValueError:
            print(f"dp-demo: {key}={value!r} is not a valid {types[key]}", file=sys.stderr)
            return 2
    try:
        demo(cfg)
    except (ConfigError, CheckpointError, EvalError, StoreError) as e:
        print(f"dp-demo: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
