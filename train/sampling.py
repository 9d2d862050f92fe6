"""Counter-based randomness for the training stream: hashing, per-epoch permutations, and the
seeded mixture sampler.

Everything here is a pure function of integers (no global RNG, no numpy Generator whose stream
may change between releases): splitmix64 mixing in wrapping uint64 arithmetic.

* ``uniforms(base, j0, n)`` - the j-th uniform of a stream is ``mix64(base + j*GOLDEN)``, so draw
  j can be computed without computing draws 0..j-1 (counter-based).
* ``feistel_permute(x, n, keys)`` - a keyed bijection of [0, n) (balanced Feistel network over
  the smallest even-bit power of two >= n, cycle-walking back into [0, n)). A dataset's order in
  epoch e is ``feistel_permute(arange(n), n, key(seed, dataset, e))``: position p of the epoch
  is evaluated on demand, no permutation array is stored.
* ``MixtureSampler`` - the global sample sequence of the train split. Its whole state is
  ``draws`` (the counter) and ``(epoch, pos)`` per dataset. It computes the two functions
  above draw by draw in compiled code (kernels.mixture_choices / permuted_positions); the
  numpy versions here are their definition, and the tests hold the kernels to them.
* ``HeldOut`` - the validation split: sample i of a dataset is held out iff
  ``hash_uniform(key, i) < percentage / 100``; it maps train positions and validation
  positions to sample ids through per-block counts (8 B per 64 samples), no per-sample array.
* ``HeldOutSource`` - the validation split's (dataset, sample) sequence, state ``draws`` only.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .kernels import heldout_block_counts, mixture_choices, permuted_positions, select_ids

U64 = np.uint64
GOLDEN = U64(0x9E3779B97F4A7C15)
_M1 = U64(0xBF58476D1CE4E5B9)
_M2 = U64(0x94D049BB133111EB)
_S30, _S27, _S31 = U64(30), U64(27), U64(31)
FEISTEL_ROUNDS = 6


def stable_hash64(*parts) -> int:
    """A 64-bit hash of the parts' text, stable across processes, runs and machines."""
    h = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def mix64(z) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = np.array(z, dtype=U64, copy=True, ndmin=1)
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def uniforms(base: int, j0: int, n: int) -> np.ndarray:
    """Uniforms in [0, 1) for counters j0 .. j0+n-1 of the stream `base`."""
    ctr = np.arange(j0, j0 + n, dtype=U64)
    z = mix64(ctr * GOLDEN + U64(base))
    return (z >> U64(11)).astype(np.float64) * (1.0 / (1 << 53))


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


