"""``dp-collect``: record a task's scripted expert into a Zarr episode store.

    dp-collect task=avoid episodes=200                     # -> data/avoid.zarr
    dp-collect task=pusht episodes=100 out=data/pusht.zarr workers=2
    dp-collect task=metaworld_push episodes=50             # MetaWorld's own scripted policy

Attempt ``i`` resets the env with seed ``COLLECT_SEED_BASE + seed + i`` (a range disjoint from the
selection and evaluation seeds, diffusion_policy.config) and runs the expert until the episode
ends. Only successful attempts are stored, in seed order, each with the observation of every step
(obs at step t, all keys of the env's observation), the action taken at step t (``action``) and
its seed (``episode_seed``, constant over the episode). Running the command again appends, from the
attempt after the last stored one, until the store holds ``episodes`` episodes.

Workers are separate *spawned* processes (never forked: a forked OpenGL context crashes MuJoCo's
renderer); each owns one env and one expert and returns whole episodes; only this process writes.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from diffusion_policy.config import (
    COLLECT_SEED_BASE,
    SEED_RANGE,
    CollectConfig,
    ConfigError,
    run_cli,
)

SEED_KEY = "episode_seed"
EXPERT_STREAM = 0xC011EC7  # the expert's generator: SeedSequence([seed, EXPERT_STREAM]), not the env's


# ------------------------------------------------------------------------------ one episode
def make_env(env_id: str, env_kwargs: dict, max_episode_steps: int):
    import gymnasium as gym

    import envs  # noqa: F401  (registers dp/*)

    try:
        return gym.make(env_id, max_episode_steps=max_episode_steps, **env_kwargs)
    except gym.error.Error as e:  # unknown id, missing module of a peer suite, ...
        raise ConfigError(f"task.env_id={env_id!r}: {e}") from None


def run_episode(env, expert, seed: int) -> dict:
    """Run ``expert`` from ``env.reset(seed=seed)`` to the episode's end.

    Returns ``{"seed", "success", "steps", "seconds", "data"}``; ``data`` holds ``(T, ...)`` arrays
    of every observation key, ``action`` and ``episode_seed`` (obs[t] is what the expert saw when it
    chose action[t]; the observation after the last action is not kept).
    """
    t0 = time.perf_counter()
    obs, info = env.reset(seed=seed)
    expert.reset(env, np.random.default_rng([seed, EXPERT_STREAM]))
    frames: dict[str, list] = {key: [] for key in obs}
    actions = []
    success, done = False, False
    while not done:
        action = np.asarray(expert.act(env), dtype=np.float32)
        for key, value in obs.items():
            frames[key].append(value)
        actions.append(action)
        obs, _, terminated, truncated, info = env.step(action)
        success = bool(info.get("success", False))
        done = terminated or truncated
    data = {key: np.stack(v) for key, v in frames.items()}
    data["action"] = np.stack(actions)
    data[SEED_KEY] = np.full(len(actions), seed, dtype=np.int64)
    return {"seed": seed, "success": success, "steps": len(actions),
            "seconds": time.perf_counter() - t0, "data": data}


# Worker processes: one env and one expert each, made once by the pool's initializer.
_WORKER: dict = {}


def _init_worker(env_id: str, env_kwargs: dict, max_episode_steps: int, expert: str) -> None:
    from envs.experts import make_expert

    _WORKER["env"] = make_env(env_id, env_kwargs, max_episode_steps)
    _WORKER["expert"] = make_expert(expert)


def _worker_episode(seed: int) -> dict:
    result = run_episode(_WORKER["env"], _WORKER["expert"], seed)
    if not result["success"]:
        result["data"] = None  # failures are not stored: do not ship their frames back
    return result


# ------------------------------------------------------------------------------------ job
def attempt_seeds(seed_offset: int, n_attempts: int) -> tuple[int, int]:
    """First and last+1 seed of attempts ``0 .. n_attempts-1``; raises if they leave the range."""
    if seed_offset < 0:
        raise ConfigError(f"seed={seed_offset} must be >= 0")
    first = COLLECT_SEED_BASE + seed_offset
    stop = first + n_attempts
    if stop > COLLECT_SEED_BASE + SEED_RANGE:
        raise ConfigError(
            f"collection seeds {first}..{stop - 1} (seed={seed_offset}, up to {n_attempts} attempts) "
            f"would leave the collection range [{COLLECT_SEED_BASE}, {COLLECT_SEED_BASE + SEED_RANGE}) "
            f"and reach the selection/evaluation seeds; use a smaller seed or fewer episodes"
        )
    return first, stop


def _stored_seeds(store) -> set[int]:
    if store.n_episodes == 0 or SEED_KEY not in store:
        return set()
    return {int(s) for s in store[SEED_KEY][store.episode_ends - 1]}


def collect(cfg: CollectConfig) -> dict:
    """Fill ``cfg.out`` with ``cfg.episodes`` successful expert episodes; returns the statistics
    (also printed): ``episodes`` (in the store), ``added``, ``attempts``, ``successes``,
    ``success_rate`` (of this run's attempts), ``seconds_per_episode`` (wall clock per attempt),
    ``mean_steps``, ``seeds`` ([first, last] attempted)."""
    from tqdm import tqdm

    from diffusion_policy.data.store import EpisodeStore

    task = cfg.task
    if not task.expert:
        raise ConfigError(f"task {task.name} has no scripted expert (task.expert is empty)")
    if cfg.episodes < 1:
        raise ConfigError(f"episodes={cfg.episodes} must be >= 1")
    max_attempts = math.ceil(cfg.episodes * cfg.max_attempts_factor)
    first, stop = attempt_seeds(cfg.seed, max_attempts)

    # The env's observation keys, checked against the task before any episode runs.
    from envs.experts import make_expert

    env = make_env(task.env_id, dict(task.env_kwargs), task.max_episode_steps)
    try:
        expert = make_expert(task.expert)
    except (KeyError, ImportError, AttributeError) as e:
        raise ConfigError(f"task.expert={task.expert!r}: {e.args[0] if e.args else e}") from None
    keys = sorted(env.observation_space.spaces) + ["action", SEED_KEY]
    missing = [k for k in task.obs_keys if k not in env.observation_space.spaces]
    if missing:
        env.close()
        raise ConfigError(f"task {task.name}: obs_keys {missing} are not observations of {task.env_id} "
                          f"(it gives {sorted(env.observation_space.spaces)})")

    out = Path(cfg.out)
    store = EpisodeStore.open(out, mode="a") if out.exists() else EpisodeStore.create(out)
    if store.n_episodes and sorted(store.keys()) != sorted(keys):
        env.close()
        raise ConfigError(f"{out}: holds keys {store.keys()}, but task {task.name} records {sorted(keys)}; "
                          f"use another out= for this task")
    done = _stored_seeds(store)
    need = cfg.episodes - store.n_episodes
    # Resume after the last stored attempt (the attempts before it are decided).
    start = max([s - first + 1 for s in done if first <= s < stop] + [0])
    seeds = [s for s in range(first + start, stop) if s not in done]
    stats = {"task": task.name, "out": str(out), "episodes": store.n_episodes, "added": 0,
             "attempts": 0, "successes": 0, "success_rate": None, "seconds_per_episode": None,
             "mean_steps": None, "seeds": None}
    if need <= 0:
        env.close()
        print(f"dp-collect: {out} already holds {store.n_episodes} episodes (asked for {cfg.episodes})")
        return stats
    if not seeds:
        env.close()
        raise ConfigError(f"no attempts left: {max_attempts} attempts (episodes x max_attempts_factor) "
                          f"from seed {first} are used up; raise max_attempts_factor")

    workers = cfg.workers or len(os.sched_getaffinity(0))
    workers = max(1, min(workers, need, len(seeds)))
    t0 = time.perf_counter()
    steps, attempted = [], []
    bar = tqdm(total=need, desc=f"dp-collect {task.name}", unit="ep", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs get a line every 30 s
    pool = None
    try:
        if workers == 1:
            results = (run_episode(env, expert, s) for s in seeds)
        else:
            env.close()  # the workers make their own; none is open here when they start
            ctx = mp.get_context("spawn")
            pool = ctx.Pool(workers, _init_worker,
                            (task.env_id, dict(task.env_kwargs), task.max_episode_steps, task.expert))
            results = pool.imap(_worker_episode, seeds)  # in seed order, computed ahead
        for r in results:
            attempted.append(r["seed"])
            steps.append(r["steps"])
            if r["success"]:
                stats["successes"] += 1
                store.add_episode(r["data"])
                stats["added"] += 1
                bar.update(1)
            bar.set_postfix(success=f"{stats['successes']}/{len(attempted)}", refresh=False)
            if stats["added"] >= need:
                break
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()  # drop attempts computed ahead of need
            pool.join()
        env.close()
    wall = time.perf_counter() - t0
    n = len(attempted)
    stats.update(episodes=store.n_episodes, attempts=n, success_rate=stats["successes"] / n,
                 seconds_per_episode=wall / n, mean_steps=float(np.mean(steps)),
                 seeds=[attempted[0], attempted[-1]], workers=workers, seconds=wall)
    print(f"dp-collect: {task.name}: expert success {stats['successes']}/{n} = "
          f"{100 * stats['success_rate']:.1f}% (seeds {attempted[0]}-{attempted[-1]}), "
          f"{stats['seconds_per_episode']:.3f} s per episode ({workers} workers, {wall:.1f} s, "
          f"{stats['mean_steps']:.1f} steps per episode); {out}: {store.n_episodes} episodes")
    if store.n_episodes < cfg.episodes:
        print(f"dp-collect: stopped after {max_attempts} attempts with {store.n_episodes} of "
              f"{cfg.episodes} episodes; raise max_attempts_factor to try more seeds", file=sys.stderr)
    return stats


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``dp-collect key=value ...`` (hydra overrides on configs/collect.yaml)."""
    from diffusion_policy.data.store import StoreError

    return run_cli("dp-collect", "collect", collect, argv, __doc__, errors=(StoreError,),
                   interrupted="the store keeps every finished episode, run again to resume")


if __name__ == "__main__":
    sys.exit(main())
