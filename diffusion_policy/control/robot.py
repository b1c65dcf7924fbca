"""The robot side of the deploy loop: a small protocol, and an adapter to copy for your own SDK.

The loop (control/realtime.py) needs five things from a robot, nothing else::

    obs, t = robot.observe()          # newest observation {key: array} and its capture time (s)
    robot.command(actions, stamps)    # timestamped waypoints: actions (N, Da), stamps (N,) seconds
    robot.hold()                      # drop scheduled waypoints, keep the current target
    robot.stop()                      # stop for good (end of run, Ctrl-C, repeated faults)
    robot.observation_space, robot.action_space, robot.control_rate   # Gymnasium spaces, Hz

Times are seconds on the clock the loop was given (``clock.now()``), for real hardware a wall
clock shared with the SDK (``time.monotonic()`` based; see :class:`ExampleSdkRobot`). ``observe``
returns the capture time of the observation, not the time it was read: a camera frame that is
130 ms old says so (UMI declares such per-device latencies), and the loop stamps the actions of a
chunk from it: chunk index ``To-1 + i`` is meant for ``t + i * dt``. ``command`` receives only
waypoints that are still in the future by the loop's ``action_margin_s``; the robot interpolates
between them at its own rate (Chi et al.'s UR5 controller: 125 Hz) and holds the last one when it
runs out. ``observe`` returns ``(None, None)`` until a first observation exists.

Optional, used when present: ``reset(seed)`` (start an episode; simulated robots), ``done`` and
``info`` (the episode ended; ``info["success"]``), ``drain_executed()`` (what was really sent to the
actuators, for the log; otherwise the log records the commanded waypoints as executed).

Write an adapter for your robot by copying :class:`ExampleSdkRobot` and replacing the four calls
marked ``SDK:``. tests/test_deploy_robot.py runs this class against a fake SDK, so it stays correct.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Robot(Protocol):
    """What :class:`diffusion_policy.control.realtime.RealtimeLoop` drives (module docstring)."""

    observation_space: object
    action_space: object
    control_rate: float

    def observe(self) -> tuple[dict | None, float | None]: ...

    def command(self, actions: np.ndarray, timestamps: np.ndarray) -> None: ...

    def hold(self) -> None: ...

    def stop(self) -> None: ...


def check_waypoints(actions, timestamps, action_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(N, Da)`` float64 actions and ``(N,)`` strictly increasing stamps, or a ValueError."""
    actions = np.asarray(actions, dtype=np.float64)
    stamps = np.asarray(timestamps, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != action_dim or stamps.shape != (len(actions),):
        raise ValueError(f"command: actions {actions.shape} and timestamps {stamps.shape}, expected "
                         f"(N, {action_dim}) and (N,)")
    if len(stamps) > 1 and not np.all(np.diff(stamps) > 0):
        raise ValueError("command: timestamps must be strictly increasing")
    if not np.all(np.isfinite(actions)):
        raise ValueError("command: actions hold NaN or inf")
    return actions, stamps


class ExampleSdkRobot:
    """Adapter from a vendor SDK to :class:`Robot`: copy this class and replace the ``SDK:`` calls.

    It assumes an SDK with a streaming servo call (``servo_to(target)``, as UR's ``servoL``, Franka's
    impedance target or a Dynamixel goal position) and a camera callback. The adapter owns the
    interpolation: a thread at ``servo_rate`` Hz sends the waypoint target for the current time,
    linearly interpolated between the waypoints, and holds the last one when they run out.

    ``sdk`` needs (replace with your calls): ``read_state() -> (array, capture_time)``,
    ``latest_frame() -> (image, capture_time)`` (or None for no camera), ``servo_to(target)`` and
    ``brake()``. Capture times must be on ``time.monotonic()``, like :class:`WallClock` (which
    measures from its own origin: pass ``clock`` so that times are converted).
    """

    def __init__(self, sdk, observation_space, action_space, control_rate: float, clock,
                 servo_rate: float = 125.0, state_key: str = "agent_pos", image_key: str | None = None):
        self.sdk, self.clock = sdk, clock
        self.observation_space, self.action_space = observation_space, action_space
        self.control_rate, self.servo_rate = float(control_rate), float(servo_rate)
        self.state_key, self.image_key = state_key, image_key
        self._origin = time.monotonic() - clock.now()  # clock time = monotonic - origin
        self._lock = threading.Lock()
        self._waypoints: list = []  # (stamp, target) in the future, sorted
        self._last = None  # (time, target) last sent to the servo
        self._timer = clock.every(1.0 / self.servo_rate, self._servo_tick, name="servo")

    def observe(self):
        state, t_state = self.sdk.read_state()  # SDK: joint/end-effector state and its time
        if state is None:
            return None, None
        obs = {self.state_key: np.asarray(state, np.float32)}
        t = t_state - self._origin
        if self.image_key is not None:
            frame = self.sdk.latest_frame()  # SDK: newest camera frame and its capture time
            if frame is None:
                return None, None
            image, t_image = frame
            obs[self.image_key] = np.asarray(image, np.uint8)
            t = min(t, t_image - self._origin)  # the observation is as old as its oldest part
        return obs, t

    def command(self, actions, timestamps) -> None:
        actions, stamps = check_waypoints(actions, timestamps, self.action_space.shape[0])
        with self._lock:
            keep = [w for w in self._waypoints if w[0] < stamps[0]]  # the new plan replaces the rest
            self._waypoints = keep + list(zip(stamps.tolist(), actions))

    def hold(self) -> None:
        with self._lock:
            self._waypoints = []

    def stop(self) -> None:
        self._timer.stop()
        with self._lock:
            self._waypoints = []
        self.sdk.brake()  # SDK: stop the arm (protective stop / zero velocity)

    def _servo_tick(self, t: float) -> None:
        with self._lock:
            target = interpolate(self._waypoints, self._last, t)
            self._waypoints = [w for w in self._waypoints if w[0] > t]
            if target is not None:
                self._last = (t, target)
        if target is not None:
            self.sdk.servo_to(target)  # SDK: stream the target to the controller


def interpolate(waypoints: list, last, t: float):
    """Target at time ``t``: linear between ``last = (time, target)`` (what is being executed) and
    the waypoints ``[(stamp, target), ...]`` (sorted), the last target once they are passed, None
    when there is nothing at all. A waypoint is reached exactly at its stamp."""
    points = ([last] if last is not None else []) + [w for w in waypoints if last is None or w[0] > last[0]]
    if not points:
        return None
    if t <= points[0][0]:
        return np.asarray(points[0][1], dtype=np.float64)
    for (t0, a0), (t1, a1) in zip(points, points[1:]):
        if abs(t - t1) <= 1e-9:  # at the waypoint (times computed two ways differ in the last bits)
            return np.asarray(a1, dtype=np.float64)
        if t <= t1:
            w = (t - t0) / (t1 - t0)
            return (1.0 - w) * np.asarray(a0, np.float64) + w * np.asarray(a1, np.float64)
    return np.asarray(points[-1][1], dtype=np.float64)
