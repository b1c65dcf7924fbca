"""Clocks and the simulated robot: virtual-time ordering, per-key observation latency, actuation
latency (late waypoints dropped), interpolation between waypoints, hold; the wall clock's ticks."""
import math
import threading
import time

import numpy as np
import pytest

from diffusion_policy.config import compose
from diffusion_policy.control.clock import SimClock, WallClock, make_clock
from diffusion_policy.control.sim_robot import SimRobot

from conftest import needs_gl


def task(name="pusht", steps=20):
    return compose("deploy", [f"task={name}", f"task.max_episode_steps={steps}"]).task


def test_sim_clock_runs_ticks_before_t_in_order_and_ticks_at_t_next_time():
    clock, seen = SimClock(), []
    clock.every(0.25, lambda t: seen.append(("a", round(t, 9), round(clock.now(), 9))))
    clock.every(0.5, lambda t: seen.append(("b", round(t, 9), round(clock.now(), 9))))
    clock.sleep_until(0.5)
    # the ticks at 0.5 have not run: what the caller does at 0.5 comes first
    assert seen == [("a", 0.0, 0.0), ("b", 0.0, 0.0), ("a", 0.25, 0.25)] and clock.now() == 0.5
    clock.sleep_until(0.75)
    assert seen[3:] == [("a", 0.5, 0.5), ("b", 0.5, 0.5)]
    # 24 ticks of 0.1 s land on the same instant as 240 of 0.01 s (within 1 ns)
    c2, n = SimClock(), [0]
    c2.every(0.01, lambda t: n.__setitem__(0, n[0] + 1))
    c2.sleep_until(24 * 0.1)
    assert n[0] == 240
    with pytest.raises(ValueError, match="clock='x'"):
        make_clock("x")


def test_wall_clock_ticks_in_real_time():
    clock, ticks = WallClock(), []
    timer = clock.every(0.02, ticks.append)
    time.sleep(0.25)
    timer.stop()
    assert 8 <= len(ticks) <= 14  # 0.25 s at 50 Hz, on a loaded machine
    np.testing.assert_allclose(np.diff(ticks), 0.02, atol=1e-9)  # scheduled times, not drift
    ev = threading.Event()
    t0 = clock.now()
    threading.Timer(0.05, ev.set).start()
    clock.sleep_until(t0 + 5.0, wake=ev)
    assert clock.now() - t0 < 1.0  # woken by the event, not the deadline


def test_per_key_observation_latency_and_capture_times():
    clock = SimClock()
    robot = SimRobot(task(), clock, obs_latency={"keypoint": 0.13, "agent_pos": 0.02})
    robot.reset(seed=1)
    assert robot.observe() == (None, None)  # nothing has arrived at t = 0
    clock.sleep_until(0.13)
    obs, t = robot.observe()
    assert t == 0.0 and set(obs) == {"keypoint", "agent_pos"}
    clock.sleep_until(0.42)
    # agent_pos captured at 0.4 (visible at 0.42), keypoint at 0.2 (visible 0.33; 0.3 not before 0.43)
    obs, t = robot.observe()
    assert t == pytest.approx(0.2)
    frames = {k: [f[0] for f in v if f[1] <= 0.42 + 1e-9] for k, v in robot._frames.items()}
    assert max(frames["agent_pos"]) == pytest.approx(0.4) and max(frames["keypoint"]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="obs_latency names keys"):
        SimRobot(task(), clock, obs_latency={"camera": 0.1})
    with pytest.raises(ValueError, match="whole multiple"):
        SimRobot(task(), clock, rate_hz=95)


def test_actuation_latency_interpolation_and_hold():
    clock = SimClock()
    robot = SimRobot(task(), clock, act_latency=0.05)
    robot.reset(seed=2)
    start = robot._last[1].copy()
    a = np.array([[0.0, 0.0], [0.1, 0.1], [0.2, 0.0], [0.2, 0.2]])
    robot.command(a[:2], [0.0, 0.1])  # the first waypoint is late once it arrives at 0.05
    clock.sleep_until(0.1)
    robot.command(a[2:], [0.3, 0.5])  # only 0.3 and 0.5: 0.4 is interpolated
    clock.sleep_until(0.7)
    ex = robot.executed
    assert robot.late_waypoints == 1 and [round(e[0], 9) for e in ex] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    np.testing.assert_allclose(ex[0][1], start)  # step 0: nothing arrived yet, held
    np.testing.assert_allclose(ex[1][1], a[1])  # exactly the waypoint stamped 0.1
    np.testing.assert_allclose(ex[2][1], (a[1] + a[2]) / 2)  # between 0.1 and 0.3
    np.testing.assert_allclose(ex[3][1], a[2])
    np.testing.assert_allclose(ex[4][1], (a[2] + a[3]) / 2)
    np.testing.assert_allclose(ex[5][1], a[3])
    np.testing.assert_allclose(ex[6][1], a[3])  # past the last waypoint: held
    assert [math.isnan(e[2]) for e in ex] == [True, False, True, False, True, False, True]
    assert robot.held_steps == 2
    robot.command(a[:1] + 0.05, [0.8])
    robot.hold()  # drops what is scheduled, even not yet arrived
    clock.sleep_until(0.9)
    np.testing.assert_allclose(robot.executed[-1][1], a[3])
    robot.stop()
    n = len(robot.executed)
    clock.sleep_until(1.5)
    assert len(robot.executed) == n  # stopped: the env is not stepped any more


def test_episode_end_and_waypoint_errors():
    clock = SimClock()
    robot = SimRobot(task(steps=5), clock)
    robot.reset(seed=0)
    clock.sleep_until(1.0)
    assert robot.done and robot.steps == 5 and robot.info["terminated"] is False  # truncated
    with pytest.raises(ValueError, match="strictly increasing"):
        robot.command(np.zeros((2, 2)), [0.2, 0.2])
    with pytest.raises(ValueError, match=r"expected \(N, 2\)"):
        robot.command(np.zeros((2, 3)), [0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        robot.command(np.full((1, 2), np.nan), [0.2])


@needs_gl
def test_pickplace_cameras_have_their_own_latency():
    """PickPlace from pixels: each camera its own latency, proprioception without."""
    clock = SimClock()
    robot = SimRobot(task("pickplace_image", 10), clock,
                     obs_latency={"front_image": 0.15, "wrist_image": 0.05})
    robot.reset(seed=0)
    clock.sleep_until(0.35)
    obs, t = robot.observe()
    assert obs["front_image"].shape == (96, 96, 3) and obs["front_image"].dtype == np.uint8
    newest = {k: max(f[0] for f in v if f[1] <= 0.35 + 1e-9) for k, v in robot._frames.items()}
    assert newest == pytest.approx({"front_image": 0.2, "wrist_image": 0.3, "agent_pos": 0.3})
    assert t == pytest.approx(0.2)  # as old as its oldest part
    robot.close()
