"""The shard readers: `read_shard` (h5py; tokens memory-mapped), `map_shard` (every numeric
dataset as a read-only view of one memory map, placed by the byte layout a meta.json entry
records - no h5py, no file descriptor held) and provenance (`shard_provenance`).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import weakref
from pathlib import Path

import h5py
import numpy as np

from .layout import Provenance, ShardArrays, decode_files


def _memmap_or_read(path: Path, dset: h5py.Dataset) -> np.ndarray:
    offset = dset.id.get_offset()
    if offset is None or dset.size == 0:  # empty or not contiguous: plain read
        return dset[...]
    return np.memmap(path, dtype=dset.dtype, mode="r", offset=offset, shape=dset.shape)


def read_shard(path: str | Path, mmap: bool = True) -> ShardArrays:
    """Open a shard. With mmap=True, `tokens` is a zero-copy np.memmap of the file; the small
    index arrays are read into memory. The h5py handle is closed before returning, so the
    result pickles and works in any process."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        tokens = _memmap_or_read(path, f["tokens"]) if mmap else f["tokens"][...]
        has_spans = "loss_spans" in f
        offsets = f["offsets"][...]
        files, sfo = read_provenance(f, len(offsets) - 1)
        return ShardArrays(
            tokens=tokens,
            offsets=offsets,
            source_record=f["source_record"][...],
            loss_spans=f["loss_spans"][...] if has_spans else None,
            loss_span_offsets=f["loss_span_offsets"][...] if has_spans else None,
            source_files=files,
            source_file_offsets=sfo,
        )


def read_provenance(f, n_samples: int) -> tuple[list[str], np.ndarray]:
    """(source_files, source_file_offsets) of an open shard of either format: a format 1
    shard is one run of its `source` attribute."""
    if "source_files" in f:
        return decode_files(f["source_files"][...]), f["source_file_offsets"][...].astype(np.int64)
    return [str(f.attrs.get("source", ""))], np.array([0, n_samples], np.int64)


def shard_provenance(path: str | Path, i: int) -> Provenance:
    """Provenance of sample i of one shard file (stages.built_dataset.BuiltDataset.provenance
    is the dir-level entry). Reads the file runs and the few source_record values it needs."""
    with h5py.File(path, "r") as f:
        recs = f["source_record"]
        files, sfo = read_provenance(f, len(f["offsets"]) - 1)
        run = int(np.searchsorted(sfo, i, side="right")) - 1
        if not (0 <= run < len(files) and sfo[run] <= i < sfo[run + 1] and i < len(recs)):
            raise ValueError(f"{path}: source_file_offsets do not cover sample {i}")
        rec = int(recs[i])
        # earlier pieces of the same record are right before it, inside its file's run
        piece, hi, start = 0, i, int(sfo[run])
        while hi > start:
            lo = max(start, hi - 64)
            other = np.flatnonzero(np.asarray(recs[lo:hi])[::-1] != rec)
            if other.size:
                return Provenance(files[run], rec, piece + int(other[0]))
            piece, hi = piece + hi - lo, lo
    return Provenance(files[run], rec, piece)




# ------------------------------------------------------------------ the memory-mapped reader
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_READ, _MAP_SHARED = mmap.PROT_READ, mmap.MAP_SHARED


def _map_file(path: str) -> tuple[object, int]:
    """(buffer, size) of a read-only shared map of the whole file, holding no descriptor:
    Python's mmap keeps a dup of the file's descriptor for as long as the map lives (one
    per shard: a lock of 10^3 shards exhausted `ulimit -n 1024`); a map made with mmap(2)
    directly needs none once made. Unmapped when the buffer (and every view of it) is gone."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return (ctypes.c_char * 0)(), 0
        addr = _libc.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
    finally:
        os.close(fd)
    buf = (type("_Map", (ctypes.c_char * size,), {})).from_address(addr)
    weakref.finalize(buf, _libc.munmap, addr, size)
    return buf, size


class MappedArrays:
    """A shard's numeric datasets as read-only views of one map of its file (the page cache,
    shared by every process of a node): `tokens`, `offsets`, and with spans `loss_spans`
    (m, 2) and `loss_span_offsets`; `view(name)` gives any dataset the layout names. No
    file descriptor is held; the map lives as long as any view of it."""

    __slots__ = ("layout", "size", "_buf", "tokens", "offsets", "loss_spans", "loss_span_offsets")

    def __init__(self, path: str | Path, layout: dict):
        self.layout = layout
        self._buf, self.size = _map_file(str(path))
        self.tokens, self.offsets = self.view("tokens"), self.view("offsets")
        self.loss_spans, self.loss_span_offsets = self.view("loss_spans"), self.view("loss_span_offsets")

    def view(self, name: str) -> np.ndarray | None:
        a = self.layout.get(name)
        if a is None:
            return None
        dt, shape = np.dtype(a["dtype"]), tuple(a["shape"])
        if a["offset"] is None:  # empty
            return np.zeros(shape, dt)
        v = np.frombuffer(self._buf, dt, int(np.prod(shape)), a["offset"]).reshape(shape)
        v.flags.writeable = False  # (the map is PROT_READ: a write would be a segfault)
        return v


def map_shard(path: str | Path, layout: dict) -> MappedArrays:
    """Map a shard by its byte layout (a meta.json entry's `arrays`, or layout.shard_layout).
    The layout must have passed layout.expected_layout_faults against the file's size: the
    views are placed by it, unchecked. OSError when the file cannot be opened or mapped."""
    return MappedArrays(path, layout)


def map_errno_is_limit(e: OSError) -> str | None:
    """'open files' / 'memory maps' when e is running out of that per-process resource."""
    if e.errno in (errno.EMFILE, errno.ENFILE):
        return "open files"
    if e.errno == errno.ENOMEM:
        return "memory maps (vm.max_map_count)"
    return None
