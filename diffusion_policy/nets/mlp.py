"""MLP over the whole chunk: the behaviour-cloning baseline's network.

With the regression method it sees ``x = 0`` and ``t = 0`` and maps observations straight to an
action chunk (an MSE regressor, which averages the modes of multimodal demonstrations: the reason
to use a generative method). It still reads ``x`` and ``t``, so it also works as a (weak) denoiser.
"""
from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.nets.time_embedding import SinusoidalEmbedding, broadcast_time


class MLPDenoiser(nn.Module):
    """``forward(x (B, H, Da), t (B,), cond (B, To, F)) -> (B, H, Da)``.

    ``cond_dim`` is the size of the flattened condition, ``To * F``.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        hidden_dims: list[int] | tuple[int, ...] = (512, 512, 512),
        time_embed_dim: int = 64,
    ):
        super().__init__()
        self.action_dim, self.horizon, self.cond_dim = action_dim, horizon, cond_dim
        self.time_embed = SinusoidalEmbedding(time_embed_dim)
        layers: list[nn.Module] = []
        d = horizon * action_dim + time_embed_dim + cond_dim
        for h in hidden_dims:
            layers += [nn.Linear(d, h), nn.Mish()]
            d = h
        layers.append(nn.Linear(d, horizon * action_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, H, Da = x.shape
        if H != self.horizon or Da != self.action_dim:
            raise ValueError(
                f"x has shape (B, {H}, {Da}); this MLP was built for (B, {self.horizon}, {self.action_dim})"
            )
        cond = cond.reshape(B, -1)
        if cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond flattens to {cond.shape[1]} features, expected {self.cond_dim}")
        temb = self.time_embed(broadcast_time(t, B, x.device))
        h = torch.cat([x.reshape(B, H * Da), temb, cond], dim=-1)
        return self.net(h).reshape(B, H, Da)
