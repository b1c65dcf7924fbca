"""Integrity of an episode store: every chunk present and whole, values finite, actions in bounds.

Through zarr a deleted chunk file reads back as the fill value (zeros), silently, and a damaged one
fails somewhere deep in a codec. This module finds both before a job uses the store. Jobs call
:func:`check_store`, which raises the first finding as a one-line :class:`StoreError`;
``dp-data validate`` prints every finding of :func:`scan_store`.

Three depths, each doing what the ones above it do:

fast (default)
    Every chunk file holding committed steps (those before ``meta/episode_ends[-1]``) is looked up
    in the array's chunk grid. A missing file is an error (this package writes every chunk, even an
    all-zero one), and so is an empty one. A Blosc chunk (what this package and Chi et al.'s replay
    buffers write) has its 16-byte header read: the uncompressed size it states must be the chunk's
    and the compressed size the file's, which catches a truncated file. An uncompressed chunk must
    hold exactly the chunk's bytes. Floating-point arrays are read whole, and every episode holding
    NaN or inf is reported (and every episode with actions outside ``action_bounds``).
full
    Every chunk is decoded, which catches garbage behind a plausible header.
checksums
    Each episode's values of each key are hashed and compared with the digest recorded when the
    episode was appended (``meta/episode_digests``, see :func:`episode_digest`). A checksum of an
    append-only store covers exactly its committed episodes: an append adds one row without reading
    what is already there, a pop removes one, an interrupted append leaves an uncommitted row that
    the next append overwrites, and a mismatch names the episode and the key. A store without
    digests (zarr v2 replay buffers, other tools) gets a note and the full read.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec

from diffusion_policy.data.lazy import direct_chunk_reader
from diffusion_policy.data.store import DIGESTS, EpisodeStore, StoreError, one_line, partial_files

BLOCK_BYTES = 64 << 20  # values decoded at a time when reading an array
MAX_LINES = 10  # damaged chunks listed per array; the rest are counted in one more line
BLOSC_HEADER = 16  # bytes: version, flags, typesize, nbytes, blocksize, cbytes (c-blosc README)


@dataclass
class StoreReport:
    """What :func:`scan_store` found: ``errors`` (the store is unusable), ``notes`` (it is usable)."""

    path: Path
    mode: str
    episodes: int = 0
    steps: int = 0
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nonfinite: dict[str, list[int]] = field(default_factory=dict)
    """Key -> episodes holding NaN or inf."""
    out_of_bounds: list[int] = field(default_factory=list)
    """Episodes with actions outside ``action_bounds``."""
    chunks: int = 0
    """Chunk files looked at."""
    decoded_bytes: int = 0
    digests_verified: int = 0
    """(episode, key) pairs whose digest was compared."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        size = f"{self.decoded_bytes / 2**20:.1f} MiB" if self.decoded_bytes >= 2**20 else \
            f"{self.decoded_bytes / 1024:.1f} KiB"
        return (f"{self.mode} check: {self.episodes} episodes, {self.steps} steps, {self.chunks} chunk files, "
                f"{size} decoded, {self.digests_verified} digests verified")


def check_store(store, *, keys=None, full: bool = False, checksums: bool = False, finite: bool = True,
                action_bounds=None, action_key: str = "action", episodes=None, min_episodes: int = 0
                ) -> StoreReport:
    """:func:`scan_store`, raising its first error as a :class:`StoreError` (one line). What the jobs
    call before using a store: ``check_store(store, keys=[...], min_episodes=1)``."""
    report = scan_store(store, keys=keys, full=full, checksums=checksums, finite=finite,
                        action_bounds=action_bounds, action_key=action_key, episodes=episodes,
                        min_episodes=min_episodes)
    if report.errors:
        more = len(report.errors) - 1
        tail = f" (and {more} more problem{'s' * (more > 1)}: dp-data validate lists them)" if more else ""
        raise StoreError(report.errors[0] + tail)
    return report


