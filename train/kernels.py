"""Compiled inner loops of the training stream (numba, cached on disk after the first run).

Loops that are per item or per token by nature and cost far more as Python steps or numpy
passes than the read they serve:

* ``permuted_positions`` - the sampler: the keyed Feistel permutation of a dataset's epoch,
  one draw at a time.
* ``gather_samples`` - where a window's samples are: first token, length and loss spans,
  read through the memory-mapped index of their shards.
* ``bfd_rows`` - best-fit decreasing: the rows of a window; ``packed_layout`` - those rows in
  their seeded order, as a table of pieces.
* ``select_ids`` - the validation split without any per-sample (or per-block) table: the id
  of the r-th kept / held-out sample, from closed-form counts per block of 64 ids.
* ``fill_packed`` - one pass that writes a packed batch: input_ids (read from the shard
  memmaps), labels (from the loss spans), position_ids and cu_seqlens, row by row.

Each has a plain numpy / Python counterpart in the tests (feistel_permute, hash_uniform,
a naive best-fit, tokens and spans read back from the shards) that it must
match exactly. There are no bounds checks in compiled code: TokenStore refuses a shard
whose index points outside its arrays when it first maps it, before anything is read.

Shards are passed to ``fill_packed`` as the addresses of their token arrays (`token_table`):
a list of arrays cannot cross into compiled code without a typed container that is itself
compiled at every process start. The arrays must outlive the table (a window keeps both).
Compiled code is cached next to this file (or in numba's user cache dir when that is not
writable; NUMBA_CACHE_DIR overrides both). The first process on a machine compiles every kernel
for the argument types the stream passes (~15 s on one core, and every rank of a first
multi-rank run at once); later processes load them (~0.3 s), also those of another venv whose
editable install points at this file, with the same numba and Python (numba keys its cache on
both, and on the CPU). `python -m train.kernels` does that compilation at install time.
"""
from __future__ import annotations

import numpy as np
from numba import carray, njit, types, uintp
from numba.extending import intrinsic

from stages.constants import IGNORE

# splitmix64 / Feistel constants of the sampler: defined here once (train/sampling.py's numpy
# definitions import them; compiled code freezes them as constants)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)
FEISTEL_ROUNDS = 6


def token_table(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list]:
    """(address per shard, proto, arrays) for `fill_packed`. Every shard is read as the
    dtype of `proto` (an empty array: compiled code is specialised on it): uint16 when all
    shards are, else uint32 - a shard of another dtype is converted to it in memory (shards of
    one lock share a tokenizer, so they share a dtype unless built by hand). The addresses
    point into the returned arrays: keep them alive as long as the table."""
    dt = np.uint16 if all(a.dtype == np.uint16 for a in arrays) else np.uint32
    keep = [np.ascontiguousarray(a) if a.dtype == dt else np.asarray(a, dt) for a in arrays]
    addr = np.asarray([a.ctypes.data for a in keep], np.int64)
    return addr, np.zeros(0, dt), keep


@intrinsic
def _pointer(typingctx, address, proto):
    """The array of proto's dtype at `address` (no bounds: offsets come from the shard index)."""
    sig = types.CPointer(proto.dtype)(types.int64, proto)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))
    return sig, codegen


