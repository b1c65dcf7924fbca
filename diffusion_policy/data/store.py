"""Zarr episode store: demonstrations as episodes concatenated along time.

Layout (the replay-buffer layout of Chi et al., "Diffusion Policy", RSS 2023, so their stores open
here too)::

    store.zarr/
      data/<key>         every episode concatenated along axis 0, e.g. action (N, Da) float32,
                         image (N, H, W, 3) uint8
      meta/episode_ends  cumulative end of each episode, int64, strictly increasing
      meta/episode_digests  (episodes, keys) uint64 digest of each key's values per episode
                         (optional; the key order is in its attributes)

New stores are written in zarr format 3. Stores in zarr format 2, as directories or ``.zarr.zip``
files, open read-only (``dp-data copy`` converts them).

Crash safety. ``meta/episode_ends`` is the commit record and ``episode_ends[-1]`` is the only truth
about how many steps exist. An append writes the data arrays first (growing them, which may leave
them longer than ``episode_ends[-1]`` if the writer dies), then commits the new end with one atomic
file replacement: the chunk holding the new end is written under the future shape before the array
metadata that makes it visible (zarr's LocalStore writes every file to a temporary name and renames
it). A writer killed at any moment therefore leaves a store that opens with only complete
episodes; the next append overwrites the uncommitted tail. One writer at a time.

Integrity. Every chunk that holds committed steps is written, even one equal to the fill value
(zarr skips those by default), so a missing chunk file is always damage, never zeros; and each
append records a 64-bit BLAKE2b digest of every key's episode bytes in ``meta/episode_digests``
(written before the commit, like the data). :mod:`diffusion_policy.data.integrity` checks both.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.core.array import AsyncArray
from zarr.core.sync import sync


class StoreError(Exception):
    """A store that is missing, malformed, or used in a way its mode does not allow."""


ENDS_CHUNK = 4096  # episode ends per chunk; a commit rewrites one small chunk
DIGESTS = "episode_digests"  # meta/episode_digests: (episodes, keys) uint64, keys in its attrs
DIGEST_NAME = "blake2b-64"  # of each key's episode values in C order, little-endian
WRITE_ALL_CHUNKS = {"write_empty_chunks": True}  # a missing chunk file is damage, never zeros
IMAGE_CHUNK_BYTES = 128 * 1024  # images: a few frames per chunk so a random read decodes little
LOWDIM_CHUNK_BYTES = 1 << 20  # low-dim: long time chunks (read once, whole, into memory)


def is_image_shape(step_shape: tuple) -> bool:
    """A key whose per-step shape has rank >= 3 (H, W, C) is an image: read lazily, chunked by
    frame."""
    return len(step_shape) >= 3


def default_chunk_steps(step_shape: tuple, dtype) -> int:
    """Steps per chunk: 1-8 frames for images, a power of two near 1 MiB for low-dim arrays."""
    step_bytes = max(1, int(np.prod(step_shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
    if is_image_shape(step_shape):
        return int(max(1, min(8, 2 ** int(np.log2(max(1, IMAGE_CHUNK_BYTES // step_bytes))))))
    return int(min(1 << 16, max(256, 2 ** int(np.log2(max(1, LOWDIM_CHUNK_BYTES // step_bytes))))))


def default_compressor(step_shape: tuple) -> BloscCodec:
    """Blosc decodes at GB/s. lz4 for images (decoded again on every lazy read); zstd with byte
    shuffle for low-dim arrays (decoded once at open, compresses floats better)."""
    if is_image_shape(step_shape):
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (codec errors can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def episode_digest(values: np.ndarray) -> int:
    """64-bit BLAKE2b of an episode's values of one key (C order, little-endian), as an int."""
    v = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
    return int.from_bytes(hashlib.blake2b(v.data, digest_size=8).digest(), "little")


