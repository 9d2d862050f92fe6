"""The shard format's invariants, checked in bounded memory.

`check_arrays` is the one structural check of a shard's arrays (offsets 0 … len(tokens)
non-decreasing, loss_span_offsets 0 … len(loss_spans) non-decreasing, every span inside its
sample, provenance runs, token ids < vocab). It walks the arrays in blocks of `block`
entries through an accessor, so the same code checks arrays in memory, memory maps (the
stream's first map of a small shard) and a file read block by block (`shard_file_faults`,
`pipeline verify`): memory O(block), never O(shard). `shard_file_faults` adds what only the
file can tell (format version, datasets present, contiguous layout, meta.json's layout).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .layout import READABLE_FORMATS, decode_files, expected_layout_faults, shard_layout

BLOCK = 1 << 20  # entries per block (8 MiB of int64 offsets)


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


class _InMemory:
    """Accessor over a dict of arrays (numpy arrays or memory maps)."""

    def __init__(self, arr: dict):
        self.arr = dict(arr)
        if "loss_spans" in self.arr:
            self.arr["loss_spans"] = np.asarray(self.arr["loss_spans"]).reshape(-1, 2)

    def has(self, name):
        return name in self.arr

    def len(self, name):
        return len(self.arr[name])

    def get(self, name, a, b):
        return np.asarray(self.arr[name][a:b])

    def whole(self, name):
        return self.arr[name]


class _FileBlocks:
    """Accessor reading blocks of a shard's contiguous datasets with plain reads (no map: the
    pages read do not stay in this process's RSS), placed by its layout."""

    def __init__(self, path, layout: dict, files=None):
        self.f, self.layout, self.files = open(path, "rb"), layout, files

    def close(self):
        self.f.close()

    def has(self, name):
        return name in self.layout or (name == "source_files" and self.files is not None)

    def len(self, name):
        return self.layout[name]["shape"][0]

    def get(self, name, a, b):
        lay = self.layout[name]
        dt, tail = np.dtype(lay["dtype"]), tuple(lay["shape"][1:])
        row = int(np.prod(tail)) if tail else 1
        b = min(b, lay["shape"][0])
        if b <= a or lay["offset"] is None:
            return np.zeros((0,) + tail, dt)
        self.f.seek(lay["offset"] + a * row * dt.itemsize)
        return np.fromfile(self.f, dt, (b - a) * row).reshape((-1,) + tail)

    def whole(self, name):
        return self.files if name == "source_files" else self.get(name, 0, self.len(name))


def _index_ok(acc, name: str, last: int, block: int) -> bool:
    """acc's `name` is a non-decreasing index from 0 to `last` (at least one entry)."""
    m = acc.len(name)
    if m < 1 or acc.get(name, 0, 1)[0] != 0 or acc.get(name, m - 1, m)[0] != last:
        return False
    for a in range(0, m, block):
        if bool((np.diff(acc.get(name, max(a - 1, 0), a + block)) < 0).any()):
            return False
    return True


def check_arrays(arr: dict, vocab_size: int, *, tokens: bool = True,
                 sorted_spans: bool = False, block: int = BLOCK) -> list[str]:
    """Structure of one shard's arrays (numpy arrays or memory maps of exact dtypes):
    offsets 0 … len(tokens) non-decreasing, loss_span_offsets 0 … len(loss_spans)
    non-decreasing, every span inside its sample ([s, e), 0 <= s < e <= length; sorted and
    disjoint with sorted_spans), and (tokens=True) every token id < vocab_size. Read in
    blocks of `block` entries."""
    return _check(_InMemory(arr), vocab_size, tokens, sorted_spans, block)


