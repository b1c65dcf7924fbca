"""Rollouts: a policy (behind the receding-horizon controller) or a scripted expert in a batch of
environments, episode seeds taken from a queue so that every episode's result depends on its seed
only.

    shard = run_shard(task, seeds, make_actor, rank, world, n_envs)   # this rank's episodes
    records, latencies = merge(gather(shard.part(), rank, world))    # every rank's, in order

:func:`run_shard` is the one runner: ``dp-eval`` (diffusion_policy/evaluate.py) writes reports
from it, ``dp-train`` calls :func:`run_episodes` (the same runner, metrics only) for checkpoint
selection, and anything else that rolls a policy out in simulation (a deploy benchmark) passes its
own actor factory (DESIGN.md, "One rollout runner").
"""
from __future__ import annotations

import functools
import importlib
import multiprocessing as mp
import os
from dataclasses import dataclass, field

import numpy as np

from diffusion_policy import report
from diffusion_policy.config import TaskConfig
from diffusion_policy.distributed import gather


class EvalError(RuntimeError):
    """A bad checkpoint, task or option; the message says which and what was expected."""


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
@dataclass
class _Episode:
    """What one environment's running episode has done so far."""

    index: int  # episode number (its place in the seed list)
    seed: int
    rewards: list = field(default_factory=list)
    action_sum: np.ndarray | float = 0.0  # per-dimension sum of the actions taken (a fingerprint)
    success: bool = False
    frames: list | None = None  # (image, step, reward) per step when this episode is recorded


def rollout(actor, vec_env, episodes: list, seeds: list, videos: int = 0,
            final_frames: bool = True, progress: bool = False) -> tuple[list, dict, dict]:
    """Run the episodes (indices with their seeds) on ``vec_env``, ``n_envs`` at a time.

    Returns (records in episode order, {episode: video frames} for episodes ``< videos``,
    {episode: final frame}). A record: episode, seed, success, max_reward, return, length,
    rewards, mean_action (the episode's mean action: a fingerprint of what was done), final_info.
    """
    n = vec_env.num_envs
    queue = list(zip(episodes, seeds))[::-1]  # pop() takes the lowest episode first
    running: list[_Episode | None] = [None] * n  # the episode in each env, None once the queue is empty
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
            running[i] = _Episode(*queue.pop()) if queue else None
            if running[i] is not None:
                mask[i], seed_list[i] = True, int(running[i].seed)
        if not mask.any():
            return
        new, _ = vec_env.reset(seed=seed_list, options={"reset_mask": mask})
        if obs is None:
            obs = {k: np.array(v) for k, v in new.items()}
        for k in obs:
            obs[k][mask] = new[k][mask]
        for i in np.flatnonzero(mask):
            env = vec_env.envs[i] if hasattr(vec_env, "envs") else None
            actor.begin(i, running[i].seed, env)
        if any(running[i].index < videos for i in np.flatnonzero(mask)):
            imgs = render_all()
            for i in np.flatnonzero(mask):
                if imgs is not None and running[i].index < videos:
                    running[i].frames = [(np.asarray(imgs[i]), 0, 0.0)]

    from tqdm import tqdm

    bar = tqdm(total=len(episodes), desc="episodes", disable=not progress, dynamic_ncols=True)
    start(range(n))
    while any(e is not None for e in running):
        active = np.array([e is not None for e in running])
        act = actor.act(obs, active, vec_env)
        act = np.where(active[:, None], act, idle_action[None]).astype(space.dtype)
        new, rew, term, trunc, infos = vec_env.step(act)
        obs = {k: np.array(v) for k, v in new.items()}
        ended = active & (np.asarray(term) | np.asarray(trunc))
        recording = [i for i in np.flatnonzero(active) if running[i].frames is not None]
        imgs = render_all() if recording or (final_frames and ended.any()) else None
        for i in np.flatnonzero(active):
            ep = running[i]
            ep.rewards.append(float(rew[i]))
            ep.action_sum = ep.action_sum + np.asarray(act[i], dtype=np.float64)
            info = _env_info(infos, i)
            ep.success |= bool(info.get("success", False))
            if imgs is not None and ep.frames is not None:
                ep.frames.append((np.asarray(imgs[i]), len(ep.rewards), float(rew[i])))
            if ended[i]:
                if imgs is not None and final_frames:
                    finals[ep.index] = np.asarray(imgs[i])
                if ep.frames is not None:
                    frames[ep.index] = ep.frames
                r = np.asarray(ep.rewards)
                records.append({"episode": int(ep.index), "seed": int(ep.seed), "success": bool(ep.success),
                                "max_reward": float(r.max()), "return": float(r.sum()),
                                "length": int(len(r)), "terminated": bool(term[i]),
                                "mean_action": [round(float(x), 6) for x in
                                                np.atleast_1d(ep.action_sum) / len(r)],
                                "rewards": [round(x, 6) for x in r.tolist()], "final_info": info})
        if ended.any():
            start(np.flatnonzero(ended))
            bar.update(int(ended.sum()))
            bar.set_postfix(success=f"{np.mean([r['success'] for r in records]):.2f}")
    bar.close()
    records.sort(key=lambda rec: rec["episode"])
    return records, frames, finals