def _open_group(path: Path, mode: str) -> tuple[zarr.Group, object]:
    """Open the root group of a directory store or a ``.zarr.zip``; never creates anything."""
    if not path.exists():
        raise StoreError(f"{path}: no such file or directory (expected a Zarr store)")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise StoreError(f"{path}: not a Zarr store (a file that is not a .zarr.zip)")
        if mode != "r":
            raise StoreError(f"{path}: a .zarr.zip store opens read-only (mode='r'), "
                             f"got mode={mode!r}")
        backend = zarr.storage.ZipStore(path, mode="r")
    else:
        backend = zarr.storage.LocalStore(path, read_only=(mode == "r"))
    try:
        group = zarr.open_group(backend, mode="r" if mode == "r" else "r+")
    except json.JSONDecodeError as exc:  # a ValueError, but the metadata file is there
        raise StoreError(f"{path}: the root group's metadata is not valid JSON ({one_line(exc)}), expected "
                         f"zarr.json (v3) or .zgroup (v2)") from exc
    except (zarr.errors.NodeNotFoundError, FileNotFoundError, ValueError, KeyError) as exc:
        raise StoreError(f"{path}: not a Zarr store (no zarr.json or .zgroup at its root)") from exc
    except Exception as exc:  # corrupt metadata (bad JSON, unknown codec ...)
        raise StoreError(f"{path}: cannot read the store's root group ({one_line(exc)})") from exc
    return group, backend


def _read_ends(path: Path, group: zarr.Group) -> np.ndarray:
    try:
        return _check_ends(path, group)
    except StoreError:
        raise
    except Exception as exc:  # unreadable metadata or chunk
        raise StoreError(f"{path}: cannot read meta/episode_ends ({one_line(exc)})") from exc


def _check_ends(path: Path, group: zarr.Group) -> np.ndarray:
    if "meta" not in group or not isinstance(group["meta"], zarr.Group):
        raise StoreError(f"{path}: missing group meta (expected meta/episode_ends)")
    meta = group["meta"]
    if "episode_ends" not in meta or not isinstance(meta["episode_ends"], zarr.Array):
        raise StoreError(f"{path}: missing meta/episode_ends (expected a 1-D int64 array of "
                         f"cumulative episode ends)")
    arr = meta["episode_ends"]
    if arr.ndim != 1 or not np.issubdtype(np.dtype(arr.dtype), np.integer):
        raise StoreError(f"{path}: meta/episode_ends has shape {arr.shape} and dtype {arr.dtype}, "
                         f"expected a 1-D integer array")
    ends = np.asarray(arr[:], dtype=np.int64)
    prev = np.concatenate([[0], ends[:-1]])
    bad = np.flatnonzero(ends <= prev)
    if bad.size:
        i = int(bad[0])
        raise StoreError(f"{path}: meta/episode_ends is not increasing at episode {i} "
                         f"({ends[i]} after {prev[i]})")
    return ends


