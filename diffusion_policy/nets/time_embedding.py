"""Sinusoidal embedding of the diffusion / flow time, shared by every denoiser.

The method chooses what ``t`` means (a diffusion timestep in [0, T), or flow time scaled by 1000);
the network only needs an embedding that resolves neighbouring values. Frequencies follow the
Transformer positional encoding (Vaswani et al. 2017, sec. 3.5), as in DDPM (Ho et al. 2020, App. B).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SinusoidalEmbedding(nn.Module):
    """``t: (B,) float -> (B, dim)``: ``[sin(t w_i), cos(t w_i)]`` with ``w_i`` geometric in [1e-4, 1]."""

    def __init__(self, dim: int, max_period: float = 10_000.0):
        super().__init__()
        if dim % 2 != 0 or dim < 2:
            raise ValueError(f"time embedding dim must be even and >= 2, got {dim}")
        self.dim = dim
        self.max_period = max_period

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        # arange on the input's device (no host-to-device copy, so CUDA-graph capture works)
        freqs = torch.exp(
            -math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = t.float()[:, None] * freqs[None, :]  # (B, half)
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)  # (B, dim)


class TimeMLP(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP (``dim -> 4 dim -> out_dim``, Mish)."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        out_dim = dim if out_dim is None else out_dim
        self.net = nn.Sequential(
            SinusoidalEmbedding(dim), nn.Linear(dim, 4 * dim), nn.Mish(), nn.Linear(4 * dim, out_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.net(t)  # (B, out_dim)


def broadcast_time(t: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Accept a scalar or a ``(B,)`` / ``(1,)`` tensor; return ``(B,)`` float on ``device``."""
    if not torch.is_tensor(t):
        return torch.full((batch,), float(t), device=device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32).expand(batch)
