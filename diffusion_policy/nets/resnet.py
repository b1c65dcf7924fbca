"""Image backbone: a ResNet-18-style network with GroupNorm, a spatial-softmax head, and cropping.

- ResNet-18 (He et al. 2016): a 7x7 stride-2 stem, max-pool, four stages of two basic blocks.
  BatchNorm is replaced by GroupNorm (Wu & He 2018) because batch statistics interact badly with
  EMA weights and small batches; Diffusion Policy does the same (Chi et al. 2023, sec. 3.3).
- Spatial softmax (Levine et al. 2016, "End-to-end training of deep visuomotor policies", sec.
  4.2): each of K feature maps becomes a probability over pixels, and its expected (x, y) position
  is a keypoint, so the features keep spatial information that global pooling would discard.
- Random crop in training and center crop in evaluation (Chi et al.: 84 of 96 pixels).
Written with torch only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    # 16 channels per group, as in Chi et al.'s replacement of BatchNorm
    return nn.GroupNorm(max(1, channels // 16), channels)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet's basic block)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.norm1 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.norm2 = group_norm(out_ch)
        self.down = None
        if stride != 1 or in_ch != out_ch:
            self.down = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), group_norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class SpatialSoftmax(nn.Module):
    """``(N, C, h, w) -> (N, 2K)``: a 1x1 conv to K maps, softmax over pixels, expected (x, y)."""

    def __init__(self, in_ch: int, num_kp: int):
        super().__init__()
        self.kp = nn.Conv2d(in_ch, num_kp, 1)
        self.num_kp = num_kp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, _, h, w = x.shape
        logits = self.kp(x).flatten(2)  # (N, K, h*w)
        attn = torch.softmax(logits, dim=-1)
        # pixel centres in [-1, 1]: (2i + 1) / n - 1 (a 1x1 map sits at 0)
        ys = (2 * torch.arange(h, device=x.device, dtype=attn.dtype) + 1) / h - 1
        xs = (2 * torch.arange(w, device=x.device, dtype=attn.dtype) + 1) / w - 1
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        pos = torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)  # (h*w, 2)
        kp = attn @ pos  # (N, K, 2) expected coordinates in [-1, 1]
        return kp.reshape(N, 2 * self.num_kp)


class ResNet18GN(nn.Module):
    """``(N, 3, H, W) float -> (N, feature_dim)``; ``width`` = channels of the first stage."""

    def __init__(self, feature_dim: int = 64, width: int = 64, in_ch: int = 3):
        super().__init__()
        if feature_dim % 2 != 0:
            raise ValueError(f"image_feature_dim must be even (2 per keypoint), got {feature_dim}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, width, 7, 2, 3, bias=False), group_norm(width), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1),
        )
        stages, ch = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            stride = 1 if i == 0 else 2
            stages += [BasicBlock(ch, out, stride), BasicBlock(out, out, 1)]
            ch = out
        self.stages = nn.Sequential(*stages)
        self.head = SpatialSoftmax(ch, feature_dim // 2)
        self.out_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def crop(images: torch.Tensor, size: tuple[int, int], random: bool) -> torch.Tensor:
    """Crop ``(B, T, C, H, W)`` to ``(B, T, C, h, w)``.

    ``random``: one crop position per batch element, shared across its ``T`` steps (so the
    observation history stays spatially consistent); otherwise the center crop.
    """
    B, T, C, H, W = images.shape
    h, w = size
    if (h, w) == (H, W):
        return images
    if h > H or w > W:
        raise ValueError(f"crop size {(h, w)} is larger than the image {(H, W)}")
    if not random:
        top, left = (H - h) // 2, (W - w) // 2
        return images[..., top : top + h, left : left + w]
    top = torch.randint(0, H - h + 1, (B,), device=images.device)
    left = torch.randint(0, W - w + 1, (B,), device=images.device)
    rows = (top[:, None] + torch.arange(h, device=images.device))[:, None, None, :, None]  # (B,1,1,h,1)
    cols = (left[:, None] + torch.arange(w, device=images.device))[:, None, None, None, :]  # (B,1,1,1,w)
    b = torch.arange(B, device=images.device)[:, None, None, None, None]
    t = torch.arange(T, device=images.device)[None, :, None, None, None]
    c = torch.arange(C, device=images.device)[None, None, :, None, None]
    return images[b, t, c, rows, cols]
