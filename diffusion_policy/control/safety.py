"""The safety layer between the policy and the robot: every intervention counted and logged.

    safety = Safety(action_low, action_high, max_delta=0.05, workspace_low=[-0.3, -0.3],
                    workspace_high=[0.3, 0.3], obs_deadline=0.5, chunk_deadline=1.0, max_faults=10)
    ok = safety.check_obs(obs, now)                  # NaN/inf observation -> fault, not used
    ok = safety.check_chunk(chunk, now)              # NaN/inf action chunk -> fault, rejected
    safe = safety.filter(actions, previous, now)     # bounds, workspace, per-step rate: clipped
    state = safety.watchdog(now, obs_time, waiting_since)   # "ok", "hold" or "stop"

What it enforces, in this order for every commanded waypoint:
1. action bounds (the robot's action space): clipped per dimension, counted ``clip_bounds``;
2. the workspace box (a tighter box on the first dimensions, e.g. x/y of a position target, as
   Chi et al. clip x/y on their UR5): clipped, counted ``clip_workspace``;
3. the per-step rate limit ``|a_t - a_{t-1}| <= max_delta`` (per dimension, from the previous
   waypoint or the last target sent): clipped, counted ``clip_rate``. Clipping the rate last
   keeps the result inside both boxes, since the previous waypoint is inside them too.
A chunk with NaN or inf is rejected whole (``reject_chunk``): there is no sensible clip of NaN.

Faults, each counted: ``bad_obs`` (NaN/inf observation), ``stale_obs`` (the newest observation
is older than ``obs_deadline`` seconds), ``stall`` (a requested chunk has not arrived within
``chunk_deadline`` seconds), ``policy_error`` (predict raised), ``reject_chunk``. Any fault on a
control tick puts the robot on hold; ``max_faults`` faulty ticks without a good chunk in between
stop it (:meth:`recovered`, called when a chunk is accepted, clears the count), so a policy that
fails every request, or a stream of NaN observations, stops the robot even though the loop has
quiet ticks between its retries.
"""
from __future__ import annotations

import numpy as np

COUNTERS = ("clip_bounds", "clip_workspace", "clip_rate", "reject_chunk", "bad_obs", "stale_obs",
            "stall", "policy_error", "hold", "stop")


