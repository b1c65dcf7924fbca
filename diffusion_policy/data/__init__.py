"""Demonstration data: the Zarr episode store, training windows and normalizers.

Names are imported on first use (PEP 562), so ``import diffusion_policy.data.store`` (the collection
workers, ``dp-data``) does not pay for importing torch.
"""
import importlib

_EXPORTS = {
    "EpisodeStore": "store", "LazyArray": "lazy", "StoreError": "store", "validate_store": "cli",
    "check_store": "integrity", "scan_store": "integrity", "StoreReport": "integrity",
    "WindowSampler": "windows", "WindowDataset": "windows", "collate_windows": "windows",
    "make_datasets": "windows", "batch_to_torch": "windows", "make_loader": "windows", "split_episodes": "windows",
    "Normalizer": "normalize", "EpochBatches": "batches",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
