"""Conditional 1D temporal UNet over an action chunk ``(B, H, Da)``: the model, and only the model.

Architecture of Diffusion Policy (Chi et al. 2023, sec. 3.2 and Fig. 3): a 1D UNet (Janner et al.
2022, "Planning with Diffusion") whose convolutions run along the chunk's time axis, with the
action dimensions as channels. Every residual block is conditioned by FiLM (Perez et al. 2018):
a linear map of the global condition gives a per-channel scale and bias. The global condition is
the flattened observation features ``(B, To*F)`` concatenated with an embedding of the time ``t``.

Each level halves the chunk in time except the last, so ``H`` must be divisible by
``2 ** (len(down_dims) - 1)`` (4 for the default three levels): :meth:`ConditionalUnet1D.check_horizon`
holds that rule (the constructor applies it to the horizon it is built for).

Faster arrangements of the same function for a sampler's loop (FiLM tables per chunk, each
convolution one wide matrix product, one Triton kernel per convolution) live behind
``diffusion_policy.fast`` and are tested equal to this ``forward``.
"""
from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.nets.time_embedding import TimeMLP, broadcast_time


class ConvBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length preserving (odd kernel, 'same' padding)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, n_groups: int):
        super().__init__()
        if out_ch % n_groups != 0:
            raise ValueError(f"channels ({out_ch}) must be divisible by n_groups ({n_groups})")
        self.block = nn.Sequential(
            nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_ch),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class FiLMResBlock(nn.Module):
    """Two conv blocks; between them the features are modulated by ``scale * h + bias`` (FiLM)."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = ConvBlock(in_ch, out_ch, kernel_size, n_groups)
        self.conv2 = ConvBlock(out_ch, out_ch, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * out_ch))
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.out_ch = out_ch

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)  # (B, C, T)
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # (B, C, 1) each
        h = scale * h + bias
        h = self.conv2(h)
        return h + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """``forward(x (B, H, Da), t (B,), cond (B, To, F)) -> (B, H, Da)``.

    ``cond_dim`` is the size of the flattened condition, ``To * F``. ``horizon``: the ``H`` the
    network is built for, checked here (it runs any horizon that :meth:`check_horizon` accepts).
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: list[int] | tuple[int, ...] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        time_embed_dim: int = 256,
        horizon: int | None = None,
    ):
        super().__init__()
        down_dims = list(down_dims)
        if not down_dims:
            raise ValueError("down_dims must name at least one level, got []")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (length-preserving padding), got {kernel_size}")
        self.action_dim = action_dim
        self.cond_dim = cond_dim
        self.time_mlp = TimeMLP(time_embed_dim)
        gdim = time_embed_dim + cond_dim  # global condition: [time embedding, observations]

        def block(i: int, o: int) -> FiLMResBlock:
            return FiLMResBlock(i, o, gdim, kernel_size, n_groups)

        dims = [action_dim] + down_dims
        levels = list(zip(dims[:-1], dims[1:]))  # (in, out) per level
        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(levels):
            last = i == len(levels) - 1
            self.downs.append(
                nn.ModuleList([
                    block(d_in, d_out),
                    block(d_out, d_out),
                    nn.Identity() if last else nn.Conv1d(d_out, d_out, 3, stride=2, padding=1),
                ])
            )
        mid = down_dims[-1]
        self.mids = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.ups = nn.ModuleList()
        for d_in, d_out in reversed(levels[1:]):
            # input: upsampled features concatenated with the skip connection of the same level
            self.ups.append(
                nn.ModuleList([
                    block(2 * d_out, d_in),
                    block(d_in, d_in),
                    nn.ConvTranspose1d(d_in, d_in, 4, stride=2, padding=1),
                ])
            )
        self.final = nn.Sequential(
            ConvBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )
        self.down_dims = down_dims
        self.downsample_factor = 2 ** (len(down_dims) - 1)
        if horizon is not None:
            self.check_horizon(horizon)

    def check_horizon(self, H: int) -> None:
        """The chunk is halved ``len(down_dims) - 1`` times: ``H`` must be divisible by
        ``2 ** (len(down_dims) - 1)``."""
        if H % self.downsample_factor != 0:
            raise ValueError(f"task.horizon={H} must be divisible by {self.downsample_factor}: the UNet "
                             f"halves the chunk {len(self.down_dims) - 1} times "
                             f"(policy.down_dims={self.down_dims})")

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, H, Da = x.shape
        if Da != self.action_dim:
            raise ValueError(f"x has {Da} action dims, the UNet was built for {self.action_dim}")
        self.check_horizon(H)
        cond = cond.reshape(B, -1)  # (B, To*F)
        if cond.shape[1] != self.cond_dim:
            raise ValueError(f"cond flattens to {cond.shape[1]} features, expected {self.cond_dim}")
        g = torch.cat([self.time_mlp(broadcast_time(t, B, x.device)), cond], dim=-1)  # (B, gdim)

        h = x.transpose(1, 2)  # (B, Da, H): channels = action dims, convolve over time
        skips = []
        for res1, res2, down in self.downs:
            h = res2(res1(h, g), g)
            skips.append(h)
            h = down(h)
        for res in self.mids:
            h = res(h, g)
        for res1, res2, up in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(res2(res1(h, g), g))
        return self.final(h).transpose(1, 2)  # (B, H, Da)
