"""Overfit one batch with every network x method pair (tiny sizes), then check that sampling
returns the memorised chunks and is deterministic given a generator. Every pair goes through the
same two calls, ``method.loss(net, ...)`` and ``method.sample(net, ...)``: the separation of
networks and methods is what this file exercises."""
from __future__ import annotations

import pytest
import torch

from diffusion_policy.methods import DiffusionMethod, FlowMatching, Regression
from diffusion_policy.nets import ConditionalUnet1D, MLPDenoiser, TransformerDenoiser

B, H, DA, TO, F = 4, 8, 2, 2, 3
# (steps, learning rate) per network; the UNet costs ~15 ms a step on a CPU
SCHEDULE = {"unet": (400, 3e-3), "transformer": (600, 3e-3), "mlp": (2000, 1e-3)}

NETS = {
    "unet": lambda: ConditionalUnet1D(DA, TO * F, down_dims=[16, 32], time_embed_dim=16),
    "transformer": lambda: TransformerDenoiser(DA, H, F, TO, n_layer=1, n_head=2, n_emb=32,
                                               time_embed_dim=16),
    "mlp": lambda: MLPDenoiser(DA, H, TO * F, hidden_dims=[256, 256]),
}
METHODS = {
    "ddim": lambda: DiffusionMethod("ddim", 100, "squaredcos_cap_v2", "epsilon", True, 10),
    "flow": lambda: FlowMatching("beta", "euler", 10),
    "regression": lambda: Regression(),
}


def held_out_loss(method, net, actions, cond) -> float:
    """The loss on the batch repeated 64 times with fixed noise: a low-variance estimate."""
    state = torch.get_rng_state()
    torch.manual_seed(123)
    with torch.no_grad():
        loss = method.loss(net, actions.repeat(64, 1, 1), cond.repeat(64, 1, 1)).item()
    torch.set_rng_state(state)
    return loss


@pytest.mark.parametrize("method_name", list(METHODS))
@pytest.mark.parametrize("net_name", list(NETS))
def test_overfit_one_batch(net_name, method_name):
    torch.manual_seed(0)
    net, method = NETS[net_name](), METHODS[method_name]()
    # distinct smooth chunks in [-1, 1] (normalized units), each with its own condition
    s = torch.linspace(0, 1, H)[None, :, None]
    actions = torch.cat([torch.sin(3 * s + torch.arange(B)[:, None, None]),
                         torch.cos(2 * s - torch.arange(B)[:, None, None])], dim=-1) * 0.8  # (B, H, Da)
    cond = torch.randn(B, TO, F)
    before = held_out_loss(method, net, actions, cond)
    steps, lr = SCHEDULE[net_name]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        loss = method.loss(net, actions.repeat(2, 1, 1), cond.repeat(2, 1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss(method, net, actions, cond)
    assert after < 0.2 * before, (before, after)

    net.eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x = method.sample(net, cond, (B, H, DA), generator=g())
    assert torch.equal(x, method.sample(net, cond, (B, H, DA), generator=g())), "not deterministic"
    # every sample is nearest to its own chunk, and close to it (chunks differ by ~0.8 on average;
    # measured errors after these few steps: 0.06-0.2, largest for epsilon prediction, whose
    # low-noise predictions need the longest training)
    nearest = torch.cdist(x.flatten(1), actions.flatten(1)).argmin(1)
    assert torch.equal(nearest, torch.arange(B)), nearest
    err = (x - actions).abs().mean().item()
    assert err < 0.25, f"samples are {err:.3f} from the memorised chunks"
