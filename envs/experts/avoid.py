"""Scripted expert for ``dp/Avoid-v0``: goes around the obstacle on a side chosen at random.

At reset it flips a fair coin for the side (left or right of the obstacle), draws a via point beside
the obstacle and a point inside the goal region, and lays a smooth curve through start, via point
and goal: the quadratic Bezier curve whose middle (t = 1/2) is the via point. Each step it
commands the point a fixed arc length ``LOOKAHEAD`` ahead of where the agent is on that curve (pure
pursuit, Coulter 1992), so the action is a smooth function of the state and of the chosen side, and
the disc moves at about ``kp / kv * LOOKAHEAD`` = 0.2 m/s (the servo's steady state).

The two sides are mirror images: averaging them gives a curve through the obstacle.
"""
from __future__ import annotations

import numpy as np

LOOKAHEAD = 0.06  # metres of arc ahead of the agent's closest curve point
VIA_OFFSET = (0.20, 0.26)  # lateral distance of the via point from the obstacle centre (clearance
# needed: obstacle 0.10 + agent 0.03 radii; the rest absorbs the servo cutting the curve's inside)
VIA_JITTER_Y = 0.04  # the via point moves along y by up to this much
GOAL_JITTER = 0.02  # the final target lies this close to the goal centre (goal radius 0.06)
N_POINTS = 200  # samples of the curve


class AvoidExpert:
    """Pure pursuit of a Bezier curve left or right of the obstacle.

    ``side``: None draws the side at every reset (a fair coin from ``rng``); -1 (left) or +1 (right)
    fixes it, e.g. to show that the average of the two routes collides.
    """

    def __init__(self, side: int | None = None):
        if side not in (None, -1, 1):
            raise ValueError(f"AvoidExpert: side must be None, -1 (left) or +1 (right), got {side!r}")
        self.fixed_side = side
        self.side = 0
        self._curve = None  # (N_POINTS, 2)
        self._arclen = None  # (N_POINTS,)
        self._progress = 0  # index of the agent's closest curve point; only moves forward

    def reset(self, env, rng: np.random.Generator) -> None:
        u = env.unwrapped
        start, goal, obstacle = u.agent_pos, u.goal_pos, u.obstacle_pos
        # A caller may seed ``rng`` with the env's own seed (np.random.default_rng(seed) is what
        # gymnasium seeds ``np_random`` with): the coin would then repeat the env's first draw,
        # the start x, and the route would follow from the start state instead of being a free
        # choice. Re-seeding from a hash of one draw makes the two streams independent.
        rng = np.random.default_rng([int(rng.integers(2**62)), 0xA70])
        coin = 1 if rng.random() < 0.5 else -1  # drawn even when fixed: same rng stream either way
        self.side = self.fixed_side or coin
        via = obstacle + np.array([self.side * rng.uniform(*VIA_OFFSET),
                                   rng.uniform(-VIA_JITTER_Y, VIA_JITTER_Y)])
        end = goal + rng.uniform(-GOAL_JITTER, GOAL_JITTER, size=2)
        control = 2.0 * via - 0.5 * (start + end)  # makes B(1/2) = via
        t = np.linspace(0.0, 1.0, N_POINTS)[:, None]
        self._curve = (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t**2 * end
        seg = np.linalg.norm(np.diff(self._curve, axis=0), axis=1)
        self._arclen = np.concatenate([[0.0], np.cumsum(seg)])
        self._progress = 0

    @property
    def route(self) -> str:
        return {1: "right", -1: "left"}.get(self.side, "")

    def act(self, env) -> np.ndarray:
        if self._curve is None:
            raise RuntimeError("AvoidExpert.act called before reset(env, rng)")
        agent = env.unwrapped.agent_pos
        # Closest point, searched forward from the last one so the curve's ends never alias.
        ahead = self._curve[self._progress:]
        self._progress += int(np.argmin(np.linalg.norm(ahead - agent, axis=1)))
        s = self._arclen[self._progress] + LOOKAHEAD
        i = min(int(np.searchsorted(self._arclen, s)), N_POINTS - 1)
        return self._curve[i].astype(np.float32)
