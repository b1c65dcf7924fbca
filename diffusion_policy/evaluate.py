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
and any number of ranks (tests/test_eval_e2e.py checks this).

Environments run in ``AsyncVectorEnv`` worker processes started with ``forkserver``/``spawn``
(a forked OpenGL context crashes MuJoCo's renderer, DP issue #76); ``n_envs=1`` and the expert
run in-process. Environments that replan at the same step share one ``predict`` call when the
policy's sampler accepts a list of generators (one per row, as diffusers' ``randn_tensor`` does);
otherwise each gets its own call, which keeps the per-episode noise exact (see the controller).
``episode_generators=false`` trades that for speed: one shared generator, always batched,
reproducible for the same ``n_envs`` and ranks only (benchmarks/eval_rollouts.md: 12x on a GPU).
Under ``torchrun`` rank ``r`` runs episodes ``r, r + W, ...``, writes ``parts/rank<r>.json`` (or
gathers over torch.distributed when it is initialized) and rank 0 merges and writes the report.
"""
from __future__ import annotations

import functools
import importlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from diffusion_policy import report
from diffusion_policy.checkpoint import CheckpointError, resolve_checkpoint
from diffusion_policy.config import EVAL_SEED_BASE, SEED_RANGE, EvalConfig, TaskConfig
from diffusion_policy.control.controller import SMOOTHING

PART_WAIT_S = 3600.0  # how long rank 0 waits for the other ranks' part files


class EvalError(RuntimeError):
    """A bad checkpoint, task or option; the message says which and what was expected."""


def _checkpoint_label(policy_dir: Path) -> str:
    """``<run>-<checkpoint>`` for the standard layout, else the directory's name."""
    parts = policy_dir.resolve().parts
    if len(parts) >= 4 and parts[-1] == "policy" and parts[-3] == "checkpoints":
        return f"{parts[-4]}-{parts[-2]}"
    return parts[-2] if parts[-1] == "policy" and len(parts) >= 2 else parts[-1]


def _task_from(obj) -> TaskConfig:
    """A TaskConfig from a dataclass, a DictConfig or a plain dict (a checkpoint's config.json)."""
    if isinstance(obj, TaskConfig):
        return obj
    if not isinstance(obj, dict):
        from omegaconf import OmegaConf

        obj = OmegaConf.to_container(obj, resolve=True)
    known = {f.name for f in fields(TaskConfig)}
    return TaskConfig(**{k: v for k, v in obj.items() if k in known})


def check_compatible(label: str, task: TaskConfig, obs_keys, shapes: dict | None, obs_space) -> None:
    """Raise EvalError unless the env's observation space provides the policy's keys and shapes."""
    space_keys = list(getattr(obs_space, "spaces", {}).keys())
    missing = [k for k in obs_keys if k not in space_keys]
    if missing:
        raise EvalError(f"checkpoint {label} expects observation keys {list(obs_keys)} but env "
                        f"{task.env_id} {task.env_kwargs or ''} provides {space_keys} "
                        f"(missing {missing})")
    for k in obs_keys:
        want = tuple((shapes or {}).get(k, ()) or ())
        have = tuple(obs_space[k].shape)
        if want and want != have:
            raise EvalError(f"checkpoint {label} expects observation {k!r} of shape {want} but env "
                            f"{task.env_id} provides {have}")


# ------------------------------------------------------------------------------- environments
def make_vector_env(task: TaskConfig, n_envs: int, max_episode_steps: int, render: bool = True):
    """``n_envs`` copies of the task's env with autoreset off (episodes are reset with their seed).

    One env: ``SyncVectorEnv`` in this process. More: ``AsyncVectorEnv`` workers started by
    forkserver (spawn where there is none), never fork: MuJoCo's GL context does not survive it.
    """
    import gymnasium as gym
    from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

    import envs  # noqa: F401  (registers dp/*)

    os.environ.setdefault("MUJOCO_GL", "egl")
    env_id = task.env_id
    try:
        if ":" in env_id:  # "module:id", as gymnasium.make accepts: import the module that registers it
            module, env_id = env_id.split(":", 1)
            importlib.import_module(module)
        spec = gym.spec(env_id)
    except (gym.error.Error, ImportError) as e:
        raise EvalError(f"task {task.name}: env_id {task.env_id!r} is not registered ({e})") from None
    kwargs = dict(task.env_kwargs or {})
    if render:
        kwargs["render_mode"] = "rgb_array"
    fn = functools.partial(gym.make, spec, max_episode_steps=max_episode_steps,
                           disable_env_checker=True, **kwargs)
    if n_envs == 1:
        return SyncVectorEnv([fn], autoreset_mode=AutoresetMode.DISABLED)
    ctx = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    return AsyncVectorEnv([fn] * n_envs, context=ctx, autoreset_mode=AutoresetMode.DISABLED)


