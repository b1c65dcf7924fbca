"""Training windows over episodes, gathered a batch at a time (batches.py draws them for dp-train).

A window is ``H`` consecutive steps of one episode. Windows never cross episodes; near an edge the
edge frame is repeated. With the default padding (``To-1`` steps before the episode, ``Ta-1`` after)
every step of an episode appears as the *current* observation of some window, and every window still
has ``Ta`` real-or-repeated actions to execute (Chi et al., "Diffusion Policy", RSS 2023, Sec. IV).

Time convention (the most common off-by-one in this field). Window ``w`` covers times
``t0 .. t0+H-1`` of its episode (clamped to the episode). Observations are its first ``To`` steps,
chunk indices ``0 .. To-1``; the current observation is index ``To-1``. The action at chunk index
``To-1`` was recorded at the same time step as that observation, so it is the first action the
controller executes, followed by ``To .. To+Ta-2``. Indices ``0 .. To-2`` are past actions that the
policy also predicts.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from diffusion_policy.config import check_horizons


def split_episodes(n_episodes: int, val_ratio: float, seed: int,
                   max_train_episodes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split episode ids into (train, validation), both sorted.

    ``round(n * val_ratio)`` validation episodes (at least 1 if ``val_ratio > 0``, and at least one
    training episode always remains). ``max_train_episodes`` then keeps a random subset of the
    training episodes (for data-scaling experiments). Same seed, same split.
    """
    if n_episodes < 1:
        raise ValueError(f"split_episodes: n_episodes must be >= 1, got {n_episodes}")
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"split_episodes: val_ratio must be in [0, 1), got {val_ratio}")
    n_val = 0 if val_ratio == 0 else min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_episodes)
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if max_train_episodes is not None:
        if max_train_episodes < 1:
            raise ValueError(f"split_episodes: max_train_episodes must be >= 1, got "
                             f"{max_train_episodes}")
        if max_train_episodes < len(train):
            train = np.sort(rng.choice(train, size=max_train_episodes, replace=False))
    return train.astype(np.int64), val.astype(np.int64)


def _take(array, t: np.ndarray):
    """``array[t]`` along axis 0 for numpy arrays, torch tensors (on their device) and lazy
    arrays."""
    if isinstance(array, torch.Tensor):
        return array[torch.from_numpy(t).to(array.device)]
    if isinstance(array, np.ndarray):
        return array.take(t, axis=0)
    return array[t]


class WindowSampler:
    """Index table of every window of the given episodes.

    ``sample_indices`` is an ``(n_windows, H)`` array of flat time indices into ``data/<key>``, edge
    frames already repeated, computed once. ``gather`` turns window ids into a batch with one
    fancy-index read per key.
    """

    def __init__(self, episode_ends, horizon: int, n_obs_steps: int, n_action_steps: int,
                 episodes: Sequence[int] | None = None, pad_before: int | None = None,
                 pad_after: int | None = None):
        check_horizons(horizon, n_obs_steps, n_action_steps)
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.pad_before = n_obs_steps - 1 if pad_before is None else int(pad_before)
        self.pad_after = n_action_steps - 1 if pad_after is None else int(pad_after)
        for name, pad in (("pad_before", self.pad_before), ("pad_after", self.pad_after)):
            if not 0 <= pad < horizon:
                raise ValueError(f"WindowSampler: {name} must be in [0, H-1={horizon - 1}], "
                                 f"got {pad}")
        ends = np.asarray(episode_ends, dtype=np.int64)
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        eps = np.arange(len(ends)) if episodes is None else np.asarray(episodes, dtype=np.int64)
        if eps.size and (eps.min() < 0 or eps.max() >= len(ends)):
            raise ValueError(f"WindowSampler: episode ids must be in [0, {len(ends) - 1}], got "
                             f"{eps.min()}..{eps.max()}")
        self.episodes = eps
        # windows per episode: start offsets -pad_before .. L - H + pad_after
        lengths = ends[eps] - starts[eps]
        counts = np.maximum(0, lengths - horizon + self.pad_before + self.pad_after + 1)
        self.episode_of_window = np.repeat(eps, counts)
        offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        lo = starts[self.episode_of_window]
        hi = ends[self.episode_of_window] - 1
        t = (lo - self.pad_before + offset)[:, None] + np.arange(horizon)[None]  # (n, H)
        dtype = np.int32 if (ends[-1] if len(ends) else 0) < 2**31 else np.int64
        self.sample_indices = np.clip(t, lo[:, None], hi[:, None]).astype(dtype)
        # episodes shorter than H - pad_before - pad_after have no window at all
        self.n_skipped_episodes = int((counts == 0).sum())

    def __len__(self) -> int:
        return len(self.sample_indices)

    def gather(self, arrays: Mapping, idx, obs_keys: Sequence[str],
               action_key: str | None = "action") -> dict:
        """Batch of windows ``idx`` (B,): ``{"obs": {key: (B, To, ...)}, "action": (B, H, Da)}``.

        ``arrays`` maps keys to numpy arrays, torch tensors (gathered on their device) or lazy
        store arrays; the result has the same type. Observation keys return only their first
        ``To`` steps.
        """
        t = self.sample_indices[np.asarray(idx, dtype=np.int64)]  # (B, H)
        t_obs = np.ascontiguousarray(t[:, : self.n_obs_steps])  # (B, To)
        out = {"obs": {k: _take(arrays[k], t_obs) for k in obs_keys}}
        if action_key is not None:
            out["action"] = _take(arrays[action_key], t)
        return out


