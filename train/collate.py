"""One collator per stream mode: a batch from the units (window, u0, u1) a lane cursor hands
over - rows [u0, u1) of a window (tokens, in concat mode). Each is a pure function of the
planned windows (train/window_plan.py) and its settings; the packed one keeps a per-process
pool of output blocks (never pickled: a DataLoader worker makes its own).
"""
from __future__ import annotations

import numpy as np

from .packing import (BlockPool, Located, PackedPieces, collate_concat, collate_packed,
                      collate_padded)


class PackedCollator:
    def __init__(self, batch_size: int, seq_len: int, pad_id: int):
        self.B, self.L, self.pad_id = batch_size, seq_len, pad_id
        self._pool = None

    def __getstate__(self):
        return dict(self.__dict__, _pool=None)

    def __call__(self, segs: list, store) -> dict:
        for win, _, _ in segs:
            if win.pieces is None:
                win.pieces = PackedPieces(win.loc, win.a, win.b, win.packing)
        if self._pool is None:
            self._pool = BlockPool()
        return collate_packed([(w.pieces, u0, u1) for w, u0, u1 in segs], self.B, self.L,
                              self.pad_id, self._pool)


def _cat(x):
    return np.concatenate(x).astype(np.int64) if x else np.zeros(0, np.int64)


class PaddedCollator:
    """One piece per row, right-padded to the longest in the batch."""

    def __init__(self, batch_size: int, pad_id: int):
        self.B, self.pad_id = batch_size, pad_id

    def __call__(self, segs: list, store) -> dict:
        P, A, E, R, base = [], [], [], [], 0
        for win, u0, u1 in segs:
            p0, p1 = win.row_ptr[u0], win.row_ptr[u1]
            P.append(win.loc.take(slice(p0, p1)))
            A.append(win.a[p0:p1]); E.append(win.b[p0:p1])
            R.append(np.repeat(np.arange(base, base + u1 - u0, dtype=np.int64),
                               np.diff(win.row_ptr[u0:u1 + 1])))
            base += u1 - u0
        loc = Located.join(P) if P else store.locate([], [])
        return collate_padded(loc, _cat(A), _cat(E), _cat(R), self.B, self.pad_id)


class ConcatCollator:
    """The window's documents (EOS appended where missing) as one token stream, cut in rows."""

    def __init__(self, batch_size: int, seq_len: int, pad_id: int, eos_id: int):
        self.B, self.L, self.pad_id, self.eos_id = batch_size, seq_len, pad_id, eos_id

    def __call__(self, segs: list, store) -> dict:
        P, A, E, N, T, base = [], [], [], [], [], 0
        for win, u0, u1 in segs:
            j0 = int(np.searchsorted(win.starts + win.b, u0, side="right"))
            j1 = int(np.searchsorted(win.starts, u1, side="left"))
            st = win.starts[j0:j1]
            lo = np.maximum(st, u0)
            P.append(win.loc.take(slice(j0, j1))); N.append(win.nreal[j0:j1])
            A.append(lo - st); E.append(np.minimum(st + win.b[j0:j1], u1) - st)
            T.append(base + lo - u0)
            base += u1 - u0
        loc = Located.join(P) if P else store.locate([], [])
        return collate_concat(loc, _cat(A), _cat(E), _cat(N), _cat(T), self.B, self.L,
                              self.pad_id, self.eos_id)


def make_collator(mode: str, batch_size: int, seq_len: int, pad_id: int, eos_id: int | None):
    if mode == "packed":
        return PackedCollator(batch_size, seq_len, pad_id)
    if mode == "padded":
        return PaddedCollator(batch_size, pad_id)
    return ConcatCollator(batch_size, seq_len, pad_id, eos_id)
