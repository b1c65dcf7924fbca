"""The real-time loop: a fixed-rate control loop around the receding-horizon controller, with
inference running while the robot executes, timestamped actions, and a safety layer.

    loop = RealtimeLoop(policy, robot, clock, safety, mode="async", transition="rtc")
    record, rows = loop.run_episode(max_steps=300, seed=1000000)

Time. Control steps are the grid ``T_k = t0 + k dt`` (``dt = 1 / frequency``, ``t0`` = capture
time of the episode's first observation). An observation captured at ``T_j`` is step ``j``; the
chunk predicted from it has its index ``To-1`` at step ``j`` and index ``To-1+i`` at ``T_j + i dt``
(Chi et al.'s real-robot stamps ``obs_time + i dt``). Actions due before ``now + action_margin``
when the chunk arrives are dropped (counted), never executed late; the rest are sent to the robot
as timestamped waypoints, through :class:`~diffusion_policy.control.safety.Safety`.

Each tick of the loop (every ``dt``): read the newest observation (checked, pushed into the
controller's history when it is new), run the watchdog, accept a finished chunk, request the next
one, decide ok / hold / stop. A hold (any fault) lasts until a good chunk has been accepted after
the last fault; while holding, a chunk is requested as soon as a newer observation is there.
A chunk that finishes between ticks is accepted and sent at once
(the loop sleeps until the next tick *or* the result, whichever comes first), so the latency from
observation to first command is the inference time, not rounded up to a tick.

Modes (``mode``):
- ``async``: a new chunk is requested every ``replan_every`` observation steps (default ``Ta``)
  while the robot executes the current one; this is the deploy loop.
- ``sync``: the naive loop: when the ``replan_every`` actions of the current chunk are done,
  observe, predict while the robot waits (holds), then execute ``replan_every`` actions from
  the arrival on (chunk index ``To-1`` at the first step after the chunk arrives).

Chunk transitions (``transition``), i.e. how a new chunk takes over from the one being executed:
- ``none``, ``ensemble``, ``blend``: the controller's smoothing (control/controller.py): the new
  chunk replaces the plan, ACT's temporal ensembling, or a linear ramp over the overlap.
- ``replace``: the committed actions (those executed while the chunk is computed: the past
  ``To-1`` and the next ``d``) are imposed on the new chunk by plain inpainting
  (``policy.predict(prefix=...)``), a baseline.
- ``rtc``: real-time chunking (Black et al. 2025): the previous plan over the whole overlap is
  the prefix of guided inpainting with the soft mask of their eq. 5
  (``diffusion_policy.methods.guidance.rtc_weights``; 1 on the committed actions, decaying over
  the rest of the overlap). The delay ``d`` is the number of steps from the observation to the
  expected arrival: ``ceil((submit - obs_time + latency + margin) / dt)``, the latency being the
  largest of the last five (or the injected one before the first).

The controller (history, chunks stored with their start step, smoothing, the action of a step)
is the same object ``dp-eval`` uses: without latency this loop executes exactly ``dp-eval``'s
actions (tests/test_deploy.py checks it).
"""
from __future__ import annotations

import inspect
import math
from collections import deque

import numpy as np
import torch

from diffusion_policy.control.controller import RecedingHorizonController
from diffusion_policy.control.worker import make_worker

MODES = ("async", "sync")
TRANSITIONS = ("none", "ensemble", "blend", "replace", "rtc")
EPS = 1e-9


def _takes_prefix_weights(policy) -> bool:
    try:
        return "prefix_weights" in inspect.signature(policy.predict).parameters
    except (TypeError, ValueError):
        return False