def scan_store(store, *, keys=None, full: bool = False, checksums: bool = False, finite: bool = True,
               action_bounds=None, action_key: str = "action", episodes=None, min_episodes: int = 0
               ) -> StoreReport:
    """Check ``store`` (an :class:`EpisodeStore` or a path, opened read-only) and report every finding.

    ``keys``: the data arrays to check (default all); ``full``: decode every chunk; ``checksums``:
    also compare each episode with its recorded digest; ``finite``: report NaN/inf in
    floating-point keys; ``action_bounds``: ``(low, high)``, scalars or ``(Da,)``, that
    ``data/<action_key>`` must lie within; ``episodes``: only the chunks of these episodes (default
    all); ``min_episodes``: fewer is an error (training needs at least one).
    """
    if not isinstance(store, EpisodeStore):
        try:
            store = EpisodeStore.open(store, mode="r")
        except StoreError as exc:
            return StoreReport(Path(store), "open", errors=[str(exc)])
        with store:
            return scan_store(store, keys=keys, full=full, checksums=checksums, finite=finite,
                              action_bounds=action_bounds, action_key=action_key, episodes=episodes,
                              min_episodes=min_episodes)
    mode = "checksum" if checksums else "full" if full else "fast"
    rep = StoreReport(store.path, mode, store.n_episodes, store.n_steps)
    where = store.path
    if store.n_episodes < min_episodes:
        rep.errors.append(f"{where}: no episodes (expected at least {min_episodes}; dp-collect records them)"
                          if store.n_episodes == 0 else
                          f"{where}: {store.n_episodes} episodes, expected at least {min_episodes}")
        return rep
    keys = store.keys() if keys is None else list(keys)
    missing = [k for k in keys if k not in store]
    if missing:
        rep.errors.append(f"{where}: no array data/{missing[0]} (expected the keys {sorted(keys)}; the "
                          f"store has {store.keys()})")
        return rep
    if store.n_episodes and not store.keys():
        rep.errors.append(f"{where}: data has no arrays (expected data/<key>)")
    if action_bounds is not None and store.n_episodes and action_key not in store:
        rep.errors.append(f"{where}: no array data/{action_key} to check against the action bounds (the store "
                          f"has {store.keys()})")
    ends = store.episode_ends
    ids = range(store.n_episodes) if episodes is None else sorted({int(i) for i in episodes})
    rows = _merge([(store.episode_slice(i).start, store.episode_slice(i).stop) for i in ids])

    # ---- 1) chunk files: present, not empty, headers that match the chunk
    files = _ChunkFiles(store.path)
    try:
        meta = store._group["meta"]
        arrays = [(f"meta/{name}", meta[name], [(0, store.n_episodes)] if store.n_episodes else [], None)
                  for name in ("episode_ends", DIGESTS) if name in meta]
        arrays += [(f"data/{k}", store.zarr_array(k), rows, ends) for k in keys]
        bad_files = {}  # label -> time-chunk indices already reported (not reported again when decoding)
        for label, arr, arr_rows, arr_ends in arrays:
            bad_files[label] = _check_chunk_files(rep, files, label, arr, arr_rows, arr_ends)
    finally:
        files.close()

    # ---- 2) values: decoded where asked (or needed for NaN/bounds/digests)
    recorded = store.digests() if checksums else None
    if checksums and recorded is None:
        rep.notes.append(f"{where}: no digests recorded for every episode (written by another tool or an "
                         f"earlier version; `dp-data copy` writes a store that has them): checked by a full "
                         f"read only")
    bounds = None if action_bounds is None else tuple(np.asarray(b, np.float64) for b in action_bounds)
    for key in keys:
        arr = store.zarr_array(key)
        is_float = np.issubdtype(np.dtype(arr.dtype), np.floating)
        hashed = recorded is not None and key in recorded[0]
        in_bounds = bounds is not None and key == action_key
        if not (full or checksums or hashed or (finite and is_float) or in_bounds):
            continue
        _read_values(rep, store, key, rows, finite and is_float, bounds if in_bounds else None,
                     recorded[1][:, recorded[0].index(key)] if hashed else None, bad_files[f"data/{key}"])

    # ---- 3) notes: what a killed writer leaves (harmless)
    if store.n_episodes == 0:
        rep.notes.append(f"{where}: no episodes yet (valid; dp-train needs at least one)")
    for key in store.keys():
        extra = store.zarr_array(key).shape[0] - store.n_steps
        if extra > 0:
            rep.notes.append(f"{where}: data/{key} has {extra} steps after the last episode end "
                             f"(uncommitted; the next append overwrites them)")
    partial = [] if store.path.is_file() else partial_files(store.path)
    if partial:
        rep.notes.append(f"{where}: {len(partial)} temporary *.partial files left by a killed writer "
                         f"(removed when the store is next opened for appending)")
    return rep


