"""dp/PickPlace-v0 and its expert: Gymnasium's checker, seeding, IK, cameras and the expert."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers dp/*)
from envs.experts import EXPERTS, make_expert
from envs.experts.pickplace import PickPlaceExpert, grasp_yaw
from envs.pickplace import PickPlaceEnv

from conftest import check_env_without_warnings, needs_gl


def rollout(env, expert, seed, max_steps=200):
    obs, info = env.reset(seed=seed)
    expert.reset(env, np.random.default_rng(seed))
    for t in range(max_steps):  # noqa: B007  (t is read after the loop: the episode's length)
        obs, reward, terminated, truncated, info = env.step(expert.act(env))
        assert 0.0 <= reward <= 1.0
        if terminated or truncated:
            break
    return info, t + 1


def test_check_env_state_no_warnings():
    env = gym.make("dp/PickPlace-v0")
    check_env_without_warnings(env)
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (12,) and obs["state"].dtype == np.float32
    env.close()


@needs_gl
def test_check_env_image_no_warnings_and_cameras():
    env = gym.make("dp/PickPlace-v0", obs_mode="image", render_mode="rgb_array")
    check_env_without_warnings(env)
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"front_image", "wrist_image", "agent_pos"}
    for key in ("front_image", "wrist_image"):
        assert obs[key].shape == (96, 96, 3) and obs[key].dtype == np.uint8
        assert obs[key].std() > 5  # a scene, not a blank frame
    assert not np.array_equal(obs["front_image"], obs["wrist_image"])
    assert obs["agent_pos"].shape == (5,)
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    env.close()
    env.close()  # closing twice is allowed


def test_seeded_reset_and_steps_are_deterministic():
    env = gym.make("dp/PickPlace-v0")
    actions = np.random.default_rng(0).uniform(-1, 1, size=(5, 5)).astype(np.float32)
    runs = []
    for _ in range(2):
        obs, _ = env.reset(seed=7)
        traj = [obs["state"]]
        for a in actions:
            traj.append(env.step(a)[0]["state"])
        runs.append(np.stack(traj))
    np.testing.assert_array_equal(runs[0], runs[1])
    other, _ = env.reset(seed=8)
    assert not np.array_equal(other["state"], runs[0][0])
    env.close()


def test_reset_samples_cube_and_target_apart_on_the_table():
    env = PickPlaceEnv()
    for seed in range(20):
        env.reset(seed=seed)
        cube, target = env.cube_pos, env.target_pos
        assert 0.35 <= cube[0] <= 0.6 and -0.2 <= cube[1] <= 0.2
        assert np.linalg.norm(cube[:2] - target[:2]) >= 0.12
        assert abs(cube[2] - 0.02) < 1e-6


@pytest.mark.parametrize("goal, yaw", [((0.5, 0.1, 0.1), 0.5), ((0.38, -0.2, 0.03), -1.2),
                                       ((0.6, 0.2, 0.2), 1.4)])
def test_ik_moves_end_effector_to_commanded_pose(goal, yaw):
    env = PickPlaceEnv()
    env.reset(seed=0)
    goal = np.array(goal)
    start = np.linalg.norm(env.ee_pos - goal)
    action = env.target_to_action(goal, yaw, -1.0)
    env.step(action)
    assert np.linalg.norm(env.ee_pos - goal) < start  # moving toward it after one step
    for _ in range(9):
        env.step(action)
    assert np.linalg.norm(env.ee_pos - goal) < 0.005
    assert abs(env.ee_yaw - yaw) < 0.02
    # the end effector stays pointing down: its z axis is the world's
    assert env.data.site("ee").xmat[8] > 0.999


def test_action_mapping_round_trip_and_bad_actions():
    pos, yaw, grip = np.array([0.45, -0.1, 0.12]), 0.3, 1.0
    a = PickPlaceEnv.target_to_action(pos, yaw, grip)
    assert a.dtype == np.float32 and np.all(np.abs(a) <= 1)
    pos2, yaw2, grip2 = PickPlaceEnv.action_to_target(a)
    np.testing.assert_allclose(pos2, pos, atol=1e-6)
    assert abs(yaw2 - yaw) < 1e-6 and grip2 == grip
    env = PickPlaceEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="5 finite numbers"):
        env.step(np.zeros(4))
    with pytest.raises(ValueError, match="5 finite numbers"):
        env.step(np.array([0, 0, 0, np.nan, 0]))
    with pytest.raises(ValueError, match="obs_mode"):
        PickPlaceEnv(obs_mode="pixels")


def test_grasp_yaw_faces_the_cube():
    for yaw in np.linspace(-np.pi, np.pi, 37):
        g = grasp_yaw(yaw)
        assert -np.pi / 4 <= g <= np.pi / 4
        assert abs(np.sin(2 * (g - yaw))) < 1e-9  # differs by a multiple of a quarter turn


def test_expert_registered_and_succeeds_on_fixed_seeds():
    assert EXPERTS["pickplace"] is PickPlaceExpert
    env = gym.make("dp/PickPlace-v0")
    expert = make_expert("pickplace")
    for seed in (0, 1, 2):
        info, steps = rollout(env, expert, seed)
        assert info["success"], f"expert failed on seed {seed}"
        assert steps < 200
    env.close()


def test_expert_episodes_differ_with_the_expert_rng():
    env = gym.make("dp/PickPlace-v0")
    expert = PickPlaceExpert()
    trajs = []
    for rng_seed in (0, 1):
        env.reset(seed=3)
        expert.reset(env, np.random.default_rng(rng_seed))
        actions = []
        for _ in range(10):
            actions.append(expert.act(env))
            env.step(actions[-1])
        trajs.append(np.stack(actions))
    assert not np.allclose(trajs[0], trajs[1])
    env.close()


def test_grasp_holds_the_cube_through_fast_moves():
    env = gym.make("dp/PickPlace-v0")
    u = env.unwrapped
    expert = PickPlaceExpert()
    env.reset(seed=4)
    expert.reset(env, np.random.default_rng(4))
    while expert.phase != "carry":
        env.step(expert.act(env))
    offset = u.cube_pos - u.ee_pos
    # jump the target 15 cm back and forth (1.5 m/s commanded) and up and down
    for i in range(10):
        goal = np.array([0.45, 0.15 * (-1) ** i, 0.15 + 0.05 * (i % 3)])
        env.step(u.target_to_action(goal, 0.3 * (-1) ** i, 1.0))
        assert u.finger_contacts() == 2
    assert np.linalg.norm(u.cube_pos - u.ee_pos - offset) < 0.015  # measured: 6 mm
    env.close()
