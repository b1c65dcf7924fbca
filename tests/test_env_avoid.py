"""dp/Avoid-v0 and its expert: Gymnasium's checker, seeding, the expert's success and both routes."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers dp/*)
from envs.avoid import AGENT_RADIUS, OBSTACLE_RADIUS
from envs.experts import EXPERTS, make_expert
from envs.experts.avoid import AvoidExpert

from conftest import check_env_without_warnings, needs_gl


def rollout(env, expert, seed, max_steps=100):
    obs, info = env.reset(seed=seed)
    expert.reset(env, np.random.default_rng(seed))
    for t in range(max_steps):  # noqa: B007  (t is read after the loop: the episode's length)
        obs, reward, terminated, truncated, info = env.step(expert.act(env))
        if terminated or truncated:
            break
    return info, t + 1


def test_check_env_state_no_warnings():
    env = gym.make("dp/Avoid-v0")
    check_env_without_warnings(env)
    env.close()


@needs_gl
def test_check_env_image_and_render():
    env = gym.make("dp/Avoid-v0", obs_mode="image", render_mode="rgb_array")
    check_env_without_warnings(env)
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (96, 96, 3) and obs["image"].dtype == np.uint8
    assert obs["agent_pos"].shape == (2,)
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.std() > 10  # not a blank frame
    env.close()


def test_seeded_reset_is_deterministic_and_random_across_seeds():
    env = gym.make("dp/Avoid-v0")
    a = env.reset(seed=3)[0]["state"]
    b = env.reset(seed=3)[0]["state"]
    c = env.reset(seed=4)[0]["state"]
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Layout: agent bottom, goal top, obstacle between.
    assert a[1] < a[5] < a[3]


def test_collision_terminates_as_failure():
    env = gym.make("dp/Avoid-v0")
    obs, _ = env.reset(seed=0)
    obstacle = obs["state"][4:6]
    for _ in range(30):  # straight at the obstacle
        obs, reward, terminated, truncated, info = env.step(obstacle)
        if terminated:
            break
    assert terminated and info["collision"] and not info["success"] and reward == 0.0
    agent = obs["state"][:2]
    assert np.linalg.norm(agent - obstacle) < AGENT_RADIUS + OBSTACLE_RADIUS


def test_expert_succeeds_by_both_routes():
    env = gym.make("dp/Avoid-v0")
    expert = make_expert("avoid")
    sides, lengths = [], []
    for seed in range(40):
        info, steps = rollout(env, expert, seed)
        assert info["success"], f"expert failed on seed {seed}"
        sides.append(expert.side)
        lengths.append(steps)
    assert 10 <= sides.count(-1) <= 30, sides  # a fair coin, both routes taken
    assert 25 <= np.mean(lengths) <= 50


def test_average_of_the_two_routes_collides():
    env = gym.make("dp/Avoid-v0")
    left, right = AvoidExpert(side=-1), AvoidExpert(side=1)
    for seed in range(10):
        env.reset(seed=seed)
        left.reset(env, np.random.default_rng(seed))
        right.reset(env, np.random.default_rng(seed))
        mean_route = 0.5 * (left._curve + right._curve)  # (N, 2), same curve parameter
        for k in range(100):  # walk the averaged route at the expert's pace
            target = mean_route[min(6 * (k + 1), len(mean_route) - 1)]
            _, _, terminated, truncated, info = env.step(target.astype(np.float32))
            if terminated or truncated:
                break
        assert info["collision"], f"seed {seed}: the averaged route missed the obstacle"


def test_registry():
    assert "avoid" in EXPERTS
    with pytest.raises(KeyError, match="unknown expert"):
        make_expert("no-such-expert")


def test_route_is_independent_of_the_start_even_with_the_env_seed():
    # Seeding the expert with the env's own seed must not tie the route to the initial state.
    env = gym.make("dp/Avoid-v0")
    expert = make_expert("avoid")
    rows = []
    for seed in range(300):
        obs, _ = env.reset(seed=seed)
        expert.reset(env, np.random.default_rng(seed))
        rows.append([*obs["state"], expert.side])
    rows = np.array(rows)
    corr = [abs(np.corrcoef(rows[:, i], rows[:, -1])[0, 1]) for i in range(6)]
    assert max(corr) < 0.2, corr


def test_seeded_regression_values():
    """Recorded values: a change here changes every stored Avoid dataset. Regenerate with
    python -c "import numpy as np, gymnasium as gym, envs; from diffusion_policy.collect import \
    run_episode; from envs.experts import make_expert; env = gym.make('dp/Avoid-v0'); \
    print(env.reset(seed=0)[0]['state']); r = run_episode(env, make_expert('avoid'), 0); \
    print(r['steps'], r['data']['state'][-1], r['data']['action'][10])"
    """
    from diffusion_policy.collect import run_episode

    env = gym.make("dp/Avoid-v0", max_episode_steps=100)
    start = env.reset(seed=0)[0]["state"]
    np.testing.assert_allclose(start, [0.016435, -0.393813, -0.055083, 0.320992, 0.025062, 0.03302], atol=1e-6)
    r = run_episode(env, make_expert("avoid"), 0)
    assert r["steps"] == 36
    np.testing.assert_allclose(r["data"]["state"][-1][:2], [0.003763, 0.281422], atol=1e-5)
    np.testing.assert_allclose(r["data"]["action"][10], [0.194756, -0.156524], atol=1e-5)