# --------------------------------------------------------------------------------- chunk files
def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class _ChunkFiles:
    """Size and first bytes of chunk files, read directly: a directory store costs one open per
    chunk, a ``.zarr.zip`` one look-up in its central directory (zarr's own ``getsize`` is a round
    trip through its event loop per key)."""

    def __init__(self, path: Path):
        self.root = Path(path)
        self.zip = zipfile.ZipFile(path) if self.root.is_file() else None
        self.sizes = {i.filename: i.file_size for i in self.zip.infolist()} if self.zip else None

    def head(self, key: str, n: int) -> tuple[int, bytes] | None:
        """(size, first n bytes) of the file at ``key``, None if there is none."""
        if self.zip is not None:
            if key not in self.sizes:
                return None
            with self.zip.open(key) as f:
                return self.sizes[key], f.read(n)
        try:
            with open(self.root / key, "rb") as f:
                return os.fstat(f.fileno()).st_size, f.read(n)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def close(self) -> None:
        if self.zip is not None:
            self.zip.close()


def _codec_kind(arr: zarr.Array) -> str:
    """'blosc' (bytes + Blosc), 'raw' (no compression) or 'other' (any other chain: size > 0 only)."""
    md = arr.metadata
    if md.zarr_format == 3:
        codecs = md.codecs
        if len(codecs) == 1 and isinstance(codecs[0], BytesCodec):
            return "raw"
        if len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and isinstance(codecs[1], BloscCodec):
            return "blosc"
        return "other"
    if md.filters:
        return "other"
    if md.compressor is None:
        return "raw"
    return "blosc" if getattr(md.compressor, "codec_id", None) == "blosc" else "other"


def _file_shape(arr: zarr.Array) -> tuple[int, ...]:
    """Shape of what one file holds: a shard where the array is sharded, else a chunk."""
    shards = getattr(arr, "shards", None)
    return tuple(shards or arr.chunks)


def _location(arr_ends, a: int, b: int) -> str:
    """'steps a-b, episode(s) i[-j]' of committed steps [a, b)."""
    if arr_ends is None:  # meta arrays: rows are episodes
        return f"episodes {a}-{b - 1}" if b - a > 1 else f"episode {a}"
    e0 = int(np.searchsorted(arr_ends, a, side="right"))
    e1 = int(np.searchsorted(arr_ends, b - 1, side="right"))
    eps = f"episode {e0}" if e0 == e1 else f"episodes {e0}-{e1}"
    return f"steps {a}-{b - 1}, {eps}"