@njit(cache=True, nogil=True)
def gather_samples(slot, j, off_addr, lso_addr, span_addr, ntok, nspan, p64, p32):
    """Sample j[t] of shard slot[t] for each item t, read through the shards' mapped index
    (addresses per slot of offsets (int64), loss_span_offsets (int64; 0: no spans) and
    loss_spans (int32 pairs)): its first token, length and loss spans [q0, q1) in the
    returned lo/hi (-1, -1: no spans). Every index read is checked against its array first
    (ntok / nspan: tokens and loss spans per slot; offsets and loss_span_offsets have
    n_samples + 1 entries, checked when mapped): the last two results are the first bad item
    (-1: none) and what is wrong (1 offsets, 2 loss_span_offsets, 3 a loss span)."""
    n = len(slot)
    start = np.empty(n, np.int64)
    length = np.empty(n, np.int64)
    q0 = np.full(n, -1, np.int64)
    q1 = np.full(n, -1, np.int64)
    s0 = np.zeros(n, np.int64)
    total = 0
    for t in range(n):
        s = slot[t]
        o = carray(_pointer(off_addr[s] + j[t] * 8, p64), (2,))
        if o[0] < 0 or o[1] < o[0] or o[1] > ntok[s]:
            return start, length, q0, q1, np.empty(0, np.int32), np.empty(0, np.int32), t, 1
        start[t] = o[0]
        length[t] = o[1] - o[0]
        if lso_addr[s] != 0:
            q = carray(_pointer(lso_addr[s] + j[t] * 8, p64), (2,))
            if q[0] < 0 or q[1] < q[0] or q[1] > nspan[s]:
                return start, length, q0, q1, np.empty(0, np.int32), np.empty(0, np.int32), t, 2
            s0[t] = q[0]
            q0[t] = total
            total += q[1] - q[0]
            q1[t] = total
    lo = np.empty(total, np.int32)
    hi = np.empty(total, np.int32)
    for t in range(n):
        m = q1[t] - q0[t]
        if q0[t] >= 0 and m > 0:
            sp = carray(_pointer(span_addr[slot[t]] + s0[t] * 8, p32), (2 * m,))
            for k in range(m):
                a, b = sp[2 * k], sp[2 * k + 1]
                if a < 0 or b < a or b > length[t]:
                    return start, length, q0, q1, lo, hi, t, 3
                lo[q0[t] + k] = a
                hi[q0[t] + k] = b
    return start, length, q0, q1, lo, hi, -1, 0


@njit(cache=True, nogil=True)
def bfd_rows(lengths, order, cap):
    """Best-fit decreasing. Items are taken in `order` (decreasing length, ties by position;
    computed here by a counting sort when empty), each goes to the open row with the least
    room that still fits it (ties: the row opened first), else to a new row. Returns
    (order, row of each item in that order, number of rows). Rows whose room is below the
    smallest item can take nothing more and leave the scan."""
    n = len(lengths)
    if len(order) == 0 and n:
        ptr = np.zeros(cap + 2, np.int64)
        for t in range(n):
            ptr[cap - lengths[t] + 1] += 1
        for v in range(cap + 1):
            ptr[v + 1] += ptr[v]
        order = np.empty(n, np.int64)
        for t in range(n):
            v = cap - lengths[t]
            order[ptr[v]] = t
            ptr[v] += 1
    row_of = np.empty(n, np.int64)
    room = np.empty(n, np.int64)  # of the open rows, unordered
    rid = np.empty(n, np.int64)  # their row numbers
    nopen = 0
    nrows = 0
    smallest = lengths[order[n - 1]] if n else 0
    for t in range(n):
        x = lengths[order[t]]
        best = -1
        for s in range(nopen):
            v = room[s]
            if v >= x and (best < 0 or v < room[best] or (v == room[best]
                                                          and rid[s] < rid[best])):
                best = s
        if best < 0:
            best = nopen
            room[best] = cap
            rid[best] = nrows
            nopen += 1
            nrows += 1
        room[best] -= x
        row_of[t] = rid[best]
        if room[best] < smallest:  # full for good: swap-remove
            nopen -= 1
            room[best] = room[nopen]
            rid[best] = rid[nopen]
    return order, row_of, nrows


@njit(cache=True, nogil=True)
def piece_table(placed, d, i, a, b, slot, start, q0, q1):
    """Pieces in `placed` order as fill_packed reads them: rows shard slot, first token in
    the shard, length, first token in the sample, loss spans [q0, q1) (-1, -1: a sample
    without spans) - and the (dataset, sample) of each. Per item: slot (the window's token
    table), start (the sample's first token in its shard), q0, q1 (its spans)."""
    P = len(placed)
    table = np.empty((6, P), np.int64)
    samples = np.empty((P, 2), np.int64)
    for j in range(P):
        p = placed[j]
        table[0, j] = slot[p]
        table[1, j] = start[p] + a[p]
        table[2, j] = b[p] - a[p]
        table[3, j] = a[p]
        table[4, j], table[5, j] = q0[p], q1[p]
        samples[j, 0], samples[j, 1] = d[p], i[p]
    return table, samples


@njit(cache=True, nogil=True)
def seeded_rows(rows, nrows, row_key):
    """Row numbers renumbered into the seeded order argsort(mix64(row ^ row_key)) (mix64 is a
    bijection: no ties, so any sort gives the stable order)."""
    h = np.empty(nrows, np.uint64)
    for r in range(nrows):
        h[r] = _mix64(np.uint64(r) ^ row_key)
    rank = np.empty(nrows, np.int64)
    rank[np.argsort(h)] = np.arange(nrows)
    out = np.empty_like(rows)
    for t in range(len(rows)):
        out[t] = rank[rows[t]]
    return out


