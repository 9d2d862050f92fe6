"""Token access and batch assembly for the training stream.

``train/store.py``'s ``TokenStore`` finds a window's samples in the memory-mapped shards
(a ``Located``); this module turns them into batches.

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

from stages.constants import IGNORE

from .kernels import bfd_rows, fill_packed, packed_layout, rows_csr, seeded_rows, token_table
from .store import Located, StreamError, TokenStore, ranges_index  # noqa: F401 (re-exported)


def last_tokens(loc: Located) -> np.ndarray:
    """Last token of each item (all non-empty)."""
    out = np.full(len(loc.d), -1, np.int64)
    for u in np.unique(loc.slot).tolist():
        sel = np.flatnonzero(loc.slot == u)
        out[sel] = loc.tokens[u][loc.start[sel] + loc.n[sel] - 1]
    return out


def fill_tokens(ids: np.ndarray, loc: Located, a, b, dst) -> None:
    """Copy tokens [a, b) of each item to ids[dst:]."""
    toks = loc.tokens
    for s, st, t, m in zip(loc.slot.tolist(), (loc.start + a).tolist(),
                           np.asarray(dst).tolist(), (b - a).tolist()):
        ids[t:t + m] = toks[s][st:st + m]


def trained_mask(total: int, loc: Located, a, b, dst) -> np.ndarray:
    """Boolean mask over the flat batch: token trained per the loss spans of each piece
    (pieces of samples without spans: all trained)."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    dst = np.asarray(dst, np.int64)
    sp = loc.q0 >= 0
    if not sp.any():
        return mask_from_intervals(total, dst, dst + (b - a))
    w = np.flatnonzero(sp)
    s0, s1 = loc.q0[w], loc.q1[w]
    rows = ranges_index(s0, s1)
    own = np.repeat(w, s1 - s0)
    aa, bb, dd = a[own], b[own], dst[own]
    lo = np.clip(loc.lo[rows], aa, bb) - aa + dd
    hi = np.clip(loc.hi[rows], aa, bb) - aa + dd
    if not sp.all():
        lo = np.concatenate([lo, dst[~sp]])
        hi = np.concatenate([hi, dst[~sp] + (b - a)[~sp]])
    return mask_from_intervals(total, lo, hi)


def label_rule(ids: np.ndarray, trained: np.ndarray, first) -> tuple[np.ndarray, np.ndarray]:
    """The label rule, numpy form (kernels._write_piece is the compiled form of the same rule,
    for packed batches): a token trains where `trained` (its loss spans) says so, never at
    `first` (a document's first token - a row's, in concat mode - has nothing before it to
    predict it from); labels = ids where it trains, IGNORE elsewhere. → (labels, mask)."""
    trained[first] = False
    return np.where(trained, ids, IGNORE), trained


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


def _segments(d, start, end) -> torch.Tensor:
    """(dataset, flat start, flat end) of each piece in the flattened [B * L] batch."""
    return torch.from_numpy(np.stack([np.asarray(d, np.int64), np.asarray(start, np.int64),
                                      np.asarray(end, np.int64)], 1).reshape(-1, 3))


def _packed_segments(w, u0: int, u1: int, at: int, L: int) -> np.ndarray:
    """_segments of rows [u0, u1) of a window's PackedPieces written from flat position at."""
    p0, p1 = int(w.row_ptr[u0]), int(w.row_ptr[u1])
    lens = w.table[2, p0:p1]
    per_row = np.diff(w.row_ptr[u0:u1 + 1])
    row = np.repeat(np.arange(u1 - u0, dtype=np.int64), per_row)
    cs = np.cumsum(lens) - lens  # exclusive, over the pieces of these rows
    if p1 == p0:
        return np.zeros((0, 3), np.int64)
    row_cs = cs[np.minimum(w.row_ptr[u0:u1] - p0, p1 - p0 - 1)]  # rows are never empty
    start = at + row * L + cs - row_cs[row]
    return np.stack([w.samples[p0:p1, 0], start, start + lens], 1).reshape(-1, 3)


def _tensors(ids, labels, **extra) -> dict:
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    out.update(extra)
    return out


def _samples(d, i) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(d, np.int64), np.asarray(i, np.int64)], 1))


