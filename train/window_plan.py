"""The per-window plan of the training stream: window w of the schedule -> its units.

`WindowPlanner(w, store)` is a pure function of w (and the stream's definition): the window's
draws become sample ids (past the validation split), are found in the shards (empty samples
dropped), cut by the overflow policy into pieces of at most seq_len tokens (counted per
dataset), and laid out for the mode - packed: rows by best-fit-decreasing inside the window,
in a seeded order (train) or in opening order (validation); padded: one piece per row;
concat: the documents, EOS appended where missing, as one token stream. None of it depends on
the rank, the world size or the worker count.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.overflow import piece_bounds

from .packing import Located, PackedPieces, best_fit_rows, last_tokens
from .sampling import stable_hash64


@dataclass
class Window:
    index: int
    size: int  # rows, or tokens in concat mode
    d: np.ndarray
    i: np.ndarray
    a: np.ndarray
    b: np.ndarray
    overflow: np.ndarray  # per dataset: samples of this window longer than seq_len
    row_ptr: np.ndarray | None = None  # padded (one piece per row)
    loc: Located | None = None  # each piece's sample in its shard (TokenStore.locate)
    nreal: np.ndarray | None = None  # concat: real length of each document
    starts: np.ndarray | None = None  # concat: token start of each document in the window
    packing: tuple | None = None  # packed: best_fit_rows' result and the row order key
    pieces: PackedPieces | None = None  # packed: built when a batch of this window is read


@dataclass(frozen=True)
class WindowPlanner:
    schedule: object  # sampling.MixtureSchedule or HeldOutSchedule
    held: object  # sampling.HeldOut (train positions -> sample ids), or None
    mode: str
    split: str
    seq_len: int
    seed: int
    eos_id: int | None
    policies: np.ndarray  # overflow policy per dataset
    n_datasets: int

    def __call__(self, w: int, store) -> Window:
        L, nd = self.seq_len, self.n_datasets
        d, t = self.schedule.window(w)
        # train positions -> sample ids, where a validation split holds some
        i = self.held.train_ids(d, t) if self.split == "train" and self.held is not None else t
        loc = store.locate(d, i)  # empty samples dropped
        d, i, n = loc.d, loc.i, loc.n
        over = np.zeros(nd, np.int64)
        if self.mode == "concat":
            last = last_tokens(loc)
            vl = n + (last != self.eos_id)
            ends = np.cumsum(vl)
            return Window(w, int(ends[-1]) if len(ends) else 0, d, i,
                          np.zeros(len(d), np.int64), vl, over, nreal=n, starts=ends - vl, loc=loc)
        a, b = np.zeros(len(d), np.int64), n
        if len(n) and n.max() > L:
            over = np.bincount(d[n > L], minlength=nd).astype(np.int64)
            item, a, b = piece_bounds(n, L, self.policies[d])
            loc = loc.take(item)
            d, i = loc.d, loc.i
        if self.mode == "packed":
            key = (stable_hash64("tokenmill-rows", self.seed, w) if self.split == "train"
                   else None)  # rows in a seeded order (train), in opening order (eval)
            order, rows, nrows = best_fit_rows(b - a, L)
            return Window(w, nrows, d, i, a, b, over, loc=loc, packing=(order, rows, nrows, key))
        return Window(w, len(d), d, i, a, b, over, loc=loc,
                      row_ptr=np.arange(len(d) + 1, dtype=np.int64))