class RealtimeLoop:
    """One robot, one policy (module docstring). ``policy``: a Policy, a FastPredictor or a
    RemotePolicy. ``latency``: a :class:`~diffusion_policy.control.worker.Latency` injected on
    every inference (None: none)."""

    def __init__(self, policy, robot, clock, safety, mode: str = "async", transition: str = "none",
                 frequency: float | None = None, replan_every: int | None = None,
                 action_margin: float = 0.01, ensemble_k: float = 0.01, num_inference_steps: int | None = None,
                 latency=None, device=None, max_guidance: float = 5.0, on_tick=None):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {MODES}")
        if transition not in TRANSITIONS:
            raise ValueError(f"transition={transition!r}: expected one of {TRANSITIONS}")
        if action_margin < 0:
            raise ValueError(f"action_margin={action_margin} must be >= 0 s")
        self.policy, self.robot, self.clock, self.safety = policy, robot, clock, safety
        self.mode, self.transition = mode, transition
        self.frequency = float(frequency or robot.control_rate)
        self.dt = 1.0 / self.frequency
        smoothing = transition if transition in ("none", "ensemble", "blend") else "none"
        self.controller = RecedingHorizonController(
            policy, n_envs=1, smoothing=smoothing, ensemble_k=ensemble_k, n_action_steps=replan_every,
            num_inference_steps=num_inference_steps, device=device)
        self.To, self.H = self.controller.n_obs_steps, self.controller.horizon
        self.replan_every = self.controller.n_action_steps
        self.margin = float(action_margin)
        self.latency = latency
        self.worker = make_worker(clock, latency)
        self.remote = _takes_prefix_weights(policy)
        self.max_guidance = float(max_guidance)
        self.on_tick = on_tick  # callable(loop) after every tick (the status line)
        space = robot.action_space
        if tuple(space.shape) != (int(getattr(policy, "action_dim", space.shape[0])),):
            raise ValueError(f"the policy's actions have {policy.action_dim} dims but the robot's action space "
                             f"is {space.shape}")

    # ------------------------------------------------------------------------------ grid
    def step_of(self, t: float) -> int:
        return int(round((t - self.t0) / self.dt))

    def stamp(self, step: int) -> float:
        return self.t0 + step * self.dt

    def first_open_step(self, now: float) -> int:
        """The first step whose stamp is not before ``now + margin`` (earlier ones are dropped)."""
        return int(math.ceil((now + self.margin - self.t0) / self.dt - EPS))

    # ------------------------------------------------------------------------------ episode
    def run_episode(self, max_steps: int, seed: int | None = None, generator: torch.Generator | None = None):
        """Run until the robot's episode ends (``robot.done``), ``max_steps`` control steps, or a
        stop. Returns ``(record, rows)``: the episode's summary and per-step log columns."""
        r = self.robot
        if hasattr(r, "reset"):
            r.reset(seed)
        if hasattr(self.policy, "reset") and self.remote:
            self.policy.reset(seed)
        self.controller.reset(generator=generator)
        self.generator = None if self.remote else generator
        self.t0 = None
        self.frames, self.obs_seen_at = {}, {}  # step -> observation, clock time first seen
        self.sent, self.raw, self.chunk_of = {}, {}, {}  # step -> safe waypoint, plan value, chunk id
        self.executed = {}  # step -> executed target (robots with drain_executed)
        self.tick_hold = {}  # step -> the loop held the robot on that tick
        self.events_from = len(self.safety.events)
        self.counts_from = dict(self.safety.counts)
        self.pending = None  # (obs step, obs time, submit time) of the request in flight
        self.accepted_step = None
        self.sync_end = None
        self.last_obs_t = self.last_valid_obs_t = None
        self.last_obs_step = -1
        self.on_hold = self.stopped = False
        self.stop_reason = ""
        self.dropped = 0
        self.chunks: list = []  # per accepted chunk: latency_s, compute_ms, first command latency
        self.recent_latency = deque(maxlen=5)
        self.loop_latency_ms: list = []
        self._await_first_command = None
        self.tick_late: list = []
        self.tick_times: list = []
        start = self.clock.now()
        self.ticks = 0
        interrupted = False
        try:
            while True:
                t_tick = start + self.ticks * self.dt
                self._sleep_until(t_tick)
                self.tick_late.append(self.clock.now() - t_tick)
                self.tick_times.append(self.clock.now())
                self._tick()
                self.ticks += 1
                if self.on_tick is not None:
                    self.on_tick(self)
                if self.stopped or getattr(r, "done", False):
                    break
                if self.t0 is not None and self.step_of(self.clock.now()) >= max_steps - 1:
                    self._sleep_until(start + self.ticks * self.dt)  # let the last step execute
                    self._drain_executed()
                    break
        except KeyboardInterrupt:
            interrupted, self.stop_reason = True, "interrupted"
            r.stop()
            self.stopped = True
            raise
        finally:
            self._drain_executed()
            self._cancel_pending()
            self.interrupted = interrupted
        return self.record(max_steps), self.rows(max_steps)

    def _cancel_pending(self) -> None:
        if self.worker.busy:
            self.worker.close()
            self.worker.poll()
            if hasattr(self.worker, "_pending"):
                self.worker._pending = None
        self.pending = None

    # ------------------------------------------------------------------------------ tick
    def _tick(self) -> None:
        now = self.clock.now()
        obs, t_obs = self.robot.observe()
        if obs is not None and (self.last_obs_t is None or t_obs > self.last_obs_t + EPS):
            self.last_obs_t = t_obs
            if self.t0 is None:
                self.t0 = t_obs
            if self.safety.check_obs(obs, now):
                j = self.step_of(t_obs)
                self.controller.observe(0, obs)
                self.frames.setdefault(j, {k: np.array(v, copy=True) for k, v in obs.items()})
                self.obs_seen_at.setdefault(j, now)
                self.last_valid_obs_t, self.last_obs_step = t_obs, j
        self._drain_executed()
        if self.t0 is None:  # nothing observed yet: the robot holds where it is
            return
        k = self.step_of(now)
        self.safety.watchdog(now, self.last_valid_obs_t, self.pending[2] if self.pending else None)
        self._poll(now)
        if self._needs_plan(now) and not self.safety.tick_faulted:
            self._submit(now)
            self._poll(now)  # a result without latency (simulated clock) is used on this tick
        state = self.safety.end_tick(now)
        if state == "stop":
            self.robot.stop()
            self.stopped, self.stop_reason = True, "safety"
        elif state == "hold":
            if not self.on_hold:
                self.robot.hold()
                self.safety.counts["hold"] += 1
                self.on_hold = True
        elif self.on_hold and self.safety.consecutive == 0:
            self.on_hold = False  # a good chunk arrived since the last fault
            self._send(now)  # back from a hold: the current plan from now on
        self.tick_hold[k] = self.tick_hold.get(k, False) or self.on_hold or self.stopped

    def _sleep_until(self, t: float) -> None:
        """Sleep to ``t``; a chunk that arrives meanwhile is accepted and sent at once."""
        while True:
            self.clock.sleep_until(min(t, self.worker.ready_at()), wake=self.worker.event)
            now = self.clock.now()
            if self.t0 is not None:
                self._poll(now)
            if now >= t - EPS:
                return

    def _needs_plan(self, now: float) -> bool:
        if self.worker.busy or self.stopped or self.last_obs_step < 0:
            return False
        if self.mode == "sync":
            return self.sync_end is None or self.first_open_step(now) > self.sync_end
        if self.on_hold:  # a fresh chunk ends a hold: ask as soon as there is a newer observation
            return self.accepted_step is None or self.last_obs_step > self.accepted_step
        return self.accepted_step is None or self.last_obs_step - self.accepted_step >= self.replan_every

    # ------------------------------------------------------------------------------ inference
    def _submit(self, now: float) -> None:
        j, t_obs = self.last_obs_step, self.last_valid_obs_t
        batch = self.controller.history_batch([0])
        kwargs = self._conditioning(j, now, t_obs)
        ctl, gen = self.controller, self.generator
        if self.transition == "rtc" and not self.remote and kwargs:
            from diffusion_policy.methods.guidance import predict_guided

            base = getattr(self.policy, "policy", self.policy)  # a FastPredictor's policy (eager)
            prefix, weights, mg = torch.as_tensor(kwargs["prefix"]), kwargs["prefix_weights"], self.max_guidance

            def guided(obs, num_steps=None, generator=None):
                return predict_guided(base, obs, prefix, weights, num_steps=num_steps, generator=generator,
                                      max_guidance=mg)

            tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).to(ctl.device) for k, v in batch.items()}

            def fn():
                return ctl._call_policy(guided, tensors, 1, gen, {}, inference_mode=False)
        else:
            if "prefix" in kwargs and not self.remote:
                kwargs["prefix"] = torch.as_tensor(kwargs["prefix"]).to(ctl.device)

            def fn():
                return ctl.predict_batch(batch, gen, **kwargs)
        self.pending = (j, t_obs, now)
        self.worker.submit(fn)

    def _expected_latency(self) -> float:
        if self.recent_latency:
            return max(self.recent_latency)
        if self.latency is not None and self.latency.fn is None:
            return self.latency.base
        return 0.0

    def _conditioning(self, j: int, now: float, t_obs: float) -> dict:
        """``prefix`` (and ``prefix_weights``) for ``replace`` / ``rtc``; {} for the others or
        when there is no previous plan."""
        span = self.controller.plan_span(0)
        if self.transition not in ("replace", "rtc") or span is None:
            return {}
        To, H = self.To, self.H
        first = j - To + 1  # the step of chunk index 0
        d = int(math.ceil((now - t_obs + self._expected_latency() + self.margin) / self.dt - EPS))
        end = span[1] - first + 1  # the old plan covers indices [0, end)
        end = min(end, H)
        d = max(0, min(d, end - (To - 1)))
        committed = To - 1 + d  # indices [0, committed) are executed before the chunk arrives
        if self.transition == "replace":
            n = committed
        else:
            n = end
        if n <= 0 or (self.transition == "rtc" and end < To - 1):
            # rtc: the old plan ended before the observation's step (it ran out during
            # a stall): nothing is committed to guide toward, the chunk is sampled unguided
            return {}
        prefix = np.zeros((1, n, self.robot.action_space.shape[0]), np.float32)
        for i in range(n):
            s = first + i
            if s in self.sent and (i < committed or s < span[0]):
                prefix[0, i] = self.sent[s]
            else:
                try:
                    prefix[0, i] = self.controller.action_at(0, s)
                except IndexError:
                    prefix[0, i] = self.sent.get(s, prefix[0, i - 1] if i else self._last_target())
        if self.transition == "replace":
            return {"prefix": prefix}
        from diffusion_policy.methods.guidance import rtc_weights

        w = rtc_weights(H, d, exec_horizon=H - end, start=To - 1).numpy()
        return {"prefix": prefix, "prefix_weights": w}

    def _poll(self, now: float) -> None:
        res = self.worker.poll()
        if res is None:
            return
        j, t_obs, _ = self.pending
        self.pending = None
        if res.error:
            self.safety.fault(now, "policy_error", f"predict raised {type(res.value).__name__}: {res.value}")
            return
        chunk = np.asarray(res.value)[0]
        if not self.safety.check_chunk(chunk, now):
            return
        f = self.first_open_step(now)
        start = f if self.mode == "sync" else j
        self.controller.add_chunk(0, chunk, start)
        n_exec = self.H - self.To + 1
        last = start + (self.replan_every if self.mode == "sync" else n_exec) - 1
        if self.mode == "sync":
            self.sync_end = last
        dropped = max(0, min(f, last + 1) - start)
        self.dropped += dropped
        self.accepted_step = j
        self.safety.recovered()
        lat = res.done - res.submitted
        self.recent_latency.append(lat)
        self.chunks.append({"obs_step": j, "start": start, "latency_s": lat, "compute_ms": res.compute_s * 1e3,
                            "dropped": dropped, "arrived": now})
        self._await_first_command = t_obs
        self._send(now)

    # ------------------------------------------------------------------------------ commands
    def _last_target(self):
        if self.executed:
            return self.executed[max(self.executed)][0]
        return None

    def _send(self, now: float) -> None:
        if self.on_hold or self.stopped or self.safety.tick_faulted:
            return
        span = self.controller.plan_span(0)
        if span is None:
            return
        f = self.first_open_step(now)
        last = min(span[1], self.sync_end) if self.mode == "sync" else span[1]
        steps = list(range(max(f, span[0]), last + 1))
        if not steps:
            return
        self.controller.prune(0, steps[0])
        raw = np.stack([self.controller.action_at(0, s) for s in steps]).astype(np.float64)
        prev = self.sent.get(steps[0] - 1)
        if prev is None:
            prev = self._last_target()
        safe = self.safety.filter(raw, prev, now)
        self.robot.command(safe, np.array([self.stamp(s) for s in steps]))
        chunk_id = len(self.chunks) - 1
        for s, a, b in zip(steps, safe, raw):
            self.sent[s], self.raw[s], self.chunk_of[s] = a, b, chunk_id
        if self._await_first_command is not None:
            self.loop_latency_ms.append((now - self._await_first_command) * 1e3)
            self._await_first_command = None

    def _drain_executed(self) -> None:
        if self.t0 is None or not hasattr(self.robot, "drain_executed"):
            return
        for t, target, stamp, _ in self.robot.drain_executed():
            self.executed[self.step_of(t)] = (np.asarray(target, np.float64), stamp)

    # ------------------------------------------------------------------------------ results
    def n_rows(self, max_steps: int) -> int:
        if hasattr(self.robot, "drain_executed"):
            return min(len(self.executed), max_steps)
        return min(self.ticks, max_steps)

    def rows(self, max_steps: int) -> dict:
        """Per-step log columns of the episode, demonstration format: step ``k``'s observation
        (captured at ``T_k``; the last one seen before it where none arrived: ``obs_missing``), the
        executed action ``action``, and what the loop did at that step: ``commanded_action`` (the
        plan, before safety), ``sent_action`` (after safety), ``commanded`` (0: nothing was sent
        for the step; both then repeat ``action``), ``timestamp`` (``T_k``), ``obs_age_ms`` (when
        the loop first saw the observation, -1 = never), ``inference_ms`` (latency of the chunk
        the step's action came from, -1 = none), ``held`` (the step executed no waypoint of its own:
        the robot held, or moved between other waypoints), ``safety_events``, ``dropped``."""
        n = self.n_rows(max_steps)
        if n == 0 or not self.frames:
            return {}
        events, dropped = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for t, kind, _, count in self.safety.events[self.events_from:]:
            if kind not in ("hold", "stop"):
                events[min(max(self.step_of(t), 0), n - 1)] += count
        for c in self.chunks:  # dropped when the chunk arrived
            dropped[min(max(self.step_of(c["arrived"]), 0), n - 1)] += c["dropped"]
        first = min(self.frames)
        cols = {k: [] for k in self.frames[first]}
        extra = {"action": [], "commanded_action": [], "sent_action": [], "timestamp": [], "obs_missing": [],
                 "obs_age_ms": [], "inference_ms": [], "held": [], "commanded": []}
        frame, last_action = self.frames[first], None
        for k in range(n):
            missing = k not in self.frames
            frame = frame if missing else self.frames[k]
            for key in cols:
                cols[key].append(frame[key])
            a = self.executed[k][0] if k in self.executed else self.sent.get(k)
            if a is None:
                a = last_action if last_action is not None else self._initial_action()
            last_action = a
            extra["action"].append(np.asarray(a, np.float32))
            # no NaN in a store (dp-data validate refuses it): steps never commanded log the
            # executed action there and commanded = 0
            extra["commanded_action"].append(np.asarray(self.raw.get(k, a), np.float32))
            extra["sent_action"].append(np.asarray(self.sent.get(k, a), np.float32))
            extra["commanded"].append(k in self.sent)
            extra["timestamp"].append(self.stamp(k))
            extra["obs_missing"].append(missing)
            extra["obs_age_ms"].append((self.obs_seen_at[k] - self.stamp(k)) * 1e3 if not missing else -1.0)
            c = self.chunk_of.get(k)
            extra["inference_ms"].append(self.chunks[c]["latency_s"] * 1e3 if c is not None and c >= 0 else -1.0)
            held = math.isnan(self.executed[k][1]) if k in self.executed else k not in self.sent
            extra["held"].append(held or self.tick_hold.get(k, False))
        out = {k: np.stack(v) for k, v in cols.items()}
        out.update(action=np.stack(extra["action"]), commanded_action=np.stack(extra["commanded_action"]),
                   sent_action=np.stack(extra["sent_action"]),
                   timestamp=np.asarray(extra["timestamp"], np.float64),
                   obs_missing=np.asarray(extra["obs_missing"], np.int8),
                   obs_age_ms=np.asarray(extra["obs_age_ms"], np.float32),
                   inference_ms=np.asarray(extra["inference_ms"], np.float32),
                   held=np.asarray(extra["held"], np.int8), commanded=np.asarray(extra["commanded"], np.int8),
                   safety_events=events, dropped=dropped)
        return out

    def _initial_action(self):
        space = self.robot.action_space
        return np.clip(np.zeros(space.shape), space.low, space.high)

    def record(self, max_steps: int) -> dict:
        info = dict(getattr(self.robot, "info", {}) or {})
        lat = [c["latency_s"] * 1e3 for c in self.chunks]
        span = self.tick_times[-1] - self.tick_times[0] if len(self.tick_times) > 1 else 0.0
        late = np.asarray(self.tick_late) if self.tick_late else np.zeros(1)
        return {
            "success": bool(info.get("success", False)), "steps": self.n_rows(max_steps), "ticks": self.ticks,
            "max_reward": (float(self.robot.max_reward) if hasattr(self.robot, "max_reward") and self.n_rows(max_steps)
                           else None),
            "chunks": len(self.chunks), "dropped_actions": self.dropped,
            "late_waypoints": int(getattr(self.robot, "late_waypoints", 0)),
            "held_steps": int(getattr(self.robot, "held_steps", 0)),
            "stopped": self.stopped, "stop_reason": self.stop_reason or ("done" if getattr(self.robot, "done", False)
                                                                        else "max_steps"),
            "safety": {k: v - self.counts_from.get(k, 0) for k, v in self.safety.counts.items()},
            "inference_ms": lat,
            "compute_ms": [c["compute_ms"] for c in self.chunks],
            "loop_latency_ms": list(self.loop_latency_ms),
            "rate_hz": (len(self.tick_times) - 1) / span if span > 0 else None,  # ticks per clock second
            "tick_late_ms_max": float(late.max() * 1e3), "tick_late_ms_p99": float(np.percentile(late, 99) * 1e3),
            "final_info": {k: v for k, v in info.items() if isinstance(v, (bool, int, float, str))},
        }
