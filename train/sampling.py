"""Counter-based randomness for the training stream: hashing, per-epoch permutations, and the
seeded mixture sampler.

Everything here is a pure function of integers (no global RNG, no numpy Generator whose stream
may change between releases): splitmix64 mixing in wrapping uint64 arithmetic.

* ``feistel_permute(x, n, keys)`` - a keyed bijection of [0, n) (balanced Feistel network over
  the smallest even-bit power of two >= n, cycle-walking back into [0, n)). A dataset's order in
  epoch e is ``feistel_permute(arange(n), n, key(seed, dataset, e))``: position p of the epoch
  is evaluated on demand, no permutation array is stored.
* ``MixtureSchedule`` - the global sample sequence of the train split, window by window:
  stratified per-dataset counts that are O(datasets) to compute for any window (so a rank
  computes only its own windows), positions through the Feistel maps in compiled code
  (kernels.permuted_positions; ``feistel_permute`` here is its definition).
* ``HeldOut`` - the validation split, stratified by blocks of 64 ids: ids [0, i) hold
  floor(i * percentage / 100 + phase) held-out samples at every block edge i, and inside a
  block the ids with the lowest keyed hashes are the held-out ones. Train and validation
  positions map to sample ids in O(log blocks) with no table: memory O(datasets).
* ``HeldOutSchedule`` - the validation split's (dataset, sample) sequence, window by window.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .kernels import (FEISTEL_ROUNDS, GOLDEN, M1, M2, permuted_positions,  # noqa: F401
                      select_ids)

U64 = np.uint64

_S30, _S27, _S31 = U64(30), U64(27), U64(31)


def stable_hash64(*parts) -> int:
    """A 64-bit hash of the parts' text, stable across processes, runs and machines."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def mix64(z) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = np.array(z, dtype=U64, copy=True, ndmin=1)
    z ^= z >> _S30
    z *= M1
    z ^= z >> _S27
    z *= M2
    z ^= z >> _S31
    return z


