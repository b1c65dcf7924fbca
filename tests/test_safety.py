"""The safety layer: clipping to bounds, workspace and rate limit with exact counts, NaN/inf
rejection, the watchdog's deadlines, hold and stop after repeated faults."""
import numpy as np
import pytest

from diffusion_policy.control.safety import Safety


def make(**kw):
    return Safety([-1.0, -1.0], [1.0, 1.0], **kw)


def test_bounds_workspace_and_rate_are_clipped_in_order_and_counted():
    s = make(max_delta=0.2, workspace_low=[-0.5], workspace_high=[0.5])
    a = np.array([[0.0, 0.0], [2.0, 0.1], [0.6, -3.0], [0.5, -0.9]])
    out = s.filter(a, previous=np.array([0.0, 0.0]), now=1.0)
    # bounds: rows 1 and 2; workspace (dim 0 in [-0.5, 0.5]): rows 1 and 2 (1.0 and 0.6 -> 0.5);
    # rate from (0, 0): row 1 x 0.5 -> 0.2, row 2 x 0.4, y -1 -> -0.2 ... step by step
    expected = np.array([[0.0, 0.0], [0.2, 0.1], [0.4, -0.1], [0.5, -0.3]])
    np.testing.assert_allclose(out, expected)
    assert s.counts["clip_bounds"] == 2 and s.counts["clip_workspace"] == 2 and s.counts["clip_rate"] == 3
    assert s.interventions == 7 and [e[1] for e in s.events] == ["clip_bounds", "clip_workspace", "clip_rate"]
    assert [e[3] for e in s.events] == [2, 2, 3]
    # without a previous waypoint the first is only clipped to the boxes
    np.testing.assert_allclose(make(max_delta=0.1).filter(np.array([[0.9, 0.9]]), None, 0.0), [[0.9, 0.9]])


def test_nan_chunks_and_observations_are_faults():
    s = make()
    assert not s.check_chunk(np.array([[0.0, np.nan], [np.inf, 0.0]]), 0.0)
    assert s.counts["reject_chunk"] == 1 and "2 NaN/inf" in s.events[-1][2]
    assert not s.check_obs({"state": np.array([0.0, np.nan], np.float32)}, 0.0)
    assert s.check_obs({"image": np.zeros((2, 2, 3), np.uint8), "state": np.zeros(3)}, 0.0)
    assert s.counts["bad_obs"] == 1 and s.end_tick(0.0) == "hold"


def test_watchdog_holds_then_stops_after_max_faults_without_a_good_chunk():
    s = make(obs_deadline=0.5, chunk_deadline=1.0, max_faults=3)
    s.watchdog(now=1.0, obs_time=0.6, waiting_since=0.1)  # both within their deadlines
    assert s.end_tick(1.0) == "ok"
    s.watchdog(now=1.2, obs_time=0.6, waiting_since=0.1)  # 0.6 s old and 1.1 s waited
    assert s.counts["stale_obs"] == 1 and s.counts["stall"] == 1 and s.end_tick(1.2) == "hold"
    assert s.end_tick(1.3) == "ok"  # a quiet tick does not clear the count ...
    s.fault(1.4, "policy_error", "x")
    assert s.end_tick(1.4) == "hold"
    s.recovered()  # ... a good chunk does
    s.fault(1.5, "policy_error", "x")
    assert s.end_tick(1.5) == "hold"
    s.fault(1.6, "policy_error", "x")
    s.fault(1.6, "stale_obs", "y")  # two faults on one tick count as one faulty tick
    assert s.end_tick(1.6) == "hold"
    s.fault(1.7, "policy_error", "x")
    assert s.end_tick(1.7) == "stop" and s.counts["stop"] == 1 and s.counts["policy_error"] == 4


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="low <= high"):
        Safety([1.0], [0.0])
    with pytest.raises(ValueError, match="max_delta"):
        make(max_delta=0.0)
    with pytest.raises(ValueError, match="both workspace_low and workspace_high"):
        make(workspace_low=[0.0])
    with pytest.raises(ValueError, match="length <= Da=2"):
        make(workspace_low=[0, 0, 0], workspace_high=[1, 1, 1])
