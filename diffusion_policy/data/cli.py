"""``dp-data``: inspect, check and edit episode stores.

    dp-data info STORE                      episodes, steps, per-key shape/dtype/chunks/codecs/size
    dp-data validate STORE                  exit status 0 only if the store is valid
    dp-data pop STORE                       delete the last episode
    dp-data copy SRC DST --episodes 0-9,12  copy episodes to a new zarr-v3 store (converts v2/zip)

Bad input gives one line on stderr naming the path, key and what was expected, and exit status 1;
``info`` and ``validate`` open the store read-only and never modify it.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from diffusion_policy.data.store import EpisodeStore, StoreError, disk_usage, validate_store


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
        lines = [f"{store.path} (zarr v{store.zarr_format}, {_size(disk_usage(store.path))} on disk)",
                 f"  episodes: {store.n_episodes}", f"  steps:    {store.n_steps}"]
        if len(lengths):
            lines.append(f"  episode length: min {lengths.min()}, median {np.median(lengths):g}, "
                         f"max {lengths.max()}")
        lines.append("  keys:")
        for key in store.keys():
            arr = store.zarr_array(key)
            shape = (store.n_steps,) + tuple(arr.shape[1:])
            extra = f" (+{arr.shape[0] - store.n_steps} uncommitted)" if arr.shape[0] > store.n_steps \
                else ""
            lines.append(f"    {key}: shape {shape}{extra}, {arr.dtype}, chunks {tuple(arr.chunks)}, "
                         f"{_codecs(arr)}, {_size(disk_usage(store.path, f'data/{key}'))}")
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
