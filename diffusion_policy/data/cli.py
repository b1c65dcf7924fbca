"""``dp-data``: inspect, check (:func:`validate_store`) and edit episode stores.

    dp-data info STORE                      episodes, steps, per-key shape/dtype/chunks/codecs/size
    dp-data validate STORE [--full | --checksums] [--task NAME | --recorded-env]
                                            exit status 0 only if the store is valid
    dp-data pop STORE                       delete the last episode
    dp-data copy SRC DST --episodes 0-9,12  copy episodes to a new zarr-v3 store (converts v2/zip)

``validate`` checks what :mod:`diffusion_policy.data.integrity` describes: by default every chunk
file is present with a size that matches its header and floating-point keys hold no NaN/inf;
``--full`` decodes every chunk; ``--checksums`` also compares every episode with the digest recorded
when it was appended; ``--task pusht`` also reports actions outside that task's action space, and
``--recorded-env`` outside the action space of the env the store records it was collected on
(``env_id`` and ``env_kwargs`` in its attributes, written by ``dp-collect``).

Bad input gives one line on stderr per problem, naming the path, array, episode or chunk and what
was expected, and exit status 2; ``info`` and ``validate`` open the store read-only and never
modify it, and a failed ``copy`` leaves nothing at DST.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from diffusion_policy.data.integrity import scan_store
from diffusion_policy.data.store import EpisodeStore, StoreError, one_line


def validate_store(path, full: bool = False, checksums: bool = False, action_bounds=None,
                   action_key: str = "action") -> tuple[list[str], list[str]]:
    """Check a store; returns (errors, notes). Valid if there are no errors.

    :func:`~diffusion_policy.data.integrity.scan_store` over every key: the layout, strictly
    increasing ``meta/episode_ends``, every key at least as long as the last end, every chunk file
    of the committed steps present and whole, no NaN/inf in floating-point keys, actions within
    ``action_bounds`` if given. Steps beyond the last end (left by an interrupted append) and a store
    with no episodes yet are notes, not errors.
    """
    report = scan_store(path, full=full, checksums=checksums, action_bounds=action_bounds,
                        action_key=action_key)
    return report.errors, report.notes


def task_action_bounds(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(low, high, action key) of task ``name``'s environment (``configs/task/<name>.yaml``)."""
    from diffusion_policy.config import compose

    task = compose("collect", [f"task={name}"]).task
    low, high = env_action_bounds(task.env_id, dict(task.env_kwargs), f"--task {name}")
    return low, high, task.action_key


def recorded_action_bounds(path) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of the env recorded in the store's attributes (``env_id``, ``env_kwargs``)."""
    with EpisodeStore.open(path) as store:
        attrs = dict(store._group.attrs)
    if "env_id" not in attrs:
        raise StoreError(f"{path}: records no env_id in its attributes (stores of dp-collect do); "
                         f"pass --task NAME instead of --recorded-env")
    return env_action_bounds(str(attrs["env_id"]), dict(attrs.get("env_kwargs") or {}),
                             f"{path}: recorded env")


def env_action_bounds(env_id: str, env_kwargs: dict, what: str) -> tuple[np.ndarray, np.ndarray]:
    from diffusion_policy.collect import make_env

    env = make_env(env_id, env_kwargs, 1)
    try:
        space = env.action_space
    finally:
        env.close()
    if not hasattr(space, "low") or not hasattr(space, "high"):
        raise StoreError(f"{what}: {env_id} has action space {space}, expected a Box with bounds")
    return np.asarray(space.low, np.float64), np.asarray(space.high, np.float64)


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
    from diffusion_policy.config import ConfigError

    parser = argparse.ArgumentParser(prog="dp-data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="summary of a store").add_argument("store")
    p = sub.add_parser("validate", help="check a store; exit 0 only if valid")
    p.add_argument("store")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--full", action="store_true", help="decode every chunk")
    depth.add_argument("--checksums", action="store_true",
                       help="decode every chunk and compare each episode with its recorded digest")
    bounds_from = p.add_mutually_exclusive_group()
    bounds_from.add_argument("--task", default=None, help="also report actions outside this task's action space")
    bounds_from.add_argument("--recorded-env", action="store_true",
                             help="also report actions outside the action space of the env the store records")
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
            bounds, action_key = None, "action"
            if args.task is not None:
                low, high, action_key = task_action_bounds(args.task)
                bounds = (low, high)
            elif args.recorded_env:
                bounds = recorded_action_bounds(args.store)
            report = scan_store(args.store, full=args.full, checksums=args.checksums,
                                action_bounds=bounds, action_key=action_key)
            for line in report.notes:
                print(f"note: {line}")
            for line in report.errors:
                print(f"dp-data: {line}", file=sys.stderr)
            if report.errors:
                return 2
            print(f"{args.store}: valid ({report.summary()})")
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
    except (StoreError, ConfigError) as exc:
        print(f"dp-data: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a full disk during copy (the partial copy is removed)
        print(f"dp-data: {one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
