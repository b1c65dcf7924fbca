"""The sampling plans the methods export say what their reference loops do: run by the fast
path's loop (fast.runner.run_plan) with the plain network, every sampler gives the method's own
chunk, with per-row generators and a prefix; the plan's times are the times the loop calls the
network with."""
import pytest
import torch

from diffusion_policy.fast.runner import run_plan
from diffusion_policy.methods import DiffusionMethod, FlowMatching
from diffusion_policy.methods.sampling import SamplingPlan

METHODS = {
    "ddpm": lambda: DiffusionMethod("ddpm", num_inference_steps=6),
    "ddim": lambda: DiffusionMethod("ddim", num_inference_steps=4),
    "ddim-sample-noclip": lambda: DiffusionMethod("ddim", prediction_type="sample", clip_sample=False,
                                                  num_inference_steps=3),
    "ddim-v": lambda: DiffusionMethod("ddim", prediction_type="v_prediction", num_inference_steps=5),
    "dpmsolver": lambda: DiffusionMethod("dpmsolver", clip_sample=False, num_inference_steps=4),
    "flow-euler": lambda: FlowMatching(integrator="euler", num_inference_steps=4),
    "flow-midpoint": lambda: FlowMatching(integrator="midpoint", num_inference_steps=3),
    "flow-heun": lambda: FlowMatching(integrator="heun", num_inference_steps=3),
}
B, H, DA = 3, 8, 2


def net(x, t, cond):
    """A smooth field of the chunk, the time and the condition (every input matters; the chunk's
    mean couples its steps, so the known prefix reaches the rest)."""
    return (0.5 * torch.tanh(x) * torch.cos(t / 300.0)[:, None, None] + 0.3 * x.mean(dim=1, keepdim=True)
            + cond.mean(dim=(1, 2))[:, None, None])


def gens(seed: int = 3) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + b) for b in range(B)]


@pytest.mark.parametrize("name", list(METHODS))
def test_plan_run_with_the_plain_network_equals_the_method_loop(name):
    method = METHODS[name]()
    cond = torch.randn(B, 2, 4, generator=torch.Generator().manual_seed(0))
    plan = method.sampling_plan(None, cond.device)

    def f(x, i):  # the plain network at the plan's time i; the step too for an "update" plan
        out = net(x, plan.step_times[i].expand(B), cond)
        return plan.update.apply(x, out, i) if plan.kind == "update" else out

    for prefix in (None, torch.rand(B, 3, DA, generator=torch.Generator().manual_seed(1)) * 2 - 1):
        want = method.sample(net, cond, (B, H, DA), generator=gens(), prefix=prefix)
        got = run_plan(plan, f, (B, H, DA), cond.device, generator=gens(), prefix=prefix)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if prefix is not None:
            assert torch.equal(got[:, :3], prefix)


@pytest.mark.parametrize("name", list(METHODS))
def test_plan_times_are_the_times_the_loop_calls_the_network_with(name):
    method = METHODS[name]()
    seen = []

    def spy(x, t, cond):
        seen.append(float(t[0]))
        return net(x, t, cond)

    method.sample(spy, torch.zeros(B, 1, 1), (B, H, DA), generator=gens())
    plan = method.sampling_plan()
    assert plan.times.tolist() == seen and [float(t) for t in plan.step_times] == seen
    assert method.sampling_plan() is plan  # kept per (steps, device): a fast path may key on it
    assert method.sampling_plan(2) is not plan and len(method.sampling_plan(2).step_times) == 2 * len(plan.b or (0,))


def test_plans_by_kind():
    ddim, euler = METHODS["ddim"]().sampling_plan(), METHODS["flow-euler"]().sampling_plan()
    assert (ddim.kind, euler.kind) == ("update", "update") and ddim.timesteps == (99, 74, 49, 24)
    assert METHODS["ddpm"]().sampling_plan().kind == "scheduler"
    heun = METHODS["flow-heun"]().sampling_plan()
    assert (heun.kind, heun.a, heun.b, heun.h) == ("runge_kutta", ((), (1.0,)), (0.5, 0.5), -1 / 3)
    # the flow prefix weights are (1 - t, t) on the straight path: t = 1 at the start
    assert euler.prefix_weights[0] == (0.0, 1.0) and euler.prefix_weights[2] == (0.5, 0.5)
    with pytest.raises(ValueError, match="SamplingPlan.kind must be one of"):
        SamplingPlan("direct", euler.times, euler.step_times, euler.prefix_weights)
    with pytest.raises(ValueError, match="one StepUpdate row per call"):
        SamplingPlan("update", euler.times, euler.step_times, euler.prefix_weights)
