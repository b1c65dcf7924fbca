"""dp/PushT-v0 and v1: Gymnasium's checker, seeding, rendering, exact coverage, v1's walls and the
scripted expert."""
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import mujoco
import numpy as np
import pytest

import envs  # noqa: F401  (registers dp/*)
from envs import geometry
from envs.experts import EXPERTS, make_expert
from envs.experts.pusht import PushTExpert
from envs.pusht import TARGET_POSE, UNIT, PushTEnv, PushTWallsEnv

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


VERSIONS = ["dp/PushT-v0", "dp/PushT-v1"]


# ------------------------------------------------------------------------------ environment
@pytest.mark.parametrize("env_id", VERSIONS)
@pytest.mark.parametrize("mode", ["state", "keypoints"])
def test_check_env_no_warnings(mode, env_id):
    env = gym.make(env_id, obs_mode=mode)
    check_env_without_warnings(env)
    env.close()


@needs_gl
@pytest.mark.parametrize("env_id", VERSIONS)
def test_check_env_image_and_render(env_id):
    env = gym.make(env_id, obs_mode="image", render_mode="rgb_array")
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


@pytest.mark.parametrize("env_id", VERSIONS)
def test_seeded_reset_and_steps_are_deterministic(env_id):
    def run(seed):
        env = gym.make(env_id)
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


def test_versions_registered_and_alike_but_for_walls():
    """v0 stays what it was (open table, setpoints up to 0.25); v1 is v0 inside walls: the same
    spaces and the same starting state for the same seed."""
    assert gym.spec("dp/PushT-v0").entry_point == "envs.pusht:PushTEnv"
    assert gym.spec("dp/PushT-v1").entry_point == "envs.pusht:PushTWallsEnv"
    assert gym.spec("dp/PushT-v0").max_episode_steps == gym.spec("dp/PushT-v1").max_episode_steps == 300
    v0, v1 = gym.make("dp/PushT-v0", obs_mode="keypoints"), gym.make("dp/PushT-v1", obs_mode="keypoints")
    assert type(v0.unwrapped) is PushTEnv and type(v1.unwrapped) is PushTWallsEnv
    assert (v0.unwrapped.agent_limit, v1.unwrapped.agent_limit) == (0.25, 0.238)
    for env, solid in ((v0, []), (v1, ["wall_e", "wall_n", "wall_s", "wall_w"])):
        m = env.unwrapped.model
        static = [m.geom(i).name for i in range(m.ngeom) if m.geom_bodyid[i] == 0 and m.geom_contype[i]]
        assert sorted(static) == solid
    assert v0.action_space == v1.action_space and v0.observation_space == v1.observation_space
    for seed in (0, 5):
        o0, i0 = v0.reset(seed=seed)
        o1, i1 = v1.reset(seed=seed)
        np.testing.assert_array_equal(o0["keypoint"], o1["keypoint"])
        assert i0 == i1
    v0.close()
    v1.close()


def _push_towards_east_wall(env_id: str, steps: int = 40):
    """Block at (0.1, 0) unrotated, pusher behind it, sent to x = 0.25 (the edge of the action
    space) for ``steps`` steps: returns the env, the largest x of the block's outline over the
    steps and at the end, and the largest x of the pusher."""
    env = gym.make(env_id).unwrapped
    env.reset(seed=0)
    env.data.qpos[:] = 0.0
    env.data.qpos[env._block_qpos] = [0.1, 0.0, 0.0]
    env.data.qpos[env._agent_qpos] = [-0.05, 0.0]
    env.data.act[:] = [-0.05, 0.0]
    mujoco.mj_forward(env.model, env.data)
    block_x, agent_x = [], []
    for _ in range(steps):
        env.step(np.array([0.25, 0.0]))
        block_x.append(env.keypoints()[:, 0].max())
        agent_x.append(env.agent_pos()[0])
    return env, max(block_x), block_x[-1], max(agent_x)


def test_walls_keep_the_block_and_the_pusher_on_the_table():
    """Pushed at the east edge with the servo's full force: on v0 the block leaves the table and
    the camera's view (x > 0.27); on v1 the wall stops it (the block, wedged, spins and sinks in by
    ~5 mm for a step, then rests at 0.25) and the pusher stays on the table."""
    env, block_x, _, agent_x = _push_towards_east_wall("dp/PushT-v0")
    # pusher 0.25 + its radius 0.012 + the stem's half width 0.0175 + the bar's half length 0.07
    assert block_x == pytest.approx(0.3495, abs=1e-3) and agent_x == pytest.approx(0.25, abs=1e-4)
    env, block_x, block_x_end, agent_x = _push_towards_east_wall("dp/PushT-v1")
    assert block_x < 0.256 and block_x_end < 0.2501 and agent_x < 0.2385
    # Empty table: the pusher sent to the corner stops at (0.238, -0.238), touching no wall.
    env.data.qpos[env._block_qpos] = [0.0, 0.0, 0.0]
    mujoco.mj_forward(env.model, env.data)
    for _ in range(15):
        env.step(np.array([0.25, -0.25]))
    np.testing.assert_allclose(env.agent_pos(), [0.238, -0.238], atol=1e-4)
    assert env.data.ncon == 0


@needs_gl
def test_v1_image_shows_the_whole_table():
    """The walls lie inside the 96x96 view: a block pressed against a wall is as visible as one in
    the middle, and every edge of the image is wall."""
    env, _, _, _ = _push_towards_east_wall("dp/PushT-v1", steps=30)
    env.obs_mode = "image"
    image = env._get_obs()["image"].astype(int)
    blue = lambda im: int(((im[..., 2] - im[..., 0]) > 30).sum())  # noqa: E731  (block: bluish)
    at_wall = blue(image)
    env.data.qpos[env._block_qpos] = [0.0, 0.1, 0.0]
    env.data.qpos[env._agent_qpos] = [0.0, -0.2]
    mujoco.mj_forward(env.model, env.data)
    middle = blue(env._get_obs()["image"].astype(int))
    assert middle > 100 and abs(at_wall - middle) <= 0.1 * middle
    edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert (edges.max(axis=-1) < 100).all()  # dark grey walls, nothing else
    env.close()


# ----------------------------------------------------------------------------------- expert
def test_expert_registered():
    assert EXPERTS["pusht"] is PushTExpert
    assert isinstance(make_expert("pusht"), PushTExpert)


@pytest.mark.parametrize("env_id", VERSIONS)
def test_expert_makes_progress_and_succeeds(env_id):
    env = gym.make(env_id)
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
