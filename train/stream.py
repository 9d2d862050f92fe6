"""MixtureStream: the deterministic, packed, resumable training stream over a mixture lock.

Layers (each a pure function of the one above, none depends on world size or worker count):

1. **Global sample sequence** (`sampling.MixtureSampler`): draw j picks a dataset by the lock's
   `sample_probability` (∝ token share / mean tokens) among active datasets from a counter-based
   uniform; inside the dataset, its t-th draw is position t % n of epoch t // n of a keyed
   Feistel permutation of its n train samples (no permutation array is stored; with a
   validation split, the sorted int64 list of train sample ids, at most the size of `offsets`,
   maps permutation positions to samples). State: `draws` + `(epoch, pos)` per dataset.
2. **Windows**: the sample sequence is cut into fixed windows of `pack_window` draws. Window w is
   turned into pieces (overflow policy for samples longer than seq_len, counted per dataset)
   and, in packed mode, into rows by best-fit-decreasing inside the window (the bounded
   look-ahead), rows then put in a seeded order. Padded mode: one piece per row, in order.
   Concat mode: the window's documents (EOS appended where missing) as one token stream.
3. **Global row (token) sequence**: windows back to back. Global step s takes the next
   world_size * batch_size rows; rank r gets rows [r*B, (r+1)*B) of it; the DataLoader worker
   `s % num_workers` (s counted from where this run started) builds it. Every worker walks the
   windows itself (cheap: lengths only), but reads tokens only for its own batches.

State (`state_dict()`): the window index, the sampler state at the window's start (a few
numbers per dataset) and the offset (rows, or tokens in concat mode) into the window. Restore
regenerates one window: O(pack_window), independent of how far the stream has run. Since the
state is a global position, any world size / worker count / batch size continues the same
global stream. Each batch carries the state *after its global step*; the loader hands out the
one of the last batch the caller took, so worker prefetch does not matter.

Batches (dicts of tensors; labels follow the HF convention, see train/packing.py):
  packed  input_ids, labels, position_ids [B, seq_len] int64; cu_seqlens int32 over the
          flattened batch (documents, and each row's padding as its own segment); max_seqlen.
          The three are views of one block, written in one compiled pass; its memory is
          reused for a later batch only once every tensor of this one is dropped.
  padded  input_ids, labels, attention_mask [B, longest piece in the batch]
  concat  input_ids, labels [B, seq_len]
  all     n_trained (labels != -100), samples LongTensor [k, 2] of (dataset, sample index)
When a finite stream (only non-repeating datasets) ends inside a global step, every rank still
gets that step's batch (missing rows are all padding, labels -100), so ranks stay in lockstep.
Samples longer than seq_len go through their dataset's overflow policy (lock entry `overflow`,
else meta.json build.overflow, else "segment"); `stats()["overflow"]` counts them per dataset
over the windows entered so far. Empty samples are skipped.
"""
from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.built_dataset import BuiltDataset, DatasetError, open_built
from stages.constants import DEFAULT_SEED, OVERFLOW_MODES
from stages.overflow import piece_bounds

from .kernels import warm_up
from .packing import (BlockPool, Located, PackedPieces, StreamError, TokenStore, best_fit_rows,
                      collate_concat, collate_packed, collate_padded, last_tokens)
from .sampling import HeldOut, HeldOutSource, MixtureSampler, stable_hash64

STATE_VERSION = 1
MODES = ("packed", "padded", "concat")
__all__ = ["MixtureStream", "StreamLoader", "StreamError", "verify_lock"]


