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

DART (Laskey et al., "DART: Noise Injection for Robust Imitation Learning", CoRL 2017)::

    dp-collect task=pusht dart_noise=0.02 dart_episodes=0.5 out=data/pusht_dart.zarr

perturbs the executed actions of a fraction of the episodes with Gaussian noise, so the
demonstrations visit the states a learner drifts into and show the expert's way back; the store's
``action`` is what the expert chose (the label to learn), ``action_executed`` what the env received.

Provenance. The store's root attributes record where it came from (:func:`provenance`): the env id
with its version, the task, the expert and the DART settings. ``dp-collect`` appends only to a store
of the same provenance, and ``dp-train`` refuses a store whose env id is not its task's
(:func:`check_store_task`): a change of a task's dynamics is a new env version, and demonstrations
of the old dynamics are not demonstrations of the new.

Workers are separate *spawned* processes (never forked: a forked OpenGL context crashes MuJoCo's
renderer); each owns one env and one expert and returns whole episodes; only this process writes.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
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
EXECUTED_KEY = "action_executed"  # DART stores: the perturbed action the env received
EXPERT_STREAM = 0xC011EC7  # the expert's generator: SeedSequence([seed, EXPERT_STREAM]), not the env's
DART_STREAM = 0xDA27  # DART's noise: SeedSequence([seed, DART_STREAM]); the expert's draws are unchanged
PROVENANCE_KEYS = ("env_id", "env_kwargs", "task", "expert", "dart_noise", "dart_episodes")


# ------------------------------------------------------------------------------ one episode
def make_env(env_id: str, env_kwargs: dict, max_episode_steps: int):
    import gymnasium as gym

    import envs  # noqa: F401  (registers dp/*)

    try:
        return gym.make(env_id, max_episode_steps=max_episode_steps, **env_kwargs)
    except gym.error.Error as e:  # unknown id, missing module of a peer suite, ...
        raise ConfigError(f"task.env_id={env_id!r}: {e}") from None


def run_episode(env, expert, seed: int, dart_noise: float = 0.0, dart_episodes: float = 1.0) -> dict:
    """Run ``expert`` from ``env.reset(seed=seed)`` to the episode's end.

    Returns ``{"seed", "success", "steps", "seconds", "perturbed", "data"}``; ``data`` holds
    ``(T, ...)`` arrays of every observation key, ``action`` and ``episode_seed`` (obs[t] is what
    the expert saw when it chose action[t]; the observation after the last action is not kept).

    DART (``dart_noise > 0``): the episode is perturbed with probability ``dart_episodes``; then the
    env executes ``action[t] + n[t]``, ``n[t] ~ N(0, (dart_noise * (high - low))^2)`` per dimension,
    kept inside the action space, while ``action[t]`` stays the expert's clean choice (Laskey et
    al. 2017: the noise shows the expert's recovery, the label stays the expert's). ``data`` then
    also holds ``action_executed``. The noise has its own generator, seeded by the episode's seed,
    so the expert's own random draws are those of the clean episode.
    """
    t0 = time.perf_counter()
    obs, info = env.reset(seed=seed)
    expert.reset(env, np.random.default_rng([seed, EXPERT_STREAM]))
    space = env.action_space
    noise_rng = np.random.default_rng([seed, DART_STREAM])
    perturbed = dart_noise > 0 and bool(noise_rng.random() < dart_episodes)
    scale = dart_noise * (space.high - space.low) if perturbed else None
    frames: dict[str, list] = {key: [] for key in obs}
    actions, executed = [], []
    success, done = False, False
    while not done:
        action = np.asarray(expert.act(env), dtype=np.float32)
        for key, value in obs.items():
            frames[key].append(value)
        actions.append(action)
        if perturbed:
            # Clipped to the space: the perturbed action must still be a valid action of the env.
            action = np.clip(action + noise_rng.normal(0.0, scale), space.low, space.high).astype(np.float32)
        executed.append(action)
        obs, _, terminated, truncated, info = env.step(action)
        success = bool(info.get("success", False))
        done = terminated or truncated
    data = {key: np.stack(v) for key, v in frames.items()}
    data["action"] = np.stack(actions)
    if dart_noise > 0:
        data[EXECUTED_KEY] = np.stack(executed)
    data[SEED_KEY] = np.full(len(actions), seed, dtype=np.int64)
    return {"seed": seed, "success": success, "steps": len(actions), "perturbed": perturbed,
            "seconds": time.perf_counter() - t0, "data": data}


# Worker processes: one env and one expert each, made once by the pool's initializer.
_WORKER: dict = {}


