"""Push-T in MuJoCo: a round pusher pushes a T-shaped block until it covers a fixed target T.

The task of Florence et al. (Implicit BC, 2021) and Chi et al. (Diffusion Policy, 2023), rebuilt on
MuJoCo with a quasi-static block (see ``assets/pusht.xml`` for the physical choices).

Two versions, registered in ``envs/__init__.py``:

- ``dp/PushT-v0`` (:class:`PushTEnv`, ``assets/pusht.xml``): an open table; a push can take the
  block off the table and out of the camera's view, where it stays.
- ``dp/PushT-v1`` (:class:`PushTWallsEnv`, ``assets/pusht_v1.xml``): the same task inside walls, as
  in the original pymunk Push-T: the block and the pusher stay on the table, in view.
"""
from __future__ import annotations

from pathlib import Path

from envs.rendering import make_renderer  # first: it chooses MUJOCO_GL before mujoco is imported

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

from envs import geometry

ASSET = Path(__file__).parent / "assets" / "pusht.xml"
ASSET_V1 = Path(__file__).parent / "assets" / "pusht_v1.xml"
UNIT = 0.035  # stem width u of the T (m); the XML's block and target geoms use the same numbers
TARGET_POSE = np.array([0.0, 0.0, np.pi / 4])
ARENA = 0.25  # actions (pusher targets) lie in [-ARENA, ARENA]^2; v1's table is this square
SUCCESS_COVERAGE = 0.95
# Keypoints: the 8 outline corners of the T and the middle of the stem's bottom edge (its tip).
KEYPOINTS_LOCAL = np.concatenate(
    [geometry.t_outline(UNIT), geometry.t_outline(UNIT)[:2].mean(axis=0, keepdims=True)])


