"""Networks: tensors in, tensors out. Every denoiser is ``forward(x (B, H, Da), t (B,), cond
(B, To, F)) -> (B, H, Da)``; none knows a noise schedule or a robot."""
from __future__ import annotations

from torch import nn

from diffusion_policy.config import PolicyConfig
from diffusion_policy.nets.mlp import MLPDenoiser
from diffusion_policy.nets.obs_encoders import ObsEncoder
from diffusion_policy.nets.transformer import TransformerDenoiser
from diffusion_policy.nets.unet1d import ConditionalUnet1D

NET_NAMES = ("unet", "transformer", "mlp")


def build_net(policy_cfg: PolicyConfig, action_dim: int, horizon: int, n_obs_steps: int,
              cond_dim: int) -> nn.Module:
    """The denoiser named by ``policy_cfg.name``; ``cond_dim`` = per-step feature size ``F``."""
    name = policy_cfg.name
    if name == "unet":  # the UNet checks that it can halve the horizon
        return ConditionalUnet1D(
            action_dim, n_obs_steps * cond_dim, list(policy_cfg.down_dims), policy_cfg.kernel_size,
            policy_cfg.n_groups, policy_cfg.time_embed_dim, horizon=horizon,
        )
    if name == "transformer":
        return TransformerDenoiser(
            action_dim, horizon, cond_dim, n_obs_steps, policy_cfg.n_layer, policy_cfg.n_head,
            policy_cfg.n_emb, policy_cfg.p_drop, policy_cfg.time_embed_dim,
        )
    if name == "mlp":
        return MLPDenoiser(action_dim, horizon, n_obs_steps * cond_dim, list(policy_cfg.hidden_dims))
    raise ValueError(f"policy.name must be one of {NET_NAMES}, got {name!r}")


__all__ = ["ConditionalUnet1D", "TransformerDenoiser", "MLPDenoiser", "ObsEncoder", "build_net"]
