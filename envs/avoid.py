"""Avoid: reach a goal around an obstacle, passing left or right of it (a bimodal task).

A disc starts near the bottom of a 1 m square arena and must reach a goal region near the top; a
round obstacle sits between them, across the straight line. There are two equally good ways around
it, and their average runs into the obstacle: a policy that regresses to the mean of the
demonstrations fails, one that represents both modes (and commits to one) succeeds. This is the
multimodality argument of Chi et al., "Diffusion Policy" (RSS 2023), Sec. 4.1, made as small as
possible so that a policy learns it from a few hundred demonstrations on a CPU.
"""
from __future__ import annotations

from pathlib import Path

from envs.rendering import make_renderer  # first: it chooses MUJOCO_GL before mujoco is imported

import mujoco
import numpy as np
from gymnasium import spaces
from gymnasium.envs.mujoco.mujoco_env import MujocoEnv

ASSET = Path(__file__).parent / "assets" / "avoid.xml"

ARENA = 0.47  # the agent's centre stays within [-ARENA, ARENA]^2 (joint ranges in the MJCF)
AGENT_RADIUS = 0.03
OBSTACLE_RADIUS = 0.10
GOAL_RADIUS = 0.06
# Nominal layout and the half-widths of the uniform noise around it. The offsets are small enough
# that the straight start-goal line always meets the obstacle (|dx| < OBSTACLE + AGENT radius).
START, START_NOISE = np.array([0.0, -0.38]), np.array([0.06, 0.03])
GOAL, GOAL_NOISE = np.array([0.0, 0.35]), np.array([0.06, 0.03])
OBSTACLE, OBSTACLE_NOISE = np.array([0.0, 0.0]), np.array([0.04, 0.04])