def _check(acc, vocab_size: int, tokens: bool, sorted_spans: bool, block: int) -> list[str]:
    out = []
    ntok = acc.len("tokens")
    n = acc.len("offsets") - 1
    if n < 0 or not _index_ok(acc, "offsets", ntok, block):
        return [f"offsets are not a non-decreasing index from 0 to the {ntok} tokens"]
    if acc.has("source_record"):
        if acc.len("source_record") != n:
            out.append(f"source_record has {acc.len('source_record')} entries for {n} samples")
        elif n:
            low = min(int(acc.get("source_record", a, a + block).min()) for a in range(0, n, block))
            if low < 0:
                out.append(f"source_record has a negative record number {low}")
    if acc.has("source_file_offsets"):  # O(source files): read whole
        out += provenance_faults(np.asarray(acc.whole("source_file_offsets")),
                                 acc.whole("source_files") if acc.has("source_files") else None, n)
    if tokens and ntok:
        top = max(int(acc.get("tokens", a, a + block).max()) for a in range(0, ntok, block))
        if top >= vocab_size:
            out.append(f"token id {top} >= vocab size {vocab_size}")
    if acc.has("loss_spans"):
        nsp = acc.len("loss_spans")
        if acc.len("loss_span_offsets") != n + 1 or not _index_ok(acc, "loss_span_offsets", nsp, block):
            return out + [f"loss_span_offsets are not a non-decreasing index from 0 to the "
                          f"{nsp} loss spans"]
        bad = _span_fault(acc, n, sorted_spans, block)
        if bad is not None:
            span, owner, length = bad
            out.append(f"loss span {span} of sample {owner} lies outside the sample (length "
                       f"{length})" + (" or is empty or out of order" if sorted_spans else ""))
    return out


def _span_fault(acc, n: int, sorted_spans: bool, block: int):
    """(span, sample, sample length) of the first span outside its sample (empty or out of
    order too, with sorted_spans), or None. Samples in blocks; a block's spans in blocks."""
    prev_owner, prev_end = -1, 0  # the last span of the previous block (order across blocks)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        off = acc.get("offsets", i0, i1 + 1).astype(np.int64)
        lso = acc.get("loss_span_offsets", i0, i1 + 1).astype(np.int64)
        lengths = np.diff(off)
        for k0 in range(int(lso[0]), int(lso[-1]), block):
            k1 = min(k0 + block, int(lso[-1]))
            spans = acc.get("loss_spans", k0, k1)
            owner = np.searchsorted(lso, np.arange(k0, k1), side="right") - 1  # local sample
            s0, s1 = spans[:, 0].astype(np.int64), spans[:, 1].astype(np.int64)
            bad = (s0 < 0) | (s1 < s0) | (s1 > lengths[owner])
            if sorted_spans:
                bad |= s1 == s0
                glob = owner + i0
                p_owner = np.concatenate([[prev_owner], glob[:-1]])
                p_end = np.concatenate([[prev_end], s1[:-1]])
                bad |= (glob == p_owner) & (s0 < p_end)
                prev_owner, prev_end = int(glob[-1]), int(s1[-1])
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                return spans[j].tolist(), int(owner[j] + i0), int(lengths[owner[j]])
    return None


def shard_file_faults(path: str | Path, entry: dict, vocab_size: int, *,
                      block: int = BLOCK) -> list[str]:
    """Every structural fault of one shard file against its meta.json entry (`entry`: n_samples,
    n_tokens, optional arrays): format version, datasets present, contiguous layout equal to the
    entry's, then check_arrays (sorted spans, token ids) read from the file block by block.
    Memory O(block + source files), whatever the shard's size. OSError: unreadable."""
    import h5py
    p = Path(path)
    layout = shard_layout(p)
    with h5py.File(p, "r") as h:
        version = int(h.attrs.get("format_version", -1))
        if version not in READABLE_FORMATS:
            return [f"format_version {h.attrs.get('format_version')} unsupported "
                    f"(want one of {list(READABLE_FORMATS)})"]
        need = ("tokens", "offsets", "source_record") + (
            ("source_files", "source_file_offsets") if version >= 2 else ())
        for name in need:
            if name not in h:
                return [f"dataset '{name}' missing"]
        if version == 1 and "source" not in h.attrs:
            return ["attribute 'source' missing (format 1)"]
        out = expected_layout_faults(layout, int(entry["n_samples"]), int(entry["n_tokens"]),
                                     vocab_size, p.stat().st_size)
        if h["tokens"].chunks is not None or h["tokens"].compression is not None:
            out.append("tokens is chunked or compressed (must be contiguous)")
        if entry.get("arrays") is not None and entry["arrays"] != layout:
            out.append("arrays in meta.json differ from the file's datasets")
        if version >= 2 and (h["source_files"].ndim != 1 or h["source_files"].dtype.kind != "S"):
            out.append(f"source_files must be 1-D byte strings, not {h['source_files'].dtype} "
                       f"{list(h['source_files'].shape)}")
        if out:
            return out
        files = h["source_files"][...] if version >= 2 else None
    acc = _FileBlocks(p, layout, files)
    try:
        return _check(acc, vocab_size, True, True, block)
    finally:
        acc.close()
