"""Lazy reads of image arrays: frames decoded on demand, straight from the chunk files.

:class:`LazyArray` is what :meth:`EpisodeStore.__getitem__` returns for an image key of a store
opened without ``cache_images``: a read-only view of the committed steps that decodes only the
chunks a window touches. For arrays laid out as :mod:`diffusion_policy.data.store` writes them it
reads the chunk files itself (:func:`direct_chunk_reader`); anything else goes through zarr.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from diffusion_policy.data.store import StoreError, one_line


def direct_chunk_reader(array: zarr.Array):
    """A function ``chunk index -> ndarray`` that reads chunk files of ``array`` directly, or None.

    Only for arrays laid out as this module writes them (zarr v3 in a local directory, chunked along
    time only, codecs = bytes + Blosc, default '/' chunk keys). zarr's per-chunk overhead is
    about 0.5 ms, twenty times the Blosc decode of a 4-frame chunk, and random window reads touch
    one chunk per frame; anything else goes through zarr.
    """
    from numcodecs import Blosc
    from zarr.codecs import BytesCodec
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

    md = array.metadata
    if md.zarr_format != 3 or not isinstance(array.store, zarr.storage.LocalStore):
        return None
    codecs = md.codecs
    if not (len(codecs) == 2 and isinstance(codecs[0], BytesCodec)
            and isinstance(codecs[1], BloscCodec)
            and isinstance(md.chunk_key_encoding, DefaultChunkKeyEncoding)
            and md.chunk_key_encoding.separator == "/"):
        return None
    chunk_shape = tuple(md.chunk_grid.chunk_shape)
    if chunk_shape[1:] != tuple(array.shape[1:]):
        return None
    endian = getattr(codecs[0].endian, "value", None)
    dtype = np.dtype(array.dtype)
    if endian is not None and dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    root = Path(array.store.root) / array.path
    blosc, zeros = Blosc(), (0,) * (len(chunk_shape) - 1)

    def read(c: int) -> np.ndarray:
        try:
            raw = (root / md.encode_chunk_key((c,) + zeros)).read_bytes()
        except FileNotFoundError:  # every chunk is written (WRITE_ALL_CHUNKS): a missing one is damage
            raise StoreError(f"{root}/{md.encode_chunk_key((c,) + zeros)}: chunk file is missing, "
                             f"expected one for steps {c * chunk_shape[0]}-{(c + 1) * chunk_shape[0] - 1}"
                             f" (dp-data validate lists every damaged chunk)") from None
        try:
            return np.frombuffer(blosc.decode(raw), dtype).reshape(chunk_shape)
        except Exception as exc:  # truncated or garbage (the cause is kept for the integrity check)
            raise StoreError(f"{root}/{md.encode_chunk_key((c,) + zeros)}: chunk cannot be decoded "
                             f"({one_line(exc)}), expected a Blosc chunk of {np.prod(chunk_shape)} "
                             f"values") from exc

    return read, chunk_shape[0]


class LazyArray:
    """Read-only view of the first ``n`` steps of a zarr array (images not cached in memory).

    Supports ints, slices and integer arrays of any shape along axis 0 (each distinct frame is read
    once, each chunk decoded once), which is what :meth:`WindowSampler.gather` needs.
    """

    def __init__(self, array: zarr.Array, n: int):
        self._array = array
        self.shape = (n,) + tuple(array.shape[1:])
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self._direct = direct_chunk_reader(array)

    def __len__(self) -> int:
        return self.shape[0]

    def _frames(self, uniq: np.ndarray) -> np.ndarray:
        """Frames at sorted unique indices ``uniq``."""
        if self._direct is None:
            return self._array.get_orthogonal_selection((uniq,))
        read, steps = self._direct
        out = np.empty((len(uniq),) + self.shape[1:], self.dtype)
        chunk_of = uniq // steps
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(uniq)]):
            c = int(chunk_of[lo])
            out[lo:hi] = read(c)[uniq[lo:hi] - c * steps]
        return out

    def __getitem__(self, idx):
        rest = ()
        if isinstance(idx, tuple):
            idx, rest = idx[0], idx[1:]
        n = self.shape[0]
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            out = self._array[start:stop] if stop > start else np.empty((0,) + self.shape[1:],
                                                                        self.dtype)
            out, lead = out[::step], 1
        else:
            flat = np.asarray(idx)
            if not np.issubdtype(flat.dtype, np.integer):
                raise TypeError(f"LazyArray: index must be int, slice or integer array, "
                                f"got {flat.dtype}")
            flat = np.where(flat < 0, flat + n, flat)
            if flat.size and (flat.min() < 0 or flat.max() >= n):
                raise IndexError(f"LazyArray: index out of range for {n} steps")
            uniq, inv = np.unique(flat.ravel(), return_inverse=True)
            frames = self._frames(uniq) if uniq.size else \
                np.empty((0,) + self.shape[1:], self.dtype)
            out, lead = frames[inv].reshape(flat.shape + self.shape[1:]), flat.ndim
        return out[(slice(None),) * lead + rest] if rest else out

    def __repr__(self) -> str:
        return f"LazyArray(shape={self.shape}, dtype={self.dtype})"

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)
