"""Token access and batch assembly for the training stream.

``TokenStore`` memory-maps every shard of every dataset of a lock (opened lazily, once per
process) and answers, vectorised, "where are the tokens and loss spans of sample (d, i)".

``pack_rows`` is best-fit-decreasing bin packing of one look-ahead window of pieces into rows
of ``seq_len`` tokens; ``collate_packed`` writes a packed batch in one compiled pass over its
rows (both loops in train/kernels.py); ``collate_padded`` / ``collate_concat`` turn the pieces
of one batch into tensors. A *piece* is ``[a, b)`` of sample ``(d, i)``: a whole sample,
or a part of an over-long one after the overflow policy (then a document of its own).

Label convention (HF causal LM, the model shifts): ``labels[t] = input_ids[t]`` where token t is
trained (inside a loss span; every token of a sample without spans), else -100; the first token
of every document (packed/padded) or row (concat) is -100, since nothing before it in the same
document predicts it. So ``n_trained`` counts exactly the predictions that carry loss.
"""
from __future__ import annotations

import sys
import threading

import numpy as np
import torch

from stages.shard import read_shard

from .kernels import bfd_rows, fill_packed, packed_layout, rows_csr, seeded_rows, token_table

IGNORE = -100


def ranges_index(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) over the pairs, vectorised."""
    lens = np.asarray(ends, np.int64) - np.asarray(starts, np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.asarray(starts, np.int64) - (np.cumsum(lens) - lens)
    return np.repeat(shift, lens) + np.arange(total, dtype=np.int64)


def _check_index(path, sh) -> None:
    """Offsets that stay inside their arrays: the compiled batch fill reads tokens and spans
    at them without bounds checks, so a damaged index must fail here, not there."""
    def ok(offsets, size):
        o = np.asarray(offsets)
        return len(o) > 0 and o[0] == 0 and o[-1] <= size and bool((np.diff(o) >= 0).all())
    if not ok(sh.offsets, len(sh.tokens)):
        raise ValueError(f"{path}: offsets are not a non-decreasing index from 0 into the "
                         f"{len(sh.tokens)} tokens")
    if sh.loss_spans is not None and not ok(sh.loss_span_offsets, len(sh.loss_spans)):
        raise ValueError(f"{path}: loss_span_offsets are not a non-decreasing index from 0 into "
                         f"the {len(sh.loss_spans)} loss spans")


class TokenStore:
    """All shards of all datasets, memory-mapped. Per-sample memory: the shards' own `offsets`
    (and `loss_span_offsets`) concatenated; tokens stay on disk (np.memmap, plain views)."""

    def __init__(self, shard_paths: list[list[str]]):
        self.tokens: list[np.ndarray] = []
        offs, lsos, spans, has = [], [], [], []
        ds_base, first = [0], [0]
        off_base, span_base = [], 0
        pos = 0
        for paths in shard_paths:
            for p in paths:
                sh = read_shard(p, mmap=True)
                _check_index(p, sh)
                tok = sh.tokens
                self.tokens.append(tok.view(np.ndarray) if isinstance(tok, np.memmap) else tok)
                off_base.append(pos)
                offs.append(np.asarray(sh.offsets, np.int64))
                pos += len(sh.offsets)
                n = sh.n_samples
                first.append(first[-1] + n)
                if sh.loss_spans is not None:
                    sp = np.asarray(sh.loss_spans, np.int32).reshape(-1, 2)
                    lsos.append(np.asarray(sh.loss_span_offsets, np.int64) + span_base)
                    spans.append(sp)
                    span_base += len(sp)
                    has.append(True)
                else:
                    lsos.append(np.full(n + 1, span_base, np.int64))
                    has.append(False)
            ds_base.append(first[-1])
        self.ds_base = np.asarray(ds_base, np.int64)  # global sample id of each dataset's sample 0
        self.first = np.asarray(first, np.int64)  # global sample id of each shard's sample 0
        self.off_base = np.asarray(off_base, np.int64)
        self.off_all = np.concatenate(offs) if offs else np.zeros(0, np.int64)
        self.lso_all = np.concatenate(lsos) if lsos else np.zeros(0, np.int64)
        self.spans_all = np.concatenate(spans) if spans else np.zeros((0, 2), np.int32)
        self.span_lo = np.ascontiguousarray(self.spans_all[:, 0])  # 1-D: cheaper to gather
        self.span_hi = np.ascontiguousarray(self.spans_all[:, 1])
        self.has_spans = np.asarray(has, bool)
        self._kernel_args = self._kernel_arrays = None  # built on first use (kernel_args)

    def kernel_args(self) -> tuple:
        """What `kernels.fill_packed` needs of the store (built once per process)."""
        if self._kernel_args is None:
            addr, proto, self._kernel_arrays = token_table(self.tokens)
            self._kernel_args = (addr, proto, self.span_lo, self.span_hi)
        return self._kernel_args

    def locate(self, d: np.ndarray, i: np.ndarray):
        """(shard id, index into off_all) of samples (d, i)."""
        gsid = self.ds_base[d] + i
        g = np.searchsorted(self.first, gsid, side="right") - 1
        return g, self.off_base[g] + (gsid - self.first[g])

    def lengths(self, d: np.ndarray, i: np.ndarray) -> np.ndarray:
        _, k = self.locate(d, i)
        return self.off_all[k + 1] - self.off_all[k]

    def last_tokens(self, d: np.ndarray, i: np.ndarray) -> np.ndarray:
        g, k = self.locate(d, i)
        end = self.off_all[k + 1]
        out = np.full(len(d), -1, np.int64)
        for gg in np.unique(g).tolist():
            sel = np.flatnonzero((g == gg) & (end > self.off_all[k]))
            out[sel] = self.tokens[gg][end[sel] - 1]
        return out

    def fill(self, ids: np.ndarray, d, i, a, b, dst) -> tuple[np.ndarray, np.ndarray]:
        """Copy tokens [a, b) of samples (d, i) to ids[dst:]; returns (shard, off index)."""
        g, k = self.locate(d, i)
        src = self.off_all[k] + a
        toks = self.tokens
        for gg, s, t, m in zip(g.tolist(), src.tolist(), np.asarray(dst).tolist(),
                               (b - a).tolist()):
            ids[t:t + m] = toks[gg][s:s + m]
        return g, k

    def trained_mask(self, total: int, g, k, a, b, dst) -> np.ndarray:
        """Boolean mask over the flat batch: token trained per the loss spans of each piece
        (pieces from shards without spans: all trained)."""
        a = np.asarray(a, np.int64)
        b = np.asarray(b, np.int64)
        dst = np.asarray(dst, np.int64)
        sp = self.has_spans[g]
        if not sp.any():
            return mask_from_intervals(total, dst, dst + (b - a))
        w = np.flatnonzero(sp)
        s0, s1 = self.lso_all[k[w]], self.lso_all[k[w] + 1]
        rows = self.spans_all[ranges_index(s0, s1)]
        own = np.repeat(w, s1 - s0)
        aa, bb, dd = a[own], b[own], dst[own]
        lo = np.clip(rows[:, 0], aa, bb) - aa + dd
        hi = np.clip(rows[:, 1], aa, bb) - aa + dd
        if not sp.all():
            lo = np.concatenate([lo, dst[~sp]])
            hi = np.concatenate([hi, dst[~sp] + (b - a)[~sp]])
        return mask_from_intervals(total, lo, hi)


def mask_from_intervals(total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Union of [lo, hi) intervals (any order, may overlap) as a boolean mask of `total`."""
    if len(lo) == 0:
        return np.zeros(total, bool)
    o = np.argsort(lo, kind="stable")
    lo, hi = lo[o], np.maximum.accumulate(hi[o])
    lo[1:] = np.maximum(lo[1:], hi[:-1])
    keep = hi > lo
    lo, hi = lo[keep], hi[keep]
    m = len(lo)
    if m == 0:
        return np.zeros(total, bool)
    runs = np.empty(2 * m + 1, np.int64)
    runs[0] = lo[0]
    runs[2:-1:2] = lo[1:] - hi[:-1]
    runs[1::2] = hi - lo
    runs[-1] = total - hi[-1]
    vals = np.zeros(2 * m + 1, bool)
    vals[1::2] = True
    return np.repeat(vals, runs)


