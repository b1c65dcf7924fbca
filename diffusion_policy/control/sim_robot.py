"""SimRobot: any task of envs/ behind the :class:`~diffusion_policy.control.robot.Robot` protocol,
with observation latency (per key: each camera its own), actuation latency and jitter.

    robot = SimRobot(task, clock, rate_hz=100, obs_latency={"image": 0.13}, act_latency=0.02)
    robot.reset(seed)                    # the episode starts at clock.now()
    obs, t = robot.observe()             # newest frames that have "arrived", t = their capture time
    robot.command(actions, stamps)       # waypoints; they arrive after the actuation latency

Timeline. The robot's servo thread (``clock.every``) ticks at ``rate_hz``. The env steps at the
task's control rate ``fps``: env step ``k`` runs at ``T_k = t0 + k / fps`` on the tick that falls
there, with the waypoint target interpolated at ``T_k``, and produces the observation captured at
``T_{k+1}``. Each key of that observation becomes visible to :meth:`observe` at
``T_{k+1} + latency[key] + U(0, jitter)``.

Why one env step per control period instead of sub-steps at the servo rate: the tasks' physics
integrate one target over a control period (MuJoCo sub-steps with the target held, and Push-T
rate-limits the setpoint per period), which is exactly how their demonstrations were recorded.
Sub-stepping a moving target would change the dynamics the policy was trained on and would need
each env's internals. So only the target at ``T_k`` reaches the physics; the ticks between decide
when commands arrive (actuation latency, resolved to one tick), and what :meth:`hold` keeps. With
waypoints stamped on the ``T_k`` grid (the loop's stamps ``obs_time + i * dt`` are) the target at
``T_k`` is the waypoint itself, and a loop without latency reproduces ``dp-eval`` exactly.

Waypoints. :meth:`command` replaces every scheduled waypoint at or after its first stamp. A
waypoint whose stamp is already past when it arrives is *late*: it is dropped and counted in
``late_waypoints`` (a correct loop leaves this at 0). With no waypoint left the robot holds its
last target (``held_steps``). Every env step is recorded in :attr:`executed`: ``(T_k, target,
waypoint stamp or NaN when held, arrival time of that waypoint)``.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from diffusion_policy.control.robot import check_waypoints, interpolate

EPS = 1e-9  # seconds: times closer than this are equal (grid times computed two ways)


def initial_target(env) -> np.ndarray:
    """The action that holds the robot where an env's reset put it (before any command)."""
    u = env.unwrapped
    name = type(u).__name__
    if name.startswith("PushT"):
        return np.asarray(u.data.act, np.float64).copy()  # the servo's setpoint
    if name == "AvoidEnv":
        return np.asarray(u.agent_pos, np.float64)
    if name == "PickPlaceEnv":
        return u.target_to_action(u.ee_pos, u.ee_yaw, -1.0).astype(np.float64)  # gripper open
    space = env.action_space
    return np.clip(np.zeros(space.shape), space.low, space.high).astype(np.float64)