def _init_worker(env_id: str, env_kwargs: dict, max_episode_steps: int, expert: str, dart: tuple) -> None:
    from envs.experts import make_expert

    _WORKER["env"] = make_env(env_id, env_kwargs, max_episode_steps)
    _WORKER["expert"] = make_expert(expert)
    _WORKER["dart"] = dart


def _worker_episode(seed: int) -> dict:
    result = run_episode(_WORKER["env"], _WORKER["expert"], seed, *_WORKER["dart"])
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


# ----------------------------------------------------------------------------- provenance
def provenance(cfg: CollectConfig) -> dict:
    """The store attributes that say where a store's episodes came from (JSON types)."""
    task = cfg.task
    return {"env_id": task.env_id, "env_kwargs": dict(task.env_kwargs), "task": task.name,
            "expert": task.expert, "dart_noise": float(cfg.dart_noise),
            "dart_episodes": float(cfg.dart_episodes) if cfg.dart_noise > 0 else 1.0,
            "action": "the expert's action" + (" (clean; executed with DART noise: "
                                               f"{EXECUTED_KEY})" if cfg.dart_noise > 0 else "")}


def store_attrs(path) -> dict:
    """The root attributes of the store at ``path`` (a directory or a ``.zarr.zip``)."""
    import zarr

    path = Path(path)
    backend = (zarr.storage.ZipStore(path, mode="r") if path.is_file()
               else zarr.storage.LocalStore(path, read_only=True))
    try:
        return dict(zarr.open_group(backend, mode="r").attrs)
    finally:
        backend.close()


def _write_store_attrs(path, attrs: dict) -> None:
    import zarr

    zarr.open_group(zarr.storage.LocalStore(Path(path)), mode="r+").attrs.update(attrs)


def recorded_env_id(attrs: dict, env_id: str) -> str | None:
    """The env id a store came from: its ``env_id`` attribute, or for a store written before
    stores recorded it, version 0 of ``env_id``'s family for this package's ``dp/`` tasks (every
    ``dp/`` task was at v0 then); ``None`` where that cannot be known (a peer suite's store)."""
    if "env_id" in attrs:
        return str(attrs["env_id"])
    if env_id.startswith("dp/"):
        return re.sub(r"-v\d+$", "-v0", env_id)
    return None


def check_store_task(path, task) -> None:
    """Raise ConfigError if the store at ``path`` came from another env (or env version) than
    ``task.env_id``: one line naming both."""
    attrs = store_attrs(path)
    came_from = recorded_env_id(attrs, task.env_id)
    if came_from is None or came_from == task.env_id:
        return
    how = ("was collected on" if "env_id" in attrs else
           "records no env id (stores written before the record came from v0 tasks), taken as")
    raise ConfigError(f"{path}: {how} {came_from}, but task {task.name} runs {task.env_id}; "
                      f"collect a new store with task={task.name}{_older_task_hint(task.name, came_from)}")


def _older_task_hint(name: str, env_id: str) -> str:
    """`` or train with task=<name>_vN`` where configs/task/ has that config for the old version."""
    from diffusion_policy.config import CONFIG_DIR

    version = re.search(r"-v(\d+)$", env_id)
    old = f"{name}_v{version[1]}" if version else ""
    return f" or train with task={old}" if old and (Path(CONFIG_DIR) / "task" / f"{old}.yaml").exists() else ""


def _check_same_provenance(path, attrs: dict, origin: dict) -> None:
    """Appending: the store's recorded provenance must be this run's (a store written before the
    record must at least be of the same env version, :func:`recorded_env_id`)."""
    came_from = recorded_env_id(attrs, origin["env_id"])
    if came_from is not None and came_from != origin["env_id"]:
        raise ConfigError(f"{path}: holds episodes of {came_from}, but task {origin['task']} runs "
                          f"{origin['env_id']}; use another out= for this task")
    for key in PROVENANCE_KEYS:
        if key in attrs and attrs[key] != origin[key]:
            raise ConfigError(f"{path}: was collected with {key}={attrs[key]!r}, this run has "
                              f"{key}={origin[key]!r}; use another out= (one store, one provenance)")


def _stored_seeds(store) -> set[int]:
    if store.n_episodes == 0 or SEED_KEY not in store:
        return set()
    return {int(s) for s in store[SEED_KEY][store.episode_ends - 1]}


