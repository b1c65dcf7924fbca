"""``dp-data``: inspect, check (:func:`validate_store`) and edit episode stores.

    dp-data info STORE                      episodes, steps, per-key shape/dtype/chunks/codecs/size
    dp-data validate STORE                  exit status 0 only if the store is valid
    dp-data pop STORE                       delete the last episode
    dp-data copy SRC DST --episodes 0-9,12  copy episodes to a new zarr-v3 store (converts v2/zip)

Bad input gives one line on stderr naming the path, key and what was expected, and exit status 1;
``info`` and ``validate`` open the store read-only and never modify it.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from diffusion_policy.data.store import EpisodeStore, StoreError, partial_files


def validate_store(path) -> tuple[list[str], list[str]]:
    """Check a store; returns (errors, notes). Valid if there are no errors.

    Checks the layout, strictly increasing ``meta/episode_ends``, every key at least as long as the
    last end, and no NaN/inf in floating-point keys. Steps beyond the last end (left by an
    interrupted append) are a note, not an error.
    """
    try:
        store = EpisodeStore.open(path, mode="r")
    except StoreError as exc:
        return [str(exc)], []
    errors, notes = [], []
    try:
        n = store.n_steps
        if not store.keys():
            errors.append(f"{store.path}: data has no arrays (expected data/<key>)")
        for key in store.keys():
            arr = store.zarr_array(key)
            if arr.shape[0] > n:
                notes.append(f"{store.path}: data/{key} has {arr.shape[0] - n} steps after the "
                             f"last episode end (uncommitted; the next append overwrites them)")
            if not np.issubdtype(np.dtype(arr.dtype), np.floating):
                continue
            block = max(1, (64 << 20) // max(1, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize))
            for s in range(0, n, block):
                try:
                    x = np.asarray(arr[s: min(n, s + block)])
                except Exception as exc:  # a damaged chunk
                    errors.append(f"{store.path}: data/{key} steps {s}-{min(n, s + block) - 1} "
                                  f"cannot be read ({exc})")
                    break
                bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
                if bad.any():
                    t = s + int(np.flatnonzero(bad)[0])
                    ep = int(np.searchsorted(store.episode_ends, t, side="right"))
                    errors.append(f"{store.path}: data/{key} has NaN/inf at step {t} "
                                  f"(episode {ep}), expected finite values")
                    break
        partial = [] if store.path.is_file() else partial_files(store.path)
        if partial:
            notes.append(f"{store.path}: {len(partial)} temporary *.partial files left by a killed "
                         f"writer (removed when the store is next opened for appending)")
    finally:
        store.close()
    return errors, notes


def disk_usage(path, prefix: str = "") -> int:
    """Bytes on disk under ``prefix`` of a directory store or a ``.zarr.zip`` (compressed sizes)."""
    path = Path(path)
    if path.is_file():
        with zipfile.ZipFile(path) as zf:
            return sum(i.compress_size for i in zf.infolist() if i.filename.startswith(prefix))
    total = 0
    for root, _, files in os.walk(path / prefix if prefix else path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _codecs(arr) -> str:
    parts = [*getattr(arr, "filters", ()), *getattr(arr, "compressors", ())]
    names = []
    for c in parts:
        cname = getattr(c, "cname", None)
        cname = getattr(cname, "value", cname)
        shuffle = getattr(c, "shuffle", None)
        shuffle = getattr(shuffle, "name", shuffle)
        label = type(c).__name__.replace("Codec", "").lower()
        names.append(f"{label}({cname}, clevel={c.clevel}, shuffle={shuffle})" if cname else label)
    return " + ".join(names) or "none"


def info(path) -> str:
    """The report printed by ``dp-data info``."""
    with EpisodeStore.open(path, mode="r") as store:
        lengths = store.episode_lengths
        size = _size(disk_usage(store.path))
        lines = [f"{store.path} (zarr v{store.zarr_format}, {size} on disk)",
                 f"  episodes: {store.n_episodes}", f"  steps:    {store.n_steps}"]
        if len(lengths):
            lines.append(f"  episode length: min {lengths.min()}, median {np.median(lengths):g}, "
                         f"max {lengths.max()}")
        lines.append("  keys:")
        for key in store.keys():
            arr = store.zarr_array(key)
            shape = (store.n_steps,) + tuple(arr.shape[1:])
            tail = arr.shape[0] - store.n_steps
            extra = f" (+{tail} uncommitted)" if tail > 0 else ""
            size = _size(disk_usage(store.path, f"data/{key}"))
            lines.append(f"    {key}: shape {shape}{extra}, {arr.dtype}, "
                         f"chunks {tuple(arr.chunks)}, {_codecs(arr)}, {size}")
        return "\n".join(lines)


def parse_episodes(spec: str, n_episodes: int) -> list[int]:
    """``"0-9,12"`` -> [0, ..., 9, 12]; ranges are inclusive."""
    ids = []
    for part in spec.split(","):
        part = part.strip()
        try:
            lo, _, hi = part.partition("-")
            a, b = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise StoreError(f"--episodes: {part!r} is not an episode id or range (expected e.g. "
                             f"0-9,12)") from None
        if a > b:
            raise StoreError(f"--episodes: range {part!r} is decreasing (expected low-high)")
        if a < 0 or b >= n_episodes:
            raise StoreError(f"--episodes: {part!r} is out of range (the store has {n_episodes} "
                             f"episodes: 0-{n_episodes - 1})")
        ids.extend(range(a, b + 1))
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dp-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="summary of a store").add_argument("store")
    sub.add_parser("validate", help="check a store; exit 0 only if valid").add_argument("store")
    sub.add_parser("pop", help="delete the last episode").add_argument("store")
    p = sub.add_parser("copy", help="copy episodes to a new zarr-v3 store")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--episodes", default=None, help="ids and inclusive ranges, e.g. 0-9,12 "
                                                    "(default: all)")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            print(info(args.store))
        elif args.command == "validate":
            errors, notes = validate_store(args.store)
            for line in notes:
                print(f"note: {line}")
            for line in errors:
                print(f"dp-data: {line}", file=sys.stderr)
            if errors:
                return 1
            print(f"{args.store}: valid")
        elif args.command == "pop":
            store = EpisodeStore.open(args.store, mode="a")
            length = store.pop_episode()
            print(f"{args.store}: removed episode {store.n_episodes} ({length} steps); "
                  f"{store.n_episodes} episodes left")
        elif args.command == "copy":
            with EpisodeStore.open(args.src, mode="r") as src:
                ids = None if args.episodes is None else parse_episodes(args.episodes,
                                                                       src.n_episodes)
                dst = src.copy_to(args.dst, ids)
            print(f"{args.dst}: {dst.n_episodes} episodes, {dst.n_steps} steps")
    except StoreError as exc:
        print(f"dp-data: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
