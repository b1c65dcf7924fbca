"""Scripted expert for ``dp/PickPlace-v0``: a waypoint machine over end-effector poses.

Phases: approach above the cube -> descend -> close -> lift -> carry above the target -> lower ->
release -> retreat. Every waypoint is recomputed each step from the simulator state (closed
loop), and a grasp that fails or slips sends the expert back to the approach, so it recovers
instead of finishing an empty-handed placement.

Diversity for demonstrations: per-episode speed, approach and carry heights, grasp depth, release
height and small offsets on the waypoints, all drawn from the ``rng`` given to :meth:`reset`. The
commanded pose moves toward each waypoint along a straight line at that speed, so the actions
themselves are smooth (a policy learns positions, not jumps).
"""
from __future__ import annotations

import numpy as np

CUBE_HALF = 0.02


def grasp_yaw(cube_yaw: float) -> float:
    """Gripper yaw facing the cube's sides: its yaw modulo a quarter turn, in [-pi/4, pi/4]."""
    return float((cube_yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)


class PickPlaceExpert:
    """Pick the cube and place it on the target. Interface: ``reset(env, rng)``, ``act(env)``."""

    # Closing and opening the jaws take this many control steps before the expert moves on.
    CLOSE_STEPS = 4
    OPEN_STEPS = 3

    def reset(self, env, rng: np.random.Generator) -> None:
        u = env.unwrapped
        self.speed = rng.uniform(0.025, 0.05)  # m per 0.1 s step while moving freely
        self.slow = rng.uniform(0.4, 0.7)  # fraction of the speed on the way down
        self.yaw_speed = rng.uniform(0.25, 0.45)  # rad per step
        self.approach_h = rng.uniform(0.06, 0.14)  # above the cube's centre
        self.carry_h = rng.uniform(0.10, 0.22)  # grasp point height while carrying
        self.grasp_dz = rng.uniform(-0.004, 0.004)  # grasp point vs cube centre
        self.release_dz = rng.uniform(0.002, 0.010)  # cube bottom above the table when released
        self.retreat_h = rng.uniform(0.08, 0.16)
        self.approach_off = rng.normal(0.0, 0.01, size=2)  # where the descent begins
        self.carry_off = np.clip(rng.normal(0.0, 0.025, size=2), -0.05, 0.05)  # of the via point
        self.grasp_off = np.clip(rng.normal(0.0, 0.002, size=2), -0.004, 0.004)
        self.ref_pos = u.ee_pos
        self.ref_yaw = u.ee_yaw
        self.grip = -1.0
        self.yaw = grasp_yaw(u.cube_yaw)
        self._enter("approach")

    def _enter(self, phase: str) -> None:
        self.phase, self.phase_steps = phase, 0
        if phase == "approach":  # (re)starting: the carry's via point is chosen after the lift
            self.via, self.via_done = None, False

    def _move(self, goal: np.ndarray, goal_yaw: float, speed: float) -> bool:
        """Advance the commanded pose toward the goal; True once the commanded pose is there."""
        delta = goal - self.ref_pos
        dist = np.linalg.norm(delta)
        self.ref_pos = goal.copy() if dist <= speed else self.ref_pos + delta * (speed / dist)
        dyaw = goal_yaw - self.ref_yaw
        self.ref_yaw += float(np.clip(dyaw, -self.yaw_speed, self.yaw_speed))
        return dist <= speed and abs(dyaw) <= self.yaw_speed

    def _arrived(self, u, goal: np.ndarray, commanded: bool, tol: float = 0.01) -> bool:
        """The real end effector is near the goal (or the servos had a few steps to get there)."""
        return commanded and (np.linalg.norm(u.ee_pos - goal) < tol or self.phase_steps > 25)

    def act(self, env) -> np.ndarray:
        u = env.unwrapped
        self.phase_steps += 1
        cube = u.cube_pos
        target = u.target_pos
        held = u.finger_contacts() == 2

        if self.phase == "approach":
            self.yaw = grasp_yaw(u.cube_yaw)
            goal = np.array([*(cube[:2] + self.approach_off), cube[2] + self.approach_h])
            if self._arrived(u, goal, self._move(goal, self.yaw, self.speed), tol=0.015):
                self._enter("descend")
        elif self.phase == "descend":
            self.yaw = grasp_yaw(u.cube_yaw)
            goal = np.array([*(cube[:2] + self.grasp_off), cube[2] + self.grasp_dz])
            commanded = self._move(goal, self.yaw, self.speed * self.slow)
            if self._arrived(u, goal, commanded, tol=0.006):
                self._enter("close")
        elif self.phase == "close":
            self.grip = 1.0
            if self.phase_steps >= self.CLOSE_STEPS:
                self._enter("lift" if held else "reopen")
        elif self.phase == "reopen":  # missed: open, rise and try again
            self.grip = -1.0
            self._move(self.ref_pos + [0, 0, 0.03], self.ref_yaw, self.speed)
            if self.phase_steps >= self.OPEN_STEPS:
                self._enter("approach")
        elif self.phase == "lift":
            goal = np.array([*self.ref_pos[:2], self.carry_h])
            done = self._move(goal, self.ref_yaw, self.speed * self.slow)
            if not held and cube[2] < CUBE_HALF + 0.01:
                self._enter("reopen")
            elif done:
                self._enter("carry")
        elif self.phase in ("carry", "lower"):
            # Place the cube, not the gripper: correct for where the cube sits in the jaws.
            offset = cube[:2] - u.ee_pos[:2]
            xy = target[:2] - offset
            if not held:
                self._enter("reopen")
            elif self.phase == "carry":
                if self.via is None:  # a perturbed midpoint: carry paths are not all straight
                    self.via = 0.5 * (self.ref_pos[:2] + xy) + self.carry_off
                goal = np.array([*(self.via if not self.via_done else xy), self.carry_h])
                commanded = self._move(goal, self.ref_yaw, self.speed)
                if not self.via_done:
                    self.via_done = commanded
                elif self._arrived(u, goal, commanded, 0.015):
                    self._enter("lower")
            else:
                z = CUBE_HALF + self.release_dz + (u.ee_pos[2] - cube[2])
                goal = np.array([*xy, z])
                commanded = self._move(goal, self.ref_yaw, self.speed * self.slow)
                if self._arrived(u, goal, commanded, 0.006):
                    self._enter("release")
        elif self.phase == "release":
            self.grip = -1.0
            if self.phase_steps >= self.OPEN_STEPS:
                self._enter("retreat")
        elif self.phase == "retreat":
            goal = np.array([*self.ref_pos[:2], CUBE_HALF + self.retreat_h])
            self._move(goal, self.ref_yaw, self.speed * self.slow)
            if np.linalg.norm(cube[:2] - target[:2]) > 0.02 and cube[2] < CUBE_HALF + 0.01:
                self._enter("approach")  # it rolled off the target: pick it again
        return u.target_to_action(self.ref_pos, self.ref_yaw, self.grip)
