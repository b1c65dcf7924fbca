"""What the per-task environment benchmarks (env_avoid.py, env_pusht.py, env_pickplace.py) share.
Imported as a sibling module: run those scripts from the repository root as
``python benchmarks/env_<task>.py`` (Python puts the script's folder on the path)."""
from __future__ import annotations

import time

from diffusion_policy.collect import make_env


def steps_per_second(env_id: str, env_kwargs: dict, n_steps: int) -> float:
    """Env steps per second with seeded random actions, resetting whenever an episode ends (reset
    time included). One step runs before the clock starts: the image renderer is created on the
    first observation, and that one-off cost is not a per-step cost."""
    env = make_env(env_id, dict(env_kwargs), 10**6)
    env.reset(seed=0)
    env.action_space.seed(0)
    actions = [env.action_space.sample() for _ in range(n_steps)]
    env.step(actions[0])
    t0 = time.perf_counter()
    for a in actions:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    rate = n_steps / (time.perf_counter() - t0)
    env.close()
    return rate
