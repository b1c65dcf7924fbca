"""dp-collect on the Avoid task with tiny budgets: the real function and the real command, what is
stored (obs at t, action at t, seeds), resuming, failures left out, and the seed-range guard."""
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401
from diffusion_policy import collect as collect_mod
from diffusion_policy.collect import SEED_KEY, collect
from diffusion_policy.config import (
    COLLECT_SEED_BASE,
    SEED_RANGE,
    ConfigError,
    compose,
)
from diffusion_policy.data.store import EpisodeStore
from envs.experts import EXPERTS
from envs.experts.avoid import AvoidExpert

REPO = Path(__file__).resolve().parents[1]


def cfg_for(out, *overrides):
    return compose("collect", [f"out={out}", "workers=1", *overrides])


def test_collect_stores_obs_and_action_at_the_same_step(tmp_path):
    out = tmp_path / "avoid.zarr"
    stats = collect(cfg_for(out, "episodes=3"))
    assert stats["added"] == 3 and stats["episodes"] == 3 and stats["success_rate"] == 1.0
    assert stats["seconds_per_episode"] > 0 and stats["seeds"] == [COLLECT_SEED_BASE, COLLECT_SEED_BASE + 2]
    store = EpisodeStore.open(out)
    assert store.keys() == ["action", SEED_KEY, "state"]
    assert store["state"].dtype == np.float32 and store["action"].shape[1:] == (2,)
    # Replaying episode 1's actions from its seed reproduces its observations step by step.
    ep = store.get_episode(1)
    seed = int(ep[SEED_KEY][0])
    assert (ep[SEED_KEY] == seed).all() and seed == COLLECT_SEED_BASE + 1
    env = gym.make("dp/Avoid-v0", max_episode_steps=100)
    obs, _ = env.reset(seed=seed)
    for t, action in enumerate(ep["action"]):
        np.testing.assert_array_equal(obs["state"], ep["state"][t])
        obs, _, terminated, truncated, info = env.step(action)
    assert terminated and info["success"]


def test_resume_appends_until_the_target(tmp_path):
    out = tmp_path / "avoid.zarr"
    collect(cfg_for(out, "episodes=2"))
    first = EpisodeStore.open(out).get_episode(1)
    stats = collect(cfg_for(out, "episodes=4"))
    assert stats["added"] == 2 and stats["episodes"] == 4
    store = EpisodeStore.open(out)
    seeds = store[SEED_KEY][store.episode_ends - 1]
    np.testing.assert_array_equal(seeds, COLLECT_SEED_BASE + np.arange(4))
    np.testing.assert_array_equal(store.get_episode(1)["action"], first["action"])
    again = collect(cfg_for(out, "episodes=4"))  # nothing to do
    assert again["added"] == 0 and EpisodeStore.open(out).n_episodes == 4


class CrashingHalfTheTime(AvoidExpert):
    """Drives straight into the obstacle on about half of the episodes."""

    def reset(self, env, rng):
        super().reset(env, rng)
        self.crash = rng.random() < 0.5

    def act(self, env):
        return env.unwrapped.obstacle_pos.astype(np.float32) if self.crash else super().act(env)


def test_failed_episodes_are_not_stored(tmp_path, monkeypatch):
    monkeypatch.setitem(EXPERTS, "avoid", CrashingHalfTheTime)
    out = tmp_path / "avoid.zarr"
    stats = collect(cfg_for(out, "episodes=4"))
    assert stats["episodes"] == 4 and stats["attempts"] > 4
    assert stats["success_rate"] == pytest.approx(4 / stats["attempts"])
    store = EpisodeStore.open(out)
    env = gym.make("dp/Avoid-v0", max_episode_steps=100)
    for i in range(store.n_episodes):  # every stored episode ends at the goal
        ep = store.get_episode(i)
        env.reset(seed=int(ep[SEED_KEY][0]))
        for action in ep["action"]:
            *_, info = env.step(action)
        assert info["success"]


def test_gives_up_after_max_attempts(tmp_path, monkeypatch, capsys):
    class Never(AvoidExpert):
        def act(self, env):
            return env.unwrapped.obstacle_pos.astype(np.float32)

    monkeypatch.setitem(EXPERTS, "avoid", Never)
    stats = collect(cfg_for(tmp_path / "x.zarr", "episodes=2", "max_attempts_factor=1.5"))
    assert stats["attempts"] == 3 and stats["episodes"] == 0 and stats["success_rate"] == 0.0
    assert "raise max_attempts_factor" in capsys.readouterr().err


def test_seed_range_is_guarded(tmp_path):
    with pytest.raises(ConfigError, match="collection range"):
        collect(cfg_for(tmp_path / "x.zarr", "episodes=10", f"seed={SEED_RANGE - 5}"))
    assert not (tmp_path / "x.zarr").exists()


def test_wrong_obs_keys_and_mismatched_store(tmp_path):
    with pytest.raises(ConfigError, match="obs_keys"):
        collect(cfg_for(tmp_path / "a.zarr", "episodes=1", "task.obs_keys=[nope]"))
    store = EpisodeStore.create(tmp_path / "b.zarr")
    store.add_episode({"other": np.zeros((3, 2), np.float32)})
    with pytest.raises(ConfigError, match="holds keys"):
        collect(cfg_for(tmp_path / "b.zarr", "episodes=2"))


def test_cli_with_spawned_workers(tmp_path):
    out = tmp_path / "avoid.zarr"
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = subprocess.run(
        [sys.executable, "-m", "diffusion_policy.collect", "task=avoid", "episodes=3", f"out={out}",
         "workers=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "expert success 3/3" in proc.stdout
    assert EpisodeStore.open(out).n_episodes == 3
    bad = subprocess.run([sys.executable, "-m", "diffusion_policy.collect", "task.n_obs_steps=0"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "n_obs_steps" in bad.stderr


def test_run_episode_records_one_row_per_action():
    env = gym.make("dp/Avoid-v0", max_episode_steps=100)
    r = collect_mod.run_episode(env, AvoidExpert(), seed=7)
    assert r["success"] and r["steps"] == len(r["data"]["action"]) == len(r["data"]["state"])