class EpisodeStore:
    """Episodes of named arrays in a Zarr store. Use :meth:`create` or :meth:`open`."""

    def __init__(self, path, group: zarr.Group, backend, mode: str, cache_images: bool,
                 chunks: Mapping[str, int] | None = None):
        self.path = Path(path)
        self.mode = mode
        self.cache_images = cache_images
        self.zarr_format = group.metadata.zarr_format
        self._group, self._backend = group, backend
        self._chunks = dict(chunks or {})
        self._cache: dict[str, np.ndarray] = {}
        self._ends = _read_ends(self.path, group)
        if "data" not in group or not isinstance(group["data"], zarr.Group):
            raise StoreError(f"{self.path}: missing group data (expected data/<key> arrays)")
        self._data = group["data"]
        try:
            with warnings.catch_warnings():  # zarr warns about *.partial files (see partial_files)
                warnings.simplefilter("ignore", UserWarning)
                self._arrays = {k: a for k, a in self._data.arrays()}
        except Exception as exc:  # e.g. a codec that is not installed (imagecodecs' jpeg2k)
            raise StoreError(f"{self.path}: cannot read the arrays under data/ ({one_line(exc)})") from exc
        n = self.n_steps
        for key, arr in sorted(self._arrays.items()):
            if arr.ndim == 0:
                raise StoreError(f"{self.path}: data/{key} is a scalar, expected an array with "
                                 f"time on axis 0")
            if arr.shape[0] < n:
                raise StoreError(f"{self.path}: data/{key} has {arr.shape[0]} steps, expected at "
                                 f"least {n} (meta/episode_ends[-1])")
        self._ends_array = group["meta"]["episode_ends"]
        digests = group["meta"].get(DIGESTS)
        self._digests = digests if isinstance(digests, zarr.Array) else None
        if mode == "a":  # runtime setting, not stored: set on every array this object writes
            self._arrays = {k: a.with_config(WRITE_ALL_CHUNKS) for k, a in self._arrays.items()}
            self._ends_array = self._ends_array.with_config(WRITE_ALL_CHUNKS)
            if self._digests is not None:
                self._digests = self._digests.with_config(WRITE_ALL_CHUNKS)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, path, exist_ok: bool = False, chunks: Mapping[str, int] | None = None
               ) -> "EpisodeStore":
        """Create an empty zarr-v3 store (``exist_ok``: open an existing one for appending).

        ``chunks`` optionally sets steps per chunk per key (default :func:`default_chunk_steps`).
        """
        path = Path(path)
        if path.exists():
            if not exist_ok:
                raise StoreError(f"{path}: already exists (pass exist_ok=True to append to it)")
            store = cls.open(path, mode="a")
            store._chunks.update(chunks or {})
            return store
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="w-", zarr_format=3)
        group.create_group("data")
        group.create_group("meta").create_array(
            "episode_ends", shape=(0,), chunks=(ENDS_CHUNK,), dtype="int64", fill_value=0,
            compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")], config=WRITE_ALL_CHUNKS)
        return cls(path, group, None, "a", False, chunks)

    @classmethod
    def open(cls, path, mode: str = "r", cache_images: bool = False) -> "EpisodeStore":
        """Open a store: ``mode="r"`` read-only (v2, v3, ``.zarr.zip``) or ``"a"`` to append/pop
        (v3 directories only). ``cache_images`` loads image keys into memory on first use."""
        if mode not in ("r", "a"):
            raise StoreError(f"{path}: mode must be 'r' or 'a', got {mode!r}")
        path = Path(path)
        group, backend = _open_group(path, mode)
        if mode == "a" and group.metadata.zarr_format != 3:
            raise StoreError(f"{path}: a zarr v{group.metadata.zarr_format} store opens read-only; "
                             f"convert it with `dp-data copy {path} NEW.zarr`")
        store = cls(path, group, backend, mode, cache_images)  # raises on a malformed store
        if mode == "a":
            _remove_partial_files(path)
        return store

    def close(self) -> None:
        if self._backend is not None and hasattr(self._backend, "close"):
            self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"EpisodeStore({str(self.path)!r}, episodes={self.n_episodes}, "
                f"steps={self.n_steps}, keys={self.keys()})")

    # ------------------------------------------------------------------ reading
    @property
    def episode_ends(self) -> np.ndarray:
        return self._ends.copy()

    @property
    def n_episodes(self) -> int:
        return len(self._ends)

    @property
    def n_steps(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def episode_lengths(self) -> np.ndarray:
        return np.diff(self._ends, prepend=0)

    def keys(self) -> list[str]:
        return sorted(self._arrays)

    def __contains__(self, key: str) -> bool:
        return key in self._arrays

    def zarr_array(self, key: str) -> zarr.Array:
        """The underlying zarr array (may be longer than :attr:`n_steps` after a crash)."""
        self._check_key(key)
        return self._arrays[key]

    def is_image(self, key: str) -> bool:
        self._check_key(key)
        return is_image_shape(self._arrays[key].shape[1:])

    def __getitem__(self, key: str):
        """The first ``n_steps`` of ``data/<key>``: a numpy array for low-dim keys (loaded once) and
        for images with ``cache_images``; a :class:`~diffusion_policy.data.lazy.LazyArray` for other
        images."""
        self._check_key(key)
        if key in self._cache:
            return self._cache[key]
        arr = self._arrays[key]
        if self.is_image(key) and not self.cache_images:
            from diffusion_policy.data.lazy import LazyArray  # (it imports this module)

            return LazyArray(arr, self.n_steps)
        self._cache[key] = self._read(key, slice(0, self.n_steps))
        return self._cache[key]

    def _read(self, key: str, rows: slice) -> np.ndarray:
        try:
            return np.asarray(self._arrays[key][rows])
        except Exception as exc:  # a damaged chunk (zarr names no chunk): point to the check that does
            raise StoreError(f"{self.path}: data/{key} steps {rows.start}-{rows.stop - 1} cannot be read "
                             f"({one_line(exc)}); `dp-data validate --full {self.path}` names the "
                             f"damaged chunk") from None

    def digests(self) -> tuple[list[str], np.ndarray] | None:
        """Keys and ``(n_episodes, len(keys))`` uint64 digests recorded at append time (see
        :func:`episode_digest`), or None where the store has none for every episode (written by
        another tool, or appended to by one)."""
        d = self._digests
        if d is None or d.ndim != 2 or d.shape[0] < self.n_episodes:
            return None
        keys = list(d.attrs.get("keys", []))
        if d.attrs.get("hash") != DIGEST_NAME or len(keys) != d.shape[1]:
            return None
        return keys, np.asarray(d[: self.n_episodes], dtype=np.uint64)

    def episode_slice(self, i: int) -> slice:
        n = self.n_episodes
        if not -n <= i < n:
            raise IndexError(f"{self.path}: episode {i} out of range (store has {n} episodes)")
        i %= n
        return slice(int(self._ends[i - 1]) if i > 0 else 0, int(self._ends[i]))

    def get_episode(self, i: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of episode ``i`` (negative counts from the end), copies."""
        sl = self.episode_slice(i)
        out = {}
        for key in (self.keys() if keys is None else keys):
            self._check_key(key)
            src = self._cache.get(key)
            out[key] = src[sl].copy() if src is not None else self._read(key, sl)
        return out

    def _check_key(self, key: str) -> None:
        if key not in self._arrays:
            raise KeyError(f"{self.path}: no key data/{key} (keys: {', '.join(self.keys())})")

    # ------------------------------------------------------------------ writing
    def _check_writable(self, what: str) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.path}: opened read-only; {what} needs EpisodeStore.open(path, "
                             f"mode='a')")

    def add_episode(self, data: Mapping[str, np.ndarray]) -> None:
        """Append one episode. Every key of the store must be given, all with the same length.
        Values are cast to the store's dtype only where numpy calls it safe or same-kind."""
        self._add_episode(data, None)

    def _add_episode(self, data: Mapping[str, np.ndarray], expected: Mapping[str, int] | None) -> None:
        """``expected``: digests the values must have (``copy_to`` checks what it read against the
        source's record before anything is written)."""
        self._check_writable("add_episode")
        if not data:
            raise StoreError(f"{self.path}: add_episode got no arrays")
        data = {k: np.asarray(v) for k, v in data.items()}
        for key, v in data.items():
            if not key or "/" in key or "." in key:
                raise StoreError(f"{self.path}: key {key!r} is not a plain name (no '/', '.')")
            if v.ndim == 0:
                raise StoreError(f"{self.path}: add_episode: data[{key!r}] is a scalar, expected "
                                 f"an array with time on axis 0")
        first = next(iter(data))
        length = len(data[first])
        for key, v in data.items():
            if len(v) != length:
                raise StoreError(f"{self.path}: add_episode: data[{key!r}] has {len(v)} steps, "
                                 f"expected {length} (the length of data[{first!r}])")
        if length == 0:
            raise StoreError(f"{self.path}: add_episode: episode has 0 steps, expected at least 1")
        n, e = self.n_steps, self.n_episodes
        if self.n_episodes:
            self._check_same_keys(data)
        else:
            self._make_arrays(data)
        data = {k: v.astype(self._arrays[k].dtype, copy=False) for k, v in data.items()}
        record = self._digests is not None and self._digests.shape[0] >= e  # one for every episode so far
        hashes = {k: episode_digest(v) for k, v in data.items()} if record or expected else {}
        digests = np.array([hashes[k] for k in self._digests.attrs["keys"]], np.uint64) if record else None
        if expected is not None:
            for key in data:
                if key in expected and hashes[key] != expected[key]:
                    raise StoreError(f"data/{key}: values read for this episode do not match the digest "
                                     f"recorded when it was written ({expected[key]:016x}); a chunk is "
                                     f"damaged")
        # 1) data and digests, possibly leaving an uncommitted tail if killed here
        for key, v in data.items():
            arr = self._arrays[key]
            if arr.shape[0] != n + length:
                arr.resize((n + length,) + tuple(arr.shape[1:]))
            arr[n: n + length] = v
        if digests is not None:
            if self._digests.shape[0] != e + 1:
                self._digests.resize((e + 1, len(digests)))
            self._digests[e] = digests
        # 2) commit
        self._commit_ends(np.append(self._ends, n + length))
        for key, v in data.items():
            if key in self._cache:
                old = self._cache[key]
                self._cache[key] = np.concatenate([old, v.astype(old.dtype)])

    def _check_same_keys(self, data: Mapping[str, np.ndarray]) -> None:
        missing, extra = set(self._arrays) - set(data), set(data) - set(self._arrays)
        if missing or extra:
            raise StoreError(f"{self.path}: add_episode: keys {sorted(data)} differ from the "
                             f"store's {self.keys()} (missing {sorted(missing)}, unknown "
                             f"{sorted(extra)})")
        for key, v in data.items():
            arr = self._arrays[key]
            if v.shape[1:] != tuple(arr.shape[1:]):
                raise StoreError(f"{self.path}: add_episode: data[{key!r}] has per-step shape "
                                 f"{v.shape[1:]}, expected {tuple(arr.shape[1:])}")
            if not np.can_cast(v.dtype, arr.dtype, casting="same_kind"):
                raise StoreError(f"{self.path}: add_episode: data[{key!r}] has dtype {v.dtype}, "
                                 f"expected {arr.dtype}")

    def _make_arrays(self, data: Mapping[str, np.ndarray]) -> None:
        """First episode: the arrays take its keys, shapes and dtypes. Arrays left by an interrupted
        first append hold no committed steps and are replaced when they do not match."""
        for key in list(self._arrays):
            a, v = self._arrays[key], data.get(key)
            if v is None or tuple(a.shape[1:]) != v.shape[1:] or a.dtype != v.dtype:
                del self._data[key]
                del self._arrays[key]
        for key, v in data.items():
            if key in self._arrays:
                continue
            steps = self._chunks.get(key) or default_chunk_steps(v.shape[1:], v.dtype)
            self._arrays[key] = self._data.create_array(
                key, shape=(0,) + v.shape[1:], chunks=(steps,) + v.shape[1:], dtype=v.dtype,
                fill_value=0, compressors=[default_compressor(v.shape[1:])], config=WRITE_ALL_CHUNKS)
        meta = self._group["meta"]
        if DIGESTS in meta:
            del meta[DIGESTS]
        self._digests = meta.create_array(
            DIGESTS, shape=(0, len(data)), chunks=(ENDS_CHUNK, len(data)), dtype="uint64", fill_value=0,
            compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")], config=WRITE_ALL_CHUNKS,
            attributes={"keys": sorted(data), "hash": DIGEST_NAME})
        self._cache.clear()

    def _commit_ends(self, new_ends: np.ndarray) -> None:
        """Make ``new_ends`` visible with one atomic metadata write (see module docstring)."""
        aa = self._ends_array._async_array
        old = len(self._ends)
        if len(new_ends) > old:
            staged = zarr.Array(AsyncArray(metadata=aa.metadata.update_shape((len(new_ends),)),
                                           store_path=aa.store_path, config=aa.config))
            staged[old:] = new_ends[old:]
        # keep chunks outside a smaller shape: deleting them before the metadata is replaced
        # would expose fill values to a reader if the writer died in between
        sync(aa.resize((len(new_ends),), delete_outside_chunks=False))
        self._ends = np.asarray(new_ends, dtype=np.int64)

    def pop_episode(self) -> int:
        """Delete the last episode; returns its length."""
        self._check_writable("pop_episode")
        if not self.n_episodes:
            raise StoreError(f"{self.path}: pop_episode: the store has no episodes")
        length = int(self.episode_lengths[-1])
        self._commit_ends(self._ends[:-1])
        n = self.n_steps
        for key, arr in self._arrays.items():
            arr.resize((n,) + tuple(arr.shape[1:]))
            if key in self._cache:
                self._cache[key] = self._cache[key][:n]
        if self._digests is not None and self._digests.shape[0] > self.n_episodes:
            self._digests.resize((self.n_episodes, self._digests.shape[1]))
        return length

    def copy_to(self, path, episodes: Iterable[int] | None = None) -> "EpisodeStore":
        """Write the given episodes (default all, in the given order) to a new zarr-v3 store.

        The source's chunks under those episodes are checked first (missing, empty, truncated:
        :func:`~diffusion_policy.data.integrity.check_store`), every value read is checked against
        the source's digests where it has them, and the copy is written to a temporary sibling
        renamed to ``path`` at the end: a failure leaves no store at ``path`` (a copy killed outright
        leaves only that hidden ``.NAME.PID.copying`` sibling, never a partial store at ``path``).
        """
        from diffusion_policy.data.integrity import check_store

        ids = list(range(self.n_episodes)) if episodes is None else [int(i) for i in episodes]
        for i in ids:
            if not 0 <= i < self.n_episodes:
                raise StoreError(f"{self.path}: episode {i} out of range (store has "
                                 f"{self.n_episodes} episodes: 0-{self.n_episodes - 1})")
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path}: already exists (expected a new path for the copy)")
        check_store(self, episodes=sorted(set(ids)), finite=False)
        recorded = self.digests()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.copying")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a copy killed before its rename
        try:
            dst = EpisodeStore.create(tmp)
            # the root attributes (dp-collect's provenance record: env id, task, expert) travel
            # with the episodes, so a copy is refused or accepted by dp-train like its source
            dst._group.attrs.update(dict(self._group.attrs))
            for i in ids:
                expected = None if recorded is None else dict(zip(recorded[0], map(int, recorded[1][i])))
                try:
                    dst._add_episode(self.get_episode(i), expected)
                except StoreError as exc:
                    if str(exc).startswith("data/"):  # a digest mismatch: name the source episode
                        raise StoreError(f"{self.path}: episode {i}: {exc}") from None
                    raise
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return EpisodeStore.open(path, mode="a")


_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def partial_files(path: Path) -> list[Path]:
    """Temporary files of zarr's atomic writes that a killed writer left behind."""
    return [Path(r) / f for r, _, files in os.walk(path) for f in files if _PARTIAL.search(f)]


def _remove_partial_files(path: Path) -> None:
    for f in partial_files(path):
        f.unlink(missing_ok=True)