class PackedPieces:
    """One window's pieces in row order, as `kernels.fill_packed` reads them (built when a
    batch of the window is read: a worker that only walks past a window needs its row count,
    not its layout). `loc`: the window's pieces (Located, with a/b their token ranges);
    `packing`: best_fit_rows' result and the row order key (None: rows in opening order).
    Holds the token table and spans of the window's shards while a batch reads them."""

    def __init__(self, loc: Located, a, b, packing: tuple):
        order, rows, nrows, key = packing
        self.row_ptr, self.table, self.samples = packed_layout(
            order, rows, nrows, np.uint64(key or 0), key is not None, loc.d, loc.i, a, b,
            loc.slot, loc.start, loc.q0, loc.q1)
        if loc.addr is not None:  # one dtype: the maps' own addresses (loc.tokens keeps them)
            self.addr, self._keep = loc.addr, loc.tokens
            self.proto = np.zeros(0, loc.tokens[0].dtype)
        elif loc.tokens:  # mixed dtypes: converted copies
            self.addr, self.proto, self._keep = token_table(loc.tokens)
        else:
            self.addr, self.proto, self._keep = np.zeros(0, np.int64), np.zeros(0, np.uint16), []
        self.lo = np.ascontiguousarray(loc.lo, np.int32)
        self.hi = np.ascontiguousarray(loc.hi, np.int32)


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


def collate_packed(segs: list, nrows: int, seq_len: int, pad_id: int,
                   pool: BlockPool | None = None) -> dict:
    """Rows [u0, u1) of each (PackedPieces, u0, u1) in segs, back to back, then all-padding
    rows up to nrows (the end of a finite stream). input_ids, labels and position_ids are
    views of one block (from `pool` when given)."""
    L = seq_len
    n = nrows * L
    out = pool.take((3, n)) if pool is not None else np.empty((3, n), np.int64)
    cu = np.zeros(sum(int(w.row_ptr[u1] - w.row_ptr[u0]) for w, u0, u1 in segs) + nrows + 1,
                  np.int32)
    ncu, at, trained, longest, smp, sgs = 1, 0, 0, 0, [], []
    for w, u0, u1 in segs:
        ncu, tr, lg = fill_packed(w.addr, w.proto, w.table, w.lo, w.hi, w.row_ptr, u0, u1, L,
                                  pad_id, out, cu, ncu, at)
        trained, longest, at = trained + tr, max(longest, lg), at + (u1 - u0) * L
        smp.append(w.samples[w.row_ptr[u0]:w.row_ptr[u1]])
        sgs.append(_packed_segments(w, u0, u1, at - (u1 - u0) * L, L))
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
            "n_trained": int(trained), "samples": torch.from_numpy(samples),
            "segments": torch.from_numpy(np.concatenate(sgs) if sgs else np.zeros((0, 3), np.int64))}


def collate_padded(loc: Located, a, b, row, nrows: int, pad_id: int) -> dict:
    """One piece per row, right-padded to the longest in the batch."""
    n = b - a
    width = max(1, int(n.max()) if len(n) else 1)
    total = nrows * width
    dst = row * width
    ids = np.full(total, pad_id, np.int64)
    fill_tokens(ids, loc, a, b, dst)
    labels, mask = label_rule(ids, trained_mask(total, loc, a, b, dst), dst)
    row_len = np.zeros(nrows, np.int64)
    row_len[row] = n
    att = (np.arange(width)[None, :] < row_len[:, None]).astype(np.int64)
    return _tensors(
        ids.reshape(nrows, width), labels.reshape(nrows, width),
        attention_mask=torch.from_numpy(att),
        n_trained=int(np.count_nonzero(mask)), samples=_samples(loc.d, loc.i),
        segments=_segments(loc.d, dst, dst + (b - a)))


def collate_concat(loc: Located, a, b, nreal, dst, nrows: int, seq_len: int,
                   pad_id: int, eos_id: int) -> dict:
    """Pieces [a, b) of documents in virtual coordinates (a document of nreal tokens that does
    not end with EOS has a virtual EOS at nreal), at flat positions dst of [nrows, seq_len]."""
    total = nrows * seq_len
    bc = np.minimum(b, nreal)
    ids = np.full(total, pad_id, np.int64)
    fill_tokens(ids, loc, a, bc, dst)
    mask = trained_mask(total, loc, a, bc, dst)
    eos_at = np.flatnonzero(b > nreal)
    if eos_at.size:
        p = dst[eos_at] + (nreal[eos_at] - a[eos_at])
        ids[p] = eos_id
        mask[p] = True
    labels, mask = label_rule(ids, mask, slice(None, None, seq_len))
    return _tensors(
        ids.reshape(nrows, seq_len), labels.reshape(nrows, seq_len),
        n_trained=int(np.count_nonzero(mask)), samples=_samples(loc.d, loc.i),
        segments=_segments(loc.d, dst, dst + (b - a)))
