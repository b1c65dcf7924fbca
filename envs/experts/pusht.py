"""Scripted Push-T expert: a greedy planner over push primitives checked by simulation.

A push primitive is a contact point on the T's outline, a push direction (the inward normal turned
by up to ~20 degrees, within the pusher-block friction cone) and a push length. Each decision:

1. Sample candidate contacts on the outline (block frame), keep those the pusher can reach: its
   start point, ``r + gap`` off the edge, clear of the block and inside the arena.
2. Simulate every candidate push at once with ``mujoco.rollout`` from a copy of the current state
   with the pusher moved to the candidate's start point (the approach path goes around the block,
   so it does not disturb it).
3. Score every (candidate, push length) by the decrease of the pose error per control step spent
   travelling to it and pushing; take one of the best, at random among the near-best.
4. Queue the actions: leave the block, go around its convex hull to the start point, push. Replan
   when the queue is empty, or earlier when the block moved while the pusher was travelling.

The pose error weights rotation by the length RHO = 0.052 m, the ratio of the coverage losses of a
1 rad rotation and a 1 m shift of the target T, so decreasing it means increasing coverage. The
block is quasi-static (viscous damping, see ``envs/assets/pusht.xml``): its final pose depends on
where and how far it is pushed, which makes one-step lookahead with short pushes converge; as the
error shrinks, pushes get shorter and slower (the final alignment needs ~1 mm and ~1 degree).

Diversity: per episode a strategy (rotate first, translate first or balanced weighting of the
error far from the goal), a random subset of contacts per decision, a random choice among the
near-best pushes, random travel speeds and noisy travel waypoints.

The expert reads the simulator (``env.unwrapped``); the policy's observations never do.
"""
from __future__ import annotations

import mujoco
import numpy as np
from mujoco import rollout

from envs import geometry

RHO = 0.052  # m per rad: rotation error weight (coverage loss of 1 rad / of 1 m)
GAP = 0.004  # start point clearance between the pusher and the edge (m)
MARGIN = 0.007  # travel clearance around the block's convex hull (m)
LAG_STEPS = 4  # the servo trails its setpoint by kv/kp = 0.02 s = 4 physics steps
STRATEGIES = {"balanced": RHO, "rotate_first": 2.0 * RHO, "translate_first": 0.5 * RHO}