def best_fit_rows(lengths: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Best-fit decreasing: items (all 0 < len <= cap) in order of decreasing length (ties by
    position) go to the open row with the least room that still fits them (ties: the row
    opened first). Returns (that item order, row of each item in it, number of rows)."""
    lengths = np.asarray(lengths, np.int64)
    order = (np.zeros(0, np.int64) if cap <= 1 << 17 else  # counted in the kernel
             np.argsort(cap - lengths, kind="stable"))
    return bfd_rows(lengths, order, int(cap))


def pack_rows(lengths: np.ndarray, cap: int,
              row_key: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing (see `best_fit_rows`) as CSR (item order, row_ptr), items of a row
    in placement order, rows in opening order, or with `row_key` in the seeded order
    argsort(mix64(row ^ row_key))."""
    order, rows, nrows = best_fit_rows(lengths, cap)
    if row_key is not None and nrows > 1:
        rows = seeded_rows(rows, nrows, np.uint64(row_key))
    return rows_csr(order, rows, nrows)


def _tensors(ids, labels, **extra) -> dict:
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    out.update(extra)
    return out


def _samples(d, i) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(d, np.int64), np.asarray(i, np.int64)], 1))


class PackedPieces:
    """One window's pieces in row order, as `kernels.fill_packed` reads them (built when a
    batch of the window is read: a worker that only walks past a window needs its row count,
    not its layout). `packing`: best_fit_rows' result and the row order key (None: rows in
    opening order)."""

    def __init__(self, store: TokenStore, d, i, a, b, g, k, packing: tuple):
        order, rows, nrows, key = packing
        self.row_ptr, self.table, self.samples = packed_layout(
            order, rows, nrows, np.uint64(key or 0), key is not None, d, i, a, b, g, k,
            store.off_all, store.lso_all, store.has_spans)