class MixtureSampler:
    """The global train sample sequence: draw j picks a dataset with probability proportional to
    its lock `sample_probability` among the still-active datasets (uniform j of the seeded
    counter stream); within a dataset, its t-th draw is position t % n of epoch t // n, mapped
    through that epoch's Feistel permutation. A non-repeating dataset retires after n draws (the
    others renormalise); a repeating one goes on with epoch + 1.

    State: ``draws`` and per dataset ``(epoch, pos)`` - restored in O(1) (one block of draws
    is generated ahead; it is not part of the state)."""

    def __init__(self, probs, n_train, allow_repeat, dataset_bases, seed_base: int,
                 block: int = 8192):
        self.probs = np.asarray(probs, dtype=np.float64)
        self.n = [int(v) for v in n_train]
        self.repeat = [bool(v) for v in allow_repeat]
        self.bases = [int(v) for v in dataset_bases]
        self._n_arr = np.asarray(self.n, np.int64)
        self._bases_arr = np.asarray(self.bases, dtype=U64)
        self._rep_arr = np.asarray(self.repeat, bool)
        self.seed_base = int(seed_base)
        # Draws are generated `block` at a time (a window of 1024 is mostly numpy call
        # overhead) into a look-ahead buffer; the public state below only counts what `draw`
        # handed out, so it is exactly the state an unbuffered sampler would have.
        self.block = max(1, int(block))
        self.restore({"draws": 0, "epoch": [0] * len(self.n), "pos": [0] * len(self.n)})

    # -- state ---------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"draws": self.draws, "epoch": self.epoch.tolist(), "pos": self.pos.tolist()}

    def restore(self, snap: dict) -> None:
        self.draws = int(snap["draws"])
        self.epoch = np.array(snap["epoch"], np.int64).reshape(-1)
        self.pos = np.array(snap["pos"], np.int64).reshape(-1)
        # the generator's own position (ahead of the public one by the buffered draws)
        self._g_draws, self._g_epoch, self._g_pos = self.draws, self.epoch.copy(), self.pos.copy()
        self._buf_d = self._buf_t = np.zeros(0, np.int64)
        self._buf_at = 0

    def _active(self, pos) -> np.ndarray:
        """Datasets still drawn from (vectorised: no Python loop over datasets)."""
        return np.flatnonzero((self._n_arr > 0) & (self.probs > 0)
                              & (self._rep_arr | (pos < self._n_arr)))

    def active(self) -> list[int]:
        return self._active(self.pos)

    def exhausted(self) -> bool:
        return len(self.active()) == 0

    # -- drawing -------------------------------------------------------------------------
    def draw(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Next `count` draws (fewer when every dataset is retired): (dataset, train position)."""
        count = int(count)
        have = len(self._buf_d) - self._buf_at
        if have < count:
            d, t = self._generate(max(self.block, count - have))
            self._buf_d = np.concatenate([self._buf_d[self._buf_at:], d])
            self._buf_t = np.concatenate([self._buf_t[self._buf_at:], t])
            self._buf_at = 0
        a = self._buf_at
        b = min(len(self._buf_d), a + count)
        self._buf_at = b
        d, t = self._buf_d[a:b], self._buf_t[a:b]
        self.draws += b - a
        self._advance(self.epoch, self.pos, np.bincount(d, minlength=len(self.n)))
        return d, t

    def _advance(self, epoch: np.ndarray, pos: np.ndarray, counts: np.ndarray) -> None:
        """Move (epoch, pos) of every dataset by its draw count, in place."""
        c = np.asarray(counts, np.int64)
        tot = pos + c
        rep = np.flatnonzero(self._rep_arr & (c > 0))
        epoch[rep] += tot[rep] // self._n_arr[rep]
        pos[rep] = tot[rep] % self._n_arr[rep]
        once = np.flatnonzero(~self._rep_arr & (c > 0))
        pos[once] = tot[once]

    def _generate(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `count` draws from the generator's position (the buffer's end)."""
        out_d, out_t = [], []
        remaining = int(count)
        epoch, pos = self._g_epoch, self._g_pos
        while remaining > 0:
            act = self._active(pos)
            if len(act) == 0:
                break
            cdf = np.cumsum(self.probs[act])
            cdf /= cdf[-1]
            choice = mixture_choices(U64(self.seed_base), self._g_draws, remaining, cdf, act)
            cut = remaining
            for d in act[~self._rep_arr[act]].tolist():  # first draw that uses up a
                left = self.n[d] - int(pos[d])         # non-repeating dataset ends this chunk
                hit = np.flatnonzero(choice == d)
                if hit.size >= left:
                    cut = min(cut, int(hit[left - 1]) + 1)
            choice = choice[:cut]
            counts = np.bincount(choice, minlength=len(self.n))
            t = permuted_positions(choice, np.asarray(pos, np.int64), np.asarray(epoch, np.int64),
                                   self._n_arr, self._bases_arr)
            self._advance(epoch, pos, counts)
            out_d.append(choice)
            out_t.append(t)
            self._g_draws += cut
            remaining -= cut
        if not out_d:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(out_d), np.concatenate(out_t)


class HeldOut:
    """The keyed validation split of every dataset of a stream. Sample i of dataset d is held
    out iff hash_uniform(bases[d], i) < percentage / 100. Kept (train) sample number t and
    held-out sample number r are found via cumulative counts per block of BLOCK ids."""

    BLOCK = 64

    def __init__(self, bases, n, percentage: float):
        self.bases = np.asarray([int(b) for b in bases], dtype=U64)
        self.n = np.asarray(n, np.int64)
        self.threshold = float(percentage) / 100.0
        held, ptr, cum_held = [], [0], []
        for b, nn in zip(self.bases, self.n.tolist()):
            c = heldout_block_counts(nn, b, self.threshold, self.BLOCK)
            cum_held.append(np.concatenate([[0], np.cumsum(c)]).astype(np.int64))
            held.append(int(cum_held[-1][-1]))
            ptr.append(ptr[-1] + len(c) + 1)
        self.n_held = np.asarray(held, np.int64)
        self.n_train = self.n - self.n_held
        self.blk_ptr = np.asarray(ptr, np.int64)
        ch = np.concatenate(cum_held) if cum_held else np.zeros(0, np.int64)
        # kept samples before each block: block start minus the held-out ones
        starts = np.concatenate([np.minimum(np.arange(len(c), dtype=np.int64) * self.BLOCK, nn)
                                 for c, nn in zip(cum_held, self.n.tolist())]) if cum_held \
            else np.zeros(0, np.int64)
        self.cum_held, self.cum_kept = ch, starts - ch

    def train_ids(self, d, t) -> np.ndarray:
        return select_ids(np.asarray(d, np.int64), np.asarray(t, np.int64), self.blk_ptr,
                          self.cum_kept, self.bases, self.n, self.threshold, self.BLOCK, False)

    def held_ids(self, d, r) -> np.ndarray:
        return select_ids(np.asarray(d, np.int64), np.asarray(r, np.int64), self.blk_ptr,
                          self.cum_held, self.bases, self.n, self.threshold, self.BLOCK, True)


class HeldOutSource:
    """Every held-out sample once: dataset 0's in id order, then dataset 1's, ...; state
    `draws` (the position in that sequence)."""

    def __init__(self, held: HeldOut):
        self.held = held
        self.cum = np.concatenate([[0], np.cumsum(held.n_held)]).astype(np.int64)
        self.draws = 0

    def snapshot(self) -> dict:
        return {"draws": self.draws, "epoch": [], "pos": []}

    def restore(self, snap: dict) -> None:
        self.draws = int(snap["draws"])

    def exhausted(self) -> bool:
        return self.draws >= self.cum[-1]

    def draw(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.draws, min(int(self.cum[-1]), self.draws + int(count))
        self.draws = b
        p = np.arange(a, b, dtype=np.int64)
        d = np.searchsorted(self.cum, p, side="right") - 1
        return d, self.held.held_ids(d, p - self.cum[d])
