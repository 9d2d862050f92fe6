"""MixtureStream: the deterministic, packed, resumable training stream over a mixture lock.

Layers (each a pure function of the one above):

1. **Global sample sequence, window by window** (`sampling.MixtureSchedule`): window w holds,
   for each dataset, the draws between its stratified cumulative counts C_d(w) and C_d(w + 1)
   (shares follow the lock's `sample_probability`, ∝ token share / mean tokens, to within one
   draw); a dataset's t-th draw is position t % n of epoch t // n of a keyed Feistel
   permutation of its n train samples (no permutation array; with a validation split, a keyed
   hash per sample id decides what is held out). Window w is O(datasets) to find for any w.
2. **Window → units**: the window's samples become pieces (overflow policy for samples longer
   than seq_len, counted per dataset) and, in packed mode, rows by best-fit-decreasing inside
   the window (the bounded look-ahead), rows then put in a seeded order. Padded mode: one piece
   per row, in order. Concat mode: the window's documents (EOS appended where missing) as one
   token stream. None of this depends on world size or worker count.
3. **Lanes** (`train/lanes.py`): rank r of world_size consumes the windows r, r + world_size,
   r + 2 * world_size, ... back to back, batch_size rows (batch_size * seq_len tokens in concat
   mode) per batch. A rank never makes another rank's windows, so its cost per batch does not
   grow with the world size. DataLoader worker `k % num_workers` builds the rank's k-th batch
   (counted from where this run started): every worker walks the rank's windows (lengths and
   packing only), reading tokens only for its own batches, so the batches do not depend on the
   worker count.

Who does what: `sampling` (the schedule and the held-out split), `window_plan` (layer 2, a
pure function of the window), `collate` (one collator per mode), `lanes` (layer 3),
`stream_state` (the resume state: `ResumeState` holds it, `adopt` resumes it; the loader),
`store` (the shard maps). This class opens and checks the datasets and ties them together.

State (`state_dict()`, a rank's): its lane position (the window it is in and the units of it
consumed, plus a short queue after a world-size change), and per dataset the draws before that
window. Restore regenerates one window. On the same world size, each rank continues exactly
(any worker count). On another world size, `load_state_dict` takes the list of *every* old
rank's state and re-plans: every unit not yet consumed is owed to exactly one new rank, so no
sample is repeated or lost. Each batch carries the state after it; the loader hands out the
one of the last batch the caller took, so worker prefetch does not matter.

Batches (dicts of tensors; labels follow the HF convention, see train/packing.py):
  packed  input_ids, labels, position_ids [B, seq_len] int64; cu_seqlens int32 over the
          flattened batch (documents, and each row's padding as its own segment); max_seqlen.
          The three are views of one block, written in one compiled pass; its memory is
          reused for a later batch only once every tensor of this one is dropped.
  padded  input_ids, labels, attention_mask [B, longest piece in the batch]
  concat  input_ids, labels [B, seq_len]
  all     n_trained (labels != -100), samples LongTensor [k, 2] of (dataset, sample index),
          segments [k, 3] (dataset, flat start, flat end) of each piece
A finite stream (only non-repeating datasets) ends per rank: the rank's last batch is filled
with all-padding rows (labels -100), and ranks may end a batch or two apart - a distributed
loop keeps them in lockstep itself (train/loop.py all-reduces whether any rank still has data
and runs a batch with nothing trained where one has none). Samples longer than seq_len go
through their dataset's overflow policy (lock entry `overflow`, else meta.json build.overflow,
else "segment"); `stats()["overflow"]` counts them per dataset over the windows this rank
entered. Empty samples are skipped.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from stages.built_dataset import BuiltDataset, DatasetError, open_built
from mixtures.lock import LockError, lock_content_sha256, read_lock
from stages.constants import OVERFLOW_MODES

from .collate import make_collator
from .lanes import LaneCursor, LanePos
from .packing import StreamError, TokenStore
from .sampling import HeldOut, HeldOutSchedule, MixtureSchedule, stable_hash64
from .store import check_fd_headroom, raise_open_file_limit
from .stream_state import (HELDOUT_RULE, STATE_VERSION, ResumeState, StreamLoader, adopt,
                           overflow_stats, resume_position)
from .window_plan import Window, WindowPlanner

MODES = ("packed", "padded", "concat")
__all__ = ["MixtureStream", "StreamLoader", "StreamError", "verify_lock", "STATE_VERSION"]


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
        raise_open_file_limit()  # once per process that opens a stream; workers inherit it
        self.lock_path = Path(lock_path).resolve()
        try:  # the lock's one reader: validated against its schema (mixtures/lock.py)
            self.lock = read_lock(self.lock_path)
        except LockError as e:
            raise StreamError(str(e).splitlines()[0]) from None
        self.lock_sha256 = lock_content_sha256(self.lock)
        self.seq_len, self.mode, self.split = int(seq_len), mode, split
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)
        self.validation_percentage = float(validation_percentage)
        self.allow_lock_change = bool(allow_lock_change)
        self.pack_window = int(pack_window)
        self.seed = int(self.lock["seed"] if seed is None else seed)
        tok = self.lock["tokenizer"]
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
        self._collator = make_collator(mode, self.batch_size, self.seq_len, self.pad_id, self.eos_id)
        self.set_origin(None)
        self._resume = ResumeState(self.start_state())
        self._feed_start = None  # set on the copies a loader hands to DataLoader workers

    # ---------------------------------------------------------------- opening and checks
    def _open_datasets(self, overflow: str | None) -> list[_Dataset]:
        out = []
        for k, e in enumerate(self.lock["datasets"]):  # every field is the schema's (read_lock)
            where = f"{self.lock_path}: datasets[{k}]"
            path = Path(e["path"])
            if not path.is_absolute():
                path = self.lock_path.parent / path
            try:
                built = open_built(path)
            except DatasetError as err:
                raise StreamError(f"{where}: {err}") from None
            pol = overflow or (built.meta.get("build") or {}).get("overflow")
            pol = pol if pol in OVERFLOW_MODES else "segment"
            key = str(e["key"])
            out.append(_Dataset(k, e["dataset_name"], e["task_name"], key, path, built, built.n_samples,
                                bool(e["allow_repeat"]), float(e["sample_probability"]), pol,
                                uid=key or e["task_name"]))
        return out

    def _verify(self, ds: _Dataset, level: str) -> None:
        """BuiltDataset.check at open: `cheap` (meta.json, the lock entry, file sizes and
        the recorded dtypes; each shard's bounds again when first mapped) or `full` (also
        sha256 and the structure of every shard)."""
        if level == "none":
            return
        try:
            ds.built.check(level, self.lock["datasets"][ds.index], self.lock["tokenizer"])
        except DatasetError as err:
            faults = str(err).splitlines()  # one line: the first fault, and how to see the rest
            more = (f" (and {len(faults) - 1} more: `python -m pipeline verify {ds.path}` lists "
                    "them)") if len(faults) > 1 else ""
            raise StreamError(f"{self.lock_path}: dataset {ds.task!r}: {faults[0]}{more}") from None

    def set_origin(self, origin: list | None) -> None:
        """The sample sequence starts after `origin` draws per dataset (None: from 0; set when
        resuming across a changed lock)."""
        self.origin = origin
        if self.split == "validation":
            self._schedule = HeldOutSchedule(self._held, self.pack_window)
        else:
            self._schedule = MixtureSchedule(
                [ds.prob for ds in self.datasets], [ds.n_train for ds in self.datasets],
                [ds.allow_repeat for ds in self.datasets],
                [stable_hash64("tokenmill-perm", self.seed, ds.uid, ds.task) for ds in self.datasets],
                stable_hash64("tokenmill-mix", self.seed), self.pack_window, base=origin)
        self._planner = WindowPlanner(self._schedule, self._held, self.mode, self.split,
                                      self.seq_len, self.seed, self.eos_id, self._policies,
                                      len(self.datasets))

    @property
    def n_windows(self) -> int | None:
        """Where a finite stream ends (None: never)."""
        return self._schedule.n_windows

    def start_state(self) -> dict:
        """The public state of this rank before its first batch (from `origin`)."""
        return self.public_from(LanePos(self.rank, self.world_size, self.rank), [0] * len(self.datasets))

    # ---------------------------------------------------------------- per-process data
    def __getstate__(self):
        st = self.__dict__.copy()
        st["_store"] = None  # memmaps are re-opened lazily in each worker
        return st

    def _tokens(self) -> TokenStore:
        if self._store is None:
            self._store = TokenStore(
                [list(zip(map(str, ds.built.shard_paths), ds.built.shards)) for ds in self.datasets],
                self.vocab_size or self.datasets[0].built.vocab_size)
        return self._store

    # ---------------------------------------------------------------- windows
    def _make_window(self, w: int) -> Window:
        return self._planner(w, self._tokens())

    # ---------------------------------------------------------------- batches
    def _collate(self, segs: list) -> dict:
        """The batch of these (window, u0, u1) units; token ids checked against the vocabulary
        (a shard too large for the check when first mapped is checked here, batch by batch)."""
        batch = self._assemble(segs)
        if not segs[0][0].loc.ids_checked or (len(segs) > 1 and not all(
                w.loc.ids_checked for w, _, _ in segs)):
            ids, vocab = batch["input_ids"], self._tokens().vocab_size
            if ids.numel() and int(ids.max()) >= vocab:
                raise StreamError(self._bad_token(batch, vocab))
        return batch

    def _bad_token(self, batch: dict, vocab: int) -> str:
        flat = batch["input_ids"].reshape(-1)
        p = int(np.flatnonzero(flat.numpy() >= vocab)[0])
        seg = batch["segments"].numpy()
        k = np.flatnonzero((seg[:, 1] <= p) & (p < seg[:, 2]))
        if not len(k):
            return f"{self.lock_path}: token id {int(flat[p])} >= vocab size {vocab} in a batch"
        d, i = batch["samples"][int(k[0])].tolist()
        path = self._tokens().path_of(d, i)
        return (f"{path}: token id {int(flat[p])} >= vocab size {vocab} in sample {i} of dataset "
                f"{self.datasets[d].task!r} (`python -m pipeline verify` checks every shard)")

    def _assemble(self, segs: list) -> dict:
        return self._collator(segs, self._tokens())

    def _iter_batches(self, wid: int, nw: int, start: dict):
        pos, done = resume_position(self, start)
        cur = LaneCursor(pos, done, self._make_window, self._schedule.n_windows)
        per = self.batch_size * (self.seq_len if self.mode == "concat" else 1)
        step = 0
        while not cur.exhausted():
            if step % nw == wid:
                batch = self._collate(cur.advance(per, collect=True))
                batch["_state"] = self._position(cur)
                if get_worker_info() is not None:
                    check_fd_headroom()  # a worker: torch needs descriptors to hand it over
                yield batch
            else:
                cur.advance(per)
            step += 1

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        if self._feed_start is not None:  # a loader's copy: keep the state in the batch
            yield from self._iter_batches(wid, nw, self._feed_start)
            return
        for batch in self._iter_batches(wid, nw, self._resume.start()):
            st = batch.pop("_state")
            if info is None:
                self._resume.took(st)
            yield batch

    def loader(self, num_workers: int = 0, **dataloader_kwargs) -> StreamLoader:
        return StreamLoader(self, num_workers, **dataloader_kwargs)

    def eval_batches(self):
        """The validation split, each held-out sample once over the ranks (this rank's
        windows), in a fixed order; ranks may get a different number of batches."""
        if self.validation_percentage <= 0:
            return iter(())
        v = copy.copy(self)  # the same opened datasets and maps, another split (not resumed)
        v.split, v._feed_start = "validation", None
        # windows small enough that every rank gets some of a small split
        held = int(self._held.n_held.sum())
        v.pack_window = max(1, min(self.pack_window, -(-held // self.world_size)))
        v.set_origin(None)

        def batches():
            for b in v._iter_batches(0, 1, v.start_state()):
                del b["_state"]
                yield b
        return batches()

    # ---------------------------------------------------------------- state
    def public_from(self, pos: LanePos, overflow_done, seen=None) -> dict:
        """A rank's state: its lane position, and per dataset the draws before the lane's
        window (for a changed-lock resume and for reading) and its overflow counts."""
        w = pos.current()
        ds = []
        if self.split == "train":
            c = self._schedule.counts(w)
            epoch, p = self._schedule.positions(c)
            seen = overflow_done if seen is None else seen
            for k, d in enumerate(self.datasets):
                ds.append({"task_name": d.task, "key": d.key, "draws": int(c[k]),
                           "epoch": int(epoch[k]), "pos": int(p[k]),
                           "overflow": int(overflow_done[k]), "overflow_seen": int(seen[k])})
        st = {"version": STATE_VERSION, "lock_sha256": self.lock_sha256, "seed": self.seed,
              "seq_len": self.seq_len, "mode": self.mode, "split": self.split,
              "pack_window": self.pack_window,
              "validation_percentage": self.validation_percentage,
              "rank": self.rank, "world_size": self.world_size, "window": w,
              "lane": pos.to_json(), "origin": self.origin, "datasets": ds}
        if self.validation_percentage > 0:  # which held-out rule chose the split (see adopt)
            st["heldout_rule"] = HELDOUT_RULE
        return st

    def _position(self, cur: LaneCursor) -> tuple:
        """What a batch carries: the cursor's position, compact (the public state, O(datasets)
        in Python, is built from it only when state_dict() is asked for)."""
        cur._settle()
        p = cur.pos  # (its queue list is never mutated in place: sharing it is safe)
        return LanePos(p.lane, p.lanes, p.next, p.offset, p.queue), cur.done, cur.seen

    def public_state(self, position: tuple) -> dict:
        return self.public_from(*position)

    def state_dict(self) -> dict:
        """Position after the last batch this object's own iteration yielded (num_workers=0
        use); with `loader()`, use the loader's state_dict."""
        return self._resume.state_dict(self.public_state)

    def load_state_dict(self, state) -> None:
        """Continue from `state`: this rank's own state (same world size), or the list of
        every rank's state (any world size: see train/stream_state.resume_position)."""
        self._resume = ResumeState(adopt(self, state))

    def feeder(self, start: dict) -> "MixtureStream":
        """A copy that iterates from the public state `start` and leaves each batch's
        position in it (`_state`): what a loader hands to its DataLoader (workers)."""
        feed = copy.copy(self)  # (a copy drops the maps: __getstate__)
        feed._feed_start = copy.deepcopy(start)
        return feed

    def stats(self) -> dict:
        return overflow_stats(self.datasets, self.state_dict())


def verify_lock(lock_path, level: str = "full") -> None:
    """The trainer's --verify_data: check every dataset of a lock before step 0 (`full`:
    sha256 and structure of every shard, as `pipeline verify`; `cheap`: meta.json, lock and
    file sizes). Raises StreamError naming the dir or shard and the fault."""
    MixtureStream(lock_path, 2, verify=level)