class SimRobot:
    """A task's env as a robot (module docstring). ``obs_latency``: seconds, one number or a dict
    per observation key (missing keys: 0); ``*_jitter``: width of the uniform extra delay."""

    def __init__(self, task, clock, rate_hz: float = 100.0, obs_latency=0.0, obs_jitter: float = 0.0,
                 act_latency: float = 0.0, act_jitter: float = 0.0, seed: int = 0,
                 max_episode_steps: int | None = None, env=None):
        from diffusion_policy.collect import make_env

        self.task, self.clock = task, clock
        self.control_rate = float(task.fps)
        self.dt = 1.0 / self.control_rate
        ticks = rate_hz / self.control_rate
        if ticks < 1 or abs(ticks - round(ticks)) > 1e-9:
            raise ValueError(f"SimRobot: rate_hz={rate_hz} must be a whole multiple of the task's "
                             f"control rate fps={self.control_rate}")
        self.rate_hz, self.ticks_per_step = float(rate_hz), int(round(ticks))
        self.env = env if env is not None else make_env(
            task.env_id, dict(task.env_kwargs), max_episode_steps or task.max_episode_steps)
        self.observation_space = self.env.observation_space
        self.action_space = self.env.action_space
        keys = list(self.observation_space.spaces)
        lat = obs_latency if isinstance(obs_latency, dict) else {k: obs_latency for k in keys}
        unknown = [k for k in lat if k not in keys]
        if unknown:
            raise ValueError(f"SimRobot: obs_latency names keys {unknown} the env does not observe ({keys})")
        self.obs_latency = {k: float(lat.get(k, 0.0)) for k in keys}
        if min(self.obs_latency.values(), default=0.0) < 0 or min(obs_jitter, act_latency, act_jitter) < 0:
            raise ValueError("SimRobot: latencies and jitters must be >= 0 s")
        self.obs_jitter, self.act_latency, self.act_jitter = float(obs_jitter), float(act_latency), float(act_jitter)
        self._rng = np.random.default_rng([seed, 0x5137])
        self._lock = threading.Lock()
        self._timer = None
        self.done, self.info, self.stopped = False, {}, False

    # ------------------------------------------------------------------------------ episodes
    def reset(self, seed: int | None = None) -> None:
        """Start an episode from ``env.reset(seed=seed)`` at ``clock.now()``; the servo starts."""
        with self._lock:
            if self._timer is not None:
                self._timer.stop()
            obs, info = self.env.reset(seed=seed)
            self.t0 = self.clock.now()
            self._frames = {k: [] for k in self.obs_latency}  # (capture, visible, value), in order
            self._add_frame(obs, self.t0)
            self._waypoints: list = []  # (stamp, target, arrival)
            self._pending: list = []  # (arrival, actions, stamps) not yet at the robot
            self._last = (self.t0 - self.dt, initial_target(self.env))  # what the servo holds
            self._tick_index = 0
            self.executed: list = []
            self.late_waypoints = self.held_steps = 0
            self.done, self.info, self.stopped = False, dict(info), False
            self.steps, self.max_reward = 0, -math.inf
        self._timer = self.clock.every(1.0 / self.rate_hz, self._tick, name="sim-robot")

    def _add_frame(self, obs: dict, capture: float) -> None:
        for k, v in obs.items():
            jitter = float(self._rng.uniform(0.0, self.obs_jitter)) if self.obs_jitter else 0.0
            self._frames[k].append((capture, capture + self.obs_latency[k] + jitter, np.array(v, copy=True)))
            if len(self._frames[k]) > 64:  # older frames are never the newest visible one again
                del self._frames[k][0]

    # ------------------------------------------------------------------------------ Robot
    def observe(self):
        """Newest visible frame of every key; the time is the oldest of their capture times."""
        now = self.clock.now() + EPS
        with self._lock:
            obs, times = {}, []
            for k, frames in self._frames.items():
                seen = [f for f in frames if f[1] <= now]
                if not seen:
                    return None, None
                capture, _, value = max(seen, key=lambda f: f[0])
                obs[k], times = value, times + [capture]
        return obs, min(times)

    def command(self, actions, timestamps) -> None:
        actions, stamps = check_waypoints(actions, timestamps, self.action_space.shape[0])
        if len(stamps) == 0:
            return
        jitter = float(self._rng.uniform(0.0, self.act_jitter)) if self.act_jitter else 0.0
        with self._lock:
            self._pending.append((self.clock.now() + self.act_latency + jitter, actions, stamps))

    def hold(self) -> None:
        with self._lock:
            self._waypoints, self._pending = [], []

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            self._waypoints, self._pending = [], []
        if self._timer is not None:
            self._timer.stop()

    def close(self) -> None:
        self.stop()
        self.env.close()

    def drain_executed(self) -> list:
        """Env steps executed since the last call: ``(T_k, target, stamp, arrival)``."""
        with self._lock:
            out, self._drain_from = self.executed[getattr(self, "_drain_from", 0):], len(self.executed)
        return out

    # ------------------------------------------------------------------------------ servo
    def _tick(self, t: float) -> None:
        with self._lock:
            if self.stopped or self.done:
                return
            self._merge_arrivals(t)
            n = self._tick_index
            self._tick_index += 1
            if n % self.ticks_per_step:
                return
            k = n // self.ticks_per_step
            T_k = self.t0 + k * self.dt  # the loop stamps with the same formula
            exact = [w for w in self._waypoints if abs(w[0] - T_k) <= EPS]
            future = [w for w in self._waypoints if w[0] >= T_k - EPS]
            target = interpolate([(w[0], w[1]) for w in self._waypoints], self._last, T_k)
            held = not future
            self.held_steps += held
            stamp, arrival = (exact[0][0], exact[0][2]) if exact else (math.nan, math.nan)
            self._waypoints = [w for w in self._waypoints if w[0] > T_k + EPS]
            self._last = (T_k, target)
            self.executed.append((T_k, target.copy(), stamp, arrival))
            obs, reward, terminated, truncated, info = self.env.step(target.astype(self.action_space.dtype))
            self.steps += 1
            self.max_reward = max(self.max_reward, float(reward))
            self._add_frame(obs, T_k + self.dt)
            if terminated or truncated:
                self.done, self.info = True, dict(info, terminated=bool(terminated))

    def _merge_arrivals(self, t: float) -> None:
        arrived = [p for p in self._pending if p[0] <= t + EPS]
        self._pending = [p for p in self._pending if p[0] > t + EPS]
        for arrival, actions, stamps in arrived:
            keep = [w for w in self._waypoints if w[0] < stamps[0] - EPS]  # replaced from stamps[0] on
            late = stamps < arrival - EPS
            self.late_waypoints += int(late.sum())
            self._waypoints = keep + [(float(s), a, arrival) for s, a, x in zip(stamps, actions, late) if not x]