def hash_uniform(base: int, idx: np.ndarray) -> np.ndarray:
    """Uniform in [0, 1) for each index, keyed by base (used for the validation split)."""
    z = mix64(mix64(np.asarray(idx, dtype=U64)) ^ U64(base))
    return (z >> U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _feistel_once(x: np.ndarray, half: np.ndarray, mask: np.ndarray,
                  round_keys: list[np.ndarray]) -> np.ndarray:
    left = x >> half
    right = x & mask
    for rk in round_keys:
        left, right = right, left ^ (mix64(right ^ rk) & mask)
    return (left << half) | right


def feistel_permute(x, n, keys) -> np.ndarray:
    """Image of positions x (each in [0, n)) under the keyed bijection of [0, n).

    `n` and `keys` are scalars or arrays like x (one domain and key per element: elements of
    different datasets and epochs are permuted in one call). Cycle-walking: a balanced Feistel
    network permutes [0, 2**bits) with 2**bits < 4n, re-applied until the value falls back into
    [0, n) (expected < 4 rounds)."""
    x = np.asarray(x, dtype=U64).reshape(-1)
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), x.shape)
    keys = np.broadcast_to(np.asarray(keys, dtype=U64), x.shape)
    if x.size == 0:
        return np.zeros(0, np.int64)
    un, ninv = np.unique(n, return_inverse=True)
    halves = []
    for v in un.tolist():
        bits = max(2, (max(v, 1) - 1).bit_length())
        halves.append((bits + (bits & 1)) // 2)
    half = np.asarray(halves, dtype=U64)[ninv.reshape(-1)]
    mask = (U64(1) << half) - U64(1)
    ukeys, kinv = np.unique(keys, return_inverse=True)  # few distinct keys (epochs) per call
    kinv = kinv.reshape(-1)
    rks = [mix64(ukeys + U64(((r + 1) * int(GOLDEN)) & 0xFFFFFFFFFFFFFFFF))[kinv]
           for r in range(FEISTEL_ROUNDS)]
    nn = n.astype(U64)
    y = _feistel_once(x, half, mask, rks)
    bad = np.flatnonzero(y >= nn)
    while bad.size:
        y[bad] = _feistel_once(y[bad], half[bad], mask[bad], [rk[bad] for rk in rks])
        bad = bad[y[bad] >= nn[bad]]
    out = y.astype(np.int64)
    out[n <= 1] = 0
    return out


class MixtureSchedule:
    """The global train sample sequence, window by window, stratified: after w windows of
    (about) `window` draws, dataset d has had exactly

        C_d(w) = base_d + min(cap_d, floor(X_d(w) + u_d))

    draws, where X_d grows by window * p_d / (sum of the active p) per window (piecewise
    linear: a non-repeating dataset retires when it reaches cap_d = n_d - base_d and the others
    renormalise), and u_d in [0, 1) is a seeded phase. So the realised share of each dataset
    is its lock share to within one draw, and C(w) - and with it window w - is O(datasets) to
    compute for *any* w: no walk over earlier windows, whatever rank packs window w.

    Window w holds C_d(w + 1) - C_d(w) draws of each d: its positions C_d(w), C_d(w) + 1, ...
    (epoch = c // n_d, position c % n_d through that epoch's keyed Feistel permutation), put in
    a seeded order. `n_windows` is where a finite stream (only non-repeating datasets) ends."""

    def __init__(self, probs, n_train, allow_repeat, dataset_bases, seed_base: int,
                 window: int, base=None):
        self.p = np.asarray(probs, np.float64)
        self.n = np.asarray(n_train, np.int64)
        self.rep = np.asarray(allow_repeat, bool)
        self.bases = np.asarray([int(b) for b in dataset_bases], dtype=U64)
        self.seed_base, self.W = int(seed_base), int(window)
        nd = len(self.n)
        self.base = np.zeros(nd, np.int64) if base is None else np.asarray(base, np.int64)
        self.base = np.where(self.rep, self.base, np.minimum(self.base, self.n))
        self.u = hash_uniform(self.seed_base, np.arange(nd))
        self.cap = np.where(self.rep, np.inf, (self.n - self.base).astype(np.float64))
        self._plan_segments()

    def _plan_segments(self) -> None:
        """Segments [b_k, b_k+1) of constant rates, one per retirement (at most one per
        dataset); each event found in closed form, checked with the one count formula."""
        nd = len(self.n)
        b, X = 0, np.zeros(nd)
        active = (self.n > 0) & (self.p > 0) & (self.rep | (self.cap > 0))
        starts, xs, rates = [], [], []
        self.n_windows = None
        while active.any():
            rate = np.where(active, self.W * self.p / self.p[active].sum(), 0.0)
            starts.append(b); xs.append(X); rates.append(rate)
            fin = np.flatnonzero(active & ~self.rep)
            if not fin.size:
                break
            reached = lambda e: np.floor(X[fin] + (e - b) * rate[fin] + self.u[fin]) >= self.cap[fin]  # noqa
            e = b + np.maximum(1, np.ceil((self.cap[fin] - self.u[fin] - X[fin]) / rate[fin])).astype(np.int64)
            while True:  # float rounding: step the closed form onto the formula's answer
                late = ~reached(e)
                early = (e - 1 > b) & reached(e - 1)
                if not late.any() and not early.any():
                    break
                e = e + late - early
            nb = int(e.min())
            X = X + (nb - b) * rate
            active[fin[np.floor(X[fin] + self.u[fin]) >= self.cap[fin]]] = False
            b = nb
        if not active.any():
            self.n_windows = b
        self._starts = np.asarray(starts, np.int64)
        self._x, self._rate = xs, rates

    def counts(self, w: int) -> np.ndarray:
        """C(w): per dataset, the draws made in windows 0 .. w-1 (with the base)."""
        if not len(self._starts):
            return self.base.copy()
        k = max(0, int(np.searchsorted(self._starts, w, side="right")) - 1)
        c = np.floor(self._x[k] + (w - self._starts[k]) * self._rate[k] + self.u)
        return self.base + np.minimum(self.cap, c).astype(np.int64)

    def positions(self, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, pos) per dataset of the cumulative draw counts c."""
        n = np.maximum(self.n, 1)
        return np.where(self.rep, c // n, 0), np.where(self.rep, c % n, c)

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """The draws of window w: (dataset, train position), in the window's seeded order."""
        if self.n_windows is not None and w >= self.n_windows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        c0 = self.counts(w)
        q = self.counts(w + 1) - c0
        nz = np.flatnonzero(q)
        d = np.repeat(nz, q[nz]).astype(np.int64)
        epoch, pos = self.positions(c0)
        t = permuted_positions(d, pos.astype(np.int64), epoch.astype(np.int64), self.n, self.bases)
        order = np.argsort(mix64(np.arange(len(d), dtype=U64) ^ U64(window_key(self.seed_base, w))),
                           kind="stable")
        return d[order], t[order]


def window_key(seed_base: int, w: int) -> int:
    return int(mix64(U64(w) ^ mix64(U64(seed_base))[0])[0])


class HeldOut:
    """The keyed validation split of every dataset of a stream, stratified by blocks of BLOCK
    ids. With f = percentage / 100 and a seeded phase u_d in [0, 1) per dataset, the ids
    [0, i) of dataset d hold exactly floor(i * f + u_d) held-out samples at every block edge i
    (and at i = n_d): the block [bB, bB + B) holds the difference, and they are its ids with
    the lowest keys mix64(mix64(id) ^ bases[d]). So the held-out share is f to within one
    sample per dataset and within one per block, and kept (train) sample t or held-out sample
    r is found from closed-form counts - nothing stored per sample or per block."""

    BLOCK = 64

    def __init__(self, bases, n, percentage: float):
        self.bases = np.asarray([int(b) for b in bases], dtype=U64)
        self.n = np.asarray(n, np.int64)
        self.frac = float(percentage) / 100.0
        self.phase = ((mix64(self.bases ^ GOLDEN) >> U64(11)).astype(np.float64)
                      * (1.0 / (1 << 53))) if len(self.bases) else np.zeros(0)
        # the compiled count's own arithmetic (float64 product, then floor)
        self.n_held = np.floor(self.n.astype(np.float64) * self.frac + self.phase).astype(np.int64)
        self.n_train = self.n - self.n_held

    def train_ids(self, d, t) -> np.ndarray:
        return select_ids(np.asarray(d, np.int64), np.asarray(t, np.int64), self.n, self.frac,
                          self.phase, self.bases, self.BLOCK, False)

    def held_ids(self, d, r) -> np.ndarray:
        return select_ids(np.asarray(d, np.int64), np.asarray(r, np.int64), self.n, self.frac,
                          self.phase, self.bases, self.BLOCK, True)


class HeldOutSchedule:
    """The validation split as windows: every held-out sample once, dataset 0's in id order,
    then dataset 1's, ...; window w holds positions [w * window, (w + 1) * window)."""

    def __init__(self, held: HeldOut, window: int):
        self.held, self.W = held, int(window)
        self.cum = np.concatenate([[0], np.cumsum(held.n_held)]).astype(np.int64)
        self.n_windows = -(-int(self.cum[-1]) // self.W)

    def window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = min(w * self.W, int(self.cum[-1])), min((w + 1) * self.W, int(self.cum[-1]))
        p = np.arange(a, b, dtype=np.int64)
        d = np.searchsorted(self.cum, p, side="right") - 1
        return d, self.held.held_ids(d, p - self.cum[d])
