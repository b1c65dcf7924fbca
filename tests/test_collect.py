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


# ------------------------------------------------------------------------------------ DART
def _expected_executed(seed, actions, noise, fraction, space):
    """DART's executed actions regenerated from the episode's seed (collect.run_episode's rule)."""
    rng = np.random.default_rng([seed, collect_mod.DART_STREAM])
    if not rng.random() < fraction:
        return actions
    scale = noise * (space.high - space.low)
    return np.stack([np.clip(a + rng.normal(0.0, scale), space.low, space.high).astype(np.float32)
                     for a in actions])


def test_dart_executes_noisy_actions_and_records_the_expert_ones(tmp_path):
    """The env receives action + noise (action_executed), the store's action is what the expert
    chose in the state the noisy execution led to, and the noise comes from the episode's seed."""
    out = tmp_path / "dart.zarr"
    stats = collect(cfg_for(out, "episodes=4", "dart_noise=0.05", "dart_episodes=0.5"))
    store = EpisodeStore.open(out)
    assert store.keys() == ["action", collect_mod.EXECUTED_KEY, SEED_KEY, "state"]
    env = gym.make("dp/Avoid-v0", max_episode_steps=100)
    space = env.action_space
    perturbed = []
    for i in range(store.n_episodes):
        ep = store.get_episode(i)
        seed = int(ep[SEED_KEY][0])
        executed = ep[collect_mod.EXECUTED_KEY]
        np.testing.assert_array_equal(executed, _expected_executed(seed, ep["action"], 0.05, 0.5, space))
        perturbed.append(bool(np.any(executed != ep["action"])))
        # Replay: executing action_executed reproduces the observations, and the expert, asked in
        # each of those states, chooses the recorded action.
        obs, _ = env.reset(seed=seed)
        expert = AvoidExpert()
        expert.reset(env, np.random.default_rng([seed, collect_mod.EXPERT_STREAM]))
        for t in range(len(executed)):
            np.testing.assert_array_equal(obs["state"], ep["state"][t])
            np.testing.assert_array_equal(expert.act(env), ep["action"][t])
            obs, _, terminated, _, info = env.step(executed[t])
        assert terminated and info["success"]
    assert stats["perturbed"] == sum(perturbed) and 0 < sum(perturbed) < 4  # about half, from the seeds
    seeds = store[SEED_KEY][store.episode_ends - 1]
    assert seeds.min() >= COLLECT_SEED_BASE and seeds.max() < COLLECT_SEED_BASE + SEED_RANGE


def test_dart_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"dart_noise=-0.1 must be >= 0"):
        collect(cfg_for(tmp_path / "x.zarr", "dart_noise=-0.1"))
    with pytest.raises(ConfigError, match=r"dart_episodes=0.0 must be in \(0, 1\]"):
        collect(cfg_for(tmp_path / "x.zarr", "dart_noise=0.1", "dart_episodes=0"))
    assert not (tmp_path / "x.zarr").exists()


# ------------------------------------------------------------------------------ provenance
def test_store_records_its_provenance_and_appends_only_the_same(tmp_path):
    out = tmp_path / "avoid.zarr"
    collect(cfg_for(out, "episodes=1"))
    assert collect_mod.store_attrs(out) == {
        "env_id": "dp/Avoid-v0", "env_kwargs": {"obs_mode": "state"}, "task": "avoid", "expert": "avoid",
        "dart_noise": 0.0, "dart_episodes": 1.0, "action": "the expert's action"}
    with pytest.raises(ConfigError, match=r"avoid.zarr: was collected with dart_noise=0.0, this run has "
                                          r"dart_noise=0.1; use another out="):
        collect(cfg_for(out, "episodes=2", "dart_noise=0.1"))
    collect_mod._write_store_attrs(out, {"env_id": "dp/Avoid-v7"})  # as if from another version
    with pytest.raises(ConfigError, match=r"holds episodes of dp/Avoid-v7, but task avoid runs dp/Avoid-v0"):
        collect(cfg_for(out, "episodes=2"))
    assert EpisodeStore.open(out).n_episodes == 1
    old = _pusht_store(tmp_path / "old.zarr")  # no record: from the time dp/PushT was v0 only
    with pytest.raises(ConfigError, match=r"holds episodes of dp/PushT-v0, but task pusht runs dp/PushT-v1"):
        collect(cfg_for(old, "task=pusht", "episodes=3"))
    assert EpisodeStore.open(old).n_episodes == 2 and collect_mod.store_attrs(old) == {}
    dart = tmp_path / "dart.zarr"
    collect(cfg_for(dart, "episodes=1", "dart_noise=0.1", "dart_episodes=0.5"))
    attrs = collect_mod.store_attrs(dart)
    assert (attrs["dart_noise"], attrs["dart_episodes"]) == (0.1, 0.5)
    assert attrs["action"] == "the expert's action (clean; executed with DART noise: action_executed)"