def _env_info(infos: dict, i: int) -> dict:
    """Env ``i``'s entries of a vector env's merged info dict, as JSON-able values."""
    out = {}
    for k, v in infos.items():
        if k.startswith("_"):
            continue
        mask = infos.get("_" + k)
        if mask is not None and not mask[i]:
            continue
        out[k] = _env_info(v, i) if isinstance(v, dict) else report.jsonable(v[i])
    return out


# ------------------------------------------------------------------------------- actors
class PolicyActor:
    """A policy behind the receding-horizon controller.

    ``shared_seed=None``: one sampler generator per episode, seeded with the episode's env seed.
    Otherwise one generator seeded with ``shared_seed`` for all, so rows are always batched.
    """

    def __init__(self, policy, n_envs, device, num_inference_steps=None, smoothing="none",
                 ensemble_k=0.01, shared_seed: int | None = None):
        import torch

        from diffusion_policy.control import RecedingHorizonController

        self._torch, self.device, self.shared = torch, device, shared_seed is not None
        shared = torch.Generator(device=device).manual_seed(shared_seed) if self.shared else None
        self.controller = RecedingHorizonController(
            policy, n_envs, smoothing=smoothing, ensemble_k=ensemble_k,
            num_inference_steps=num_inference_steps, generator=shared, device=device)

    def begin(self, i, seed, env=None):
        gen = None if self.shared else self._torch.Generator(device=self.device).manual_seed(int(seed))
        self.controller.reset([i], generator=gen)

    def act(self, obs, active, vec_env=None):
        return self.controller.act(obs, active)

    def latencies(self):
        return list(self.controller.latencies_ms)


class ExpertActor:
    """The task's scripted expert, one instance per in-process env (it reads the simulator)."""

    def __init__(self, name: str, n_envs: int):
        from envs.experts import make_expert

        self.experts = [make_expert(name) for _ in range(n_envs)]

    def begin(self, i, seed, env=None):
        from diffusion_policy.collect import EXPERT_STREAM  # the same expert stream as dp-collect

        self.experts[i].reset(env, np.random.default_rng([int(seed), EXPERT_STREAM]))

    def act(self, obs, active, vec_env=None):
        acts = [np.asarray(self.experts[i].act(vec_env.envs[i]), np.float32) if active[i] else None
                for i in range(len(self.experts))]
        dim = next(a for a in acts if a is not None).shape
        return np.stack([a if a is not None else np.full(dim, np.nan, np.float32) for a in acts])

    def latencies(self):
        return []