class Safety:
    def __init__(self, action_low, action_high, max_delta=None, workspace_low=None, workspace_high=None,
                 obs_deadline: float = 0.5, chunk_deadline: float = 1.0, max_faults: int = 10, log=None):
        self.low = np.asarray(action_low, np.float64)
        self.high = np.asarray(action_high, np.float64)
        if self.low.shape != self.high.shape or self.low.ndim != 1 or np.any(self.low > self.high):
            raise ValueError(f"Safety: action bounds {self.low} .. {self.high} must be two (Da,) vectors "
                             f"with low <= high")
        da = len(self.low)
        self.max_delta = None if max_delta is None else np.broadcast_to(
            np.asarray(max_delta, np.float64), (da,)).copy()
        if self.max_delta is not None and np.any(self.max_delta <= 0):
            raise ValueError(f"Safety: max_delta={max_delta} must be > 0 (per step, action units)")
        self.ws_low = None if workspace_low is None else np.asarray(workspace_low, np.float64)
        self.ws_high = None if workspace_high is None else np.asarray(workspace_high, np.float64)
        if (self.ws_low is None) != (self.ws_high is None):
            raise ValueError("Safety: give both workspace_low and workspace_high, or neither")
        if self.ws_low is not None:
            n = len(self.ws_low)
            if self.ws_low.shape != self.ws_high.shape or not 1 <= n <= da or np.any(self.ws_low > self.ws_high):
                raise ValueError(f"Safety: workspace box {self.ws_low} .. {self.ws_high} must be two vectors "
                                 f"of the same length <= Da={da} with low <= high (it bounds the first dims)")
        if obs_deadline <= 0 or chunk_deadline <= 0 or max_faults < 1:
            raise ValueError(f"Safety: obs_deadline={obs_deadline}, chunk_deadline={chunk_deadline} must be > 0 "
                             f"s and max_faults={max_faults} >= 1")
        self.obs_deadline, self.chunk_deadline = float(obs_deadline), float(chunk_deadline)
        self.max_faults = int(max_faults)
        self.counts = {k: 0 for k in COUNTERS}
        self.events: list = []  # (time, kind, detail, count)
        self.consecutive = 0  # faulty ticks since the last good chunk
        self.tick_faulted = False  # a fault on the current control tick
        self.log = log  # optional callable(str)

    # ------------------------------------------------------------------------------ events
    def _event(self, now: float, kind: str, detail: str, n: int = 1) -> None:
        self.counts[kind] += n
        self.events.append((float(now), kind, detail, int(n)))
        if self.log is not None:
            self.log(f"safety t={now:.3f}s {kind}: {detail}")

    def fault(self, now: float, kind: str, detail: str) -> None:
        """Record a fault; the current tick counts as faulty."""
        self._event(now, kind, detail)
        self.tick_faulted = True

    @property
    def interventions(self) -> int:
        return sum(self.counts[k] for k in COUNTERS if k not in ("hold", "stop"))

    # ------------------------------------------------------------------------------ checks
    def check_obs(self, obs: dict, now: float) -> bool:
        for k, v in obs.items():
            a = np.asarray(v)
            if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                self.fault(now, "bad_obs", f"observation {k!r} holds NaN or inf")
                return False
        return True

    def check_chunk(self, chunk: np.ndarray, now: float) -> bool:
        if not np.all(np.isfinite(chunk)):
            self.fault(now, "reject_chunk", f"chunk holds {int((~np.isfinite(chunk)).sum())} NaN/inf values")
            return False
        return True

    def filter(self, actions: np.ndarray, previous, now: float) -> np.ndarray:
        """Waypoints ``(N, Da)`` made safe (module docstring); ``previous (Da,)`` = the waypoint
        before the first one (None: no rate limit for the first)."""
        out = np.array(actions, dtype=np.float64, copy=True)
        n = len(out)
        clipped = np.clip(out, self.low, self.high)
        hits = int(np.any(clipped != out, axis=1).sum())
        if hits:
            self._event(now, "clip_bounds", f"{hits} of {n} waypoints outside the action bounds", hits)
        out = clipped
        if self.ws_low is not None:
            d = len(self.ws_low)
            clipped = out.copy()
            clipped[:, :d] = np.clip(out[:, :d], self.ws_low, self.ws_high)
            hits = int(np.any(clipped != out, axis=1).sum())
            if hits:
                self._event(now, "clip_workspace", f"{hits} of {n} waypoints outside the workspace box", hits)
            out = clipped
        if self.max_delta is not None:
            hits = 0
            prev = None if previous is None else np.asarray(previous, np.float64)
            for i in range(n):
                if prev is not None:
                    step = np.clip(out[i] - prev, -self.max_delta, self.max_delta)
                    if np.any(prev + step != out[i]):
                        hits += 1
                        out[i] = prev + step
                prev = out[i]
            if hits:
                self._event(now, "clip_rate", f"{hits} of {n} waypoints faster than max_delta", hits)
        return out

    # ------------------------------------------------------------------------------ watchdog
    def watchdog(self, now: float, obs_time: float | None, waiting_since: float | None) -> None:
        """Deadline checks for this tick: the newest observation's capture time, and when the
        chunk still awaited was requested (None: nothing awaited)."""
        if obs_time is not None and now - obs_time > self.obs_deadline:
            self.fault(now, "stale_obs", f"newest observation is {now - obs_time:.3f} s old "
                                         f"(obs_deadline {self.obs_deadline} s)")
        if waiting_since is not None and now - waiting_since > self.chunk_deadline:
            self.fault(now, "stall", f"chunk requested {now - waiting_since:.3f} s ago has not arrived "
                                     f"(chunk_deadline {self.chunk_deadline} s)")

    def end_tick(self, now: float) -> str:
        """Close a control tick: ``"ok"``, ``"hold"`` (a fault this tick) or ``"stop"`` (``max_faults``
        faulty ticks without a good chunk)."""
        fault, self.tick_faulted = self.tick_faulted, False
        if not fault:
            return "ok"
        self.consecutive += 1
        if self.consecutive >= self.max_faults:
            self._event(now, "stop", f"{self.consecutive} faulty control ticks without a good chunk")
            return "stop"
        return "hold"

    def recovered(self) -> None:
        """A good chunk was accepted: the fault count starts again from 0."""
        self.consecutive = 0

