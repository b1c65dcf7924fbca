"""Rollouts: a policy (behind the receding-horizon controller) or a scripted expert in a batch of
environments, episode seeds taken from a queue so that every episode's result depends on its seed
only. ``dp-eval`` (diffusion_policy/evaluate.py) writes reports from these; ``dp-train`` calls
:func:`run_episodes` for checkpoint selection.
"""
from __future__ import annotations

import functools
import importlib
import multiprocessing as mp
import os

import numpy as np

from diffusion_policy import report
from diffusion_policy.config import TaskConfig


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
def rollout(actor, vec_env, episodes: list, seeds: list, videos: int = 0,
            final_frames: bool = True, progress: bool = False) -> tuple[list, dict, dict]:
    """Run the episodes (indices with their seeds) on ``vec_env``, ``n_envs`` at a time.

    Returns (records in episode order, {episode: video frames} for episodes ``< videos``,
    {episode: final frame}). A record: episode, seed, success, max_reward, return, length,
    rewards, mean_action (the episode's mean action: a fingerprint of what was done), final_info.
    """
    n = vec_env.num_envs
    queue = list(zip(episodes, seeds))[::-1]  # pop() takes the lowest episode first
    slot = [None] * n  # (episode, seed) running in each env
    rewards = [[] for _ in range(n)]
    action_sums = [0.0] * n  # per-dimension sums of the actions taken (a fingerprint of the episode)
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
            rewards[i], success[i], action_sums[i] = [], False, 0.0
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
            action_sums[i] = action_sums[i] + np.asarray(act[i], dtype=np.float64)
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
                                "mean_action": [round(float(x), 6) for x in
                                                np.atleast_1d(action_sums[i]) / len(r)],
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
        n_envs = max(1, min(n_envs or default_n_envs(len(mine)), len(mine)))
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


def default_n_envs(n_episodes: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(n_episodes, (cores or 1) // local_world))