@njit(cache=True, nogil=True)
def rows_csr(order, rows, nrows):
    """CSR of items by row (a counting sort: within a row, items keep their order)."""
    row_ptr = np.zeros(nrows + 1, np.int64)
    for t in range(len(rows)):
        row_ptr[rows[t] + 1] += 1
    for r in range(nrows):
        row_ptr[r + 1] += row_ptr[r]
    fill = row_ptr[:-1].copy()
    placed = np.empty(len(rows), np.int64)
    for t in range(len(rows)):
        placed[fill[rows[t]]] = order[t]
        fill[rows[t]] += 1
    return placed, row_ptr


@njit(cache=True, nogil=True)
def packed_layout(order, rows, nrows, row_key, keyed, d, i, a, b, slot, start, q0, q1):
    """A window's best-fit result (bfd_rows) as fill_packed reads it: rows in the seeded order
    when `keyed`, pieces row by row. Returns (row_ptr, piece table, samples)."""
    if keyed and nrows > 1:
        rows = seeded_rows(rows, nrows, row_key)
    placed, row_ptr = rows_csr(order, rows, nrows)
    table, samples = piece_table(placed, d, i, a, b, slot, start, q0, q1)
    return row_ptr, table, samples


@njit(cache=True, nogil=True)
def _copy_run(src, j0, j1, trained, ids, labels, pos):
    """Tokens j0..j1-1 of a piece: src, ids, labels, pos are the piece's own slices.
    (Unsigned indices: no negative-index wraparound, so the loop vectorises.)"""
    for j in range(uintp(j0), uintp(j1)):
        v = src[j]
        ids[j] = v
        labels[j] = v if trained else IGNORE
        pos[j] = j


@njit(cache=True, nogil=True)
def _write_piece(src, a, all_trained, q0, q1, span_lo, span_hi, ids, labels, pos):
    """Tokens [a, a + m) of a sample (src, m = len(src)) into ids, labels, pos (slices of
    length m); returns the number of trained tokens. The label rule's compiled form
    (train/packing.label_rule is its numpy form). Trained: inside the sample's loss spans
    q0..q1-1 (every token if all_trained), never the piece's first token (a document's first
    token has nothing before it). Sorted, disjoint spans (what the pipeline writes) are
    walked as runs in one pass; anything else is written untrained first, then the union of
    its spans is applied."""
    m = len(src)
    ordered = True
    if not all_trained:
        for q in range(q0, q1):
            if span_lo[q] > span_hi[q] or (q > q0 and span_lo[q] < span_hi[q - 1]):
                ordered = False
    n = 0
    if ordered:
        j = 0
        for q in range(q0, q0 + 1 if all_trained else q1):
            lo = min(max((a if all_trained else span_lo[q]) - a, 1), m)
            hi = min(max((a + m if all_trained else span_hi[q]) - a, lo), m)
            _copy_run(src, j, lo, False, ids, labels, pos)
            _copy_run(src, lo, hi, True, ids, labels, pos)
            n += hi - lo
            j = hi
        _copy_run(src, j, m, False, ids, labels, pos)
        return n
    _copy_run(src, 0, m, False, ids, labels, pos)
    for q in range(q0, q1):
        for j in range(max(span_lo[q] - a, 1), min(span_hi[q] - a, m)):
            labels[j] = ids[j]
    for j in range(m):
        n += labels[j] != IGNORE
    return n


@njit(cache=True, nogil=True)
def _pad(ids, labels, pos, pad_id):
    for j in range(uintp(len(ids))):
        ids[j] = pad_id
        labels[j] = IGNORE
        pos[j] = j


