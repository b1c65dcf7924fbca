"""The sampler steps that the network's sampling path runs with its last layer (StepUpdate)
equal the steps they replace: diffusers' DDIMScheduler.step and the Euler step."""
import copy

import pytest
import torch

from diffusion_policy.methods import DiffusionMethod, FlowMatching
from diffusion_policy.step_update import StepUpdate


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_ddim_update_equals_diffusers_step(prediction_type, clip_sample, steps):
    method = DiffusionMethod("ddim", prediction_type=prediction_type, clip_sample=clip_sample)
    sched = copy.copy(method.scheduler)
    sched.set_timesteps(steps)
    update = method._ddim_update(sched, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for i, k in enumerate(sched.timesteps):
        x = 2 * torch.randn(4, 16, 2, generator=g)  # wide enough that clipping x_0 matters
        out = 2 * torch.randn(4, 16, 2, generator=g)
        want = sched.step(out, k, x).prev_sample
        torch.testing.assert_close(update.apply(x, out, i), want, rtol=1e-5, atol=1e-5)


def test_euler_update_is_x_plus_h_v():
    update = FlowMatching(integrator="euler")._euler_update(4, torch.device("cpu"))
    x, v = torch.randn(2, 8, 3), torch.randn(2, 8, 3)
    torch.testing.assert_close(update.apply(x, v, 2), x - 0.25 * v)


def test_step_update_rows_are_checked():
    with pytest.raises(ValueError, match="a0, a1, cx, c0, co, clip"):
        StepUpdate([(1.0, 2.0)], torch.device("cpu"))