class AvoidEnv(MujocoEnv):
    """Reach the goal at the top of the arena without touching the obstacle in the middle.

    ## Action Space
    ``Box(-0.47, 0.47, (2,), float32)``: the target position (x, y) in metres of the disc, tracked
    by critically damped position servos (kp = 100 N/m, kv = 20 N s/m, 1 kg disc), as the
    pusher in Push-T. Absolute targets, not velocities. Control at 10 Hz (10 physics steps of 10 ms).

    ## Observation Space
    A ``Dict`` whose keys depend on ``obs_mode``:

    - ``"state"``: ``{"state": Box((6,), float32)}`` = agent x, y, goal x, y, obstacle x, y (metres).
    - ``"image"``: ``{"image": Box(0, 255, (96, 96, 3), uint8), "agent_pos": Box((2,), float32)}``,
      a top-down view (image up = +y, goal green, obstacle red, agent blue) and the agent's x, y.

    ## Rewards
    1.0 on the step that reaches the goal, 0.0 otherwise (so the return is the success, in [0, 1]).

    ## Starting State
    Agent at (0, -0.38), goal at (0, 0.35), obstacle (radius 0.1) at (0, 0), each moved by uniform
    noise of +-(0.06, 0.03), +-(0.06, 0.03) and +-(0.04, 0.04) m drawn from ``self.np_random``. The
    straight line from the start to the goal always passes through the obstacle.

    ## Episode End
    Terminated on success (agent centre within 0.06 m of the goal centre; ``info["success"]``) or
    on collision (the agent's disc overlaps the obstacle; ``info["collision"]``, a failure).
    Truncated after 100 steps by the registration's ``max_episode_steps``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        obs_mode: str = "state",
        render_mode: str | None = None,
        image_size: int = 96,
        render_size: int = 256,
    ):
        if obs_mode not in ("state", "image"):
            raise ValueError(f"AvoidEnv: obs_mode must be 'state' or 'image', got {obs_mode!r}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"AvoidEnv: render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.obs_mode = obs_mode
        self.image_size = image_size
        pos = spaces.Box(-0.5, 0.5, shape=(2,), dtype=np.float32)
        if obs_mode == "state":
            obs_space = spaces.Dict({"state": spaces.Box(-0.5, 0.5, shape=(6,), dtype=np.float32)})
        else:
            img = spaces.Box(0, 255, shape=(image_size, image_size, 3), dtype=np.uint8)
            obs_space = spaces.Dict({"image": img, "agent_pos": pos})
        super().__init__(
            str(ASSET), frame_skip=10, observation_space=obs_space, render_mode=render_mode,
            width=render_size, height=render_size, camera_name="top",
        )
        self.render_size = render_size
        # Renderers are made on first use, so that state-only envs without render_mode need no GL.
        self._obs_renderer = None
        self._render_renderer = None
        self._cam = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, "top")

    # -------------------------------------------------------------------------- simulation state
    @property
    def agent_pos(self) -> np.ndarray:
        return self.data.body("agent").xpos[:2].copy()

    @property
    def goal_pos(self) -> np.ndarray:
        return self.data.body("goal").xpos[:2].copy()

    @property
    def obstacle_pos(self) -> np.ndarray:
        return self.data.body("obstacle").xpos[:2].copy()

    def _uniform(self, centre: np.ndarray, half_width: np.ndarray) -> np.ndarray:
        return centre + self.np_random.uniform(-half_width, half_width)

    def reset_model(self):
        start = self._uniform(START, START_NOISE)
        self.data.mocap_pos[self.model.body("goal").mocapid[0], :2] = self._uniform(GOAL, GOAL_NOISE)
        self.data.mocap_pos[self.model.body("obstacle").mocapid[0], :2] = self._uniform(
            OBSTACLE, OBSTACLE_NOISE
        )
        # The servo target starts at the start position, so the disc rests until the first action.
        self.data.ctrl[:] = start
        self.set_state(start, np.zeros(2))  # slide joints measure from the body's origin (0, 0)
        return self._get_obs()

    def _get_obs(self) -> dict:
        if self.obs_mode == "state":
            state = np.concatenate([self.agent_pos, self.goal_pos, self.obstacle_pos])
            return {"state": state.astype(np.float32)}
        return {"image": self._render_obs(), "agent_pos": self.agent_pos.astype(np.float32)}

    def _render_obs(self) -> np.ndarray:
        if self._obs_renderer is None:
            self._obs_renderer = make_renderer(
                self.model, self.image_size, self.image_size, owner="AvoidEnv")
        self._obs_renderer.update_scene(self.data, camera=self._cam)
        return self._obs_renderer.render().copy()  # (H, W, 3) uint8; the buffer is reused

    # ------------------------------------------------------------------------------ gym API
    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"AvoidEnv: action must have shape (2,) (target x, y), got {action.shape}")
        self.do_simulation(action, self.frame_skip)
        agent = self.agent_pos
        collision = bool(
            np.linalg.norm(agent - self.obstacle_pos) < AGENT_RADIUS + OBSTACLE_RADIUS
        )
        success = bool(np.linalg.norm(agent - self.goal_pos) < GOAL_RADIUS) and not collision
        info = {"success": success, "collision": collision}
        return self._get_obs(), float(success), success or collision, False, info

    def _get_reset_info(self) -> dict:
        return {"success": False, "collision": False}

    def render(self):
        """A top-down frame of ``render_size`` pixels (``render_mode="rgb_array"``), else None."""
        if self.render_mode is None:
            return None
        if self._render_renderer is None:
            self._render_renderer = make_renderer(
                self.model, self.render_size, self.render_size, owner="AvoidEnv")
        self._render_renderer.update_scene(self.data, camera=self._cam)
        return self._render_renderer.render().copy()

    def close(self):
        for name in ("_obs_renderer", "_render_renderer"):
            renderer = getattr(self, name, None)
            if renderer is not None:
                renderer.close()  # explicitly: EGL contexts freed at interpreter exit raise errors
                setattr(self, name, None)
        super().close()
