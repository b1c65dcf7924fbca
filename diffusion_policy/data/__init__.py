"""Demonstration data: the Zarr episode store, training windows and normalizers."""
from diffusion_policy.data.normalize import Normalizer
from diffusion_policy.data.store import EpisodeStore, LazyArray, StoreError, validate_store
from diffusion_policy.data.windows import (WindowDataset, WindowSampler, collate_windows,
                                           make_datasets, make_loader, split_episodes)

__all__ = ["EpisodeStore", "LazyArray", "StoreError", "validate_store", "WindowSampler",
           "WindowDataset", "collate_windows", "make_datasets", "make_loader", "split_episodes",
           "Normalizer"]