# ------------------------------------------------------------------------------- rollouts
def rollout(actor, vec_env, episodes: list, seeds: list, videos: int = 0,
            final_frames: bool = True, progress: bool = False) -> tuple[list, dict, dict]:
    """Run the episodes (indices with their seeds) on ``vec_env``, ``n_envs`` at a time.

    Returns (records in episode order, {episode: video frames} for episodes ``< videos``,
    {episode: final frame}). A record: episode, seed, success, max_reward, return, length,
    rewards, final_info.
    """
    n = vec_env.num_envs
    queue = list(zip(episodes, seeds))[::-1]  # pop() takes the lowest episode first
    slot = [None] * n  # (episode, seed) running in each env
    rewards = [[] for _ in range(n)]
    success = np.zeros(n, bool)
    frames, finals, records = {}, {}, []
    space = vec_env.single_action_space
    idle_action = np.clip(np.zeros(space.shape), space.low, space.high).astype(space.dtype)
    obs = None
    can_render = True

    def render_all():
        nonlocal can_render
        if not can_render:
            return None
        try:
            return vec_env.call("render")
        except Exception:  # an env without rgb_array rendering: no videos, no contact sheet
            can_render = False
            return None

    def start(ids):
        nonlocal obs
        mask = np.zeros(n, bool)
        seed_list = [None] * n
        for i in ids:
            if queue:
                slot[i] = queue.pop()
                mask[i], seed_list[i] = True, int(slot[i][1])
            else:
                slot[i] = None
        if not mask.any():
            return
        new, _ = vec_env.reset(seed=seed_list, options={"reset_mask": mask})
        if obs is None:
            obs = {k: np.array(v) for k, v in new.items()}
        for k in obs:
            obs[k][mask] = new[k][mask]
        for i in np.flatnonzero(mask):
            rewards[i], success[i] = [], False
            env = vec_env.envs[i] if hasattr(vec_env, "envs") else None
            actor.begin(i, slot[i][1], env)
        if any(slot[i][0] < videos for i in np.flatnonzero(mask)):
            imgs = render_all()
            for i in np.flatnonzero(mask):
                if imgs is not None and slot[i][0] < videos:
                    frames[slot[i][0]] = [(np.asarray(imgs[i]), 0, 0.0)]

    from tqdm import tqdm

    bar = tqdm(total=len(episodes), desc="episodes", disable=not progress, dynamic_ncols=True)
    start(range(n))
    while any(s is not None for s in slot):
        active = np.array([s is not None for s in slot])
        act = actor.act(obs, active, vec_env)
        act = np.where(active[:, None], act, idle_action[None]).astype(space.dtype)
        new, rew, term, trunc, infos = vec_env.step(act)
        obs = {k: np.array(v) for k, v in new.items()}
        ended = active & (np.asarray(term) | np.asarray(trunc))
        recording = [i for i in np.flatnonzero(active) if slot[i][0] < videos]
        imgs = render_all() if recording or (final_frames and ended.any()) else None
        for i in np.flatnonzero(active):
            rewards[i].append(float(rew[i]))
            info = _env_info(infos, i)
            success[i] |= bool(info.get("success", False))
            ep, seed = slot[i]
            if imgs is not None and ep < videos:
                frames[ep].append((np.asarray(imgs[i]), len(rewards[i]), float(rew[i])))
            if ended[i]:
                if imgs is not None and final_frames:
                    finals[ep] = np.asarray(imgs[i])
                r = np.asarray(rewards[i])
                records.append({"episode": int(ep), "seed": int(seed), "success": bool(success[i]),
                                "max_reward": float(r.max()), "return": float(r.sum()),
                                "length": int(len(r)), "terminated": bool(term[i]),
                                "rewards": [round(x, 6) for x in r.tolist()], "final_info": info})
        if ended.any():
            start(np.flatnonzero(ended))
            bar.update(int(ended.sum()))
            bar.set_postfix(success=f"{np.mean([r['success'] for r in records]):.2f}")
    bar.close()
    records.sort(key=lambda rec: rec["episode"])
    return records, frames, finals


def run_episodes(policy, task: TaskConfig, seeds: list, device="cpu", rank: int = 0, world: int = 1,
                 n_envs: int = 0, num_inference_steps: int | None = None, smoothing: str = "none",
                 max_episode_steps: int | None = None) -> dict:
    """Roll ``policy`` out on the given env seeds (no videos, nothing written) and return the
    metrics of :func:`report.compute_metrics`. Every rank calls it with the same seeds and runs
    ``seeds[rank::world]``; parts are gathered over torch.distributed (needed when world > 1).
    Used by dp-train for checkpoint selection on the SELECT_SEED_BASE range."""
    mine = list(range(rank, len(seeds), world))
    part = {"rank": rank, "records": [], "latencies_ms": []}
    if mine:
        n_envs = max(1, min(n_envs or _default_n_envs(len(mine)), len(mine)))
        vec = make_vector_env(task, n_envs, max_episode_steps or task.max_episode_steps, render=False)
        try:
            check_compatible(task.name, task, policy.obs_keys, getattr(policy, "shapes", None),
                             vec.single_observation_space)
            actor = PolicyActor(policy, n_envs, device, num_inference_steps, smoothing)
            records, _, _ = rollout(actor, vec, mine, [seeds[i] for i in mine], videos=0,
                                    final_frames=False)
        finally:
            vec.close()
        part = {"rank": rank, "records": records, "latencies_ms": actor.latencies()}
    if world > 1:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise EvalError(f"run_episodes with world={world} needs torch.distributed initialized")
        parts = [None] * world
        dist.all_gather_object(parts, part)
    else:
        parts = [part]
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["episode"])
    return report.compute_metrics(records, [x for p in parts for x in p["latencies_ms"]],
                                  {"task": task.name, "label": "rollout", "n_envs": n_envs})


