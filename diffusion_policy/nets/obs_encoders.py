"""Observation encoder: normalized observations ``{key: (B, To, ...)}`` -> condition ``(B, To, F)``.

Low-dimensional keys are concatenated per step (flattening the ``To`` steps happens in the
networks that want a global vector). Each camera goes through a ResNet-18-style backbone with
GroupNorm and a spatial-softmax head (``nets/resnet.py``), one backbone per camera or one shared
(``share_rgb_model``); images are randomly cropped in ``train()`` mode and center-cropped in
``eval()`` mode (Chi et al. 2023, sec. 3.3). Features are concatenated in the order of ``shapes``.
"""
from __future__ import annotations

import torch
from torch import nn

from diffusion_policy.config import ObsEncoderConfig
from diffusion_policy.nets.resnet import ResNet18GN, crop


def image_chw(key: str, shape: tuple) -> tuple[int, int, int]:
    """Per-step image shape as ``(3, H, W)``; accepts the store's ``(H, W, 3)`` or ``(3, H, W)``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3 and shape[-1] == 3:
        return (3, shape[0], shape[1])
    if len(shape) == 3 and shape[0] == 3:
        return shape
    raise ValueError(f"image key {key!r}: expected shape (H, W, 3) or (3, H, W), got {shape}")


class ObsEncoder(nn.Module):
    """``forward(obs) -> (B, To, out_dim)``.

    ``shapes``: per-step shape of every observation key (without ``B`` and ``To``), images as in
    the store ``(H, W, 3)``. ``obs`` holds normalized tensors: low-dim ``(B, To, D)``, images
    ``(B, To, 3, H, W)`` float in [0, 1].
    """

    def __init__(self, shapes: dict[str, tuple], image_keys: list[str] | tuple[str, ...] = (),
                 cfg: ObsEncoderConfig | None = None):
        super().__init__()
        cfg = ObsEncoderConfig() if cfg is None else cfg
        unknown = [k for k in image_keys if k not in shapes]
        if unknown:
            raise ValueError(f"image_keys {unknown} are not in shapes (keys: {list(shapes)})")
        if not 0.0 < cfg.crop_ratio <= 1.0:
            raise ValueError(f"obs_encoder.crop_ratio must be in (0, 1], got {cfg.crop_ratio}")
        self.keys = list(shapes)
        self.image_keys = [k for k in self.keys if k in image_keys]
        self.lowdim_keys = [k for k in self.keys if k not in image_keys]
        self.lowdim_sizes = {}
        for k in self.lowdim_keys:
            if len(shapes[k]) != 1:
                raise ValueError(f"low-dim key {k!r}: expected a 1-D per-step shape (D,), got {shapes[k]}")
            self.lowdim_sizes[k] = int(shapes[k][0])
        self.crop_sizes = {}
        for k in self.image_keys:
            _, H, W = image_chw(k, shapes[k])
            self.crop_sizes[k] = (max(1, round(H * cfg.crop_ratio)), max(1, round(W * cfg.crop_ratio)))
        self.share_rgb_model = cfg.share_rgb_model
        self.backbones = nn.ModuleDict()
        if self.image_keys:
            names = ["shared"] if cfg.share_rgb_model else self.image_keys
            for name in names:
                self.backbones[name] = ResNet18GN(cfg.image_feature_dim, cfg.backbone_width)
        self.out_dim = sum(self.lowdim_sizes.values()) + len(self.image_keys) * cfg.image_feature_dim
        if self.out_dim == 0:
            raise ValueError("the observation encoder has no inputs: shapes is empty")

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [k for k in self.keys if k not in obs]
        if missing:
            raise KeyError(f"observation is missing keys {missing} (expected {self.keys})")
        feats = []
        for k in self.keys:
            x = obs[k]
            B, To = x.shape[:2]
            if k in self.lowdim_sizes:
                if x.shape[2:] != (self.lowdim_sizes[k],):
                    raise ValueError(f"obs[{k!r}] has shape {tuple(x.shape)}, expected (B, To, "
                                     f"{self.lowdim_sizes[k]})")
                feats.append(x.float())
            else:
                if x.ndim != 5 or x.shape[2] != 3:
                    raise ValueError(f"obs[{k!r}] has shape {tuple(x.shape)}, expected (B, To, 3, H, W) "
                                     "float (the normalizer turns uint8 HWC images into this)")
                x = crop(x.float(), self.crop_sizes[k], random=self.training)
                net = self.backbones["shared" if self.share_rgb_model else k]
                f = net(x.reshape(B * To, *x.shape[2:]))  # (B*To, feature_dim)
                feats.append(f.reshape(B, To, -1))
        return torch.cat(feats, dim=-1)  # (B, To, F)
