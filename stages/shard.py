"""The shard file format (DESIGN §4): one HDF5 file per shard, token ids back to back.

Writers get whole arrays and write each dataset in one contiguous, uncompressed block, so
readers can memory-map `tokens` and the bytes depend only on the data (no timestamps:
HDF5 object-time tracking is off).

Provenance (format 2): a shard may join units of many source files. `source_files` lists
them in order and `source_file_offsets` (k+1, like `offsets`) gives each one's samples,
`[sfo[j], sfo[j+1])`; `source_record` is the record number inside that file. O(files) per
shard, not O(samples): a file's samples are consecutive because units are joined in source
order. Format 1 shards (one file, named by the `source` attribute) are read as one run.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: one source file per shard, in the `source` attribute


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
    source_files: list[str] | None = None  # k source files, in sample order (None: the writer's `source`)
    source_file_offsets: np.ndarray | None = None  # int64, k+1: file j has samples [sfo[j], sfo[j+1])

    @property
    def n_samples(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def spans(self, i: int) -> np.ndarray | None:
        if self.loss_spans is None:
            return None
        return self.loss_spans[self.loss_span_offsets[i] : self.loss_span_offsets[i + 1]]


@dataclass(frozen=True)
class Provenance:
    """Where a stored sample came from."""
    file: str  # the source file, as the build named it
    record: int  # 0-based record number in it (line / list element / parquet row)
    piece: int  # which stored sample of that record (0; more only when overflow: segment split it)


def _files_array(files: list[str]) -> np.ndarray:
    """The `source_files` dataset: UTF-8 paths as fixed-width byte strings (contiguous and
    byte-deterministic, unlike HDF5 variable-length strings in the global heap)."""
    raw = [f.encode("utf-8", "surrogateescape") for f in files]
    return np.array(raw, dtype=f"S{max([len(r) for r in raw] + [1])}")


def decode_files(raw) -> list[str]:
    return [bytes(x).decode("utf-8", "surrogateescape") for x in raw]


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


def provenance_faults(sfo: np.ndarray, files, n: int) -> list[str]:
    """source_file_offsets: an index 0 … n, non-decreasing, with one entry per source file + 1;
    source_files: one non-empty name per run."""
    if sfo.ndim != 1 or len(sfo) < 1 or sfo[0] != 0 or sfo[-1] != n or bool((np.diff(sfo) < 0).any()):
        return [f"source_file_offsets are not a non-decreasing index from 0 to the {n} samples"]
    if files is None:
        return []
    if len(files) != len(sfo) - 1:
        return [f"source_files has {len(files)} names for {len(sfo) - 1} source file runs"]
    if any(not x for x in decode_files(files)):
        return ["source_files has an empty name"]
    return []


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