class PushTEnv(gym.Env):
    """Push a T-shaped block onto a fixed target T with a round pusher.

    ## Action Space
    ``Box(-0.25, 0.25, (2,), float32)``: the target position (m) of the pusher in the arena. A
    position servo tracks a setpoint that moves towards the target at up to ``max_speed`` m/s
    (0.4 by default), i.e. up to 4 cm per 0.1 s control step. The setpoint stays within
    ``agent_limit`` (the model's actuator range: 0.25 here, 0.238 in :class:`PushTWallsEnv`).

    ## Observation Space
    A ``Dict`` of float32 / uint8 boxes chosen by ``obs_mode``:

    - ``"state"``: ``{"state": (5,)}`` pusher x, y, block x, y (centre of mass), block angle
      (rad, wrapped to [-pi, pi)).
    - ``"keypoints"``: ``{"keypoint": (18,), "agent_pos": (2,)}``: 9 points of the block's outline
      in the world frame (its 8 corners, then the tip of the stem), flattened x0, y0, x1, ...,
      and the pusher position.
    - ``"image"``: ``{"image": (96, 96, 3) uint8, "agent_pos": (2,)}``: a top-down orthographic
      view of the arena (target T green, block blue, pusher red) and the pusher position.

    ## Rewards
    The fraction of the target T's area covered by the block, in [0, 1], computed exactly by
    polygon intersection (``envs.geometry.t_coverage``). ``info["coverage"]`` holds the same
    number, ``info["success"]`` is ``coverage >= 0.95``.

    ## Starting State
    Pusher uniform in [-0.2, 0.2]^2, block centre uniform in [-0.15, 0.15]^2 and angle uniform in
    [-pi, pi), drawn from ``self.np_random`` until the pusher does not touch the block and the
    block does not already succeed.

    ## Episode End
    Terminated on success (coverage >= 0.95). Truncated by the registration's time limit:
    300 steps (30 s at 10 Hz) for ``dp/PushT-v0`` and ``dp/PushT-v1``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    asset = ASSET  # the MJCF model; the version's dynamics live there

    def __init__(self, obs_mode: str = "state", render_mode: str | None = None,
                 render_size: int = 256, image_size: int = 96, max_speed: float = 0.4):
        if obs_mode not in ("state", "keypoints", "image"):
            raise ValueError(f"PushTEnv: obs_mode must be 'state', 'keypoints' or 'image', "
                             f"got {obs_mode!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(
                f"PushTEnv: render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.obs_mode, self.render_mode = obs_mode, render_mode
        self.render_size, self.image_size, self.max_speed = render_size, image_size, max_speed
        self.model = mujoco.MjModel.from_xml_path(str(self.asset))
        self.data = mujoco.MjData(self.model)
        self.control_dt = 0.1  # 10 Hz
        self.frame_skip = int(round(self.control_dt / self.model.opt.timestep))
        self.unit, self.target_pose = UNIT, TARGET_POSE.copy()
        self._block_qpos = np.array([self.model.joint(n).qposadr[0]
                                     for n in ("block_x", "block_y", "block_rot")])
        self._agent_qpos = np.array([self.model.joint(n).qposadr[0]
                                     for n in ("agent_x", "agent_y")])
        self._renderers: dict[int, mujoco.Renderer] = {}
        # The servo's setpoint range (the XML's actrange): where the pusher can be sent. 0.25 in v0;
        # in v1 the table less the pusher's radius, so the pusher never presses into a wall.
        self.agent_limit = float(self.model.actuator("agent_x").actrange[1])

        self.action_space = spaces.Box(-ARENA, ARENA, shape=(2,), dtype=np.float32)
        agent = spaces.Box(-ARENA - 0.05, ARENA + 0.05, shape=(2,), dtype=np.float32)
        if obs_mode == "state":
            lo = np.array([-ARENA - 0.05] * 2 + [-1.0, -1.0, -np.pi], dtype=np.float32)
            self.observation_space = spaces.Dict({"state": spaces.Box(lo, -lo, dtype=np.float32)})
        elif obs_mode == "keypoints":
            self.observation_space = spaces.Dict({
                "keypoint": spaces.Box(-1.0, 1.0, shape=(18,), dtype=np.float32),
                "agent_pos": agent})
        else:
            self.observation_space = spaces.Dict({
                "image": spaces.Box(0, 255, shape=(image_size, image_size, 3), dtype=np.uint8),
                "agent_pos": agent})

    # ------------------------------------------------------------------ simulator state, read-only
    def block_pose(self) -> np.ndarray:
        """(x, y, angle) of the block, angle wrapped to [-pi, pi)."""
        pose = self.data.qpos[self._block_qpos].copy()
        pose[2] = (pose[2] + np.pi) % (2 * np.pi) - np.pi
        return pose

    def agent_pos(self) -> np.ndarray:
        return self.data.body("agent").xpos[:2].copy()

    def coverage(self) -> float:
        return geometry.t_coverage(self.block_pose(), self.target_pose, self.unit)

    # -------------------------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        obs = self.reset_model()
        return obs, self._get_info()

    def reset_model(self) -> dict:
        """Draw the initial pusher and block poses from ``self.np_random`` (rejection sampling)."""
        hull = geometry.convex_hull(geometry.t_outline(self.unit))
        while True:
            agent = self.np_random.uniform(-0.2, 0.2, size=2)
            block = np.array([*self.np_random.uniform(-0.15, 0.15, size=2),
                              self.np_random.uniform(-np.pi, np.pi)])
            local = geometry.to_local(agent[None], block)[0]
            clear = (not geometry.inside_convex(local, hull)
                     and geometry.point_polygon_distance(local, hull) > 0.02)
            if clear and geometry.t_coverage(block, self.target_pose, self.unit) < SUCCESS_COVERAGE:
                break
        self.data.qpos[self._agent_qpos] = agent
        self.data.qpos[self._block_qpos] = block
        self.data.act[:] = agent  # the servo's setpoint starts at the pusher
        mujoco.mj_forward(self.model, self.data)
        return self._get_obs()

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"PushTEnv: action must have shape (2,), got {action.shape}")
        # Setpoint velocity that reaches the target in one control period, capped at max_speed.
        vel = (action - self.data.act) / self.control_dt
        speed = float(np.linalg.norm(vel))
        if speed > self.max_speed:
            vel *= self.max_speed / speed
        self.data.ctrl[:] = vel
        mujoco.mj_step(self.model, self.data, nstep=self.frame_skip)
        self.data.ctrl[:] = 0.0
        obs, info = self._get_obs(), self._get_info()
        return obs, info["coverage"], info["success"], False, info

    def _get_info(self) -> dict:
        cov = self.coverage()
        return {"coverage": cov, "success": bool(cov >= SUCCESS_COVERAGE)}

    def keypoints(self) -> np.ndarray:
        """The 9 keypoints of the block in the world frame, (9, 2)."""
        return geometry.transform(KEYPOINTS_LOCAL, self.block_pose())

    def _get_obs(self) -> dict:
        agent = self.agent_pos().astype(np.float32)
        if self.obs_mode == "state":
            return {"state": np.concatenate([agent, self.block_pose().astype(np.float32)])}
        if self.obs_mode == "keypoints":
            return {"keypoint": self.keypoints().reshape(-1).astype(np.float32), "agent_pos": agent}
        return {"image": self._render(self.image_size), "agent_pos": agent}

    # ------------------------------------------------------------------------------- rendering
    def _render(self, size: int) -> np.ndarray:
        if size not in self._renderers:
            self._renderers[size] = make_renderer(self.model, size, size, owner="PushTEnv")
        renderer = self._renderers[size]
        renderer.update_scene(self.data, camera="top")
        return renderer.render().copy()

    def render(self):
        if self.render_mode == "rgb_array":
            return self._render(self.render_size)
        return None

    def close(self):
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers.clear()


class PushTWallsEnv(PushTEnv):
    """``dp/PushT-v1``: Push-T on a walled table, as in the pymunk Push-T of Chi et al. (2023).

    Identical to :class:`PushTEnv` (``dp/PushT-v0``: spaces, rewards, starting state, episode end)
    except for the model, ``assets/pusht_v1.xml``:

    - Four solid walls fill the band between the table, ``[-0.25, 0.25]^2``, and the edge of the
      camera's view, ``[-0.27, 0.27]^2``: the block slides along them and cannot leave the table or
      the 96x96 image. (In v0 a push can take the block off the table for good.)
    - The pusher's setpoint stays in ``[-0.238, 0.238]^2`` (``agent_limit``: the table less the
      pusher's radius), so the pusher stays on the table; a target beyond that holds it at the wall.

    The starting state never touches a wall: the block's centre is within 0.15 of the middle and
    its outline within 0.095 of its centre, so within 0.245 < 0.25 of the middle.
    """

    asset = ASSET_V1
