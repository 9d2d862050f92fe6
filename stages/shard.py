"""The shard file format (DESIGN §4): one HDF5 file per shard, token ids back to back.

Writers get whole arrays and write each dataset in one contiguous, uncompressed block, so
readers can memory-map `tokens` and the bytes depend only on the data (no timestamps:
HDF5 object-time tracking is off).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@dataclass
class ShardArrays:
    tokens: np.ndarray  # 1-D, token_dtype(vocab)
    offsets: np.ndarray  # int64, n+1, offsets[0] == 0
    source_record: np.ndarray  # int64, n
    loss_spans: np.ndarray | None = None  # int32 (m, 2), [start, end) relative to sample start
    loss_span_offsets: np.ndarray | None = None  # int64, n+1

    @property
    def n_samples(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def spans(self, i: int) -> np.ndarray | None:
        if self.loss_spans is None:
            return None
        return self.loss_spans[self.loss_span_offsets[i] : self.loss_span_offsets[i + 1]]


def write_shard(path: str | Path, arrays: ShardArrays, source: str) -> str:
    """Write one shard atomically-by-caller (path should be a temp name); return its sha256."""
    path = Path(path)
    # track_order + no times: identical input gives identical bytes.
    with h5py.File(path, "w", track_order=False, libver=("earliest", "v110")) as f:
        def put(name, data, dtype):
            data = np.ascontiguousarray(data, dtype=dtype)
            d = f.create_dataset(name, shape=data.shape, dtype=dtype, track_times=False)
            if data.size:
                d[...] = data
            return d

        put("tokens", arrays.tokens, arrays.tokens.dtype)
        put("offsets", arrays.offsets, np.int64)
        put("source_record", arrays.source_record, np.int64)
        if arrays.loss_spans is not None:
            put("loss_spans", arrays.loss_spans.reshape(-1, 2), np.int32)
            put("loss_span_offsets", arrays.loss_span_offsets, np.int64)
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["source"] = source
        f.attrs["n_samples"] = arrays.n_samples
        f.attrs["n_tokens"] = int(len(arrays.tokens))
    return file_sha256(path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


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
        return ShardArrays(
            tokens=tokens,
            offsets=f["offsets"][...],
            source_record=f["source_record"][...],
            loss_spans=f["loss_spans"][...] if has_spans else None,
            loss_span_offsets=f["loss_span_offsets"][...] if has_spans else None,
        )


def loss_mask(length: int, spans: np.ndarray | None) -> np.ndarray:
    """Boolean mask of trained positions for one sample (all True without spans)."""
    if spans is None:
        return np.ones(length, dtype=bool)
    mask = np.zeros(length, dtype=bool)
    for s, e in spans:
        mask[s:e] = True
    return mask
