"""Batches of windows for a training loop: epoch by epoch for training, a fixed set for validation.

    windows = WindowDataset(store, WindowSampler(store.episode_ends, H, To, Ta, episodes=ids), obs_keys)
    batches = EpochBatches(windows, batch_size=256, seed=0, device="cuda", rank=r, world=W, on_device=True)
    batch = batches.batch(step)       # {"obs": {key: (256 / W, To, ...)}, "action": (256 / W, H, Da)}
    for batch in batches.fixed():     # validation: the same windows on every call
        ...

Epoch ``e`` is a permutation of all windows drawn from ``numpy.random.default_rng([seed, e])``;
step ``s`` takes the ``s``-th slice of ``batch_size`` windows of its epoch, and rank ``r`` of ``W``
takes every ``W``-th window of that slice. The batch of any step is therefore a function of
(seed, step) alone: resuming needs no loader state, and the ranks see disjoint parts of one
global batch. This replaces a DataLoader in ``dp-train``: one fancy-index read per key and batch
(and, for low-dimensional data on the device, one index into tensors already there) costs less
than worker processes and collation; :func:`diffusion_policy.data.windows.make_loader` is there for
those who want a DataLoader.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from diffusion_policy.data.windows import WindowDataset, batch_to_torch


class EpochBatches:
    """Batches of ``windows`` for training (:meth:`batch`) and validation (:meth:`fixed`).

    Args:
        windows: the windows of a store's episodes (their sampler, arrays and keys).
        batch_size: the global batch; each of ``world`` ranks gets ``batch_size / world`` windows.
        seed: seeds the epoch permutations and the validation subset.
        device: where batches go.
        rank, world: this process's place under torchrun.
        on_device: gather every window once and keep them on ``device`` (low-dimensional data:
            a batch is then one index into device tensors, no host work per step).
    """

    def __init__(self, windows: WindowDataset, batch_size: int, seed: int = 0, device="cpu",
                 rank: int = 0, world: int = 1, on_device: bool = False):
        self.check_batch_size(batch_size, world)
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.device, self.rank, self.world = torch.device(device), rank, world
        self.cache, self._perm, self._perm_device = None, None, None
        if on_device:
            self.cache = self._gather(np.arange(len(windows)))

    @staticmethod
    def check_batch_size(batch_size: int, world: int) -> None:
        """The global batch splits evenly over the ranks."""
        if batch_size < 1 or batch_size % world:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the number of ranks ({world})")

    def __len__(self) -> int:
        """Windows in the set."""
        return len(self.windows)

    def _gather(self, idx) -> dict:
        w = self.windows
        return batch_to_torch(w.sampler.gather(w.arrays, idx, w.obs_keys, w.action_key), self.device)

    def batch(self, step: int) -> dict:
        """This rank's part of the global batch of ``step`` (0-based)."""
        per_epoch = max(1, len(self) // self.batch_size)
        epoch, k = divmod(step, per_epoch)
        if self._perm is None or self._perm[0] != epoch:  # one permutation per epoch
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self)) if len(self) >= self.batch_size else \
                rng.integers(0, len(self), self.batch_size)  # tiny datasets: draw with replacement
            self._perm = (epoch, perm)
            if self.cache is not None:
                # copied to the device once per epoch: a blocking host-to-device copy every step
                # would make the host wait for the previous step to finish on the GPU
                self._perm_device = torch.as_tensor(perm, device=self.device)
        window = slice(k * self.batch_size, (k + 1) * self.batch_size)
        if self.cache is not None:
            t = self._perm_device[window][self.rank::self.world]
            return {"obs": {key: v[t] for key, v in self.cache["obs"].items()}, "action": self.cache["action"][t]}
        return self._gather(self._perm[1][window][self.rank::self.world])

    def fixed(self, max_windows: int = 4096, chunk: int = 512) -> Iterator[dict]:
        """This rank's slice of a fixed subset of at most ``max_windows`` windows (a permutation
        seeded by ``seed``), in batches of at most ``chunk``: the same windows on every call, so
        successive validation losses are comparable. A rank with no windows yields nothing."""
        idx = np.random.default_rng(self.seed).permutation(len(self))[:max_windows][self.rank::self.world]
        for part in np.array_split(idx, max(1, math.ceil(len(idx) / chunk))):
            if len(part):
                yield self._gather(part)
