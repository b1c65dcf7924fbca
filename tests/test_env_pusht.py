"""dp/PushT-v0: Gymnasium's checker, seeding, rendering, exact coverage and the scripted expert."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
import pytest

import envs  # noqa: F401  (registers dp/*)
from envs import geometry
from envs.experts import EXPERTS, make_expert
from envs.experts.pusht import PushTExpert
from envs.pusht import TARGET_POSE, UNIT
from conftest import check_env_without_warnings, needs_gl


# ------------------------------------------------------------------------------------ geometry
def test_clip_convex_squares():
    sq = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert geometry.polygon_area(geometry.clip_convex(sq, sq)) == pytest.approx(1.0)
    assert geometry.polygon_area(geometry.clip_convex(sq + 0.5, sq)) == pytest.approx(0.25)
    assert geometry.polygon_area(geometry.clip_convex(sq + 2.0, sq)) == 0.0


@pytest.mark.parametrize("phi", [0.0, np.pi / 4, 2.0])
@pytest.mark.parametrize("d", [0.1, 0.3, 0.7])
def test_coverage_closed_form(phi, d):
    """Shifting the T by d*u along either of its own axes loses area 4*u*(d*u) of 7*u^2: along x
    the bar loses d*u and the stem 3*d*u; along y the bar loses 4*d*u, the stem d*u, and the
    shifted stem gains d*u inside the bar. So coverage = 1 - 4d/7 for 0 <= d <= 1."""
    target = np.array([0.03, -0.02, phi])
    assert geometry.t_coverage(target, target, UNIT) == pytest.approx(1.0)
    for axis in (np.array([1.0, 0.0]), np.array([0.0, 1.0])):
        shift = geometry.rot(phi) @ axis * d * UNIT
        pose = target + np.array([*shift, 0.0])
        assert geometry.t_coverage(pose, target, UNIT) == pytest.approx(1 - 4 * d / 7, abs=1e-12)
    assert geometry.t_coverage(target + np.array([0.5, 0.0, 0.0]), target, UNIT) == 0.0
    # Just out of reach of each other (the stem's tip meets the bar): zero without the early exit.
    assert geometry.t_overlap(target + np.array([*(geometry.rot(phi) @ [0, 4 * UNIT]), 0.0]),
                              target, UNIT) == pytest.approx(0.0, abs=1e-15)


def test_coverage_matches_monte_carlo():
    """Random overlapping poses: the exact area agrees with a point count within its noise."""
    rng = np.random.default_rng(0)
    pts = rng.uniform(-3 * UNIT, 3 * UNIT, size=(200_000, 2))

    def inside_t(pose, p):
        local = geometry.to_local(p, pose)
        return np.any([np.all((local >= r.min(0)) & (local <= r.max(0)), axis=1)
                       for r in geometry.t_pieces(UNIT)], axis=0)

    for _ in range(3):
        pose = np.array([*rng.uniform(-0.02, 0.02, 2), rng.uniform(-np.pi, np.pi)])
        target = np.array([0.0, 0.0, 0.7])
        mc = (inside_t(pose, pts) & inside_t(target, pts)).mean() * (6 * UNIT) ** 2
        assert geometry.t_overlap(pose, target, UNIT) == pytest.approx(mc, abs=3e-5)


def test_path_around_square():
    sq = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    p, q = np.array([-0.5, 0.4]), np.array([1.5, 0.4])
    path = geometry.path_around(p, q, sq)
    assert geometry.polyline_length([p] + path) == pytest.approx(2 * np.hypot(0.5, 0.4) + 1.0)
    pts = [p] + path
    assert not any(geometry.segment_hits_convex(a, b, sq) for a, b in zip(pts[:-1], pts[1:]))
    assert geometry.path_around(p, np.array([-0.5, 2.0]), sq)[0][0] == -0.5  # straight: visible


# ------------------------------------------------------------------------------ environment
@pytest.mark.parametrize("mode", ["state", "keypoints"])
def test_check_env_no_warnings(mode):
    env = gym.make("dp/PushT-v0", obs_mode=mode)
    check_env_without_warnings(env)
    env.close()


@needs_gl
def test_check_env_image_and_render():
    env = gym.make("dp/PushT-v0", obs_mode="image", render_mode="rgb_array")
    check_env_without_warnings(env)
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (96, 96, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 5  # not a blank frame
    frame = env.render()
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    env.close()


def test_observation_layout_and_info():
    env = gym.make("dp/PushT-v0", obs_mode="keypoints")
    obs, info = env.reset(seed=3)
    u = env.unwrapped
    assert obs["keypoint"].shape == (18,) and obs["agent_pos"].shape == (2,)
    pose = u.block_pose()
    corners = geometry.transform(geometry.t_outline(UNIT), pose)
    np.testing.assert_allclose(obs["keypoint"].reshape(9, 2)[:8], corners, atol=1e-6)
    assert info["coverage"] == pytest.approx(geometry.t_coverage(pose, TARGET_POSE, UNIT))
    assert info["success"] is False
    obs, reward, terminated, truncated, info = env.step(obs["agent_pos"])
    assert 0.0 <= reward <= 1.0 and reward == info["coverage"] and not terminated
    env.close()


def test_seeded_reset_and_steps_are_deterministic():
    def run(seed):
        env = gym.make("dp/PushT-v0")
        obs, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        out = [obs["state"]]
        for _ in range(20):
            out.append(env.step(env.action_space.sample())[0]["state"])
        env.close()
        return np.array(out)

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.allclose(run(7)[0], run(8)[0])


def test_block_is_quasi_static_and_pushable():
    """Pushed through its centre of mass the block slides straight; released, it stops at once."""
    env = gym.make("dp/PushT-v0").unwrapped
    env.reset(seed=0)
    env.data.qpos[:] = 0.0
    env.data.qpos[env._agent_qpos] = [-0.1, 0.0]
    env.data.act[:] = [-0.1, 0.0]
    import mujoco

    mujoco.mj_forward(env.model, env.data)
    for _ in range(6):
        env.step(np.array([0.1, 0.0]))
    pose = env.block_pose()
    assert pose[0] > 0.05 and abs(pose[1]) < 1e-3 and abs(pose[2]) < 0.01
    env.step(env.agent_pos() - [0.03, 0.0])  # back off
    before = env.block_pose()
    for _ in range(3):
        env.step(env.agent_pos())
    np.testing.assert_allclose(env.block_pose(), before, atol=1e-4)


# ----------------------------------------------------------------------------------- expert
def test_expert_registered():
    assert EXPERTS["pusht"] is PushTExpert
    assert isinstance(make_expert("pusht"), PushTExpert)


def test_expert_makes_progress_and_succeeds():
    env = gym.make("dp/PushT-v0")
    obs, info = env.reset(seed=9)
    expert = make_expert("pusht")
    expert.reset(env, np.random.default_rng(9))
    start, covs = info["coverage"], []
    for _ in range(300):
        action = expert.act(env)
        assert env.action_space.contains(action)
        obs, reward, terminated, truncated, info = env.step(action)
        covs.append(info["coverage"])
        if terminated or truncated:
            break
    assert max(covs[:20]) > start + 0.2
    assert info["success"] and terminated
    env.close()


def test_task_configs_compose():
    from diffusion_policy.config import compose

    for name, keys in (("pusht", ["keypoint", "agent_pos"]),
                       ("pusht_image", ["image", "agent_pos"])):
        cfg = compose("eval", ["checkpoint=expert", f"task={name}"])
        assert cfg.task.obs_keys == keys and cfg.task.expert == "pusht"
        assert cfg.task.max_episode_steps == 300


def test_expert_is_seeded_and_diverse():
    """Same generator: the same actions; other generators: other routes from the same start."""
    def actions(rng_seed, n=25):
        env = gym.make("dp/PushT-v0")
        env.reset(seed=4)
        expert = make_expert("pusht")
        expert.reset(env, np.random.default_rng(rng_seed))
        out = []
        for _ in range(n):
            out.append(expert.act(env))
            if env.step(out[-1])[2]:
                break
        env.close()
        return np.array(out)

    first = actions(0)
    np.testing.assert_array_equal(first, actions(0))
    others = [actions(s) for s in (1, 2)]
    assert all(len(o) != len(first) or np.abs(o - first).max() > 0.01 for o in others)