def lock_content_sha256(lock: dict) -> str:
    """sha256 of the lock's canonical JSON without its paths (built dirs are content-addressed
    by `key`, so moving the cache does not change the content)."""
    c = copy.deepcopy(lock)
    for ds in c.get("datasets", []):
        ds.pop("path", None)
    if isinstance(c.get("tokenizer"), dict):
        c["tokenizer"].pop("path", None)
    blob = json.dumps(c, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class _Dataset:
    index: int
    name: str
    task: str
    key: str
    path: Path
    built: BuiltDataset
    n: int
    allow_repeat: bool
    prob: float
    overflow: str
    n_train: int = 0
    uid: str = field(default="")


@dataclass
class _Window:
    index: int
    start: dict  # {"src": sampler snapshot, "overflow": [...], "consumed": units before}
    size: int  # rows, or tokens in concat mode
    d: np.ndarray
    i: np.ndarray
    a: np.ndarray
    b: np.ndarray
    row_ptr: np.ndarray | None = None  # padded (one piece per row)
    loc: Located | None = None  # each piece's sample in its shard (TokenStore.locate)
    nreal: np.ndarray | None = None  # concat: real length of each document
    starts: np.ndarray | None = None  # concat: token start of each document in the window
    overflow: list[int] | None = None  # counts including this window
    next_start: dict | None = None
    packing: tuple | None = None  # packed: best_fit_rows' result and the row order key
    pieces: PackedPieces | None = None  # packed: built when a batch of this window is read
    public: dict | None = None  # the public state at offset 0 (shared by its batches' states)


class _Cursor:
    """A position in the global unit (row / token) sequence."""

    def __init__(self, stream: "MixtureStream", start: dict):
        self.s = stream
        self.src = stream._new_source()
        self.src.restore(start["src"])
        self.win = stream._make_window(start["window"], start, self.src)
        self.off = int(start["offset"])

    def _settle(self) -> bool:
        while self.off >= self.win.size:
            if self.src.exhausted():
                return False
            self.off -= self.win.size
            self.win = self.s._make_window(self.win.index + 1, self.win.next_start, self.src)
        return True

    def exhausted(self) -> bool:
        return not self._settle()

    def advance(self, k: int, collect: bool = False) -> list:
        segs = []
        while k > 0 and self._settle():
            m = min(k, self.win.size - self.off)
            if collect:
                segs.append((self.win, self.off, self.off + m))
            self.off += m
            k -= m
        return segs

    def state(self) -> dict:
        self._settle()
        w = self.win
        return {"window": w.index, "src": w.start["src"], "overflow": w.start["overflow"],
                "consumed": w.start["consumed"], "offset": self.off,
                "overflow_seen": w.overflow}


def _identity(x):
    return x


class MixtureStream(IterableDataset):
    """See the module docstring. `loader(num_workers)` is the way to iterate with state."""

    def __init__(self, lock_path, seq_len: int, seed: int | None = None, rank: int = 0,
                 world_size: int = 1, mode: str = "packed", batch_size: int = 1,
                 split: str = "train", validation_percentage: float = 0.0,
                 verify: str = "cheap", allow_lock_change: bool = False, *,
                 pack_window: int = 1024, overflow: str | None = None,
                 pad_id: int | None = None, eos_id: int | None = None,
                 packing: bool | None = None):
        if packing is not None:  # DESIGN §6 spelling
            mode = "packed" if packing else "padded"
        if mode not in MODES:
            raise StreamError(f"mode must be one of {MODES}, got {mode!r}")
        if split not in ("train", "validation"):
            raise StreamError(f"split must be 'train' or 'validation', got {split!r}")
        if verify not in ("cheap", "full", "none"):
            raise StreamError(f"verify must be cheap|full|none, got {verify!r}")
        if not (0 <= rank < world_size) or batch_size < 1 or seq_len < 2 or pack_window < 1:
            raise StreamError("need 0 <= rank < world_size, batch_size >= 1, seq_len >= 2, "
                              "pack_window >= 1")
        if overflow is not None and overflow not in OVERFLOW_MODES:
            raise StreamError(f"overflow must be one of {OVERFLOW_MODES}")
        self.lock_path = Path(lock_path).resolve()
        try:
            self.lock = json.loads(self.lock_path.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise StreamError(f"{self.lock_path}: cannot read lock: {e}") from e
        self.lock_sha256 = lock_content_sha256(self.lock)
        self.seq_len, self.mode, self.split = int(seq_len), mode, split
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)
        self.validation_percentage = float(validation_percentage)
        self.allow_lock_change = bool(allow_lock_change)
        self.pack_window = int(pack_window)
        self.seed = int(self.lock.get("seed", DEFAULT_SEED) if seed is None else seed)
        tok = self.lock.get("tokenizer") or {}
        self.vocab_size = tok.get("vocab_size")
        self.datasets = self._open_datasets(overflow)
        # special ids as recorded at build time (Tokenizer.info() in the lock and meta.json)
        ids = {w: tok.get(f"{w}_id") if isinstance(tok.get(f"{w}_id"), int)
               else self.datasets[0].built.special_id(w) for w in ("pad", "eos")}
        self.pad_id = pad_id if pad_id is not None else (ids["pad"] if ids["pad"] is not None else 0)
        self.eos_id = eos_id if eos_id is not None else ids["eos"]
        if mode == "concat" and self.eos_id is None:
            raise StreamError(f"{self.lock_path}: concat mode needs an EOS id: none in the lock's"
                              " tokenizer (a lock from before eos_id was recorded: rebuild it);"
                              " or pass eos_id=")
        self._policies = np.array([ds.overflow for ds in self.datasets])
        for ds in self.datasets:
            self._verify(ds, verify)
        # the validation split: a keyed hash per sample id (per-block counts, no per-sample array)
        self._held = (HeldOut([stable_hash64("tokenmill-validation", ds.uid) for ds in self.datasets],
                              [ds.n for ds in self.datasets], self.validation_percentage)
                      if self.validation_percentage > 0 else None)
        for k, ds in enumerate(self.datasets):
            ds.n_train = int(self._held.n_train[k]) if self._held is not None else ds.n
        if split == "validation" and self.validation_percentage <= 0:
            raise StreamError("split='validation' needs validation_percentage > 0")
        self._store = None
        self._pool = None  # packed batches' output blocks, per process
        self._state = self._initial_state()
        self._feed_start = None  # set on the copies a loader hands to DataLoader workers

    # ---------------------------------------------------------------- opening and checks
    def _open_datasets(self, overflow: str | None) -> list[_Dataset]:
        entries = self.lock.get("datasets")
        if not isinstance(entries, list) or not entries:
            raise StreamError(f"{self.lock_path}: field 'datasets' must be a non-empty list")
        out = []
        for k, e in enumerate(entries):
            where = f"{self.lock_path}: datasets[{k}]"
            if not isinstance(e, dict) or not e.get("path"):
                raise StreamError(f"{where}: missing 'path'")
            path = Path(e["path"])
            if not path.is_absolute():
                path = self.lock_path.parent / path
            try:
                built = open_built(path)
            except DatasetError as err:
                raise StreamError(f"{where}: {err}") from None
            meta = built.meta
            prob = e.get("sample_probability")
            if prob is None:
                raise StreamError(f"{where}: missing 'sample_probability'")
            pol = overflow or e.get("overflow") or (meta.get("build") or {}).get("overflow")
            pol = pol if pol in OVERFLOW_MODES else "segment"
            key = str(e.get("key") or meta["key"])
            name = str(e.get("dataset_name", f"dataset{k}"))
            task = str(e.get("task_name", name))
            out.append(_Dataset(k, name, task, key, path, built, built.n_samples,
                                bool(e.get("allow_repeat", True)), float(prob), pol,
                                uid=key or task))
        return out

    def _verify(self, ds: _Dataset, level: str) -> None:
        """BuiltDataset.check at open: `cheap` (meta.json, the lock entry, file sizes and
        the recorded dtypes; each shard's bounds again when first mapped) or `full` (also
        sha256 and the structure of every shard)."""
        if level == "none":
            return
        try:
            ds.built.check(level, self.lock["datasets"][ds.index], self.lock.get("tokenizer"))
        except DatasetError as err:
            raise StreamError(f"{self.lock_path}: dataset {ds.task!r}: {err}") from None

    # ---------------------------------------------------------------- per-process data
    def __getstate__(self):
        st = self.__dict__.copy()
        st["_store"] = None  # memmaps are re-opened lazily in each worker
        st["_pool"] = None
        return st

    def _tokens(self) -> TokenStore:
        if self._store is None:
            self._store = TokenStore(
                [list(zip(map(str, ds.built.shard_paths), ds.built.shards)) for ds in self.datasets],
                self.vocab_size or self.datasets[0].built.vocab_size)
        return self._store

    def _new_source(self):
        if self.split == "validation":
            return HeldOutSource(self._held)
        return MixtureSampler(
            [ds.prob for ds in self.datasets], [ds.n_train for ds in self.datasets],
            [ds.allow_repeat for ds in self.datasets],
            [stable_hash64("tokenmill-perm", self.seed, ds.uid, ds.task) for ds in self.datasets],
            stable_hash64("tokenmill-mix", self.seed))

    # ---------------------------------------------------------------- windows
    def _make_window(self, w: int, start: dict, src) -> _Window:
        store = self._tokens()
        L = self.seq_len
        d, t = src.draw(self.pack_window)
        # train positions -> sample ids, where a validation split holds some
        i = self._held.train_ids(d, t) if self.split == "train" and self._held is not None else t
        loc = store.locate(d, i)  # empty samples dropped
        d, i, n = loc.d, loc.i, loc.n
        over = start["overflow"]
        if self.mode == "concat":
            last = last_tokens(loc)
            vl = n + (last != self.eos_id)
            ends = np.cumsum(vl)
            win = _Window(w, start, int(ends[-1]) if len(ends) else 0, d, i,
                          np.zeros(len(d), np.int64), vl, nreal=n, starts=ends - vl, loc=loc)
        else:
            a, b = np.zeros(len(d), np.int64), n
            if len(n) and n.max() > L:
                nd = len(self.datasets)
                over = (np.asarray(over, np.int64)
                        + np.bincount(d[n > L], minlength=nd)).tolist()
                item, a, b = piece_bounds(n, L, self._policies[d])
                loc = loc.take(item)
                d, i = loc.d, loc.i
            if self.mode == "packed":
                key = (stable_hash64("tokenmill-rows", self.seed, w) if self.split == "train"
                       else None)  # rows in a seeded order (train), in opening order (eval)
                order, rows, nrows = best_fit_rows(b - a, L)
                win = _Window(w, start, nrows, d, i, a, b, loc=loc,
                              packing=(order, rows, nrows, key))
            else:
                win = _Window(w, start, len(d), d, i, a, b, loc=loc,
                              row_ptr=np.arange(len(d) + 1, dtype=np.int64))
        win.overflow = list(over)
        win.next_start = {"src": src.snapshot(), "overflow": win.overflow,
                          "consumed": start["consumed"] + win.size}
        return win

    # ---------------------------------------------------------------- batches
    def _collate(self, segs: list) -> dict:
        B, L = self.batch_size, self.seq_len
        if self.mode == "packed":
            for win, _, _ in segs:
                if win.pieces is None:
                    win.pieces = PackedPieces(win.loc, win.a, win.b, win.packing)
            if self._pool is None:
                self._pool = BlockPool()
            return collate_packed([(w.pieces, u0, u1) for w, u0, u1 in segs], B, L,
                                  self.pad_id, self._pool)
        P, A, E, R, N, T = [], [], [], [], [], []
        base = 0
        for win, u0, u1 in segs:
            if self.mode == "concat":
                j0 = int(np.searchsorted(win.starts + win.b, u0, side="right"))
                j1 = int(np.searchsorted(win.starts, u1, side="left"))
                st = win.starts[j0:j1]
                lo = np.maximum(st, u0)
                P.append(win.loc.take(slice(j0, j1))); N.append(win.nreal[j0:j1])
                A.append(lo - st); E.append(np.minimum(st + win.b[j0:j1], u1) - st)
                T.append(base + lo - u0)
                base += u1 - u0
            else:
                p0, p1 = win.row_ptr[u0], win.row_ptr[u1]
                P.append(win.loc.take(slice(p0, p1)))
                A.append(win.a[p0:p1]); E.append(win.b[p0:p1])
                R.append(np.repeat(np.arange(base, base + u1 - u0, dtype=np.int64),
                                   np.diff(win.row_ptr[u0:u1 + 1])))
                base += u1 - u0

        def cat(x):
            return np.concatenate(x).astype(np.int64) if x else np.zeros(0, np.int64)

        loc = Located.join(P) if P else self._tokens().locate([], [])
        a, b = cat(A), cat(E)
        if self.mode == "padded":
            return collate_padded(loc, a, b, cat(R), B, self.pad_id)
        return collate_concat(loc, a, b, cat(N), cat(T), B, L, self.pad_id, self.eos_id)

    def _iter_batches(self, wid: int, nw: int, start: dict):
        cur = _Cursor(self, self._internal(start))
        per = self.batch_size * (self.seq_len if self.mode == "concat" else 1)
        ws, r = self.world_size, self.rank
        step = 0
        while not cur.exhausted():
            if step % nw == wid:
                cur.advance(r * per)
                segs = cur.advance(per, collect=True)
                cur.advance((ws - r - 1) * per)
                batch = self._collate(segs)
                batch["_state"] = self._public_at(cur)
                yield batch
            else:
                cur.advance(ws * per)
            step += 1

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        if self._feed_start is not None:  # a loader's copy: keep the state in the batch
            yield from self._iter_batches(wid, nw, self._feed_start)
            return
        for batch in self._iter_batches(wid, nw, self._state):
            st = batch.pop("_state")
            if info is None:
                self._state = st
            yield batch

    def loader(self, num_workers: int = 0, **dataloader_kwargs) -> "StreamLoader":
        return StreamLoader(self, num_workers, **dataloader_kwargs)

    def eval_batches(self):
        """The validation split, each held-out sample once (this rank's share), in a fixed order."""
        if self.validation_percentage <= 0:
            return iter(())
        v = copy.copy(self)
        v.split, v._feed_start = "validation", None
        v._state = v._initial_state()
        def batches():
            for b in v._iter_batches(0, 1, v._state):
                del b["_state"]
                yield b
        return batches()

    # ---------------------------------------------------------------- state
    def _initial_state(self) -> dict:
        src = (self._new_source().snapshot() if self.split == "train"
               else {"draws": 0, "epoch": [], "pos": []})
        return self._public({"window": 0, "src": src,
                             "overflow": [0] * len(self.datasets), "consumed": 0, "offset": 0,
                             "overflow_seen": [0] * len(self.datasets)})

    def _public(self, st: dict) -> dict:
        src = st["src"]
        ds = []
        for k, d in enumerate(self.datasets):
            ds.append({"task_name": d.task, "key": d.key,
                       "epoch": src["epoch"][k] if src["epoch"] else 0,
                       "pos": src["pos"][k] if src["pos"] else 0,
                       "overflow": st["overflow"][k]})
        return {"version": STATE_VERSION, "lock_sha256": self.lock_sha256, "seed": self.seed,
                "seq_len": self.seq_len, "mode": self.mode, "split": self.split,
                "pack_window": self.pack_window,
                "validation_percentage": self.validation_percentage,
                "window": st["window"], "draws": src["draws"], "offset": st["offset"],
                "consumed": st["consumed"] + st["offset"], "datasets": ds,
                "overflow_seen": list(st.get("overflow_seen") or st["overflow"])}

    def _public_at(self, cur: _Cursor) -> dict:
        """`_public(cur.state())`, the per-window part built once (states are read-only)."""
        cur._settle()
        w = cur.win
        if w.public is None:
            st = cur.state()
            st["offset"] = 0
            w.public = self._public(st)
        st = dict(w.public)
        st["offset"] = cur.off
        st["consumed"] = w.start["consumed"] + cur.off
        return st

    def _internal(self, pub: dict) -> dict:
        by = {(x["task_name"], x["key"]): x for x in pub["datasets"]}
        ep, pos, over = [], [], []
        for d in self.datasets:
            x = by.get((d.task, d.key), {"epoch": 0, "pos": 0, "overflow": 0})
            e, p = int(x["epoch"]), int(x["pos"])
            if d.n_train and p > d.n_train:  # only after an allowed lock change
                e, p = (e + p // d.n_train, p % d.n_train) if d.allow_repeat else (e, d.n_train)
            ep.append(e); pos.append(p); over.append(int(x["overflow"]))
        src = ({"draws": int(pub["draws"]), "epoch": ep, "pos": pos} if self.split == "train"
               else {"draws": int(pub["draws"]), "epoch": [], "pos": []})
        off = int(pub["offset"])
        return {"window": int(pub["window"]), "src": src, "overflow": over,
                "consumed": int(pub["consumed"]) - off, "offset": off}

    def state_dict(self) -> dict:
        """Position after the last batch this object's own iteration yielded (num_workers=0
        use); with `loader()`, use the loader's state_dict."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise StreamError(f"unsupported stream state (version {state.get('version')!r})")
        if state.get("split", "train") != self.split:
            raise StreamError(f"state is for split {state.get('split')!r}, "
                              f"stream is {self.split!r}")
        diffs = [f for f, mine in (("lock_sha256", self.lock_sha256), ("seed", self.seed),
                                   ("seq_len", self.seq_len), ("mode", self.mode),
                                   ("pack_window", self.pack_window),
                                   ("validation_percentage", self.validation_percentage))
                 if state.get(f) != mine]
        st = copy.deepcopy(state)
        if diffs:
            if not self.allow_lock_change:
                raise StreamError(
                    "stream state does not match this stream (" + ", ".join(
                        f"{f}: state {state.get(f)!r} != {getattr(self, f)!r}" for f in diffs)
                    + "); pass allow_lock_change=True to continue from the per-dataset "
                    "positions (restarts the current packing window: up to pack_window samples"
                    " may repeat)")
            warnings.warn(f"resuming across a changed stream definition ({', '.join(diffs)}): "
                          "continuing from the start of the saved window", stacklevel=2)
            st["consumed"] -= st["offset"]
            st["offset"] = 0
        self._state = self._public(self._internal(st))

    def stats(self) -> dict:
        return {"overflow": {d.task: c for d, c in
                             zip(self.datasets, self._state["overflow_seen"])}}


class StreamLoader:
    """Iterable of collated batches with an exact, prefetch-proof state_dict()."""

    def __init__(self, stream: MixtureStream, num_workers: int = 0, **kw):
        self.stream, self.num_workers, self.kw = stream, int(num_workers), kw
        self._state = stream.state_dict()

    def __iter__(self):
        feed = copy.copy(self.stream)  # (a copy drops _store: __getstate__)
        feed._feed_start = copy.deepcopy(self._state)
        if self.num_workers == 0:  # opened once in this process, shared by the copies
            feed._store = self.stream._tokens()
        # else: each worker memory-maps the shards itself
        if self.num_workers == 0:
            it = feed._iter_batches(0, 1, feed._feed_start)
        else:
            warm_up()  # once per process; forked workers inherit the loaded kernels
            it = iter(DataLoader(feed, batch_size=None, num_workers=self.num_workers,
                                 collate_fn=_identity, **self.kw))
        for batch in it:
            self._state = batch.pop("_state")
            yield batch

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()

    def stats(self) -> dict:
        return {"overflow": {d.task: c for d, c in
                             zip(self.stream.datasets, self._state["overflow_seen"])}}


def verify_lock(lock_path, level: str = "full") -> None:
    """The trainer's --verify_data: check every dataset of a lock before step 0 (`full`:
    sha256 and structure of every shard, as `pipeline verify`; `cheap`: meta.json, lock and
    file sizes). Raises StreamError naming the dir or shard and the fault."""
    MixtureStream(lock_path, 2, verify=level)
