"""Pick-and-place with a 6-DoF arm and a parallel-jaw gripper in MuJoCo (``dp/PickPlace-v0``).

The scene is ``envs/assets/pickplace.xml``. The policy commands an end-effector pose; damped
least-squares inverse kinematics (Nakamura & Hanafusa 1986; Buss 2004, "Introduction to inverse
kinematics with Jacobian transpose, pseudoinverse and damped least squares methods", eq. 10) turns
it into joint targets every control step, and position servos track them.
"""
from __future__ import annotations

import os

from envs.rendering import make_renderer  # first: it chooses MUJOCO_GL before mujoco is imported

import gymnasium as gym
import mujoco
import numpy as np
from gymnasium import spaces

ASSET = os.path.join(os.path.dirname(__file__), "assets", "pickplace.xml")

ARM_JOINTS = ("j1", "j2", "j3", "j4", "j5", "j6")
# Commandable end-effector workspace (metres, radians); the action's [-1, 1] maps onto it.
POS_LOW = np.array([0.2, -0.35, 0.0])
POS_HIGH = np.array([0.7, 0.35, 0.35])
YAW_LIMIT = np.pi / 2  # the gripper is symmetric under a half turn, so +-90 degrees covers it
FINGER_OPEN = 0.045  # finger joint travel (m); the jaw gap is twice this
# Where cubes and targets are placed (x, y ranges on the table), and how far apart they start.
SPAWN_LOW = np.array([0.35, -0.2])
SPAWN_HIGH = np.array([0.6, 0.2])
MIN_SEPARATION = 0.12
CUBE_HALF = 0.02
HOME_POS = np.array([0.4, 0.0, 0.25])
# Success: cube centre within this xy distance of the target, resting and released.
SUCCESS_TOL = 0.025
# Termination as a failure once the cube leaves the table.
TABLE_LOW = np.array([-0.2, -0.6])
TABLE_HIGH = np.array([0.9, 0.6])


