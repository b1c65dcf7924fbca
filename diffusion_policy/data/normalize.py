"""Per-key affine normalizers, fitted from a store and saved as plain tensors or JSON.

Every mode is ``y = x * scale + offset`` over the last dimension, so normalizing and unnormalizing
are exact inverses:

- ``minmax``: each dimension to [-1, 1] (diffusion models sample in a bounded box; Chi et al.,
  "Diffusion Policy", RSS 2023, normalize actions this way). A dimension whose range is below
  ``eps`` gets ``scale = 1`` and is shifted to 0, instead of dividing by (almost) zero.
- ``meanstd``: zero mean, unit variance; a dimension with ``std < eps`` gets ``scale = 1``.
- ``image``: uint8 ``(..., H, W, 3)`` to float ``(..., 3, H, W)`` in [0, 1] (channels first).
- ``identity``: unchanged (cast to float32).
"""
from __future__ import annotations

import json
from typing import Mapping

import numpy as np
import torch
from torch import nn

MODES = ("minmax", "meanstd", "image", "identity")
EPS = 1e-4


class _KeyStats(nn.Module):
    """Buffers of one key: ``mode`` (index into MODES), ``scale``, ``offset`` and the statistics."""

    def __init__(self, mode: str, dim: int):
        super().__init__()
        self.register_buffer("mode", torch.tensor(MODES.index(mode), dtype=torch.int64))
        for name in ("scale", "offset", "min", "max", "mean", "std"):
            self.register_buffer(name, torch.zeros(dim, dtype=torch.float32))
        # the mode is also kept as a Python string: reading the buffer on every call would be a
        # device-to-host sync, which stalls the GPU and makes the sampler uncapturable in a CUDA graph
        self._mode_name = mode

    @property
    def mode_name(self) -> str:
        return self._mode_name

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "mode" in state_dict:
            self._mode_name = MODES[int(state_dict[prefix + "mode"])]


def _affine(mode: str, x: np.ndarray, eps: float) -> dict[str, np.ndarray]:
    """Statistics and (scale, offset) of ``x`` (N, D) for one mode."""
    x = x.astype(np.float64)
    lo, hi, mean, std = x.min(0), x.max(0), x.mean(0), x.std(0)
    if mode == "minmax":
        flat = (hi - lo) < eps
        scale = np.where(flat, 1.0, 2.0 / np.where(flat, 1.0, hi - lo))
        offset = np.where(flat, -(hi + lo) / 2, -1.0 - lo * scale)
    elif mode == "meanstd":
        flat = std < eps
        scale = np.where(flat, 1.0, 1.0 / np.where(flat, 1.0, std))
        offset = -mean * scale
    else:  # identity
        scale, offset = np.ones_like(lo), np.zeros_like(lo)
    return dict(scale=scale, offset=offset, min=lo, max=hi, mean=mean, std=std)


class Normalizer(nn.Module):
    """Normalizers of several keys. Build with :meth:`fit`, :meth:`from_json` or ``load_state_dict``
    (an empty ``Normalizer()`` takes its keys and modes from the state dict)."""

    def __init__(self):
        super().__init__()
        self.stats = nn.ModuleDict()

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, arrays: Mapping, modes: Mapping[str, str], eps: float = EPS) -> "Normalizer":
        """Fit from ``arrays[key]`` of shape (N, ...) (an :class:`EpisodeStore` works; image keys
        are not read). Statistics are over all axes but the last."""
        norm = cls()
        for key, mode in modes.items():
            if mode not in MODES:
                raise ValueError(f"Normalizer: mode of {key!r} is {mode!r}, expected one of "
                                 f"{MODES}")
            if mode == "image":
                entry = _KeyStats(mode, 1)
                entry.scale.fill_(1 / 255)
                norm.stats[key] = entry
                continue
            x = np.asarray(arrays[key])
            if x.ndim < 1 or x.shape[0] == 0:
                raise ValueError(f"Normalizer: {key!r} has shape {x.shape}, expected (N, ...) "
                                 f"with N >= 1")
            x = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(-1, 1)
            if not np.isfinite(x).all():
                raise ValueError(f"Normalizer: {key!r} contains NaN/inf, expected finite values")
            entry = _KeyStats(mode, x.shape[1])
            for name, value in _affine(mode, x, eps).items():
                getattr(entry, name).copy_(torch.as_tensor(value, dtype=torch.float32))
            norm.stats[key] = entry
        return norm

    def keys(self) -> list[str]:
        return list(self.stats.keys())

    def mode(self, key: str) -> str:
        return self._entry(key).mode_name

    def _entry(self, key: str) -> _KeyStats:
        if key not in self.stats:
            raise KeyError(f"Normalizer: no key {key!r} (keys: {self.keys()})")
        return self.stats[key]

    # ---------------------------------------------------------------- applying
    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Raw units to model units; images ``(..., H, W, 3)`` uint8 -> ``(..., 3, H, W)`` float."""
        e = self._entry(key)
        if e.mode_name == "image":
            return x.movedim(-1, -3).to(e.scale.dtype) * e.scale
        return x.to(e.scale.dtype) * e.scale + e.offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Model units to raw units; images ``(..., 3, H, W)`` float -> ``(..., H, W, 3)`` uint8."""
        e = self._entry(key)
        if e.mode_name == "image":
            return (x / e.scale).round().clamp(0, 255).to(torch.uint8).movedim(-3, -1)
        return (x.to(e.scale.dtype) - e.offset) / e.scale

    def normalize_dict(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Normalize every key of ``batch`` that this normalizer knows; others pass unchanged."""
        return {k: self.normalize(k, v) if k in self.stats else v for k, v in batch.items()}

    # ---------------------------------------------------------------- saving
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # An empty (or differently fitted) normalizer takes its keys from the state dict, so a
        # checkpoint loads without knowing the keys in advance. Runs before the children load.
        head = prefix + "stats."
        found = {}
        for name, value in state_dict.items():
            if name.startswith(head) and name.endswith(".scale"):
                found[name[len(head): -len(".scale")]] = value.shape[0]
        for key, dim in found.items():
            mode = MODES[int(state_dict[f"{head}{key}.mode"])]
            if key not in self.stats or self.stats[key].scale.shape[0] != dim:
                self.stats[key] = _KeyStats(mode, dim)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def to_json(self) -> str:
        """All keys, modes and numbers as JSON (float32 values written as decimals)."""
        out = {}
        for key, e in self.stats.items():
            out[key] = {"mode": e.mode_name}
            out[key].update({n: getattr(e, n).tolist()
                             for n in ("scale", "offset", "min", "max", "mean", "std")})
        return json.dumps(out)

    @classmethod
    def from_json(cls, text: str) -> "Normalizer":
        norm = cls()
        for key, d in json.loads(text).items():
            entry = _KeyStats(d["mode"], len(d["scale"]))
            for name in ("scale", "offset", "min", "max", "mean", "std"):
                getattr(entry, name).copy_(torch.tensor(d[name], dtype=torch.float32))
            norm.stats[key] = entry
        return norm

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {e.mode_name}" for k, e in self.stats.items())