@njit(cache=True, nogil=True)
def fill_packed(addr, proto, pieces, span_lo, span_hi, row_ptr, r0, r1, seq_len, pad_id, out,
                cu, ncu, at):
    """Rows [r0, r1) of a window written from flat position `at` of out[0] (input_ids),
    out[1] (labels), out[2] (position_ids). Piece p (row_ptr order) is tokens
    [pieces[1, p], + pieces[2, p]) of shard pieces[0, p], which are tokens [pieces[3, p], ...)
    of a sample whose loss spans are span_lo/hi[pieces[4, p]:pieces[5, p]] (-1: a sample
    without spans, all trained). Each piece is a document (positions from 0); the rest of a
    row is padding (pad_id, untrained, a segment of its own). cu[ncu - 1] is the flat position
    reached; segment ends are appended. Returns (ncu, trained tokens, longest segment)."""
    ids, labels, pos = out[0], out[1], out[2]
    trained = 0
    longest = 0
    for r in range(r0, r1):
        used = 0
        for p in range(row_ptr[r], row_ptr[r + 1]):
            m, q0, t = pieces[2, p], pieces[4, p], at + used
            src = carray(_pointer(addr[pieces[0, p]] + pieces[1, p] * proto.itemsize, proto),
                         (m,))
            trained += _write_piece(src, pieces[3, p], q0 < 0, q0, pieces[5, p], span_lo,
                                    span_hi, ids[t:t + m], labels[t:t + m], pos[t:t + m])
            used += m
            cu[ncu] = at + used
            ncu += 1
            longest = max(longest, m)
        if used < seq_len:
            t = at + used
            _pad(ids[t:at + seq_len], labels[t:at + seq_len], pos[t:at + seq_len], pad_id)
            longest = max(longest, seq_len - used)
            cu[ncu] = at + seq_len
            ncu += 1
        at += seq_len
    return ncu, trained, longest