class PickPlaceEnv(gym.Env):
    """Pick a cube from a random pose on the table and place it on a marked target.

    ## Action Space
    ``Box(-1, 1, (5,), float32)``: an absolute end-effector target ``(x, y, z, yaw, grip)`` in the
    world frame, each mapped linearly from [-1, 1] onto the workspace: x in [0.2, 0.7] m,
    y in [-0.35, 0.35] m, z in [0, 0.35] m (z of the grasp point, 1.5 cm above the fingertips;
    the table top is z = 0), yaw in [-pi/2, pi/2] (rotation of the gripper about the vertical),
    grip -1 = open (9 cm jaw gap) ... +1 = closed. Actions outside [-1, 1] are clipped, as a robot
    controller clips targets to its workspace. Each step the pose is converted to joint targets by
    damped least-squares IK (``mj_jacSite``, warm-started from the previous solution).
    Use :meth:`target_to_action` / :meth:`action_to_target` to convert.

    ## Observation Space
    A ``Dict`` of float32 Boxes (units: m, rad) and, with ``obs_mode="image"``, uint8 images.
    - ``obs_mode="state"``: ``{"state": (12,)}`` = ee_pos (3), ee_yaw (1), gripper gap (1),
      cube_pos (3), sin(4 cube_yaw), cos(4 cube_yaw) (2: the cube looks the same every quarter
      turn), target_xy (2).
    - ``obs_mode="image"``: ``{"front_image": (S, S, 3), "wrist_image": (S, S, 3),
      "agent_pos": (5,)}`` with ``S = image_size`` (96) and agent_pos = ee_pos, ee_yaw, gap.
      The target is visible only in the images.

    ## Rewards
    Staged, in [0, 1]: 1 on success; otherwise
    ``0.2 * reach + 0.2 * grasped + 0.2 * lifted + 0.3 * grasped * place`` (at most 0.9), where
    ``reach = 1 - tanh(10 |ee - cube|)``, ``grasped`` = both fingers touch the cube, ``lifted`` =
    grasped with the cube 2 cm above its resting height or over the target, and
    ``place = 1 - tanh(10 |cube_xy - target_xy|)``.

    ## Starting State
    The arm starts near its home pose (grasp point at (0.4, 0, 0.25), joints perturbed by
    U(-0.02, 0.02) rad), gripper open. The cube lies flat at xy ~ U([0.35, 0.6] x [-0.2, 0.2]) with
    yaw ~ U(-pi, pi); the target at xy from the same range, at least 12 cm from the cube.

    ## Episode End
    Terminated on success: the cube's centre is within 2.5 cm (xy) of the target, it rests on the
    table (z < 2.5 cm, speed < 5 cm/s) and no finger touches it (``info["success"]``). Terminated
    as a failure if the cube leaves the table. Truncated after 200 steps (10 Hz control, 20 s) by
    the registration's time limit. ``info`` has ``success`` and ``grasped`` on every step.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, obs_mode: str = "state", render_mode: str | None = None,
                 image_size: int = 96, render_size: int = 256, n_substeps: int = 50,
                 ik_iters: int = 8, ik_damping: float = 0.05):
        if obs_mode not in ("state", "image"):
            raise ValueError(f"PickPlaceEnv: obs_mode must be 'state' or 'image', got {obs_mode!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"PickPlaceEnv: render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.obs_mode, self.render_mode = obs_mode, render_mode
        self.image_size, self.render_size = image_size, render_size
        self.n_substeps, self.ik_iters, self.ik_damping = n_substeps, ik_iters, ik_damping

        self.model = mujoco.MjModel.from_xml_path(ASSET)
        self.data = mujoco.MjData(self.model)
        self._ik_data = mujoco.MjData(self.model)  # scratch data: IK never touches the simulation
        m = self.model
        self.dt = m.opt.timestep * n_substeps
        self.metadata = {**self.metadata, "render_fps": round(1.0 / self.dt)}
        self._arm_qadr = np.array([m.joint(j).qposadr[0] for j in ARM_JOINTS])
        self._arm_dadr = np.array([m.joint(j).dofadr[0] for j in ARM_JOINTS])
        self._arm_range = np.array([m.joint(j).range for j in ARM_JOINTS])
        self._finger_qadr = np.array(
            [m.joint(f).qposadr[0] for f in ("finger_left", "finger_right")])
        self._ee = m.site("ee").id
        self._finger_geoms = {m.geom("finger_left").id, m.geom("finger_right").id}
        self._cube_geom = m.geom("cube").id
        self._jacp = np.zeros((3, m.nv))
        self._jacr = np.zeros((3, m.nv))

        # Home joint angles: solved once by IK from the zero pose (gripper down, yaw 0).
        self._q_target = np.zeros(len(ARM_JOINTS))
        self._home_q = self._solve_ik(HOME_POS, 0.0, iters=100)

        self.action_space = spaces.Box(-1.0, 1.0, (5,), np.float32)
        if obs_mode == "state":
            self.observation_space = spaces.Dict(
                {"state": spaces.Box(-10.0, 10.0, (12,), np.float32)})
        else:
            img = spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)
            self.observation_space = spaces.Dict({
                "front_image": img, "wrist_image": img,
                "agent_pos": spaces.Box(-10.0, 10.0, (5,), np.float32)})
        self._renderers: dict[int, mujoco.Renderer] = {}

    # ------------------------------------------------------------------ action <-> target pose
    @staticmethod
    def target_to_action(pos, yaw: float, grip: float) -> np.ndarray:
        """World-frame grasp-point position (m), yaw (rad), grip (-1 open, +1 closed) -> action."""
        a = np.empty(5, np.float32)
        a[:3] = 2.0 * (np.asarray(pos) - POS_LOW) / (POS_HIGH - POS_LOW) - 1.0
        a[3] = yaw / YAW_LIMIT
        a[4] = grip
        return a

    @staticmethod
    def action_to_target(action) -> tuple[np.ndarray, float, float]:
        """Inverse of :meth:`target_to_action` (after clipping the action to [-1, 1])."""
        a = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        pos = POS_LOW + (a[:3] + 1.0) * 0.5 * (POS_HIGH - POS_LOW)
        return pos, float(a[3] * YAW_LIMIT), float(a[4])

    # ------------------------------------------------------------------ inverse kinematics
    def _solve_ik(self, pos: np.ndarray, yaw: float, iters: int | None = None) -> np.ndarray:
        """Joint targets that put the ``ee`` site at ``pos`` pointing down with ``yaw``.

        Damped least squares: dq = J^T (J J^T + lambda^2 I)^-1 e, with e the 6-D pose error
        (position; rotation vector of q_desired * q_current^-1, both in the world frame, matching
        mj_jacSite's world-frame Jacobians). Iterated on a scratch MjData from the previous
        solution, so the result does not depend on how well the servos currently track.
        """
        m, d = self.model, self._ik_data
        q = self._q_target.copy()
        # Rz(yaw): the ee frame is the world frame at q = 0
        quat_des = np.array([np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2)])
        quat_cur, quat_err, rot_err = np.empty(4), np.empty(4), np.empty(3)
        lam2 = self.ik_damping ** 2
        for _ in range(self.ik_iters if iters is None else iters):
            d.qpos[self._arm_qadr] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            mujoco.mju_mat2Quat(quat_cur, d.site_xmat[self._ee])
            mujoco.mju_negQuat(quat_cur, quat_cur)
            mujoco.mju_mulQuat(quat_err, quat_des, quat_cur)
            mujoco.mju_quat2Vel(rot_err, quat_err, 1.0)
            err = np.concatenate([pos - d.site_xpos[self._ee], rot_err])
            if np.linalg.norm(err) < 1e-5:
                break
            mujoco.mj_jacSite(m, d, self._jacp, self._jacr, self._ee)
            jac = np.vstack([self._jacp[:, self._arm_dadr],
                             self._jacr[:, self._arm_dadr]])  # (6, 6)
            dq = jac.T @ np.linalg.solve(jac @ jac.T + lam2 * np.eye(6), err)
            q = np.clip(q + dq, self._arm_range[:, 0], self._arm_range[:, 1])
        return q

    # ------------------------------------------------------------------ state read-out
    @property
    def ee_pos(self) -> np.ndarray:
        return self.data.site("ee").xpos.copy()

    @property
    def ee_yaw(self) -> float:
        r = self.data.site("ee").xmat
        return float(np.arctan2(r[3], r[0]))  # heading of the gripper's x axis

    @property
    def gripper_gap(self) -> float:
        return float(self.data.qpos[self._finger_qadr].sum())

    @property
    def cube_pos(self) -> np.ndarray:
        return self.data.body("cube").xpos.copy()

    @property
    def cube_yaw(self) -> float:
        r = self.data.body("cube").xmat
        return float(np.arctan2(r[3], r[0]))

    @property
    def target_pos(self) -> np.ndarray:
        return self.data.site("target").xpos.copy()

    def finger_contacts(self) -> int:
        """How many fingers touch the cube (0, 1 or 2)."""
        c = self.data.contact
        touching = set()
        for g1, g2 in zip(c.geom1[: self.data.ncon], c.geom2[: self.data.ncon]):
            if g1 == self._cube_geom and g2 in self._finger_geoms:
                touching.add(g2)
            elif g2 == self._cube_geom and g1 in self._finger_geoms:
                touching.add(g1)
        return len(touching)

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        m, d, rng = self.model, self.data, self.np_random
        mujoco.mj_resetData(m, d)
        q = self._home_q + rng.uniform(-0.02, 0.02, size=len(ARM_JOINTS))
        d.qpos[self._arm_qadr] = q
        d.qpos[self._finger_qadr] = FINGER_OPEN
        cube_xy = rng.uniform(SPAWN_LOW, SPAWN_HIGH)
        target_xy = rng.uniform(SPAWN_LOW, SPAWN_HIGH)
        while np.linalg.norm(target_xy - cube_xy) < MIN_SEPARATION:
            target_xy = rng.uniform(SPAWN_LOW, SPAWN_HIGH)
        cube_yaw = rng.uniform(-np.pi, np.pi)
        d.joint("cube").qpos[:] = [cube_xy[0], cube_xy[1], CUBE_HALF,
                                   np.cos(cube_yaw / 2), 0.0, 0.0, np.sin(cube_yaw / 2)]
        d.mocap_pos[m.body("target").mocapid[0]] = [target_xy[0], target_xy[1], 0.0]
        self._q_target = q.copy()
        d.ctrl[:6] = q
        d.ctrl[6:8] = FINGER_OPEN
        mujoco.mj_forward(m, d)
        return self._get_obs(), {"success": False, "grasped": False}

    def step(self, action):
        action = np.asarray(action)
        if action.shape != (5,) or not np.all(np.isfinite(action)):
            raise ValueError(f"PickPlaceEnv.step: action must be 5 finite numbers "
                             f"(x, y, z, yaw, grip), got shape {action.shape}: {action}")
        pos, yaw, grip = self.action_to_target(action)
        self._q_target = self._solve_ik(pos, yaw)
        self.data.ctrl[:6] = self._q_target
        self.data.ctrl[6:8] = FINGER_OPEN * (1.0 - grip) / 2.0
        mujoco.mj_step(self.model, self.data, nstep=self.n_substeps)

        cube, target, ee = self.cube_pos, self.target_pos, self.ee_pos
        n_touch = self.finger_contacts()
        grasped = n_touch == 2
        dist_xy = float(np.linalg.norm(cube[:2] - target[:2]))
        speed = float(np.linalg.norm(self.data.joint("cube").qvel[:3]))
        success = (dist_xy < SUCCESS_TOL and cube[2] < CUBE_HALF + 0.005 and speed < 0.05
                   and n_touch == 0)
        off_table = (np.any(cube[:2] < TABLE_LOW) or np.any(cube[:2] > TABLE_HIGH)
                     or cube[2] < -0.05)
        if success:
            reward = 1.0
        else:
            reach = 1.0 - np.tanh(10.0 * np.linalg.norm(ee - cube))
            place = 1.0 - np.tanh(10.0 * dist_xy)
            lifted = grasped and (cube[2] > CUBE_HALF + 0.02 or dist_xy < SUCCESS_TOL)
            reward = 0.2 * reach + 0.2 * grasped + 0.2 * lifted + 0.3 * grasped * place
        terminated = bool(success or off_table)
        return self._get_obs(), float(reward), terminated, False, {
            "success": bool(success), "grasped": bool(grasped)}

    def _get_obs(self) -> dict:
        agent = np.concatenate([self.ee_pos, [self.ee_yaw, self.gripper_gap]]).astype(np.float32)
        if self.obs_mode == "state":
            yaw4 = 4.0 * self.cube_yaw
            obj = np.concatenate([self.cube_pos, [np.sin(yaw4), np.cos(yaw4)], self.target_pos[:2]])
            return {"state": np.concatenate([agent, obj.astype(np.float32)])}
        return {"front_image": self._render_camera("front", self.image_size),
                "wrist_image": self._render_camera("wrist", self.image_size),
                "agent_pos": agent}

    # ------------------------------------------------------------------ rendering
    def _render_camera(self, camera: str, size: int) -> np.ndarray:
        renderer = self._renderers.get(size)
        if renderer is None:
            renderer = make_renderer(self.model, size, size, owner="PickPlaceEnv")
            self._renderers[size] = renderer
        renderer.update_scene(self.data, camera=camera)
        return renderer.render()  # a new (size, size, 3) uint8 array each call

    def render(self):
        """The front camera at ``render_size`` pixels (``render_mode="rgb_array"``)."""
        if self.render_mode is None:
            gym.logger.warn("PickPlaceEnv.render() called without render_mode='rgb_array'")
            return None
        return self._render_camera("front", self.render_size)

    def close(self):
        for renderer in self._renderers.values():
            renderer.close()
        self._renderers = {}
