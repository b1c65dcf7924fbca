"""``dp-eval``: roll a checkpoint (or a task's scripted expert) out in simulation and report.

    dp-eval checkpoint=runs/avoid/<run> episodes=50              # a run dir: its latest checkpoint
    dp-eval checkpoint=runs/avoid/<run>/checkpoints/step_0005000 seed=100 out=rollouts/avoid/x
    dp-eval checkpoint=expert task=avoid episodes=20            # the baseline, same metrics
    torchrun --nproc_per_node=4 -m diffusion_policy.evaluate checkpoint=...   # seeds sharded

Seeds: episode ``i`` (0-based) starts from ``env.reset(seed=EVAL_SEED_BASE + seed + i)``, a range
disjoint from the collection and selection seeds (``diffusion_policy.config``). Episodes are a
queue; whichever environment is free takes the next one and resets to that episode's seed, and the
sampler of each episode has its own torch generator seeded with the same number. An episode's
result is therefore a function of the checkpoint and its seed only: the same for any ``n_envs``
and any number of ranks, up to the float rounding of batched kernels (about 1e-5 in the actions;
tests/test_eval_e2e.py checks outcomes and each episode's mean action).

Environments run in ``AsyncVectorEnv`` worker processes started with ``forkserver``/``spawn``
(a forked OpenGL context crashes MuJoCo's renderer, DP issue #76); ``n_envs=1`` and the expert
run in-process. Environments that replan at the same step share one ``predict`` call when the
policy's sampler accepts a list of generators (one per row, as diffusers' ``randn_tensor`` does);
otherwise each gets its own call, which keeps the per-episode noise exact (see the controller).
``episode_generators=false`` trades that for speed: one shared generator, always batched,
reproducible for the same ``n_envs`` and ranks only (benchmarks/eval_rollouts.md measures the gain).
Under ``torchrun`` rank ``r`` runs episodes ``r, r + W, ...``, writes ``parts/rank<r>.json`` (or
gathers over torch.distributed when it is initialized) and rank 0 merges and writes the report.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from diffusion_policy import report
from diffusion_policy.checkpoint import CheckpointError, resolve_checkpoint
from diffusion_policy.config import EVAL_SEED_BASE, SEED_RANGE, ConfigError, EvalConfig, TaskConfig, as_dict, typed
from diffusion_policy.distributed import GatherError, gather, rank_world, resolve_device
from diffusion_policy.rollout import (  # noqa: F401  (rollout pieces: public here too)
    EvalError,
    ExpertActor,
    PolicyActor,
    check_compatible,
    default_n_envs,
    make_vector_env,
    merge,
    rank_episodes,
    rollout,
    run_episodes,
    run_shard,
)
from diffusion_policy.validation import check_method, validate


def _checkpoint_label(policy_dir: Path) -> str:
    """``<run>-<checkpoint>`` for the standard layout, else the directory's name."""
    parts = policy_dir.resolve().parts
    if len(parts) >= 4 and parts[-1] == "policy" and parts[-3] == "checkpoints":
        return f"{parts[-4]}-{parts[-2]}"
    return parts[-2] if parts[-1] == "policy" and len(parts) >= 2 else parts[-1]


def _task_from(obj) -> TaskConfig:
    """A TaskConfig from a dataclass, a DictConfig or a plain dict."""
    if isinstance(obj, TaskConfig):
        return obj
    try:
        return typed(TaskConfig, as_dict(obj))
    except ConfigError as e:
        raise EvalError(f"task config: {e}") from None


def _read_spec(policy_dir: Path, label: str, num_inference_steps: int | None):
    """The checkpoint's spec (task, shapes, method) without its weights, with the sampler-steps
    override checked against the method it was trained with."""
    from diffusion_policy.policy import PolicySpec

    try:
        spec = PolicySpec.read(policy_dir)
    except ValueError as e:
        raise EvalError(f"checkpoint {label}: {e}") from None
    if num_inference_steps is not None:
        try:
            check_method(replace(spec.method, num_inference_steps=num_inference_steps),
                         key_names={"num_inference_steps": "num_inference_steps"})
        except ConfigError as e:
            raise EvalError(f"checkpoint {label}: {e}") from None
    return spec