def _to_torch(x) -> torch.Tensor:
    x = torch.as_tensor(np.ascontiguousarray(x)) if not isinstance(x, torch.Tensor) else x
    return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x


def batch_to_torch(batch: dict, device=None) -> dict:
    """A gathered batch ``{"obs": {key: array}, "action": array}`` as torch tensors (floats as
    float32, images stay uint8), moved to ``device`` when given."""
    def conv(x):
        t = _to_torch(x)
        return t if device is None else t.to(device, non_blocking=True)

    return {"obs": {k: conv(v) for k, v in batch["obs"].items()}, "action": conv(batch["action"])}


class WindowBatch(Sequence):
    """What ``WindowDataset.__getitems__`` returns: the gathered batch in ``.batch``, and also a
    sequence of per-window dicts (made only on access) so that a DataLoader with the default
    ``collate_fn`` still works, at the price of re-stacking. :func:`collate_windows` returns
    ``.batch`` as is."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["action"])

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return {"obs": {k: v[i] for k, v in self.batch["obs"].items()},
                "action": self.batch["action"][i]}


def collate_windows(batch):
    """``collate_fn`` for a DataLoader over :class:`WindowDataset`: a :class:`WindowBatch` passes
    through without re-stacking; a list of single windows is stacked."""
    if isinstance(batch, WindowBatch):
        return batch.batch
    return torch.utils.data.default_collate(batch)


class WindowDataset(torch.utils.data.Dataset):
    """The windows of a store's episodes: its arrays, a :class:`WindowSampler` and the keys, in raw
    units (normalization belongs to the policy).

    ``dp-train`` draws its batches from one through
    :class:`diffusion_policy.data.batches.EpochBatches` (a permutation per epoch, one gather per
    batch). It is also a torch ``Dataset`` for anyone who wants a DataLoader instead (other
    samplers, worker processes): per item ``{"obs": {key: (To, ...)}, "action": (H, Da)}``; images
    stay uint8 ``(To, H, W, 3)``, floating-point keys become float32. ``__getitems__`` gathers a
    whole batch at once; use :func:`make_loader` (or ``collate_fn=collate_windows``) so the
    DataLoader does not re-stack it.
    """

    def __init__(self, store, sampler: WindowSampler, obs_keys: Sequence[str],
                 action_key: str = "action"):
        self.sampler, self.obs_keys, self.action_key = sampler, list(obs_keys), action_key
        self.arrays = {k: store[k] for k in dict.fromkeys([*self.obs_keys, action_key])}

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitems__(self, indices: Sequence[int]) -> WindowBatch:
        return WindowBatch(batch_to_torch(
            self.sampler.gather(self.arrays, indices, self.obs_keys, self.action_key)))

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]


def make_loader(dataset: WindowDataset, batch_size: int, shuffle: bool = True,
                drop_last: bool = True, seed: int = 0, **kwargs) -> torch.utils.data.DataLoader:
    """DataLoader that fetches each batch with one ``__getitems__`` gather (no per-sample loop)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       drop_last=drop_last, generator=gen,
                                       collate_fn=collate_windows, **kwargs)


def make_datasets(store, horizon: int, n_obs_steps: int, n_action_steps: int,
                  obs_keys: Sequence[str], action_key: str = "action", val_ratio: float = 0.05,
                  seed: int = 0, max_train_episodes: int | None = None
                  ) -> tuple[WindowDataset, WindowDataset]:
    """(train, validation) datasets of a store, split by episode."""
    train_ids, val_ids = split_episodes(store.n_episodes, val_ratio, seed, max_train_episodes)
    ends = store.episode_ends

    def ds(ids):
        sampler = WindowSampler(ends, horizon, n_obs_steps, n_action_steps, episodes=ids)
        return WindowDataset(store, sampler, obs_keys, action_key)

    return ds(train_ids), ds(val_ids)