# ------------------------------------------------------------------------------- the job
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _device(name: str, rank: int) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    return "cpu"


def _default_n_envs(n_episodes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(n_episodes, (cores or 1) // local_world))


def evaluate(cfg: EvalConfig) -> dict:
    """Run ``cfg.episodes`` episodes and write the report under ``cfg.out``. Returns the metrics
    on rank 0 and ``{}`` on the other ranks."""
    if cfg.episodes < 1:
        raise EvalError(f"episodes must be >= 1, got {cfg.episodes}")
    if not 0 <= cfg.seed <= SEED_RANGE - cfg.episodes:
        raise EvalError(f"seed={cfg.seed}: seed + episodes must stay within the evaluation seed "
                        f"range of {SEED_RANGE} (EVAL_SEED_BASE={EVAL_SEED_BASE})")
    rank, world = _rank_world()
    t_start = time.time()
    given_task = _task_from(cfg.task) if cfg.task is not None else None

    if cfg.checkpoint == "expert":
        if given_task is None:
            raise EvalError("checkpoint=expert needs task=<name> (the task whose expert to run)")
        task, label, ckpt = given_task, "expert", "expert"
        if not task.expert:
            raise EvalError(f"task {task.name} has no scripted expert (task.expert is empty)")
    else:
        policy_dir = resolve_checkpoint(cfg.checkpoint)
        label, ckpt = _checkpoint_label(policy_dir), str(policy_dir)
        try:
            saved = json.loads((policy_dir / "config.json").read_text())
            task = _task_from(saved["task"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EvalError(f"checkpoint {label}: {policy_dir / 'config.json'} has no readable "
                            f"task config ({e})") from None
        method = saved.get("method", {})
        if (cfg.num_inference_steps is not None and method.get("name") == "diffusion"
                and cfg.num_inference_steps > method.get("num_train_timesteps", cfg.num_inference_steps)):
            raise EvalError(f"num_inference_steps={cfg.num_inference_steps} exceeds the "
                            f"{method['num_train_timesteps']} steps checkpoint {label} was trained with")
        if given_task is not None:
            if given_task.name != task.name:
                raise EvalError(f"checkpoint {label} was trained for task {task.name!r}, not "
                                f"task={given_task.name!r}")
            task = given_task  # same task, possibly other env settings (checked below)
    max_steps = cfg.max_episode_steps or task.max_episode_steps
    smoothing = cfg.smoothing
    if smoothing not in SMOOTHING:
        raise EvalError(f"smoothing={smoothing!r} is not allowed; expected one of {', '.join(SMOOTHING)}")

    device = _device(cfg.device, rank)
    episodes = list(range(rank, cfg.episodes, world))  # this rank's share of the seeds
    seeds = [EVAL_SEED_BASE + cfg.seed + i for i in episodes]
    n_envs = 1 if cfg.checkpoint == "expert" else (cfg.n_envs or _default_n_envs(len(episodes)))
    n_envs = max(1, min(n_envs, len(episodes)))
    out = Path(cfg.out or Path("rollouts") / task.name / label)
    part = {"rank": rank, "records": [], "latencies_ms": []}
    if episodes:
        for ep in episodes:  # a reused output folder: drop what an earlier run left for these
            (out / "frames" / f"episode_{ep:04d}.png").unlink(missing_ok=True)
            (out / "videos" / f"episode_{ep:04d}.mp4").unlink(missing_ok=True)
        vec = make_vector_env(task, n_envs, max_steps, render=True)
        try:
            if cfg.checkpoint == "expert":
                actor = ExpertActor(task.expert, n_envs)
            else:
                # compare with the env before loading any weights: the checkpoint's own task
                # says which keys and shapes its policy was trained on
                check_compatible(label, task, saved["task"].get("obs_keys", []),
                                 saved.get("shapes"), vec.single_observation_space)
                policy = _load_policy(policy_dir, label, device)
                actor = PolicyActor(policy, n_envs, device, cfg.num_inference_steps, smoothing,
                                    cfg.ensemble_k,
                                    None if cfg.episode_generators else seeds[0])
            records, frames, finals = rollout(actor, vec, episodes, seeds, videos=cfg.videos,
                                              progress=rank == 0 and sys.stderr.isatty())
        finally:
            vec.close()
        out.mkdir(parents=True, exist_ok=True)
        for ep, fr in sorted(frames.items()):
            try:
                report.write_video(out / "videos" / f"episode_{ep:04d}.mp4", fr, fps=task.fps)
            except Exception as e:  # the episodes are done: keep their results, say what is missing
                print(f"dp-eval: warning: no videos ({type(e).__name__}: {e})", file=sys.stderr)
                break
        for ep, img in finals.items():
            report.write_png(out / "frames" / f"episode_{ep:04d}.png", img)
        part = {"rank": rank, "records": records, "latencies_ms": actor.latencies()}

    parts = _gather(out, rank, world, part, t_start)
    meta = {"task": task.name, "env_id": task.env_id, "checkpoint": ckpt, "label": label,
            "seed": cfg.seed, "seed_base": EVAL_SEED_BASE, "world_size": world, "n_envs": n_envs,
            "device": device, "max_episode_steps": max_steps,
            "num_inference_steps": cfg.num_inference_steps,
            "smoothing": smoothing, "episode_generators": cfg.episode_generators,
            "expert": cfg.checkpoint == "expert", "videos": cfg.videos}
    if rank != 0:
        return {}
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["episode"])
    latencies = [x for p in parts for x in p["latencies_ms"]]
    metrics = report.compute_metrics(records, latencies, meta)
    metrics["wall_s"] = round(time.time() - t_start, 3)
    report.write_all(out, metrics, records)
    return metrics


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


def _gather(out: Path, rank: int, world: int, part: dict, t_start: float) -> list | None:
    """Collect every rank's part on rank 0: torch.distributed if initialized, else files."""
    if world == 1:
        return [part]
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        parts = [None] * world
        dist.all_gather_object(parts, part)
        return parts
    pdir = out / "parts"
    pdir.mkdir(parents=True, exist_ok=True)
    tmp = pdir / f".rank{rank:03d}.json.tmp"
    tmp.write_text(json.dumps(part))
    tmp.replace(pdir / f"rank{rank:03d}.json")  # atomic: rank 0 never reads half a file
    if rank != 0:
        return None
    paths = [pdir / f"rank{r:03d}.json" for r in range(world)]
    deadline = time.time() + PART_WAIT_S
    # parts older than this run (a crashed earlier one) are not taken
    while not all(p.is_file() and p.stat().st_mtime >= t_start - 60 for p in paths):
        if time.time() > deadline:
            missing = [p.name for p in paths if not p.is_file()]
            raise EvalError(f"rank 0 waited {PART_WAIT_S:.0f} s for parts {missing} in {pdir}")
        time.sleep(0.5)
    parts = [json.loads(p.read_text()) for p in paths]
    for p in paths:
        p.unlink()
    try:
        pdir.rmdir()
    except OSError:  # something else is in there: leave it
        pass
    return parts


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``dp-eval key=value ...`` (hydra overrides on configs/eval.yaml)."""
    from diffusion_policy.config import run_cli

    def job(cfg):
        metrics = evaluate(cfg)
        if metrics:
            print(report.summary_line(metrics), flush=True)

    return run_cli("dp-eval", "eval", job, argv, __doc__, errors=(EvalError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
