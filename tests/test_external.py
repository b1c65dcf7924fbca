"""The external-suite adapter: a tiny inline Gymnasium env (Box, and a goal-conditioned nested Dict)
run through ExternalEnv, a "module:callable" expert, and dp-collect by configuration alone; then
MetaWorld, skipped when it is not installed."""
import os
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.envs.registration import register, registry
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401
from diffusion_policy.collect import SEED_KEY, collect
from diffusion_policy.config import CollectConfig, TaskConfig, compose
from diffusion_policy.data.store import EpisodeStore
from envs.experts import make_expert
from envs.external import ExternalEnv, make_external


class Reach(gym.Env):
    """A point on a line reaches a random goal; ``dict_obs`` gives a goal-conditioned nested Dict
    observation and ``is_success`` (gymnasium-robotics' names), else a Box and ``success``."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, dict_obs: bool = False, render_mode=None):
        self.dict_obs, self.render_mode = dict_obs, render_mode
        box = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float64)
        if dict_obs:
            self.observation_space = spaces.Dict({
                "observation": box, "achieved_goal": box, "desired_goal": box,
                "robot": spaces.Dict({"vel": box}),
            })
        else:
            self.observation_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float64)
        self.action_space = spaces.Box(-0.1, 0.1, shape=(1,), dtype=np.float64)

    def _obs(self):
        if self.dict_obs:
            return {"observation": self.x.copy(), "achieved_goal": self.x.copy(),
                    "desired_goal": self.goal.copy(), "robot": {"vel": self.v.copy()}}
        return np.concatenate([self.x, self.goal])

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = self.np_random.uniform(-0.5, 0.5, size=1)
        self.goal = self.np_random.uniform(-0.5, 0.5, size=1)
        self.v = np.zeros(1)
        return self._obs(), {}

    def step(self, action):
        self.v = np.clip(action, -0.1, 0.1)
        self.x = np.clip(self.x + self.v, -1, 1)
        success = bool(abs(self.x - self.goal)[0] < 0.02)
        info = {"is_success": success} if self.dict_obs else {"success": float(success)}
        return self._obs(), -float(abs(self.x - self.goal)[0]), False, False, info

    def render(self):
        frame = np.zeros((40, 60, 3), np.uint8)
        frame[:, int((self.x[0] + 1) * 29.5)] = 255
        return frame


for _id, _dict in (("test/Reach-v0", False), ("test/ReachDict-v0", True)):
    if _id not in registry:
        register(id=_id, entry_point=Reach, kwargs={"dict_obs": _dict}, max_episode_steps=50)


def reach_policy(obs):
    """obs -> action for both observation forms (the env's own, untranslated observation)."""
    x, goal = (obs["observation"], obs["desired_goal"]) if isinstance(obs, dict) else (obs[:1], obs[1:])
    return np.clip(goal - x, -0.1, 0.1)


class ReachPolicy:
    def get_action(self, obs):
        return reach_policy(obs)


def test_box_observation_becomes_state_and_success_terminates():
    env = make_external("test/Reach-v0")
    assert set(env.observation_space.spaces) == {"state"}
    assert env.action_space.dtype == np.float32
    obs, info = env.reset(seed=0)
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (2,) and info["success"] is False
    for _ in range(30):
        obs, reward, terminated, truncated, info = env.step(reach_policy(env.last_raw_obs))
        if terminated:
            break
    assert terminated and info["success"] is True and reward == 1.0 and info["env_reward"] <= 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(ExternalEnv(Reach()), skip_render_check=True)
    unexpected = [str(w.message) for w in caught if "different from the unwrapped" not in str(w.message)]
    assert unexpected == []


def test_nested_goal_dict_is_flattened_and_is_success_mapped():
    env = make_external("test/ReachDict-v0", reward="env")
    assert sorted(env.observation_space.spaces) == ["achieved_goal", "desired_goal", "observation", "robot_vel"]
    obs, _ = env.reset(seed=1)
    assert all(v.dtype == np.float32 for v in obs.values())
    obs, reward, *_ , info = env.step(np.array([0.05]))
    assert obs["robot_vel"][0] == pytest.approx(0.05) and reward < 0 and "success" in info


def test_image_mode_slices_and_errors():
    env = make_external("test/Reach-v0", obs_mode="image", image_size=32, obs_slices={"agent_pos": [0, 1]})
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (32, 32, 3) and obs["image"].dtype == np.uint8
    assert obs["agent_pos"] == pytest.approx(obs["state"][:1])
    with pytest.raises(ValueError, match="render_mode"):
        ExternalEnv(Reach(), obs_mode="image")
    with pytest.raises(ValueError, match="obs_slices"):
        ExternalEnv(Reach(), obs_slices={"agent_pos": [0, 5]})

    class NoSuccess(Reach):
        def step(self, action):
            obs, r, te, tr, _ = super().step(action)
            return obs, r, te, tr, {}

    bad = ExternalEnv(NoSuccess())
    bad.reset(seed=0)
    with pytest.raises(KeyError, match="success"):
        bad.step(np.zeros(1))


@pytest.mark.parametrize("path", ["test_external:reach_policy", "test_external:ReachPolicy"])
def test_callable_expert_from_import_path(path):
    expert = make_expert(path)
    env = make_external("test/Reach-v0")
    env.reset(seed=2)
    expert.reset(env, np.random.default_rng(0))
    assert expert.act(env).dtype == np.float32
    with pytest.raises(ValueError, match="module:callable"):
        make_expert("test_external:")


def test_collect_through_configuration_alone(tmp_path):
    task = TaskConfig(name="reach", env_id="envs.external:dp/External-v0",
                      env_kwargs={"env_id": "test/ReachDict-v0"},
                      obs_keys=["observation", "desired_goal"], max_episode_steps=50,
                      expert="test_external:reach_policy")
    stats = collect(CollectConfig(task=task, episodes=3, out=str(tmp_path / "reach.zarr"), workers=1))
    assert stats["episodes"] == 3 and stats["success_rate"] == 1.0
    store = EpisodeStore.open(tmp_path / "reach.zarr")
    assert {"observation", "desired_goal", "action", SEED_KEY} <= set(store.keys())


# ------------------------------------------------------------------------------------ MetaWorld


def _metaworld():
    try:
        import metaworld  # noqa: F401
    except ImportError:
        pytest.skip("MetaWorld not installed (pip install --no-deps metaworld==3.1.1)")


@pytest.mark.parametrize("name", ["metaworld_button_press", "metaworld_drawer_open"])
def test_metaworld_collect_with_its_scripted_policy(tmp_path, name):
    _metaworld()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MetaWorld's policies warn about their own gains
        stats = collect(compose("collect", [f"task={name}", "episodes=2", f"out={tmp_path / 'mw.zarr'}",
                                            "workers=1"]))
    assert stats["episodes"] == 2 and stats["success_rate"] > 0.5
    store = EpisodeStore.open(tmp_path / "mw.zarr")
    assert store["state"].shape[1:] == (39,) and store["action"].shape[1:] == (4,)


def test_metaworld_reset_is_a_function_of_the_seed():
    _metaworld()
    env = gym.make("envs.external:dp/MetaWorld-v0", task="push-v3")
    a = env.reset(seed=5)[0]["state"]
    env.reset(seed=6)
    b = env.reset(seed=5)[0]["state"]
    c = env.reset(seed=6)[0]["state"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert env.observation_space.contains(env.reset(seed=5)[0])
    env.close()


def test_metaworld_image_observation():
    _metaworld()
    from conftest import gl_available

    if not gl_available():
        pytest.skip("no OpenGL backend (set MUJOCO_GL=egl)")
    task = compose("collect", ["task=metaworld_push_image"]).task
    env = gym.make(task.env_id, **task.env_kwargs)
    obs, _ = env.reset(seed=0)
    assert set(task.obs_keys) <= set(obs)
    assert obs["image"].shape == (96, 96, 3) and obs["image"].dtype == np.uint8 and obs["image"].std() > 5
    np.testing.assert_array_equal(obs["agent_pos"], obs["state"][:4])
    # MetaWorld's cameras render upside down: the observation is its frame flipped vertically.
    np.testing.assert_array_equal(obs["image"], env.unwrapped.render()[::-1])
    env.close()