def _check_chunk_files(rep: StoreReport, files: _ChunkFiles, label: str, arr: zarr.Array,
                       rows: list[tuple[int, int]], arr_ends) -> set[int]:
    """Adds an error per missing, empty or mismatching chunk file under ``rows``; returns the time
    indices of those chunks."""
    shape = _file_shape(arr)
    kind = "other" if getattr(arr, "shards", None) else _codec_kind(arr)
    nbytes = math.prod(shape) * np.dtype(arr.dtype).itemsize
    committed = rows[-1][1] if rows else 0
    time_chunks = sorted({c for a, b in rows for c in range(a // shape[0], (b - 1) // shape[0] + 1)})
    others = list(itertools.product(*[range(math.ceil(s / c)) for s, c in zip(arr.shape[1:], shape[1:])]))
    bad, bad_chunks = [], set()
    for c in time_chunks:
        for rest in others:
            rep.chunks += 1
            ckey = arr.metadata.encode_chunk_key((c,) + rest)
            found = files.head(f"{arr.path}/{ckey}", BLOSC_HEADER)
            problem = _file_problem(found, kind, nbytes)
            if problem:
                a, b = c * shape[0], min((c + 1) * shape[0], committed)
                bad_chunks.add(c)
                bad.append(f"{rep.path}: {label} chunk {ckey} ({_location(arr_ends, a, b)}) {problem}")
    rep.errors += bad[:MAX_LINES]
    if len(bad) > MAX_LINES:
        rep.errors.append(f"{rep.path}: {label}: {len(bad) - MAX_LINES} more damaged chunks")
    return bad_chunks


def _file_problem(found: tuple[int, bytes] | None, kind: str, nbytes: int) -> str | None:
    if found is None:
        return "is missing (expected a chunk file; zarr would read it back as zeros)"
    size, head = found
    if size == 0:
        return "is empty (0 bytes, expected a compressed chunk)" if kind != "raw" else \
            f"is empty (0 bytes, expected {nbytes})"
    if kind == "raw" and size != nbytes:
        return f"has {size} bytes, expected {nbytes} (uncompressed chunk)"
    if kind == "blosc":
        if size < BLOSC_HEADER:
            return f"is truncated ({size} bytes, shorter than Blosc's {BLOSC_HEADER}-byte header)"
        stated, cbytes = int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
        if stated != nbytes:
            return (f"is not a Blosc chunk of this array (its header states {stated} bytes, expected "
                    f"{nbytes})")
        if size != cbytes:
            return (f"is truncated ({size} of the {cbytes} bytes its header states)" if size < cbytes else
                    f"has {size} bytes, expected {cbytes} (its Blosc header's size)")
    return None


# ------------------------------------------------------------------------------------- values
def _read_values(rep: StoreReport, store: EpisodeStore, key: str, rows, check_finite: bool, bounds,
                 digests, known: set[int]) -> None:
    """Decode ``data/<key>`` over ``rows`` block by block: damaged chunks (other than the ``known``
    time indices, already reported), NaN/inf, bounds, digests."""
    arr = store.zarr_array(key)
    ends = store.episode_ends
    starts = np.concatenate([[0], ends[:-1]])
    step_shape = tuple(arr.shape[1:])
    row_bytes = max(1, math.prod(step_shape) * np.dtype(arr.dtype).itemsize)
    c0 = _file_shape(arr)[0]
    block = max(c0, BLOCK_BYTES // row_bytes // c0 * c0)
    nonfinite: dict[int, int] = {}  # episode -> first step
    outside: dict[int, tuple] = {}  # episode -> (step, dim, value)
    hashers: dict[int, object] = {}  # episode -> BLAKE2b state, None where it cannot be verified
    for c in known:  # a damaged file may still decode (Blosc stores small chunks as plain copies)
        for ep in range(int(np.searchsorted(ends, c * c0, side="right")),
                        int(np.searchsorted(ends, min((c + 1) * c0, store.n_steps) - 1, side="right")) + 1):
            hashers[ep] = None
    damaged = []
    # chunk files of this package's layout are decoded directly, one at a time (zarr costs about
    # 0.5 ms per chunk, and a failure then names its chunk); anything else in blocks through zarr
    direct = direct_chunk_reader(arr)
    for lo, hi in rows:
        s = lo
        while s < hi:
            e = min(hi, (s // c0) * c0 + (c0 if direct else block))
            try:
                if direct:
                    c = s // c0
                    x = direct[0](c)[s - c * c0: e - c * c0]
                else:
                    x = np.asarray(arr[s:e])
            except Exception as exc:
                if not direct:
                    damaged += _find_damaged(rep.path, key, arr, s, e, ends, known)
                elif c not in known:
                    why = one_line(exc.__cause__ or exc)
                    ckey = arr.metadata.encode_chunk_key((c,) + (0,) * (arr.ndim - 1))
                    where = _location(ends, c * c0, min((c + 1) * c0, store.n_steps))
                    damaged.append(f"{rep.path}: data/{key} chunk {ckey} ({where}) cannot be decoded ({why})")
                for ep in np.unique(np.searchsorted(ends, np.arange(s, e), side="right")):
                    hashers[int(ep)] = None  # cannot be verified: its chunk is reported instead
                s = e
                continue
            rep.decoded_bytes += x.nbytes
            flat = x.reshape(len(x), -1)
            if check_finite:
                for t in np.flatnonzero(~np.isfinite(flat).all(axis=1)):
                    nonfinite.setdefault(int(np.searchsorted(ends, s + t, side="right")), s + int(t))
            if bounds is not None:
                low, high = (np.broadcast_to(b, flat.shape[1:]) for b in bounds)
                out = (flat < low) | (flat > high)
                for t in np.flatnonzero(out.any(axis=1)):
                    ep = int(np.searchsorted(ends, s + t, side="right"))
                    if ep not in outside:
                        d = int(np.flatnonzero(out[t])[0])
                        outside[ep] = (s + int(t), d, float(flat[t, d]), float(low[d]), float(high[d]))
            if digests is not None:
                le = x.dtype.newbyteorder("<")
                for ep in range(int(np.searchsorted(ends, s, side="right")),
                                int(np.searchsorted(ends, e - 1, side="right")) + 1):
                    a, b = max(s, int(starts[ep])), min(e, int(ends[ep]))
                    if ep not in hashers:
                        hashers[ep] = hashlib.blake2b(digest_size=8)
                    if hashers[ep] is not None:
                        hashers[ep].update(np.ascontiguousarray(x[a - s: b - s], dtype=le).data)
            s = e
    rep.errors += damaged[:MAX_LINES]
    if len(damaged) > MAX_LINES:
        rep.errors.append(f"{rep.path}: data/{key}: {len(damaged) - MAX_LINES} more chunks cannot be decoded")
    if nonfinite:
        eps = sorted(nonfinite)
        rep.nonfinite[key] = eps
        rep.errors.append(f"{rep.path}: data/{key} has NaN/inf in {_episodes(eps)} (first at step "
                          f"{nonfinite[eps[0]]}), expected finite values")
    if outside:
        eps = sorted(outside)
        rep.out_of_bounds = eps
        t, d, v, lo, hi = outside[eps[0]]
        rep.errors.append(f"{rep.path}: data/{key} is outside the action bounds in {_episodes(eps)} (first "
                          f"at step {t}: {v:g} in dimension {d}), expected values in [{lo:g}, {hi:g}]")
    if digests is not None:
        wrong = []
        for ep, h in sorted(hashers.items()):
            if h is None:
                continue
            rep.digests_verified += 1
            if int.from_bytes(h.digest(), "little") != int(digests[ep]):
                wrong.append(ep)
        if wrong:
            rep.errors.append(f"{rep.path}: data/{key} does not match its recorded digest in {_episodes(wrong)}, "
                              f"expected the values written by the append (a chunk was changed or damaged)")


def _episodes(eps: list[int]) -> str:
    shown = ", ".join(map(str, eps[:MAX_LINES])) + (f", ... ({len(eps)} in all)" if len(eps) > MAX_LINES else "")
    return f"episode{'s' * (len(eps) > 1)} {shown}"


def _find_damaged(where: Path, key: str, arr: zarr.Array, s: int, e: int, ends, known: set[int]) -> list[str]:
    """The chunks of ``data/<key>`` over steps [s, e) that zarr cannot decode, one line each, leaving
    out the ``known`` time indices."""
    shape = _file_shape(arr)
    others = list(itertools.product(*[range(math.ceil(n / c)) for n, c in zip(arr.shape[1:], shape[1:])]))
    out = []
    chunks = range(s // shape[0], (e - 1) // shape[0] + 1)
    for c in chunks:
        if c in known:
            continue
        for rest in others:
            try:
                arr.get_block_selection((c,) + rest)
            except Exception as exc:
                a, b = c * shape[0], min((c + 1) * shape[0], e)
                out.append(f"{where}: data/{key} chunk {arr.metadata.encode_chunk_key((c,) + rest)} "
                           f"({_location(ends, a, b)}) cannot be decoded ({one_line(exc)})")
    if not out and not known.intersection(chunks):  # the block failed, no single chunk does: name the steps
        out.append(f"{where}: data/{key} steps {s}-{e - 1} cannot be read")
    return out
