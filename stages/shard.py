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


def concat_shards(inputs: list[str | Path], output: str | Path, source: str) -> str:
    """Join unit shards, in order, into one shard file (written like `write_shard`: the same
    datasets, attrs and contiguous layout; one input gives the bytes write_shard gives for its
    arrays). Copies one dataset at a time, unit by unit: memory O(largest unit). → sha256."""
    inputs = [Path(p) for p in inputs]
    files = [h5py.File(p, "r") for p in inputs]
    try:
        spans = {"loss_spans" in f for f in files}
        if len(spans) > 1:
            raise ValueError(f"{output}: cannot join shards with and without loss spans")
        has_spans = spans == {True}
        tdtypes = {f["tokens"].dtype for f in files}
        if len(tdtypes) > 1:
            raise ValueError(f"{output}: units have different token dtypes {sorted(map(str, tdtypes))}")
        tdtype = tdtypes.pop() if files else np.dtype(np.uint16)
        n_tok = [len(f["tokens"]) for f in files]
        n_smp = [len(f["offsets"]) - 1 for f in files]
        n_spn = [len(f["loss_spans"]) for f in files] if has_spans else []
        with h5py.File(output, "w", track_order=False, libver=("earliest", "v110")) as out:
            def put(name, dtype, parts, shape_tail=()):
                """parts: (length, function giving that unit's block) per unit."""
                total = sum(m for m, _ in parts)
                d = out.create_dataset(name, shape=(total,) + shape_tail, dtype=dtype,
                                       track_times=False)
                at = 0
                for m, block in parts:
                    if m:
                        d[at:at + m] = np.ascontiguousarray(block(), dtype=dtype)
                    at += m

            put("tokens", tdtype, [(m, lambda f=f: f["tokens"][...]) for f, m in zip(files, n_tok)])
            put("offsets", np.int64, _index_parts(files, "offsets", n_smp, n_tok))
            put("source_record", np.int64,
                [(m, lambda f=f: f["source_record"][...]) for f, m in zip(files, n_smp)])
            if has_spans:
                put("loss_spans", np.int32,
                    [(m, lambda f=f: f["loss_spans"][...].reshape(-1, 2)) for f, m in zip(files, n_spn)],
                    (2,))
                put("loss_span_offsets", np.int64, _index_parts(files, "loss_span_offsets", n_smp, n_spn))
            out.attrs["format_version"] = FORMAT_VERSION
            out.attrs["source"] = source
            out.attrs["n_samples"] = sum(n_smp)
            out.attrs["n_tokens"] = sum(n_tok)
    finally:
        for f in files:
            f.close()
    return file_sha256(output)


def _index_parts(files, name: str, n_items: list[int], n_targets: list[int]) -> list:
    """Blocks of a joined n+1 index: unit 0 whole, later units without their leading 0,
    each shifted by the targets (tokens or spans) of the units before it."""
    parts, base = [], 0
    for u, (f, m) in enumerate(zip(files, n_items)):
        lo = 0 if u == 0 else 1
        parts.append((m + 1 - lo, lambda f=f, lo=lo, base=base: f[name][lo:].astype(np.int64) + base))
        base += n_targets[u]
    if not files:
        parts.append((1, lambda: np.zeros(1, np.int64)))
    return parts