def collect(cfg: CollectConfig) -> dict:
    """Fill ``cfg.out`` with ``cfg.episodes`` successful expert episodes; returns the statistics
    (also printed): ``episodes`` (in the store), ``added``, ``attempts``, ``successes``,
    ``success_rate`` (of this run's attempts), ``seconds_per_episode`` (wall clock per attempt),
    ``mean_steps``, ``seeds`` ([first, last] attempted), ``perturbed`` (DART episodes among the
    added)."""
    from tqdm import tqdm

    from diffusion_policy.validation import validate

    validate(cfg)  # the task's To, H, Ta and image keys, each error naming its key

    from diffusion_policy.data.integrity import check_store
    from diffusion_policy.data.store import EpisodeStore

    task = cfg.task
    if not task.expert:
        raise ConfigError(f"task {task.name} has no scripted expert (task.expert is empty)")
    if cfg.episodes < 1:
        raise ConfigError(f"episodes={cfg.episodes} must be >= 1")
    if not (math.isfinite(cfg.dart_noise) and cfg.dart_noise >= 0):
        raise ConfigError(f"dart_noise={cfg.dart_noise} must be >= 0 (a fraction of the action range; 0 = off)")
    if not 0 < cfg.dart_episodes <= 1:
        raise ConfigError(f"dart_episodes={cfg.dart_episodes} must be in (0, 1] (the fraction of perturbed episodes)")
    max_attempts = math.ceil(cfg.episodes * cfg.max_attempts_factor)
    first, stop = attempt_seeds(cfg.seed, max_attempts)

    # The env's observation keys, checked against the task before any episode runs.
    from envs.experts import make_expert

    env = make_env(task.env_id, dict(task.env_kwargs), task.max_episode_steps)
    try:
        expert = make_expert(task.expert)
    except (KeyError, ImportError, AttributeError) as e:
        raise ConfigError(f"task.expert={task.expert!r}: {e.args[0] if e.args else e}") from None
    keys = sorted(env.observation_space.spaces) + ["action", SEED_KEY] + ([EXECUTED_KEY] if cfg.dart_noise > 0 else [])
    missing = [k for k in task.obs_keys if k not in env.observation_space.spaces]
    if missing:
        env.close()
        raise ConfigError(f"task {task.name}: obs_keys {missing} are not observations of {task.env_id} "
                          f"(it gives {sorted(env.observation_space.spaces)})")

    out = Path(cfg.out)
    origin = provenance(cfg)
    if out.exists():
        store = EpisodeStore.open(out, mode="a")
        if store.n_episodes:
            try:
                _check_same_provenance(out, store_attrs(out), origin)
            except ConfigError:
                env.close()
                raise
    else:
        store = EpisodeStore.create(out)
    check_store(store)  # no appending to a store with damaged chunks or NaN/inf
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
             "mean_steps": None, "seeds": None, "perturbed": 0}
    if need <= 0:
        env.close()
        print(f"dp-collect: {out} already holds {store.n_episodes} episodes (asked for {cfg.episodes})")
        return stats
    if not seeds:
        env.close()
        raise ConfigError(f"no attempts left: {max_attempts} attempts (episodes x max_attempts_factor) "
                          f"from seed {first} are used up; raise max_attempts_factor")

    _write_store_attrs(out, origin)  # before the first episode: a store is never without its record
    dart = (float(cfg.dart_noise), float(cfg.dart_episodes))
    workers = cfg.workers or len(os.sched_getaffinity(0))
    workers = max(1, min(workers, need, len(seeds)))
    t0 = time.perf_counter()
    steps, attempted = [], []
    bar = tqdm(total=need, desc=f"dp-collect {task.name}", unit="ep", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30.0)  # logs get a line every 30 s
    pool = None
    try:
        if workers == 1:
            results = (run_episode(env, expert, s, *dart) for s in seeds)
        else:
            env.close()  # the workers make their own; none is open here when they start
            ctx = mp.get_context("spawn")
            pool = ctx.Pool(workers, _init_worker, (task.env_id, dict(task.env_kwargs), task.max_episode_steps,
                                                     task.expert, dart))
            results = pool.imap(_worker_episode, seeds)  # in seed order, computed ahead
        for r in results:
            attempted.append(r["seed"])
            steps.append(r["steps"])
            if r["success"]:
                stats["successes"] += 1
                store.add_episode(r["data"])
                stats["added"] += 1
                stats["perturbed"] += int(r["perturbed"])
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
    if cfg.dart_noise > 0:
        print(f"dp-collect: DART noise {cfg.dart_noise} of the action range on {stats['perturbed']} of the "
              f"{stats['added']} episodes added; '{EXECUTED_KEY}' holds the executed actions, 'action' the expert's")
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
