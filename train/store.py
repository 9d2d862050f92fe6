"""Shard access for the training stream: `TokenStore` memory-maps the shards of a lock on first
use (a bounded number at once, one map per shard file, byte offsets from meta.json) and finds
a window's samples in them (`Located`); nothing per sample is copied into private memory. A
shard's layout (dtypes, sizes, index end points) is checked when first mapped, its whole
structure too when it is small; every index entry compiled code follows is bounds-checked
as it is read (so opening a terabyte of shards costs O(shards), not O(samples)); running out
of descriptors or maps is a StreamError naming the limit and the fix. A mapped shard holds no
file descriptor (stages.shard.map_shard): descriptors per process do not grow with the shards
mapped, and the maps are capped (`default_max_mapped`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from stages.shard import (check_arrays, expected_layout_faults, map_errno_is_limit, map_shard,
                          shard_layout)

from .kernels import gather_samples


# Shards up to this many tokens get the whole structure and token-id check when first mapped
# (early, exact messages); larger ones only O(1) here, so a first batch that maps a hundred
# 1 GiB shards does not scan them - their indexes are checked as read, token ids per batch.
FULL_CHECK_ON_MAP = 1 << 18


class StreamError(ValueError):
    """A lock, shard or state that the stream refuses (message names the file and field)."""


def ranges_index(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, e) over the pairs, vectorised."""
    lens = np.asarray(ends, np.int64) - np.asarray(starts, np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    shift = np.asarray(starts, np.int64) - (np.cumsum(lens) - lens)
    return np.repeat(shift, lens) + np.arange(total, dtype=np.int64)


def default_max_mapped() -> int:
    """Shards mapped at once per process: TOKENMILL_MAX_MAPPED_SHARDS, else half of
    vm.max_map_count (shared by every map of the process), at most 32768. A map holds no file
    descriptor (stages.shard.map_shard), so the open-file limit does not bound it."""
    env = os.environ.get("TOKENMILL_MAX_MAPPED_SHARDS")
    if env:
        return max(1, int(env))
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            maps = int(f.read())
    except (OSError, ValueError):
        maps = 65530
    return max(8, min(32768, maps // 2))


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (as many trainers do at
    start; DataLoader workers inherit it) and return the soft limit now in force."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else soft
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        return soft
    except (ImportError, OSError, ValueError):
        return -1


_LIMIT_HELP = ("the process ran out of {what} ({err}); each mapped shard holds one memory "
               "map (and a file descriptor only while it is being mapped). Fix: raise the limit "
               "(`ulimit -n 65536`; `sysctl -w vm.max_map_count=262144`), or map fewer shards "
               "at once (TOKENMILL_MAX_MAPPED_SHARDS=256), or build with larger shards")

FD_HEADROOM = 64  # descriptors a DataLoader worker keeps free for torch's shared-memory batches


def check_fd_headroom() -> None:
    """In a DataLoader worker, before handing over a batch: torch passes each batch tensor
    through shared memory, one descriptor each; a worker without free ones fails inside the
    queue's feeder thread, where the error is printed and the batch dropped (the parent then
    waits forever). Refuse here instead - an exception the DataLoader forwards to the parent."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return
        used = len(os.listdir("/proc/self/fd"))
    except (ImportError, OSError, ValueError):
        return
    if soft - used < FD_HEADROOM:
        raise StreamError(
            f"a DataLoader worker has {used} of its {soft} open files in use, too few left to "
            "pass batches to the trainer through shared memory. Fix: raise the limit "
            "(`ulimit -n 65536`) or use fewer DataLoader workers")


class MappedShard:
    """One shard file mapped once (stages.shard.map_shard: one map, no h5py handle, no file
    descriptor held): its tokens, offsets and, when present, loss spans as read-only views of
    the page cache, shared by every process."""

    __slots__ = ("tokens", "offsets", "lso", "spans", "scanned")

    def __init__(self, path: str, entry: dict, vocab_size: int, check: bool):
        try:
            arrays = entry.get("arrays") or shard_layout(path)
            size = os.stat(path).st_size
        except OSError as e:
            raise _os_error(path, e) from None
        n, nt = int(entry["n_samples"]), int(entry["n_tokens"])
        bad = expected_layout_faults(arrays, n, nt, vocab_size, size, wider_tokens=True)
        if bad:
            raise StreamError(f"{path}: {bad[0]}")
        try:
            m = map_shard(path, arrays)
        except OSError as e:
            raise _os_error(path, e) from None
        self.tokens, self.offsets = m.tokens, m.offsets
        self.lso, self.spans = m.loss_span_offsets, m.loss_spans
        self.scanned = False  # whole structure and token ids checked here
        if check:
            bad = self._ends_fault()
            if not bad and nt <= FULL_CHECK_ON_MAP:
                self.scanned = True  # small: the whole structure, token ids
                arr = {"tokens": self.tokens, "offsets": self.offsets}
                if self.spans is not None:
                    arr.update(loss_spans=self.spans, loss_span_offsets=self.lso)
                bad = check_arrays(arr, vocab_size)
                bad = bad[0] if bad else None
            if bad:  # (larger shards: each index read is checked in gather_samples, token ids
                raise StreamError(f"{path}: {bad}")  # batch by batch - O(1) here, not O(samples))

    def _ends_fault(self) -> str | None:
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens):
            return f"offsets are not a non-decreasing index from 0 to the {len(self.tokens)} tokens"
        if self.spans is not None and (self.lso[0] != 0 or self.lso[-1] != len(self.spans)):
            return (f"loss_span_offsets are not a non-decreasing index from 0 to the "
                    f"{len(self.spans)} loss spans")
        return None


def _os_error(path: str, e: OSError) -> StreamError:
    what = map_errno_is_limit(e)
    if what:
        return StreamError(f"{path}: " + _LIMIT_HELP.format(what=what, err=e.strerror))
    return StreamError(f"{path}: cannot map the shard: {e.strerror or e}")


@dataclass
class Located:
    """Items (samples or pieces of them) of one window, found in their shards. Per item:
    dataset d, sample i, slot (index into `tokens`), start (the sample's first token in its
    shard), n (its length), q0/q1 (its loss spans in lo/hi; -1, -1: a sample without spans).
    tokens: the token array of each shard the window uses; lo, hi: the window's spans."""
    d: np.ndarray
    i: np.ndarray
    slot: np.ndarray
    start: np.ndarray
    n: np.ndarray
    q0: np.ndarray
    q1: np.ndarray
    tokens: list
    lo: np.ndarray
    hi: np.ndarray
    addr: np.ndarray | None = None  # address of each tokens array, when all share one dtype
    ids_checked: bool = True  # every shard's token ids were checked when it was mapped

    def take(self, idx) -> "Located":
        return Located(self.d[idx], self.i[idx], self.slot[idx], self.start[idx], self.n[idx],
                       self.q0[idx], self.q1[idx], self.tokens, self.lo, self.hi, self.addr,
                       self.ids_checked)

    @staticmethod
    def join(parts: list["Located"]) -> "Located":
        """Items of several windows as one (slots and span indices renumbered)."""
        if len(parts) == 1:
            return parts[0]
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        slot, q0, q1, toks, lo, hi = [], [], [], [], [], []
        ns = nq = 0
        for p in parts:
            slot.append(p.slot + ns)
            has = p.q0 >= 0
            q0.append(np.where(has, p.q0 + nq, -1))
            q1.append(np.where(has, p.q1 + nq, -1))
            toks += p.tokens
            lo.append(p.lo)
            hi.append(p.hi)
            ns, nq = ns + len(p.tokens), nq + len(p.lo)
        return Located(cat([p.d for p in parts]), cat([p.i for p in parts]), cat(slot),
                       cat([p.start for p in parts]), cat([p.n for p in parts]), cat(q0),
                       cat(q1), toks, np.concatenate(lo).astype(np.int32),
                       np.concatenate(hi).astype(np.int32),
                       ids_checked=all(p.ids_checked for p in parts))


class TokenStore:
    """Every shard of every dataset of a lock, memory-mapped on first use (at most
    `max_mapped` at once, least recently used unmapped first). Private memory per process:
    per-shard bookkeeping (cumulative sample counts), nothing per sample - offsets, spans and
    tokens are read through the maps, shared by every process of a node via the page cache."""

    def __init__(self, shards: list[list[tuple[str, dict]]], vocab_size: int,
                 max_mapped: int | None = None, check: bool = True):
        """shards: per dataset, (path, meta.json shard entry) of each of its shards."""
        self.paths = [p for ds in shards for p, _ in ds]
        self.entries = [e for ds in shards for _, e in ds]
        counts = [int(e["n_samples"]) for e in self.entries]
        self.first = np.zeros(len(counts) + 1, np.int64)  # global id of each shard's sample 0
        np.cumsum(counts, out=self.first[1:])
        per_ds = np.cumsum([0] + [len(ds) for ds in shards])
        self.ds_base = self.first[per_ds]  # global sample id of each dataset's sample 0
        self.vocab_size = int(vocab_size)
        self.max_mapped = max_mapped or default_max_mapped()
        self.check = check
        self._maps: dict[int, MappedShard] = {}
        self._checked: set[int] = set()
        ns = len(self.paths)
        self._addr = np.zeros((4, ns), np.int64)  # offsets, loss_span_offsets, loss_spans, tokens
        self._wide = np.zeros(ns, bool)  # tokens stored as uint32
        self._scanned = np.zeros(ns, bool)  # token ids checked when first mapped (sticky)
        self._ntok = np.zeros(ns, np.int64)  # tokens and loss spans per shard (index bounds)
        self._nspan = np.zeros(ns, np.int64)
        self._is_mapped = np.zeros(ns, bool)
        self._last_use = np.zeros(ns, np.int64)
        self._tick = 0

    def shard(self, g: int) -> MappedShard:
        if not self._is_mapped[g]:
            self._ensure(np.array([g], np.int64))
        return self._maps[g]

    def _ensure(self, uniq: np.ndarray) -> None:
        """Map the shards `uniq` (sorted ids) if not mapped; unmap the least recently used
        others beyond max_mapped (a window still holding one keeps its pages alive)."""
        self._tick += 1
        for g in uniq[~self._is_mapped[uniq]].tolist():
            m = MappedShard(self.paths[g], self.entries[g], self.vocab_size,
                            self.check and g not in self._checked)
            self._checked.add(g)
            self._scanned[g] |= m.scanned or not self.check
            self._maps[g] = m
            self._is_mapped[g] = True
            self._addr[:, g] = (m.offsets.ctypes.data,
                                m.lso.ctypes.data if m.spans is not None else 0,
                                m.spans.ctypes.data if m.spans is not None else 0,
                                m.tokens.ctypes.data)
            self._wide[g] = m.tokens.dtype == np.uint32
            self._ntok[g] = len(m.tokens)
            self._nspan[g] = len(m.spans) if m.spans is not None else 0
        self._last_use[uniq] = self._tick
        over = len(self._maps) - self.max_mapped
        if over > 0:
            cand = np.flatnonzero(self._is_mapped & (self._last_use < self._tick))
            k = min(over, len(cand))
            if k:
                for g in cand[np.argpartition(self._last_use[cand], k - 1)[:k]].tolist():
                    del self._maps[g]
                    self._is_mapped[g] = False
                    self._addr[:, g] = 0

    def path_of(self, d: int, i: int) -> str:
        """The shard file holding sample i of dataset d."""
        g = int(np.searchsorted(self.first, self.ds_base[d] + i, side="right") - 1)
        return self.paths[g]

    def locate(self, d, i, drop_empty: bool = True) -> Located:
        """Samples (dataset d, index i), in order; empty ones dropped."""
        d, i = np.asarray(d, np.int64), np.asarray(i, np.int64)
        gs = self.ds_base[d] + i
        g = np.searchsorted(self.first, gs, side="right") - 1
        j = gs - self.first[g]
        uniq, slot = np.unique(g, return_inverse=True)
        slot = slot.reshape(-1).astype(np.int64)
        self._ensure(uniq)
        a = self._addr[:, uniq]
        start, n, q0, q1, lo, hi, bad, why = gather_samples(
            slot, j, a[0], a[1], a[2], self._ntok[uniq], self._nspan[uniq], _P64, _P32)
        if bad >= 0:
            what = {1: "offsets", 2: "loss_span_offsets", 3: "loss_spans"}[int(why)]
            raise StreamError(f"{self.paths[int(uniq[slot[bad]])]}: sample {int(j[bad])}: its "
                              f"{what} entry points outside its array or sample (a corrupt shard: "
                              "`python -m pipeline verify` checks every shard)")
        tokens = [self._maps[g].tokens for g in uniq.tolist()]
        wide = self._wide[uniq]
        loc = Located(d, i, slot, start, n, q0, q1, tokens, lo, hi,
                      a[3].copy() if len(uniq) and (wide.all() or not wide.any()) else None,
                      bool(self._scanned[uniq].all()))
        if drop_empty and len(d) and not (loc.n > 0).all():
            loc = loc.take(np.flatnonzero(loc.n > 0))
        return loc


_P64, _P32 = np.zeros(0, np.int64), np.zeros(0, np.int32)