# ------------------------------------------------------------------------------- one rank's share
def default_n_envs(n_episodes: int) -> int:
    """One environment per CPU core of this rank (cores shared among torchrun's local ranks)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(n_episodes, (cores or 1) // local_world))


def rank_episodes(n_episodes: int, rank: int = 0, world: int = 1) -> list[int]:
    """Rank ``rank``'s share of episodes ``0 .. n_episodes-1``: ``rank, rank + world, ...``."""
    return list(range(rank, n_episodes, world))


@dataclass
class Shard:
    """What one rank's rollouts gave: records in episode order, predict latencies, and (when
    rendering) video frames of the recorded episodes and every episode's final frame."""

    rank: int
    episodes: list
    n_envs: int
    records: list = field(default_factory=list)
    latencies_ms: list = field(default_factory=list)
    frames: dict = field(default_factory=dict)
    finals: dict = field(default_factory=dict)

    def part(self) -> dict:
        """The JSON-able part that :func:`diffusion_policy.distributed.gather` collects."""
        return {"rank": self.rank, "records": self.records, "latencies_ms": self.latencies_ms}


def run_shard(task: TaskConfig, seeds: list, make_actor, rank: int = 0, world: int = 1, n_envs: int = 0,
              max_episode_steps: int | None = None, render: bool = False, videos: int = 0,
              final_frames: bool = False, progress: bool = False) -> Shard:
    """Roll out this rank's share of ``seeds``: episode ``i`` starts from ``seeds[i]`` and rank
    ``r`` runs ``i = r, r + world, ...`` (:func:`rank_episodes`).

    ``n_envs`` environments (0 = :func:`default_n_envs`, never more than the episodes) of the task
    run in a vector env that is closed on return. ``make_actor(vec_env, n_envs)`` builds the actor
    once the environments exist, so it can compare their observation space with a checkpoint
    before loading any weights. ``render``: environments render rgb arrays, for ``videos`` (the
    first that many episodes) and, with ``final_frames``, every episode's last frame.
    """
    episodes = rank_episodes(len(seeds), rank, world)
    n_envs = max(1, min(n_envs or default_n_envs(len(episodes)), len(episodes)))
    shard = Shard(rank=rank, episodes=episodes, n_envs=n_envs)
    if not episodes:
        return shard
    vec = make_vector_env(task, n_envs, max_episode_steps or task.max_episode_steps, render=render)
    try:
        actor = make_actor(vec, n_envs)
        shard.records, shard.frames, shard.finals = rollout(
            actor, vec, episodes, [seeds[i] for i in episodes], videos=videos,
            final_frames=final_frames, progress=progress)
    finally:
        vec.close()
    shard.latencies_ms = actor.latencies()
    return shard


def merge(parts: list) -> tuple[list, list]:
    """Every rank's parts as one (records in episode order, latencies in ms)."""
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["episode"])
    return records, [x for p in parts for x in p["latencies_ms"]]


def run_episodes(policy, task: TaskConfig, seeds: list, device="cpu", rank: int = 0, world: int = 1,
                 n_envs: int = 0, num_inference_steps: int | None = None, smoothing: str = "none",
                 max_episode_steps: int | None = None) -> dict:
    """Roll ``policy`` out on the given env seeds (no videos, nothing written) and return the
    metrics of :func:`report.compute_metrics`. Every rank calls it with the same seeds and runs
    its share; parts are gathered over torch.distributed (needed when world > 1).
    Used by dp-train for checkpoint selection on the SELECT_SEED_BASE range."""
    def make_actor(vec, n):
        check_compatible(task.name, task, policy.obs_keys, getattr(policy, "shapes", None),
                         vec.single_observation_space)
        return PolicyActor(policy, n, device, num_inference_steps, smoothing)

    shard = run_shard(task, seeds, make_actor, rank, world, n_envs, max_episode_steps)
    records, latencies = merge(gather(shard.part(), rank, world))
    return report.compute_metrics(records, latencies, {"task": task.name, "label": "rollout",
                                                       "n_envs": shard.n_envs})
