"""Real-time chunking by guided inpainting (diffusion_policy/methods/guidance.py) against closed form.

For Gaussian data ``x0 ~ N(mu, s^2 I)`` and a noisy point ``x = a x0 + b eps`` the posterior is
linear in ``x``: ``E[x0 | x] = mu + k (x - a mu)`` with ``k = a s^2 / (a^2 s^2 + b^2)`` and
``E[eps | x] = b / (a^2 s^2 + b^2) (x - a mu)``, so the Jacobian of the denoised estimate is ``k I``
and the guidance term ``g = k W (Y - x0_hat)`` is written here by hand, without autograd. For a
mixture of such components the posterior means are closed form too (responsibilities), which
gives the exact network that the mode tests plug into the samplers.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_policy.config import MethodConfig, PolicyConfig, TaskConfig
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.methods import DiffusionMethod, FlowMatching, Regression
from diffusion_policy.methods.guidance import (
    guidance_weight,
    guided_sample,
    predict_guided,
    rtc_weights,
)
from diffusion_policy.policy import Policy


class Mixture:
    """``sum_k w_k N(mu_k, s_k^2 I)`` over ``(H, Da)`` chunks, with its exact posterior means."""

    def __init__(self, means: list[torch.Tensor], stds: list[float], weights: list[float]):
        self.means = torch.stack(means).double()  # (K, H, Da)
        self.stds = torch.tensor(stds, dtype=torch.float64)  # (K,)
        self.weights = torch.tensor(weights, dtype=torch.float64)  # (K,)

    def posterior(self, x: torch.Tensor, a, b):
        """E[x0 | x] and E[eps | x] for ``x = a x0 + b eps`` (``a``, ``b``: floats); differentiable."""
        K, D = len(self.weights), x[0].numel()
        var = a**2 * self.stds.view(1, K, 1, 1) ** 2 + b**2  # (1, K, 1, 1)
        diff = x[:, None] - a * self.means[None]  # (B, K, H, Da)
        v = var.view(1, K)
        log_r = self.weights.log() - 0.5 * D * v.log() - 0.5 * (diff**2).sum((2, 3)) / v
        r = torch.softmax(log_r, dim=1)[:, :, None, None]  # (B, K, 1, 1)
        ex0 = self.means[None] + a * self.stds.view(1, K, 1, 1) ** 2 / var * diff
        return (r * ex0).sum(1), (r * b / var * diff).sum(1)


class ExactFlowNet(nn.Module):
    """The flow velocity ``E[eps - x0 | x]`` (the minimiser of the flow loss) at ``t = time / 1000``."""

    def __init__(self, data: Mixture):
        super().__init__()
        self.data = data

    def forward(self, x, time, cond):
        t = float(time[0]) / 1000.0  # one time per call in the samplers
        ex0, eeps = self.data.posterior(x.double(), 1.0 - t, t)
        return (eeps - ex0).float()


class ExactDiffusionNet(nn.Module):
    """The minimiser of the diffusion loss for ``prediction_type`` at integer timestep ``time``."""

    def __init__(self, data: Mixture, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        self.data, self.abar, self.pt = data, alphas_cumprod, prediction_type

    def forward(self, x, time, cond):
        abar = float(self.abar[int(time[0])])
        a, b = abar**0.5, (1.0 - abar) ** 0.5
        ex0, eeps = self.data.posterior(x.double(), a, b)
        out = {"epsilon": eeps, "sample": ex0, "v_prediction": a * eeps - b * ex0}[self.pt]
        return out.float()


H, DA = 4, 2
MU = torch.linspace(-0.6, 0.9, H * DA, dtype=torch.float64).view(H, DA)
S = 0.5
GAUSS = Mixture([MU], [S], [1.0])


def ddim(prediction_type: str, steps: int, clip: bool = False) -> DiffusionMethod:
    return DiffusionMethod("ddim", 100, "squaredcos_cap_v2", prediction_type, clip, steps)


# ----------------------------------------------------------------------------------------- the mask
def test_rtc_weights_match_a_hand_computation():
    # H = 12, first executed action at index 1, d = 2 frozen, s = 4: F = 3, E = 8,
    # c_i = (8 - i) / 6 for i = 3..7, W_i = c_i (e^c_i - 1) / (e - 1) (Black et al. 2025, eq. 5)
    w = rtc_weights(12, delay=2, exec_horizon=4, start=1)
    expected = [1, 1, 1, 0.6309481, 0.3677061, 0.1887703, 0.0767457, 0.0175913, 0, 0, 0, 0]
    # e.g. i = 5: c = 1/2, 0.5 * (1.6487213 - 1) / 1.7182818 = 0.1887703
    torch.testing.assert_close(w, torch.tensor(expected), atol=1e-6, rtol=0)
    hard = rtc_weights(12, delay=2, exec_horizon=4, start=1, schedule="hard")
    torch.testing.assert_close(hard, torch.tensor([1.0] * 3 + [0.0] * 9), atol=0, rtol=0)
    # nothing frozen, nothing cut: the decay spans the whole chunk, c_0 = 5 / 6
    torch.testing.assert_close(rtc_weights(5, 0, 0)[:2], torch.tensor([0.6309481, 0.3677061]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"run past the end of the overlap horizon - exec_horizon = 8"):
        rtc_weights(12, delay=8, exec_horizon=4, start=1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        rtc_weights(12, 2, 4, schedule="linear")
    with pytest.raises(ValueError, match="delay, exec_horizon >= 0"):
        rtc_weights(12, -1, 4)


def test_guidance_weight_is_the_clipped_pigdm_weight():
    # flow at t = 0.5 (a = b = 1/2): (1 - tau) / (tau r^2) = 1 / (1/2) = 2
    assert guidance_weight(0.5, 0.5, 5.0) == pytest.approx(2.0)
    assert guidance_weight(0.5, 0.5, 1.5) == 1.5
    # flow at tau = 0.2: (0.8 / 0.2) * (0.04 + 0.64) / 0.64 = 4.25
    assert guidance_weight(0.2, 0.8, 5.0) == pytest.approx(4.25)
    assert guidance_weight(0.0, 1.0, 5.0) == 5.0  # pure noise: infinite, clipped


# ------------------------------------------------------------------- one guided step, by hand
W4 = rtc_weights(H, delay=1, exec_horizon=1, start=1)  # [1, 1, 0.1887703, 0]: P = 3
PREFIX = torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]])


def _gauss_terms(x: torch.Tensor, a: float, b: float, W: torch.Tensor, Y: torch.Tensor):
    """x0_hat, eps_hat and g for the Gaussian data, by hand (no autograd)."""
    var = a * a * S * S + b * b
    k = a * S * S / var  # d x0_hat / d x = k I
    x0 = MU + k * (x - a * MU)
    eps = b / var * (x - a * MU)
    return x0, eps, k * W[:, None] * (Y - x0)


@pytest.mark.parametrize("beta", [5.0, 1.5], ids=["unclipped-at-t=0.5", "clipped"])
def test_two_guided_flow_steps_match_closed_form(beta):
    B = 3
    noise = torch.randn(B, H, DA, generator=torch.Generator().manual_seed(0))
    Y = torch.zeros(H, DA, dtype=torch.float64)
    Y[:3] = PREFIX.double()
    x = noise.double()
    for t in (1.0, 0.5):  # Euler from t = 1 with h = -1/2
        x0, eps, g = _gauss_terms(x, 1.0 - t, t, W4.double(), Y)
        w = beta if t == 1.0 else min(beta, 2.0)
        x = x - 0.5 * ((eps - x0) - w * g)  # u_guided = u - w g (eq. 2 with u = -v)
    got = guided_sample(FlowMatching("beta", "euler", 2), ExactFlowNet(GAUSS), torch.zeros(B, 1, 1), (B, H, DA),
                        PREFIX.expand(B, 3, DA), W4, noise=noise, max_guidance=beta)
    torch.testing.assert_close(got, x.float(), atol=1e-5, rtol=1e-5)
    unguided = guided_sample(FlowMatching("beta", "euler", 2), ExactFlowNet(GAUSS), torch.zeros(B, 1, 1),
                             (B, H, DA), PREFIX.expand(B, 3, DA), torch.zeros(H), noise=noise)
    assert (unguided - got).abs().max() > 1e-2  # the guidance is far above the tolerance


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_two_guided_ddim_steps_match_closed_form(prediction_type):
    """DDIM (eta = 0) written out: x_prev = a' x0' + b' eps' with the x0 estimate shifted by b w g at
    fixed x, w = min(beta, 1 / (a b)); trailing spacing with 2 steps visits k = 99, 49."""
    B, beta = 3, 5.0
    method = ddim(prediction_type, 2)
    noise = torch.randn(B, H, DA, generator=torch.Generator().manual_seed(1))
    Y = torch.zeros(H, DA, dtype=torch.float64)
    Y[:3] = PREFIX.double()
    ac = method.alphas_cumprod
    x = noise.double()
    for k, k_prev in ((99, 49), (49, None)):
        a, b = float(ac[k]) ** 0.5, (1 - float(ac[k])) ** 0.5
        x0, eps, g = _gauss_terms(x, a, b, W4.double(), Y)
        x0 = x0 + b * min(beta, 1 / (a * b)) * g
        eps = (x - a * x0) / b
        a_prev = 1.0 if k_prev is None else float(ac[k_prev]) ** 0.5  # set_alpha_to_one at the end
        x = a_prev * x0 + (1 - a_prev**2) ** 0.5 * eps
    got = guided_sample(method, ExactDiffusionNet(GAUSS, ac, prediction_type), torch.zeros(B, 1, 1), (B, H, DA),
                        PREFIX.expand(B, 3, DA), W4, noise=noise, max_guidance=beta)
    # epsilon at k = 99: x0 = (x - b eps) / a with a = 5e-4 turns float32 rounding into ~4e-5
    tol = 1e-4 if prediction_type == "epsilon" else 1e-5
    torch.testing.assert_close(got, x.float(), atol=tol, rtol=1e-5)
    unguided = guided_sample(method, ExactDiffusionNet(GAUSS, ac, prediction_type), torch.zeros(B, 1, 1),
                             (B, H, DA), PREFIX.expand(B, 3, DA), torch.zeros(H), noise=noise)
    assert (unguided - got).abs().max() > 1000 * tol  # the guidance is far above the tolerance


def test_with_clip_sample_the_error_is_taken_on_the_clipped_estimate():
    """With ``clip_sample`` the scheduler acts on ``clip(x0_hat)``: the guidance error is taken on
    that estimate and entries outside the range pass no gradient; DDIM then clips the shifted x0
    and keeps the corrected epsilon (diffusers' DDIMScheduler.step)."""
    B, beta = 3, 5.0
    wide = Mixture([2.0 * MU], [S], [1.0])  # means up to 1.8: outside the clip range [-1, 1]
    method = ddim("epsilon", 2, clip=True)
    noise = torch.randn(B, H, DA, generator=torch.Generator().manual_seed(2))
    Y = torch.zeros(H, DA, dtype=torch.float64)
    Y[:3] = PREFIX.double()
    ac = method.alphas_cumprod
    x = noise.double()
    clipped_somewhere = False
    for k, k_prev in ((99, 49), (49, None)):
        a, b = float(ac[k]) ** 0.5, (1 - float(ac[k])) ** 0.5
        var = a * a * S * S + b * b
        x0 = wide.means[0] + a * S * S / var * (x - a * wide.means[0])
        eps = b / var * (x - a * wide.means[0])
        inside = x0.abs() <= 1.0
        clipped_somewhere |= bool((~inside[:, :3]).any())
        g = a * S * S / var * inside * W4.double()[:, None] * (Y - x0.clamp(-1, 1))
        w = min(beta, 1 / (a * b))
        x0, eps = x0 + b * w * g, eps - a * w * g
        a_prev = 1.0 if k_prev is None else float(ac[k_prev]) ** 0.5
        x = a_prev * x0.clamp(-1, 1) + (1 - a_prev**2) ** 0.5 * eps
    assert clipped_somewhere  # the case this test is about happens on the guided entries
    got = guided_sample(method, ExactDiffusionNet(wide, ac, "epsilon"), torch.zeros(B, 1, 1), (B, H, DA),
                        PREFIX.expand(B, 3, DA), W4, noise=noise, max_guidance=beta)
    torch.testing.assert_close(got, x.float(), atol=1e-4, rtol=1e-5)


def test_per_row_weights_guide_each_row_on_its_own():
    """weights (B, H): a server batching several clients, each with its own delay."""
    method, net, B = FlowMatching("beta", "heun", 2), ExactFlowNet(GAUSS), 2
    noise = torch.randn(1, H, DA, generator=torch.Generator().manual_seed(4)).expand(B, H, DA)  # same in both rows
    prefix = PREFIX.expand(B, 3, DA)
    both = guided_sample(method, net, torch.zeros(B, 1, 1), (B, H, DA), prefix, torch.stack([W4, torch.zeros(H)]),
                         noise=noise)
    for row, w in ((0, W4), (1, torch.zeros(H))):
        alone = guided_sample(method, net, torch.zeros(1, 1, 1), (1, H, DA), prefix[:1], w, noise=noise[row : row + 1])
        torch.testing.assert_close(both[row : row + 1], alone, atol=1e-6, rtol=1e-6)
    assert (both[0] - both[1]).abs().max() > 1e-2  # the rows differ by their weights only


# ------------------------------------------------------------------- zero weights: the plain sampler
class SmallNet(nn.Module):
    """A nonlinear network with parameters (to check that none of them gets a gradient)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(H * DA + 1, H * DA)

    def forward(self, x, t, cond):
        z = torch.cat([x.flatten(1), t[:, None] / 1000.0], dim=1)
        return torch.tanh(self.lin(z)).view_as(x)


@pytest.mark.parametrize("method", [
    FlowMatching("beta", "euler", 4), FlowMatching("beta", "midpoint", 3), FlowMatching("beta", "heun", 3),
    DiffusionMethod("ddim", 100, "squaredcos_cap_v2", "epsilon", True, 5),
    DiffusionMethod("ddpm", 100, "squaredcos_cap_v2", "epsilon", True, 10),
    DiffusionMethod("dpmsolver", 100, "squaredcos_cap_v2", "v_prediction", False, 5),
], ids=["euler", "midpoint", "heun", "ddim", "ddpm", "dpmsolver"])
def test_zero_weights_reproduce_the_unguided_sampler(method):
    B = 5
    net = SmallNet()
    cond = torch.zeros(B, 1, 1)
    plain = method.sample(net, cond, (B, H, DA), generator=torch.Generator().manual_seed(3))
    got = guided_sample(method, net, cond, (B, H, DA), PREFIX.expand(B, 3, DA), torch.zeros(H),
                        generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=1e-6)
    assert all(p.grad is None for p in net.parameters())  # only the chunk was differentiated
    assert not got.requires_grad and torch.is_grad_enabled()  # grad mode restored after the call


# ------------------------------------------------------------------- the point: modes and the prefix
N = 400
HM = 8
_i = torch.arange(HM, dtype=torch.float64)[:, None].expand(HM, DA)
# two modes 1.0 apart against stds 0.2; the prefix comes from the minority mode (weight 0.3)
BIMODAL = Mixture([-0.5 + 0.1 * _i / HM, 0.5 - 0.2 * _i / HM], [0.2, 0.2], [0.3, 0.7])


def _mode_of_suffix(x: torch.Tensor, lo: int) -> torch.Tensor:
    d = ((x.double()[:, None, lo:] - BIMODAL.means[None, :, lo:]) ** 2).sum((2, 3))  # (N, K)
    return d.argmin(1)


@pytest.mark.parametrize("family", ["flow", "ddim"])
def test_guidance_pulls_the_chunk_into_the_mode_of_the_prefix(family):
    """Measured (N = 400, 10 steps): unguided, the frozen segment is 0.71 from the prefix and 29% of
    the suffixes are in its mode; replacing the same 3 actions: 72-73%, the first free action 0.34-0.35
    from the prefix mode's; guided with the soft mask (1 past + 2 frozen actions, decaying over 3
    more): error 0.10, 88-89% in the prefix's mode, first free action 0.15 off; with beta = 50 the
    frozen error falls to 0.03 (flow) and 0.07 (DDIM)."""
    if family == "flow":
        method, net = FlowMatching("beta", "euler", 10), ExactFlowNet(BIMODAL)
    else:
        method = ddim("epsilon", 10)
        net = ExactDiffusionNet(BIMODAL, method.alphas_cumprod, "epsilon")
    F, E = 3, 6
    W = rtc_weights(HM, delay=2, exec_horizon=2, start=1)  # 1 on [0, 3), decaying on [3, 6), 0 on [6, 8)
    Y = BIMODAL.means[0, :E].float().expand(N, E, DA)
    cond = torch.zeros(N, 1, 1)

    def gen():
        return torch.Generator().manual_seed(0)

    plain = method.sample(net, cond, (N, HM, DA), generator=gen())
    replaced = method.sample(net, cond, (N, HM, DA), generator=gen(), prefix=Y[:, :F])
    guided = guided_sample(method, net, cond, (N, HM, DA), Y, W, generator=gen())
    err_plain = (plain[:, :F] - Y[:, :F]).abs().mean().item()
    err_guided = (guided[:, :F] - Y[:, :F]).abs().mean().item()
    assert err_guided < 0.15 and err_plain > 0.6, (err_guided, err_plain)
    agree_replaced = (_mode_of_suffix(replaced, F) == 0).float().mean().item()
    agree_guided = (_mode_of_suffix(guided, F) == 0).float().mean().item()
    assert agree_guided > 0.85 and agree_replaced < 0.78, (agree_guided, agree_replaced)
    # continuity: the first free action continues the prefix's mode (the modes are 1.0 apart there)
    jump_guided = (guided[:, F] - Y[:, F]).abs().mean().item()
    jump_replaced = (replaced[:, F] - Y[:, F]).abs().mean().item()
    assert jump_guided < 0.6 * jump_replaced, (jump_guided, jump_replaced)
    # a larger clip (beta) lets more guidance through near pure noise and near the data
    strong = guided_sample(method, net, cond, (N, HM, DA), Y, W, generator=gen(), max_guidance=50.0)
    err_strong = (strong[:, :F] - Y[:, :F]).abs().mean().item()
    assert err_strong < 0.8 * err_guided, (err_strong, err_guided)


# ------------------------------------------------------------------- the policy entry point and errors
def _policy() -> Policy:
    task = TaskConfig(name="toy", env_id="none", obs_keys=["pos"], horizon=H, n_obs_steps=2, n_action_steps=2)
    rng = np.random.default_rng(0)
    act = rng.uniform([-2.0, 10.0], [4.0, 11.0], (64, 2)).astype(np.float32)  # far from [-1, 1]
    normalizer = Normalizer.fit({"pos": rng.normal(size=(64, 2)), "action": act},
                                {"pos": "minmax", "action": "minmax"})
    torch.manual_seed(0)
    policy = Policy.build(task, PolicyConfig(name="mlp", hidden_dims=[16]),
                          MethodConfig(name="flow", num_inference_steps=2), normalizer, {"pos": (2,)},
                          action_dim=2).eval()
    policy.net = ExactFlowNet(GAUSS)  # normalized units: the Gaussian of the closed-form tests
    policy.net.register_parameter("unused", nn.Parameter(torch.zeros(())))  # Policy.device reads a parameter
    return policy


def test_predict_guided_works_in_raw_units():
    policy, B = _policy(), 4
    obs = {"pos": torch.zeros(B, 2, 2)}
    raw_prefix = policy.normalizer.unnormalize("action", PREFIX.expand(B, 3, DA))
    plain = policy.predict(obs, generator=torch.Generator().manual_seed(0))
    same = predict_guided(policy, obs, raw_prefix, torch.zeros(H), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-6)
    # the closed-form two-step result, mapped to raw units: the prefix was normalized on the way in
    noise = torch.randn(B, H, DA, generator=torch.Generator().manual_seed(0))
    want = guided_sample(policy.method, policy.net, torch.zeros(B, 1, 1), (B, H, DA), PREFIX.expand(B, 3, DA), W4,
                         noise=noise)
    got = predict_guided(policy, obs, raw_prefix, W4, noise=noise)
    torch.testing.assert_close(got, policy.normalizer.unnormalize("action", want), atol=1e-4, rtol=1e-5)
    assert (got[:, :2] - raw_prefix[:, :2]).abs().mean() < 0.7 * (plain[:, :2] - raw_prefix[:, :2]).abs().mean()


def test_bad_input_is_an_error_naming_it():
    B, cond, net = 2, torch.zeros(2, 1, 1), SmallNet()
    flow = FlowMatching("beta", "euler", 2)
    prefix = PREFIX.expand(B, 3, DA)
    with pytest.raises(ValueError, match=r"nonzero at chunk index 3 but the prefix gives only indices \[0, 3\)"):
        guided_sample(flow, net, cond, (B, H, DA), prefix, torch.ones(H))
    with pytest.raises(ValueError, match=r"prefix has shape \(2, 3, 3\), expected \(2, P <= 4, 2\)"):
        guided_sample(flow, net, cond, (B, H, DA), torch.zeros(B, 3, 3), W4)
    with pytest.raises(ValueError, match=r"weights has shape \(3,\), expected \(4,\) or \(2, 4\)"):
        guided_sample(flow, net, cond, (B, H, DA), prefix, torch.ones(3))
    with pytest.raises(ValueError, match=r"weights must lie in \[0, 1\]"):
        guided_sample(flow, net, cond, (B, H, DA), prefix, -W4)
    with pytest.raises(ValueError, match="Regression has no denoising loop"):
        guided_sample(Regression(), net, cond, (B, H, DA), prefix, W4)
    with pytest.raises(ValueError, match="more than the 100 timesteps"):
        guided_sample(ddim("epsilon", 10), net, cond, (B, H, DA), prefix, W4, num_steps=101)
    with pytest.raises(ValueError, match="max_guidance must be > 0"):
        guided_sample(flow, net, cond, (B, H, DA), prefix, W4, max_guidance=0.0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        guided_sample(flow, net, cond, (B, H, DA), prefix, W4)
    assert math.isfinite(float(guided_sample(flow, net, cond, (B, H, DA), prefix, W4).sum()))