class BlockPool:
    """Output blocks of packed batches, reused once the caller has dropped every tensor of
    the batch that used one (the tensors hold the only other references to a block). A fresh
    block costs a page fault per 4 KiB on first write - as much as writing the batch - so a
    trainer that holds a batch or two while the next is made would pay it on every batch."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.blocks: list[np.ndarray] = []
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def take(self, shape: tuple) -> np.ndarray:
        with self._lock:
            for k in range(len(self.blocks)):
                # references to a free block: the list, and getrefcount's own argument
                if self.blocks[k].shape == shape and sys.getrefcount(self.blocks[k]) == 2:
                    return self.blocks[k]
            block = np.empty(shape, np.int64)
            if len(self.blocks) < min(8, max(2, self.max_bytes // block.nbytes)):
                self.blocks.append(block)
            else:  # keep the newest blocks: the batch shape may have changed
                self.blocks = self.blocks[1:] + [block]
            return block


def collate_packed(store: TokenStore, segs: list, nrows: int, seq_len: int, pad_id: int,
                   pool: BlockPool | None = None) -> dict:
    """Rows [u0, u1) of each (PackedPieces, u0, u1) in segs, back to back, then all-padding
    rows up to nrows (the end of a finite stream). input_ids, labels and position_ids are
    views of one block (from `pool` when given)."""
    L = seq_len
    n = nrows * L
    out = pool.take((3, n)) if pool is not None else np.empty((3, n), np.int64)
    cu = np.zeros(sum(int(w.row_ptr[u1] - w.row_ptr[u0]) for w, u0, u1 in segs) + nrows + 1,
                  np.int32)
    addr, proto, lo, hi = store.kernel_args()
    ncu, at, trained, longest, smp = 1, 0, 0, 0, []
    for w, u0, u1 in segs:
        ncu, tr, lg = fill_packed(addr, proto, w.table, lo, hi, w.row_ptr, u0, u1, L, pad_id,
                                  out, cu, ncu, at)
        trained, longest, at = trained + tr, max(longest, lg), at + (u1 - u0) * L
        smp.append(w.samples[w.row_ptr[u0]:w.row_ptr[u1]])
    ids, labels, pos = out
    if at < n:  # missing rows: all padding, one segment each, untrained
        ids[at:], labels[at:] = pad_id, IGNORE
        pos[at:] = np.tile(np.arange(L, dtype=np.int64), (n - at) // L)
        cu[ncu:ncu + (n - at) // L] = np.arange(at + L, n + 1, L)
        ncu, longest = ncu + (n - at) // L, L
    samples = np.concatenate(smp) if len(smp) > 1 else smp[0].copy() if smp else \
        np.zeros((0, 2), np.int64)
    o = out.reshape(3, nrows, L)  # (tensors of numpy views: cheaper than torch indexing)
    return {"input_ids": torch.from_numpy(o[0]), "labels": torch.from_numpy(o[1]),
            "position_ids": torch.from_numpy(o[2]),
            "cu_seqlens": torch.from_numpy(cu[:ncu]), "max_seqlen": int(longest),
            "n_trained": int(trained), "samples": torch.from_numpy(samples)}


def collate_padded(store: TokenStore, d, i, a, b, row, nrows: int, pad_id: int) -> dict:
    """One piece per row, right-padded to the longest in the batch."""
    n = b - a
    width = max(1, int(n.max()) if len(n) else 1)
    total = nrows * width
    dst = row * width
    ids = np.full(total, pad_id, np.int64)
    g, k = store.fill(ids, d, i, a, b, dst)
    mask = store.trained_mask(total, g, k, a, b, dst)
    mask[dst] = False
    labels = np.where(mask, ids, IGNORE)
    row_len = np.zeros(nrows, np.int64)
    row_len[row] = n
    att = (np.arange(width)[None, :] < row_len[:, None]).astype(np.int64)
    return _tensors(
        ids.reshape(nrows, width), labels.reshape(nrows, width),
        attention_mask=torch.from_numpy(att),
        n_trained=int(np.count_nonzero(mask)), samples=_samples(d, i))


def collate_concat(store: TokenStore, d, i, a, b, nreal, dst, nrows: int, seq_len: int,
                   pad_id: int, eos_id: int) -> dict:
    """Pieces [a, b) of documents in virtual coordinates (a document of nreal tokens that does
    not end with EOS has a virtual EOS at nreal), at flat positions dst of [nrows, seq_len]."""
    total = nrows * seq_len
    bc = np.minimum(b, nreal)
    ids = np.full(total, pad_id, np.int64)
    g, k = store.fill(ids, d, i, a, bc, dst)
    mask = store.trained_mask(total, g, k, a, bc, dst)
    eos_at = np.flatnonzero(b > nreal)
    if eos_at.size:
        p = dst[eos_at] + (nreal[eos_at] - a[eos_at])
        ids[p] = eos_id
        mask[p] = True
    mask[::seq_len] = False
    labels = np.where(mask, ids, IGNORE)
    return _tensors(
        ids.reshape(nrows, seq_len), labels.reshape(nrows, seq_len),
        n_trained=int(np.count_nonzero(mask)), samples=_samples(d, i))
