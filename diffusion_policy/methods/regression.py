"""Regression (behaviour cloning with MSE): the baseline that averages modes.

The network is called with ``x = 0`` and ``t = 0`` and trained to output the action chunk. The
MSE minimiser is the conditional mean E[actions | obs], so with demonstrations that go either left
or right around an obstacle it learns to go straight into it: the failure that motivates
generative policies (Florence et al. 2021 "Implicit Behavioral Cloning"; Chi et al. 2023, sec. 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion_policy.methods.sampling import check_prefix


class Regression:
    """``loss = mse(net(0, 0, cond), actions)``; ``sample`` returns ``net(0, 0, cond)``."""

    num_inference_steps = 1
    stochastic = False  # no noise at all

    def loss(self, net, actions: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros_like(actions)
        t = torch.zeros(actions.shape[0], device=actions.device)
        return F.mse_loss(net(zeros, t, cond).float(), actions.float())

    @torch.no_grad()
    def sample(self, net, cond: torch.Tensor, shape: tuple[int, int, int], num_steps: int | None = None,
               generator: torch.Generator | None = None, prefix: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic: ``num_steps``, ``generator`` and ``noise`` are accepted for a uniform
        interface and unused. A ``prefix`` overwrites the leading actions."""
        B = shape[0]
        x = torch.zeros(tuple(shape), device=cond.device)
        out = net(x, torch.zeros(B, device=cond.device), cond).float()
        P = check_prefix(prefix, shape)
        if P:
            out = torch.cat([prefix.to(out.dtype), out[:, P:]], dim=1)
        return out