def _pusht_store(path, env_id=None):
    """A two-episode store with Push-T's keys; ``env_id`` recorded as dp-collect records it, or
    nothing recorded (a store written before the record)."""
    store = EpisodeStore.create(path)
    rng = np.random.default_rng(0)
    for n in (20, 24):
        store.add_episode({"keypoint": rng.uniform(-0.2, 0.2, (n, 18)).astype(np.float32),
                           "agent_pos": rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32),
                           "action": rng.uniform(-0.2, 0.2, (n, 2)).astype(np.float32)})
    if env_id is not None:
        collect_mod._write_store_attrs(path, {"env_id": env_id})
    return path


def test_store_of_another_env_version_is_refused(tmp_path):
    task = {name: compose("collect", [f"task={name}", "out=x"]).task
            for name in ("pusht", "pusht_v0", "avoid", "pusht_image", "pusht_image_v0")}
    assert task["pusht"].env_id == task["pusht_image"].env_id == "dp/PushT-v1"
    assert task["pusht_v0"].env_id == task["pusht_image_v0"].env_id == "dp/PushT-v0"
    v0, v1, old = (_pusht_store(tmp_path / "v0.zarr", "dp/PushT-v0"), _pusht_store(tmp_path / "v1.zarr", "dp/PushT-v1"),
                   _pusht_store(tmp_path / "old.zarr"))
    with pytest.raises(ConfigError) as e:
        collect_mod.check_store_task(v0, task["pusht"])
    assert str(e.value) == (f"{v0}: was collected on dp/PushT-v0, but task pusht runs dp/PushT-v1; "
                            f"collect a new store with task=pusht or train with task=pusht_v0")
    with pytest.raises(ConfigError) as e:
        collect_mod.check_store_task(old, task["pusht_image"])
    assert str(e.value) == (f"{old}: records no env id (stores written before the record came from v0 tasks), "
                            f"taken as dp/PushT-v0, but task pusht_image runs dp/PushT-v1; collect a new "
                            f"store with task=pusht_image or train with task=pusht_image_v0")
    with pytest.raises(ConfigError, match="was collected on dp/PushT-v1, but task pusht_v0 runs dp/PushT-v0; "
                                          "collect a new store with task=pusht_v0$"):
        collect_mod.check_store_task(v1, task["pusht_v0"])
    for path, name in ((v1, "pusht"), (v0, "pusht_v0"), (old, "pusht_v0"), (old, "avoid")):
        collect_mod.check_store_task(path, task[name])  # no error


def test_dp_train_refuses_a_v0_store_for_the_v1_task(tmp_path, capsys):
    from diffusion_policy.train import main as train_main

    store = _pusht_store(tmp_path / "v0.zarr", "dp/PushT-v0")
    run = tmp_path / "run"
    argv = ["task=pusht", f"data={store}", f"run_dir={run}", "device=cpu", "policy=mlp", "method=regression",
            "steps=1"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "was collected on dp/PushT-v0, but task pusht runs dp/PushT-v1" in err
    assert not (run / "checkpoints").exists()