# ------------------------------------------------------------------------------- the job
def evaluate(cfg: EvalConfig) -> dict:
    """Run ``cfg.episodes`` episodes and write the report under ``cfg.out``. Returns the metrics
    on rank 0 and ``{}`` on the other ranks."""
    validate(cfg)
    if cfg.episodes < 1:
        raise EvalError(f"episodes must be >= 1, got {cfg.episodes}")
    if not 0 <= cfg.seed <= SEED_RANGE - cfg.episodes:
        raise EvalError(f"seed={cfg.seed}: seed + episodes must stay within the evaluation seed "
                        f"range of {SEED_RANGE} (EVAL_SEED_BASE={EVAL_SEED_BASE})")
    rank, world, local_rank = rank_world()
    t_start = time.time()
    given_task = _task_from(cfg.task) if cfg.task is not None else None

    expert = cfg.checkpoint == "expert"
    if expert:
        if given_task is None:
            raise EvalError("checkpoint=expert needs task=<name> (the task whose expert to run)")
        task, label, ckpt, spec = given_task, "expert", "expert", None
        if not task.expert:
            raise EvalError(f"task {task.name} has no scripted expert (task.expert is empty)")
    else:
        policy_dir = resolve_checkpoint(cfg.checkpoint)
        label, ckpt = _checkpoint_label(policy_dir), str(policy_dir)
        spec = _read_spec(policy_dir, label, cfg.num_inference_steps)
        task = spec.task
        if given_task is not None:
            if given_task.name != task.name:
                raise EvalError(f"checkpoint {label} was trained for task {task.name!r}, not "
                                f"task={given_task.name!r}")
            task = given_task  # same task, possibly other env settings (checked below)
    max_steps = cfg.max_episode_steps or task.max_episode_steps

    device = str(resolve_device(cfg.device, local_rank))
    if cfg.cuda_graph and not device.startswith("cuda"):
        raise EvalError(f"cuda_graph=true needs a CUDA device, the evaluation runs on {device}: "
                        f"set device=cuda, or drop cuda_graph (bf16 and compile work on a CPU)")
    seeds = [EVAL_SEED_BASE + cfg.seed + i for i in range(cfg.episodes)]
    out = Path(cfg.out or Path("rollouts") / task.name / label)
    for ep in rank_episodes(cfg.episodes, rank, world):  # a reused output folder: drop what an
        (out / "frames" / f"episode_{ep:04d}.png").unlink(missing_ok=True)  # earlier run left
        (out / "videos" / f"episode_{ep:04d}.mp4").unlink(missing_ok=True)

    def make_actor(vec, n_envs):
        if expert:
            return ExpertActor(task.expert, n_envs)
        # compare with the env before loading any weights: the checkpoint's own task says which
        # keys and shapes its policy was trained on
        check_compatible(label, task, spec.task.obs_keys, spec.shapes, vec.single_observation_space)
        policy = _load_policy(policy_dir, label, device)
        if cfg.bf16 or cfg.compile or cfg.cuda_graph:
            from diffusion_policy.inference import FastPredictor

            policy = FastPredictor(policy, dtype="bf16" if cfg.bf16 else "fp32", compile=cfg.compile,
                                   cuda_graph=cfg.cuda_graph, pad_to=n_envs)
        return PolicyActor(policy, n_envs, device, cfg.num_inference_steps, cfg.smoothing, cfg.ensemble_k,
                           None if cfg.episode_generators else seeds[0])

    shard = run_shard(task, seeds, make_actor, rank, world, n_envs=1 if expert else cfg.n_envs,
                      max_episode_steps=max_steps, render=True, videos=cfg.videos, final_frames=True,
                      progress=rank == 0 and sys.stderr.isatty())
    if shard.episodes:
        _write_pictures(out, shard, task.fps)
    parts = gather(shard.part(), rank, world, part_dir=out / "parts", since=t_start)
    if rank != 0:
        return {}
    meta = {"task": task.name, "env_id": task.env_id, "checkpoint": ckpt, "label": label,
            "seed": cfg.seed, "seed_base": EVAL_SEED_BASE, "world_size": world, "n_envs": shard.n_envs,
            "device": device, "max_episode_steps": max_steps,
            "num_inference_steps": cfg.num_inference_steps,
            "smoothing": cfg.smoothing, "episode_generators": cfg.episode_generators,
            "bf16": cfg.bf16, "compile": cfg.compile, "cuda_graph": cfg.cuda_graph,
            "expert": expert, "videos": cfg.videos}
    records, latencies = merge(parts)
    metrics = report.compute_metrics(records, latencies, meta)
    metrics["wall_s"] = round(time.time() - t_start, 3)
    report.write_all(out, metrics, records)
    return metrics


def _write_pictures(out: Path, shard, fps: float) -> None:
    """This rank's videos and final frames."""
    out.mkdir(parents=True, exist_ok=True)
    for ep, fr in sorted(shard.frames.items()):
        try:
            report.write_video(out / "videos" / f"episode_{ep:04d}.mp4", fr, fps=fps)
        except Exception as e:  # the episodes are done: keep their results, say what is missing
            print(f"dp-eval: warning: no videos ({type(e).__name__}: {e})", file=sys.stderr)
            break
    for ep, img in shard.finals.items():
        report.write_png(out / "frames" / f"episode_{ep:04d}.png", img)


def _load_policy(policy_dir: Path, label: str, device: str):
    import torch

    from diffusion_policy.policy import Policy

    try:
        policy = Policy.load(policy_dir, device=device)
    except Exception as e:  # a corrupt or foreign checkpoint: one line, naming it
        raise EvalError(f"checkpoint {label}: cannot load {policy_dir} "
                        f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    policy.eval()
    torch.manual_seed(0)  # sampling uses per-episode generators; this covers anything else
    return policy


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``dp-eval key=value ...`` (hydra overrides on configs/eval.yaml)."""
    from diffusion_policy.config import run_cli

    def job(cfg):
        metrics = evaluate(cfg)
        if metrics:
            print(report.summary_line(metrics), flush=True)

    return run_cli("dp-eval", "eval", job, argv, __doc__, errors=(EvalError, CheckpointError, GatherError))


if __name__ == "__main__":
    sys.exit(main())