@njit(cache=True, nogil=True)
def _mix64(z):
    """splitmix64 finaliser (sampling.mix64) on one uint64."""
    z = (z ^ (z >> np.uint64(30))) * M1
    z = (z ^ (z >> np.uint64(27))) * M2
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def permuted_positions(choice, pos, epoch, n, bases):
    """Sample (train position) of each draw of a chunk: the draws of dataset d are its
    positions pos[d], pos[d] + 1, ...; position q is q % n of epoch epoch[d] + q // n, mapped
    through that epoch's keyed Feistel permutation - exactly sampling.feistel_permute with key
    mix64(mix64(epoch) ^ base), one scalar draw at a time (round keys computed once per
    dataset and epoch)."""
    nd = len(n)
    q = pos.copy()
    cur_e = np.full(nd, -1, np.int64)
    rk = np.zeros((nd, FEISTEL_ROUNDS), np.uint64)
    half = np.zeros(nd, np.uint64)
    for d in range(nd):  # half the bits of the smallest even-bit power of two >= n
        bits, v = 0, max(n[d], 1) - 1
        while v:
            bits += 1
            v >>= 1
        bits = max(bits, 2)
        half[d] = np.uint64((bits + (bits & 1)) // 2)
    out = np.empty(len(choice), np.int64)
    for j in range(len(choice)):
        d = choice[j]
        nn = n[d]
        qq = q[d]
        q[d] = qq + 1
        if nn <= 1:
            out[j] = 0
            continue
        e = epoch[d] + qq // nn
        if e != cur_e[d]:
            key = _mix64(_mix64(np.uint64(e)) ^ bases[d])
            for r in range(FEISTEL_ROUNDS):
                rk[d, r] = _mix64(key + np.uint64(r + 1) * GOLDEN)
            cur_e[d] = e
        h = half[d]
        mask = (np.uint64(1) << h) - np.uint64(1)
        y = np.uint64(qq % nn)
        while True:  # cycle-walking back into [0, n)
            left = y >> h
            right = y & mask
            for r in range(FEISTEL_ROUNDS):
                left, right = right, left ^ (_mix64(right ^ rk[d, r]) & mask)
            y = (left << h) | right
            if y < np.uint64(nn):
                break
        out[j] = np.int64(y)
    return out


@njit(cache=True, nogil=True)
def _held_before(i, frac, phase):
    """Held-out ids among [0, i) of a dataset: floor(i * frac + phase) (sampling.HeldOut)."""
    return np.int64(np.floor(np.float64(i) * frac + phase))


@njit(cache=True, nogil=True)
def _wanted_before(b, block, n, frac, phase, want_held):
    """Held-out (want_held) or kept ids in the blocks before block b."""
    i = min(b * block, n)
    h = _held_before(i, frac, phase)
    return h if want_held else i - h


@njit(cache=True, nogil=True)
def select_ids(d, r, n, frac, phase, bases, block, want_held):
    """Sample id of the r-th held-out (want_held) or kept sample of dataset d, per draw
    (sampling.HeldOut's rule): the block by a binary search over the closed-form counts per
    block, then the block's ids ranked by their keyed hash - its c lowest are held out."""
    out = np.empty(len(d), np.int64)
    for j in range(len(d)):
        dd = d[j]
        nn, ph = n[dd], phase[dd]
        lo, hi = 0, (nn + block - 1) // block - 1
        while lo < hi:  # the last block whose wanted ids before it are <= r
            mid = (lo + hi + 1) // 2
            if _wanted_before(mid, block, nn, frac, ph, want_held) <= r[j]:
                lo = mid
            else:
                hi = mid - 1
        left = r[j] - _wanted_before(lo, block, nn, frac, ph, want_held)
        a = lo * block
        m = min(block, nn - a)
        c = _held_before(a + m, frac, ph) - _held_before(a, frac, ph)
        h = np.empty(m, np.uint64)
        for k in range(m):
            h[k] = _mix64(_mix64(np.uint64(a + k)) ^ bases[dd])
        thr = np.sort(h)[c - 1] if c > 0 else np.uint64(0)
        for k in range(m):
            if (c > 0 and h[k] <= thr) == want_held:
                if left == 0:
                    out[j] = a + k
                    break
                left -= 1
    return out


_WARM = False


def warm_up() -> None:
    """Run every kernel once on tiny inputs of the argument types the stream passes (each type
    is a separate compiled specialisation), so this process has them loaded (about 0.3 s from
    the cache, a full compile on a cold one). DataLoader workers forked afterwards inherit them
    instead of each paying it on their first batch."""
    global _WARM
    if _WARM:
        return
    z, one = np.zeros(1, np.int64), np.ones(1, np.int64)
    order, rows, nrows = bfd_rows(one, np.zeros(0, np.int64), 1)
    packed_layout(order, rows, nrows, np.uint64(1), True, z, z, z, one, z, z, z - 1, z - 1)
    permuted_positions(z, z, z, np.array([3], np.int64), np.zeros(1, np.uint64))
    for want in (True, False):
        select_ids(z, z, np.array([2], np.int64), 0.5, np.zeros(1), np.zeros(1, np.uint64), 64,
                   want)
    off, spans = np.array([0, 1], np.int64), np.zeros(2, np.int32)
    table = np.array([[off.ctypes.data] * 2, [off.ctypes.data] * 2, [spans.ctypes.data] * 2])
    for k in (1, 2):  # TokenStore.locate's addr[:, uniq] rows: contiguous for 1 shard, else strided
        a = table[:, np.arange(k)]
        gather_samples(np.zeros(k, np.int64), np.zeros(k, np.int64), a[0], a[1], a[2],
                       np.ones(k, np.int64), np.ones(k, np.int64),
                       np.zeros(0, np.int64), np.zeros(0, np.int32))
    for dt in (np.uint16, np.uint32):
        tok = np.zeros(1, dt)
        addr, proto, _ = token_table([tok])
        out = np.empty((3, 2), np.int64)
        fill_packed(addr, proto, np.array([[0], [0], [1], [0], [-1], [-1]], np.int64),
                    np.zeros(0, np.int32), np.zeros(0, np.int32), np.array([0, 1], np.int64),
                    0, 1, 2, 0, out, np.zeros(3, np.int32), 1, 0)
    _WARM = True


def kernels() -> dict:
    """{name: numba dispatcher} of every compiled function of this module."""
    return {n: f for n, f in globals().items() if hasattr(f, "stats") and hasattr(f, "py_func")}


def main(argv: list[str] | None = None) -> int:
    """`python -m train.kernels`: compile (or load) every kernel into numba's cache now, e.g.
    right after `pip install`, so the first training run - every rank of it - only loads them."""
    import argparse
    import time
    argparse.ArgumentParser(prog="python -m train.kernels", allow_abbrev=False, description=(
        "Compile the data stream's numba kernels into their on-disk cache now (about 10-30 s once per "
        "machine and tokenmill/numba version), so that a training run - every rank of it - only loads them. "
        "Run it after installing or updating; it prints how many were compiled and where the cache is.")
    ).parse_args(argv)
    t = time.perf_counter()
    warm_up()
    took, ks = time.perf_counter() - t, kernels().values()
    missed = sum(sum(k.stats.cache_misses.values()) for k in ks)
    hit = sum(sum(k.stats.cache_hits.values()) for k in ks)
    print(f"train.kernels: {len(ks)} kernels ready in {took:.1f} s ({missed} specialisations "
          f"compiled, {hit} loaded) - cache: {gather_samples.stats.cache_path}")
    return 0


if __name__ == "__main__":  # run as train.kernels, the module the stream imports
    from train.kernels import main as _main
    raise SystemExit(_main())
