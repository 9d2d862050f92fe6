"""The shard writers: `write_shard` (one shard from whole arrays) and `concat_shards` (unit
shards joined, in order, into one). Each dataset is written as one contiguous, uncompressed
block, so readers can memory-map it, and the bytes depend only on the data (no timestamps:
HDF5 object-time tracking is off).
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .layout import FORMAT_VERSION, ShardArrays, _files_array, file_sha256
from .reader import read_provenance


def write_shard(path: str | Path, arrays: ShardArrays, source: str | None = None) -> str:
    """Write one shard atomically-by-caller (path should be a temp name); return its sha256.
    Provenance: `arrays.source_files`/`source_file_offsets`, or else every sample is of the
    one file `source`."""
    path = Path(path)
    files, sfo = arrays.source_files, arrays.source_file_offsets
    if files is None:
        if source is None:
            raise ValueError(f"{path}: write_shard needs source_files or a source")
        files, sfo = [source], np.array([0, arrays.n_samples], np.int64)
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
        fa = _files_array(files)
        put("source_files", fa, fa.dtype)
        put("source_file_offsets", sfo, np.int64)
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["n_samples"] = arrays.n_samples
        f.attrs["n_tokens"] = int(len(arrays.tokens))
    return file_sha256(path)


class _Unit:
    """One input of concat_shards, known by the byte ranges of its contiguous datasets: it is
    opened with h5py once (here), and its blocks are then read as plain bytes — a shard may
    join 10^4 units, more than a process may keep open as HDF5 files."""

    def __init__(self, path: Path):
        self.path, self.layout = path, {}
        with h5py.File(path, "r") as f:
            for name in ("tokens", "offsets", "source_record", "loss_spans", "loss_span_offsets"):
                if name in f:
                    d = f[name]
                    self.layout[name] = (d.id.get_offset() if d.size else None, d.dtype, d.shape)
            self.n_samples = len(f["offsets"]) - 1
            self.runs = read_provenance(f, self.n_samples)
            self.fallback = {name: f[name][...] for name, (off, _, shape) in self.layout.items()
                             if off is None and np.prod(shape)}  # not contiguous: never our writer's

    def size(self, name: str) -> int:
        return self.layout[name][2][0]

    def read(self, name: str) -> np.ndarray:
        off, dtype, shape = self.layout[name]
        if name in self.fallback:
            return self.fallback[name]
        if off is None:
            return np.zeros(shape, dtype)
        return np.fromfile(self.path, dtype=dtype, count=int(np.prod(shape)), offset=off).reshape(shape)


def concat_shards(inputs: list[str | Path], output: str | Path) -> str:
    """Join unit shards, in order, into one shard file (written like `write_shard`: the same
    datasets, attrs and contiguous layout; one input gives the bytes write_shard gives for its
    arrays). The inputs may be of different source files: their runs are joined, and a file
    continued by the next input stays one run. Copies one dataset at a time, unit by unit, one
    input file open at a time: memory O(largest unit + files). → sha256."""
    units = [_Unit(Path(p)) for p in inputs]
    spans = {"loss_spans" in u.layout for u in units}
    if len(spans) > 1:
        raise ValueError(f"{output}: cannot join shards with and without loss spans")
    has_spans = spans == {True}
    tdtypes = {u.layout["tokens"][1] for u in units}
    if len(tdtypes) > 1:
        raise ValueError(f"{output}: units have different token dtypes {sorted(map(str, tdtypes))}")
    tdtype = tdtypes.pop() if units else np.dtype(np.uint16)
    n_tok = [u.size("tokens") for u in units]
    n_smp = [u.n_samples for u in units]
    n_spn = [u.size("loss_spans") for u in units] if has_spans else []
    src_files, sfo = _joined_runs([u.runs for u in units])
    with h5py.File(output, "w", track_order=False, libver=("earliest", "v110")) as out:
        def put(name, dtype, parts, shape_tail=()):
            """parts: (length, function giving that unit's block) per unit."""
            total = sum(m for m, _ in parts)
            d = out.create_dataset(name, shape=(total,) + shape_tail, dtype=dtype, track_times=False)
            at = 0
            for m, block in parts:
                if m:
                    d[at:at + m] = np.ascontiguousarray(block(), dtype=dtype)
                at += m

        put("tokens", tdtype, [(m, lambda u=u: u.read("tokens")) for u, m in zip(units, n_tok)])
        put("offsets", np.int64, _index_parts(units, "offsets", n_smp, n_tok))
        put("source_record", np.int64,
            [(m, lambda u=u: u.read("source_record")) for u, m in zip(units, n_smp)])
        if has_spans:
            put("loss_spans", np.int32,
                [(m, lambda u=u: u.read("loss_spans").reshape(-1, 2)) for u, m in zip(units, n_spn)],
                (2,))
            put("loss_span_offsets", np.int64, _index_parts(units, "loss_span_offsets", n_smp, n_spn))
        fa = _files_array(src_files)
        put("source_files", fa.dtype, [(len(fa), lambda: fa)])
        put("source_file_offsets", np.int64, [(len(sfo), lambda: sfo)])
        out.attrs["format_version"] = FORMAT_VERSION
        out.attrs["n_samples"] = sum(n_smp)
        out.attrs["n_tokens"] = sum(n_tok)
    return file_sha256(output)


def _index_parts(units, name: str, n_items: list[int], n_targets: list[int]) -> list:
    """Blocks of a joined n+1 index: unit 0 whole, later units without their leading 0,
    each shifted by the targets (tokens or spans) of the units before it."""
    parts, base = [], 0
    for k, (u, m) in enumerate(zip(units, n_items)):
        lo = 0 if k == 0 else 1
        parts.append((m + 1 - lo, lambda u=u, lo=lo, base=base: u.read(name)[lo:].astype(np.int64) + base))
        base += n_targets[k]
    if not units:
        parts.append((1, lambda: np.zeros(1, np.int64)))
    return parts


def _joined_runs(runs: list[tuple[list[str], np.ndarray]]) -> tuple[list[str], np.ndarray]:
    """The (files, file offsets) of units joined in order: each unit's runs shifted by the
    samples before it; a unit whose first file is the previous unit's last continues that run."""
    files, ends, base = [], [], 0
    for fs, sfo in runs:
        for j, name in enumerate(fs):
            end = base + int(sfo[j + 1])
            if j == 0 and files and files[-1] == name:
                ends[-1] = end
            else:
                files.append(name)
                ends.append(end)
        base += int(sfo[-1])
    return files, np.array([0] + ends, np.int64)
