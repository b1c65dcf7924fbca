"""The example SDK adapter of control/robot.py, run against a fake SDK so that the class users
copy stays correct: capture times converted to the loop's clock, interpolated servo targets, hold,
stop (brake)."""
import time

import numpy as np
from gymnasium import spaces

from diffusion_policy.control.clock import SimClock
from diffusion_policy.control.robot import ExampleSdkRobot, Robot


class FakeSdk:
    def __init__(self, origin):
        self.origin, self.targets, self.braked = origin, [], False
        self.state_time = None

    def read_state(self):
        if self.state_time is None:
            return None, None
        return np.array([0.1, 0.2]), self.origin + self.state_time

    def latest_frame(self):
        return np.zeros((4, 4, 3), np.uint8), self.origin + self.state_time - 0.13

    def servo_to(self, target):
        self.targets.append(np.array(target))

    def brake(self):
        self.braked = True


def test_example_adapter_follows_the_protocol():
    clock = SimClock()
    origin = time.monotonic() - clock.now()
    sdk = FakeSdk(origin)
    box = spaces.Box(-1, 1, (2,), np.float32)
    robot = ExampleSdkRobot(sdk, spaces.Dict({"agent_pos": box}), box, control_rate=10, clock=clock,
                            servo_rate=100, image_key="image")
    assert isinstance(robot, Robot)
    assert robot.observe() == (None, None)
    sdk.state_time = 0.5
    obs, t = robot.observe()
    assert abs(t - 0.37) < 1e-3 and obs["image"].shape == (4, 4, 3)  # as old as the camera frame
    robot.command([[0.0, 0.0], [1.0, -1.0]], [0.0, 0.1])
    clock.sleep_until(0.1)
    # ticks at 0.00 .. 0.09: from the first waypoint linearly towards the second
    assert len(sdk.targets) == 10
    np.testing.assert_allclose(sdk.targets[5], [0.5, -0.5], atol=1e-9)
    robot.hold()
    clock.sleep_until(0.2)
    np.testing.assert_allclose(sdk.targets[-1], sdk.targets[10], atol=1e-9)  # held where it was
    robot.stop()
    n = len(sdk.targets)
    clock.sleep_until(0.5)
    assert sdk.braked and len(sdk.targets) == n
