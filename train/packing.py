"""Token access and batch assembly for the training stream.

``TokenStore`` memory-maps every shard of every dataset of a lock (opened lazily, once per
process) and answers, vectorised, "where are the tokens and loss spans of sample (d, i)".

``pack_rows`` is best-fit-decreasing bin packing of one look-ahead window of pieces into rows
of ``seq_len`` tokens (exact BFD, one Python step per run of items that go to the same row);
``PackedLayout`` precomputes, once per window and vectorised, what a packed batch needs (what
to read, segments, label runs), so ``collate_packed`` is slices plus a few full-length numpy
passes; ``collate_padded`` / ``collate_concat`` turn the pieces of one batch into tensors. A *piece* is ``[a, b)`` of sample ``(d, i)``: a whole sample,
or a part of an over-long one after the overflow policy (then a document of its own).

Label convention (HF causal LM, the model shifts): ``labels[t] = input_ids[t]`` where token t is
trained (inside a loss span; every token of a sample without spans), else -100; the first token
of every document (packed/padded) or row (concat) is -100, since nothing before it in the same
document predicts it. So ``n_trained`` counts exactly the predictions that carry loss.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right, insort

import numpy as np
import torch

from stages.shard import read_shard

from .sampling import mix64

IGNORE = -100


def ranges_index(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) over the pairs, vectorised."""
    lens = np.asarray(ends, np.int64) - np.asarray(starts, np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.asarray(starts, np.int64) - (np.cumsum(lens) - lens)
    return np.repeat(shift, lens) + np.arange(total, dtype=np.int64)


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
        dts = {t.dtype for t in self.tokens}
        # one token dtype (one tokenizer): batches are read as bytes through memoryviews
        self.dtype = dts.pop() if len(dts) == 1 else None
        self._views: dict = {}

    def read(self, pg: list, ps: list, pe: list, pad_id: int, seq_len: int) -> np.ndarray:
        """Tokens [ps, pe) of shards pg, back to back, as int64; shard -1 is padding (pad_id).

        The fast path joins memoryview slices: a slice costs a fraction of a numpy slice and
        bytes.join copies in C, so a batch of ~100 pieces is read in about the time numpy
        takes just to make the ~100 slice objects. One dtype conversion at the end."""
        key = (pad_id, seq_len)
        if key not in self._views:
            dt = self.dtype
            if dt is not None and np.array(pad_id).astype(dt) != pad_id:
                dt = None  # pad id not representable in the token dtype
            if dt is None:
                arrs = self.tokens + [np.full(seq_len, pad_id, np.int64)]
                self._views[key] = (None, arrs)
            else:
                arrs = self.tokens + [np.full(seq_len, pad_id, dt)]
                self._views[key] = (dt, [memoryview(x) for x in arrs])
        dt, v = self._views[key]
        if dt is None:  # mixed dtypes: numpy slices converted one by one
            parts = [np.asarray(v[g][s:e], np.int64) for g, s, e in zip(pg, ps, pe)]
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return np.frombuffer(b"".join([v[g][s:e] for g, s, e in zip(pg, ps, pe)]),
                             dt).astype(np.int64)

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


def pack_rows(lengths: np.ndarray, cap: int,
              row_key: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: items (all 0 < len <= cap) in order of decreasing length (ties by
    position) go to the open row with the least room that still fits them (ties: the row
    opened first). Returns CSR (item order, row_ptr), items of a row in placement order, rows
    in opening order, or with `row_key` in the seeded order argsort(mix64(row ^ row_key)).

    One Python step places a whole *run* of consecutive items into one row (about 5 items per
    step on SFT data): after item x goes to row j (room r), the next items keep going to j as
    long as they fit and are all longer than q, the largest room of any other row below x -
    no other row then has a room in [item, room of j], so best fit picks j again. Runs come
    from two bisects (over the items and over their prefix sums); the result is exactly
    item-by-item BFD."""
    n = len(lengths)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    lengths = np.asarray(lengths, np.int64)
    # stable argsort of 16-bit keys is a radix sort: twice as fast as on int64
    order = np.argsort(cap - lengths if cap > 0xFFFF else (cap - lengths).astype(np.uint16),
                       kind="stable")
    xs = lengths[order]
    cs = np.zeros(n + 1, np.int64)
    np.cumsum(xs, out=cs[1:])
    xl, cl, neg = xs.tolist(), cs.tolist(), (-xs).tolist()  # neg: ascending, for bisect
    S = n.bit_length()  # open rows as sorted ints room << S | row: (room, row) order
    M = (1 << S) - 1
    NEW = (cap + 1) << S  # sentinel after every open row: "open a new row"
    keys: list[int] = [NEW]
    run_row: list[int] = []
    run_end: list[int] = []
    bl, br, ins = bisect_left, bisect_right, insort
    add_row, add_end = run_row.append, run_end.append
    nrows = t = 0
    while t < n:
        j = bl(keys, xl[t] << S)  # the best-fitting open row, if any
        key = keys[j]
        if key == NEW:
            r, row = cap, nrows
            nrows += 1
        else:
            del keys[j]
            r, row = key >> S, key & M
        q = keys[j - 1] >> S if j else -1
        c = cl[t]
        e = br(cl, c + r, t) - 1  # items that fit ...
        e2 = bl(neg, -q, t)  # ... and are longer than q
        if e2 < e:
            e = e2
        room = r - (cl[e] - c)
        add_row(row)
        add_end(e)
        if room:
            ins(keys, (room << S) | row)
        t = e
    rows = np.repeat(np.asarray(run_row, np.int64), np.diff(np.asarray([0] + run_end)))
    if row_key is not None and nrows > 1:
        rank = np.empty(nrows, np.int64)
        rank[np.argsort(mix64(np.arange(nrows, dtype=np.uint64) ^ np.uint64(row_key)),
                        kind="stable")] = np.arange(nrows)
        rows = rank[rows]
    # CSR in placement order: stable sort of the decreasing-length order by row
    placed = order[np.argsort(rows if nrows > 0xFFFF else rows.astype(np.uint16), kind="stable")]
    row_ptr = np.zeros(nrows + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=nrows), out=row_ptr[1:])
    return placed, row_ptr


def _tensors(ids, labels, **extra) -> dict:
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}
    out.update(extra)
    return out


def _samples(d, i) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(d, np.int64), np.asarray(i, np.int64)], 1))


_TRAINED = np.iinfo(np.int64).max  # label "cap" of a trained token: min(id, cap) = id
_RUNVALS = np.zeros(0, np.int64)


_AR_VIEWS: dict = {}


def _arange_view(n: int) -> memoryview:
    if n not in _AR_VIEWS:
        _AR_VIEWS[n] = memoryview(np.arange(n, dtype=np.int64))
    return _AR_VIEWS[n]


def _runvals(n: int) -> np.ndarray:
    """[cap_trained, -100, cap_trained, -100, ...] of length n (label runs alternate)."""
    global _RUNVALS
    if len(_RUNVALS) < n:
        _RUNVALS = np.tile(np.asarray([_TRAINED, IGNORE], np.int64), (n + 1) // 2 + 1024)
    return _RUNVALS[:n]


class PackedLayout:
    """One window's packed rows, precomputed once per window (vectorised over its ~1000
    pieces) so that a batch, rows [u0, u1), is only slices of it plus a few full-length numpy
    passes (`collate_packed`).

    Window coordinates: token t of row r is r * seq_len + t. Per row, in order:
      parts     what to read: each piece (shard pg, tokens [ps, pe)), then the row's padding
                (shard -1) if any; `part_ptr[r]` is the row's first part.
      segments  = the parts (a document per piece, the padding as a segment of its own):
                their lengths give position_ids and cu_seqlens.
      runs      label runs alternating trained / untrained (trained first), lengths `run_len`,
                `run_ptr[r]` the row's first run; a row starts with an empty trained run.
                Trained: inside the piece's loss spans (every token without spans), never a
                document's first token.
    """

    def __init__(self, store: TokenStore, d, i, a, b, g, k, row_ptr, seq_len: int):
        """Pieces [a, b) of samples (d, i) (shard g, index k into the store's offsets, as
        `TokenStore.locate` gives them), row-major, rows as CSR row_ptr."""
        L = seq_len
        R, P = len(row_ptr) - 1, len(d)
        m = b - a
        row = np.repeat(np.arange(R, dtype=np.int64), np.diff(row_ptr))
        cm = np.zeros(P + 1, np.int64)
        np.cumsum(m, out=cm[1:])
        row_tok = cm[row_ptr[1:]] - cm[row_ptr[:-1]]
        wpos = row * L + (cm[:-1] - cm[row_ptr[:-1]][row])  # each piece's first token

        # parts: pieces and pads interleaved (pad of row r right after its last piece)
        at_piece = np.arange(P) + row
        at_pad = row_ptr[1:] + np.arange(R)
        pg = np.empty(P + R, np.int64)
        ps = np.zeros(P + R, np.int64)
        plen = np.empty(P + R, np.int64)
        pg[at_piece], ps[at_piece], plen[at_piece] = g, store.off_all[k] + a, m
        pg[at_pad], plen[at_pad] = -1, L - row_tok
        keep = plen > 0
        kc = np.zeros(P + R + 1, np.int64)
        np.cumsum(keep, out=kc[1:])
        self.part_ptr = kc[row_ptr + np.arange(R + 1)].tolist()
        self.seg_len = plen[keep]
        self.seg_list = self.seg_len.tolist()
        self.pg, self.ps = pg[keep].tolist(), ps[keep].tolist()
        self.pe = (ps[keep] + self.seg_len).tolist()

        # trained intervals in window coordinates: loss spans clipped to the piece, or the
        # whole piece for shards without spans; minus each document's first token
        s0, s1 = store.lso_all[k], store.lso_all[k + 1]
        sx = ranges_index(s0, s1)
        own = np.repeat(np.arange(P), s1 - s0)
        aa, wo = a[own], wpos[own]
        shift = wo - aa
        lo = np.clip(store.span_lo[sx], aa, b[own]) + shift
        hi = np.clip(store.span_hi[sx], aa, b[own]) + shift
        no = np.flatnonzero(~store.has_spans[g])
        if len(no):
            lo = np.concatenate([lo, wpos[no]])
            hi = np.concatenate([hi, wpos[no] + m[no]])
            wo = np.concatenate([wo, wpos[no]])
        lo = np.maximum(lo, wo + 1)
        hi = np.maximum(hi, lo)
        # an empty "marker" interval at each piece start first, then sort and merge (spans
        # are normally sorted and disjoint already; merging makes any input safe)
        lo = np.concatenate([wpos, lo])
        hi = np.concatenate([wpos, hi])
        o = np.argsort(lo, kind="stable")
        lo, hi = lo[o], np.maximum.accumulate(hi[o])
        lo[1:] = np.maximum(lo[1:], hi[:-1])
        K = len(lo)
        run_len = np.empty(2 * K + 1, np.int64)
        run_len[0] = lo[0] if K else R * L
        run_len[2:2 * K:2] = lo[1:] - hi[:-1]
        run_len[1:2 * K:2] = hi - lo
        run_len[2 * K] = R * L - (hi[-1] if K else 0)
        self.run_len = run_len
        marker_at = np.empty(K, np.int64)
        marker_at[o] = np.arange(K)
        first = np.append(marker_at[row_ptr[:-1]], K)  # each row's first piece's marker
        self.run_ptr = (2 * first + 1).tolist()  # row R: 2K + 1, the end
        tc = np.zeros(2 * K + 2, np.int64)
        trained = run_len.copy()
        trained[::2] = 0
        np.cumsum(trained, out=tc[1:])
        self.trained_before = tc[2 * first + 1].tolist()
        self.samples = np.empty((P, 2), np.int64)
        self.samples[:, 0], self.samples[:, 1] = d, i
        self.row_ptr = row_ptr.tolist()


def collate_packed(store: TokenStore, segs: list, nrows: int, seq_len: int,
                   pad_id: int) -> dict:
    """Rows [u0, u1) of each (PackedLayout, u0, u1) in segs, back to back, then all-padding
    rows up to nrows (the end of a finite stream). Every full-length array costs one or two
    numpy passes: ids (read + cast), position_ids (repeat + subtract), labels (repeat +
    minimum)."""
    L = seq_len
    pg, ps, pe, seg, sll, runs, smp = [], [], [], [], [], [], []
    n_trained = have = 0
    for lay, u0, u1 in segs:
        x0, x1 = lay.part_ptr[u0], lay.part_ptr[u1]
        pg += lay.pg[x0:x1]
        ps += lay.ps[x0:x1]
        pe += lay.pe[x0:x1]
        seg.append(lay.seg_len[x0:x1])
        sll += lay.seg_list[x0:x1]
        runs.append(lay.run_len[lay.run_ptr[u0]:lay.run_ptr[u1]])
        n_trained += lay.trained_before[u1] - lay.trained_before[u0]
        smp.append(lay.samples[lay.row_ptr[u0]:lay.row_ptr[u1]])
        have += u1 - u0
    if have < nrows:  # missing rows: all padding, one segment each, untrained
        miss = nrows - have
        pg += [-1] * miss
        ps += [0] * miss
        pe += [L] * miss
        seg.append(np.full(miss, L, np.int64))
        sll += [L] * miss
        runs.append(np.asarray([0, miss * L], np.int64))
    ids = store.read(pg, ps, pe, pad_id, L)
    rl = runs[0] if len(runs) == 1 else np.concatenate(runs)
    labels = np.repeat(_runvals(len(rl)), rl)
    np.minimum(ids, labels, out=labels)  # (while ids is still in cache)
    # position ids: each segment's 0..n-1, joined from slices of one arange (one pass)
    ar = _arange_view(L)
    pos = np.frombuffer(bytearray().join([ar[:n] for n in sll]), np.int64)
    sl = seg[0] if len(seg) == 1 else np.concatenate(seg)
    cu = np.zeros(len(sl) + 1, np.int32)
    np.cumsum(sl, out=cu[1:])
    samples = (smp[0].copy() if len(smp) == 1 else np.concatenate(smp) if smp
               else np.zeros((0, 2), np.int64))
    return {"input_ids": torch.from_numpy(ids.reshape(nrows, L)),
            "labels": torch.from_numpy(labels.reshape(nrows, L)),
            "position_ids": torch.from_numpy(pos.reshape(nrows, L)),
            "cu_seqlens": torch.from_numpy(cu), "max_seqlen": int(sl.max()),
            "n_trained": int(n_trained), "samples": torch.from_numpy(samples)}


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
