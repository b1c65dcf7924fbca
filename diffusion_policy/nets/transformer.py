"""Transformer denoiser: action tokens attend to observation tokens, conditioned on time.

A transformer decoder over action tokens, in the spirit of Diffusion Policy's transformer variant
(Chi et al. 2023, sec. 3.2) with DiT-style time conditioning (Peebles & Xie 2023): each of the ``H``
noisy actions is one token; the memory is ``[time token, To observation tokens]``. Every decoder layer
runs bidirectional self-attention over the action tokens and cross-attention to the memory. The
time embedding is also added to every action token so that even a shallow model sees ``t``.
"""
from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.nets.time_embedding import TimeMLP, broadcast_time


class TransformerDenoiser(nn.Module):
    """``forward(x (B, H, Da), t (B,), cond (B, To, F)) -> (B, H, Da)``.

    ``cond_dim`` is the per-step observation feature size ``F`` (not flattened).
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        n_obs_steps: int,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop: float = 0.0,
        time_embed_dim: int = 256,
    ):
        super().__init__()
        if n_emb % n_head != 0:
            raise ValueError(f"n_emb ({n_emb}) must be divisible by n_head ({n_head})")
        self.action_dim, self.horizon = action_dim, horizon
        self.cond_dim, self.n_obs_steps = cond_dim, n_obs_steps
        self.action_in = nn.Linear(action_dim, n_emb)
        self.obs_in = nn.Linear(cond_dim, n_emb)
        self.time_mlp = TimeMLP(time_embed_dim, n_emb)
        # learned positions: H for actions, 1 + To for [time, observations]
        self.action_pos = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.memory_pos = nn.Parameter(torch.zeros(1, 1 + n_obs_steps, n_emb))
        nn.init.normal_(self.action_pos, std=0.02)
        nn.init.normal_(self.memory_pos, std=0.02)
        self.drop = nn.Dropout(p_drop)
        layer = nn.TransformerDecoderLayer(
            d_model=n_emb, nhead=n_head, dim_feedforward=4 * n_emb, dropout=p_drop,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers=n_layer)
        self.norm = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, action_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        B, H, Da = x.shape
        if H != self.horizon or Da != self.action_dim:
            raise ValueError(
                f"x has shape (B, {H}, {Da}); this transformer was built for (B, {self.horizon}, "
                f"{self.action_dim})"
            )
        if cond.shape[1:] != (self.n_obs_steps, self.cond_dim):
            raise ValueError(
                f"cond has shape {tuple(cond.shape)}, expected (B, {self.n_obs_steps}, {self.cond_dim})"
            )
        temb = self.time_mlp(broadcast_time(t, B, x.device))[:, None, :]  # (B, 1, E)
        tokens = self.drop(self.action_in(x) + self.action_pos + temb)  # (B, H, E)
        memory = torch.cat([temb, self.obs_in(cond)], dim=1) + self.memory_pos  # (B, 1+To, E)
        h = self.decoder(tokens, self.drop(memory))  # (B, H, E)
        return self.head(self.norm(h))  # (B, H, Da)