class PushTExpert:
    def __init__(self, max_candidates: int = 96, contact_spacing: float = 0.008,
                 angles: tuple = (0.0, 0.3, -0.3), travel_speed: float = 0.37):
        self.max_candidates, self.contact_spacing = max_candidates, contact_spacing
        self.angles, self.travel_speed = angles, travel_speed

    # --------------------------------------------------------------------------------- API
    def reset(self, env, rng: np.random.Generator) -> None:
        u = env.unwrapped
        self.rng = rng
        self.strategy = str(rng.choice(list(STRATEGIES)))
        self.queue: list[np.ndarray] = []
        self.n_travel = 0  # queued actions that still travel (the block must not move meanwhile)
        self.plan_pose = None
        self._data = mujoco.MjData(u.model)
        self._spec = mujoco.mjtState.mjSTATE_FULLPHYSICS
        self._nstate = mujoco.mj_stateSize(u.model, self._spec)
        self.radius = float(u.model.geom("agent").size[0])
        # Where the pusher can be sent (0.25 in v0; 0.238 in v1, the walled table less the radius):
        # start points stay 1 cm and push ends 5 mm inside it, targets are clipped to it.
        self.limit = u.agent_limit
        self.pieces = geometry.t_pieces(u.unit)
        self.outline = geometry.t_outline(u.unit)
        self.hull = geometry.convex_hull(self.outline)
        # Travel clearance varies per episode: routes around the block differ between episodes.
        margin = MARGIN * rng.uniform(1.0, 1.8)
        self.hull_travel = geometry.inflate_convex(self.hull, self.radius + margin)
        self.pieces_touch = [geometry.inflate_convex(p, self.radius + 0.0015, 2)
                             for p in self.pieces]
        # Start and entry points of every contact, block frame (fixed: computed once).
        contacts = self._contact_points(u.unit)
        rows = []
        for c, n in zip(contacts[:, :2], contacts[:, 2:]):
            start = c + n * (self.radius + GAP)
            if any(geometry.inside_convex(start, p) for p in self.pieces_touch):
                continue
            entry = self._exit_point(start, n)
            if np.linalg.norm(entry - start) > 1e-9 and not self._clear(entry, start):
                continue
            rows.append((start, entry, n))
        self.contacts = rows
        self.log: list[tuple] = []

    def act(self, env) -> np.ndarray:
        u = env.unwrapped
        pose = u.block_pose()
        if self.queue and self.n_travel > 0 and self._moved(pose, self.plan_pose):
            self.queue = []  # the block was bumped while travelling: the plan is stale
        if not self.queue:
            self._plan(u)
        self.n_travel -= 1
        return self.queue.pop(0).astype(np.float32)

    # ---------------------------------------------------------------------------- planning
    def _contact_points(self, unit: float) -> np.ndarray:
        """Points along the T's outline with outward normals, block frame: rows (cx, cy, nx, ny)."""
        outline = geometry.t_outline(unit)
        rows = []
        for i in range(len(outline)):
            a, b = outline[i], outline[(i + 1) % len(outline)]
            e = b - a
            length = float(np.linalg.norm(e))
            normal = np.array([e[1], -e[0]]) / length  # outward for a counter-clockwise outline
            k = max(1, int(length / self.contact_spacing))
            for t in (np.arange(k) + 0.5) / k:
                rows.append([*(a + t * e), *normal])
        return np.array(rows)

    def _error(self, poses: np.ndarray, target: np.ndarray, rho: float) -> np.ndarray:
        """Weighted pose error (m) of block poses ``(..., 3)``."""
        dth = (poses[..., 2] - target[2] + np.pi) % (2 * np.pi) - np.pi
        return np.sqrt((poses[..., 0] - target[0]) ** 2 + (poses[..., 1] - target[1]) ** 2
                       + (rho * dth) ** 2)

    def _moved(self, pose, ref) -> bool:
        dth = abs((pose[2] - ref[2] + np.pi) % (2 * np.pi) - np.pi)
        return bool(np.hypot(*(pose[:2] - ref[:2])) > 0.001 or dth > 0.01)

    def _clear(self, p: np.ndarray, q: np.ndarray) -> bool:
        """The pusher moving from p to q (block frame) does not touch the block."""
        return not any(geometry.segment_hits_convex(p, q, piece) for piece in self.pieces_touch) \
            and not any(geometry.inside_convex(q, piece) for piece in self.pieces_touch)

    def _exit_point(self, p: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """March from p along ``direction`` (block frame) until outside the travel hull."""
        q = p.copy()
        for _ in range(40):
            if not geometry.inside_convex(q, self.hull_travel):
                break
            q = q + 0.004 * direction
        return q

    def _leave(self, agent_l: np.ndarray):
        """Waypoints that take the pusher out of the travel hull, and the point where it is out."""
        if not geometry.inside_convex(agent_l, self.hull_travel):
            return [], agent_l
        out = self._exit_point(agent_l, self._away(agent_l))
        return [out], out

    def _route(self, agent_l, leave, start_l, entry_l):
        """Waypoints (block frame) from the pusher to a start point, avoiding the block."""
        if np.linalg.norm(start_l - agent_l) < 0.03 and self._clear(agent_l, start_l):
            return [start_l]
        way, p = leave
        return way + geometry.path_around(p, entry_l, self.hull_travel) + [start_l]

    def _away(self, p: np.ndarray) -> np.ndarray:
        best, best_d = np.array([0.0, -1.0]), np.inf
        outline = self.outline
        for i in range(len(outline)):
            a, b = outline[i], outline[(i + 1) % len(outline)]
            ab = b - a
            t = np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0, 1)
            c = a + t * ab
            d = np.linalg.norm(p - c)
            if d < best_d:
                best_d, best = d, (p - c) / max(d, 1e-9)
        return best

    def _plan(self, u) -> None:
        pose, agent, target = u.block_pose(), u.agent_pos(), u.target_pose
        e_now = float(self._error(pose, target, RHO))
        rho = STRATEGIES[self.strategy] if e_now > 0.02 else RHO
        e_now_s = float(self._error(pose, target, rho))
        # Pushes shrink as the error does: long and fast far away, short and slow near the goal.
        speed = float(np.clip(1.5 * e_now + self.rng.uniform(-0.01, 0.01), 0.04, 0.25))
        max_len = float(np.clip(2.0 * e_now_s, 0.012, 0.2))
        dt = u.model.opt.timestep
        nstep = int(np.ceil(max_len / speed / dt)) + LAG_STEPS
        R = geometry.rot(pose[2])
        agent_l = geometry.to_local(agent[None], pose)[0]

        idx = self.rng.permutation(len(self.contacts))
        cands = []
        for i in idx:
            start_l, entry_l, n = self.contacts[i]
            start_w = R @ start_l + pose[:2]
            if np.any(np.abs(start_w) > self.limit - 0.01):
                continue
            for ang in self.angles:
                d = geometry.rot(ang) @ (-n)
                cands.append((start_l, start_w, R @ d, entry_l))
            if len(cands) >= self.max_candidates:
                break
        if not cands:
            self.queue, self.n_travel = [np.clip(agent * 0.9, 0.01 - self.limit, self.limit - 0.01)], 1
            self.plan_pose = pose
            return

        # Simulate every push from a copy of the current state, pusher at its start point at rest.
        state = np.empty(self._nstate)
        mujoco.mj_getState(u.model, u.data, state, self._spec)
        qpos0, qvel0 = 1, 1 + u.model.nq
        act0 = qvel0 + u.model.nv
        init = np.tile(state, (len(cands), 1))
        ctrl = np.zeros((len(cands), nstep, u.model.nu))
        for k, (_, start_w, dir_w, _) in enumerate(cands):
            init[k, qpos0 + u._agent_qpos] = start_w
            init[k, act0:act0 + 2] = start_w
            ctrl[k, :nstep - LAG_STEPS] = dir_w * speed
        init[:, qvel0:qvel0 + u.model.nv] = 0.0
        states, _ = rollout.rollout(u.model, self._data, init, ctrl)
        poses = states[:, :, qpos0 + u._block_qpos]  # (C, T, 3)

        # Error after stopping the setpoint at step t: the pose LAG_STEPS later.
        t_stop = np.arange(1, nstep - LAG_STEPS + 1)
        err = self._error(poses[:, t_stop - 1 + LAG_STEPS], target, rho)  # (C, T')
        push_len = t_stop * dt * speed
        push_steps = np.ceil(push_len / (speed * u.control_dt))
        leave = self._leave(agent_l)
        routes = [self._route(agent_l, leave, s, e) for s, _, _, e in cands]
        travel = np.array([geometry.polyline_length([agent_l] + r) for r in routes])
        travel_steps = np.ceil(travel / (self.travel_speed * u.control_dt)) + 1
        end = np.array([s for _, s, _, _ in cands])[:, None, :] + \
            np.array([d for _, _, d, _ in cands])[:, None, :] * push_len[None, :, None]
        rate = (e_now_s - err) / (travel_steps[:, None] + push_steps[None, :])
        rate[np.any(np.abs(end) > self.limit - 0.005, axis=-1)] = -np.inf
        best = rate.max()
        good = np.argwhere(rate >= best - 0.15 * abs(best))
        k, t = good[self.rng.integers(len(good))]
        start_l, start_w, dir_w, _ = cands[k]
        # (error, travel steps, push steps, rate, candidates): for inspecting an episode's plans.
        self.log.append((e_now, int(travel_steps[k]), int(push_steps[t]), float(rate[k, t]),
                         len(cands)))

        # Queue: travel waypoints (block frame -> world), then the push.
        route = [R @ w + pose[:2] for w in routes[k]]
        actions = self._discretise([agent] + route, u.control_dt)
        self.n_travel = len(actions)
        length = push_len[t]
        step = speed * u.control_dt
        for j in range(1, int(np.ceil(length / step)) + 1):
            actions.append(start_w + dir_w * min(j * step, length))
        self.queue = [np.clip(a, -self.limit, self.limit) for a in actions]
        self.plan_pose = pose

    def _discretise(self, points: list[np.ndarray], dt: float) -> list[np.ndarray]:
        """Per-step targets every ``v * dt`` along a polyline at a random travel speed, with a
        little noise away from its end; the last target is repeated so that the pusher arrives
        at rest, as the simulated pushes start."""
        pts = np.asarray(points, dtype=float)
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        total = float(seg.sum())
        if total < 1e-6:
            return []
        v = self.travel_speed * self.rng.uniform(0.8, 1.0)
        k = int(np.ceil(total / (v * dt)))
        cum = np.concatenate([[0.0], np.cumsum(seg)])
        out = []
        for j in range(1, k + 1):
            s = total * j / k
            i = min(int(np.searchsorted(cum, s, side="right")) - 1, len(seg) - 1)
            f = (s - cum[i]) / max(seg[i], 1e-12)
            q = pts[i] + f * (pts[i + 1] - pts[i])
            if total - s > 0.03:
                q = q + self.rng.normal(0.0, 0.002, size=2)
            out.append(q)
        out.append(pts[-1].copy())
        return out
