"""The training stream's state: what a rank's state holds, how a resume adopts it (the same
world size, another one, a changed lock), and the loader that reports it exactly.

A rank's state (JSON, a few hundred bytes plus ~100 B per dataset):
  version, lock_sha256, seed, seq_len, mode, split, pack_window, validation_percentage
      the stream's definition: a resume with any of them different is refused unless
      allow_lock_change (then it continues from the per-dataset draws, see `adopt`)
  rank, world_size, window    who wrote it; the window its lane is in
  lane                        train/lanes.LanePos: the exact position
  origin                      per-dataset draws the sample sequence started after (None: 0)
  heldout_rule                only with a validation split: HELDOUT_RULE
  datasets                    per dataset: task_name, key, draws / epoch / pos before `window`,
                              overflow (finished windows) and overflow_seen (with this one)
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
from torch.utils.data import DataLoader

from .kernels import warm_up
from .lanes import LanePos, replan
from .store import StreamError, raise_open_file_limit

STATE_VERSION = 2
# The validation split's rule (sampling.HeldOut), written in a state with a split: 2 is the
# stratified per-block rule; a state without it chose its split by the earlier per-sample
# threshold, and a resume onto another split would silently train on other samples.
HELDOUT_RULE = 2
_DEFINITION = ("lock_sha256", "seed", "seq_len", "mode", "pack_window", "validation_percentage")


def resume_position(stream, pub: dict) -> tuple[LanePos, np.ndarray]:
    """(lane position, overflow counts of finished windows) of an adopted state."""
    done = [int(x["overflow"]) for x in pub["datasets"]] or [0] * len(stream.datasets)
    return LanePos.from_json(pub["lane"]), np.asarray(done, np.int64)


def adopt(stream, state) -> dict:
    """The state `stream` (rank r of world size N) continues from, given one rank's state or
    the list of every rank's states of a run.

    * Same world size: rank r's own state, exactly (any worker count).
    * Another world size: needs every old rank's state; `lanes.replan` deals what they had
      not consumed to the new ranks, so no sample is repeated or lost.
    * A changed lock (allow_lock_change): the sample sequence restarts after the per-dataset
      draws of the state whose window is earliest; windows other ranks had already begun
      after it (up to about the old world size of them) are drawn again."""
    states = state if isinstance(state, list) else [state]
    if not states:
        raise StreamError("no stream state given")
    for st in states:
        if not isinstance(st, dict) or st.get("version") != STATE_VERSION:
            v = st.get("version") if isinstance(st, dict) else None
            raise StreamError(f"unsupported stream state (version {v!r}, this tokenmill reads "
                              f"{STATE_VERSION}): it was written by an older tokenmill; resume "
                              "with that version, or start the data stream afresh")
        if stream.validation_percentage > 0 and st.get("heldout_rule") != HELDOUT_RULE:
            raise StreamError("the stream state was written by a tokenmill whose validation split "
                              "held out other samples (before the stratified rule): resume with "
                              "that version, or start the data stream afresh")
        if st.get("split", "train") != stream.split:
            raise StreamError(f"state is for split {st.get('split')!r}, stream is {stream.split!r}")
    first = states[0]
    if any(any(st.get(f) != first.get(f) for f in _DEFINITION + ("world_size", "origin"))
           for st in states):
        raise StreamError("the stream states given are not of one run (definitions differ)")
    diffs = [f for f in _DEFINITION if first.get(f) != getattr(stream, f)]
    if diffs:
        if not stream.allow_lock_change:
            raise StreamError(
                "stream state does not match this stream (" + ", ".join(
                    f"{f}: state {first.get(f)!r} != {getattr(stream, f)!r}" for f in diffs)
                + "); pass allow_lock_change=True to continue from the per-dataset "
                "positions (a few windows already begun by other ranks may repeat)")
        early = min(states, key=lambda st: int(st["window"]))
        by = {(x["task_name"], x["key"]): int(x["draws"]) for x in early["datasets"]}
        warnings.warn(f"resuming across a changed stream definition ({', '.join(diffs)}): "
                      f"continuing from the per-dataset draws at window {early['window']}",
                      stacklevel=3)
        stream.set_origin([by.get((d.task, d.key), 0) for d in stream.datasets])
        return stream.start_state()
    if first.get("origin") != stream.origin:
        stream.set_origin(first.get("origin"))
    ws, r = stream.world_size, stream.rank
    old_ws = int(first["world_size"])
    if old_ws == ws:
        mine = [st for st in states if int(st["rank"]) == r]
        if not mine:
            raise StreamError(f"no stream state for rank {r} among the states given "
                              f"(ranks {sorted(int(st['rank']) for st in states)})")
        return copy.deepcopy(mine[0])
    ranks = sorted(int(st["rank"]) for st in states)
    if ranks != list(range(old_ws)):
        raise StreamError(
            f"the stream state is from {old_ws} ranks and this run has {ws}: a world-size change "
            f"needs every old rank's state (got ranks {ranks}); pass the list of all {old_ws} "
            "(the trainer reads every stream_state_rank*.json of the checkpoint)")
    by_rank = sorted(states, key=lambda st: int(st["rank"]))
    new = replan([LanePos.from_json(st["lane"]) for st in by_rank], ws, stream.n_windows)
    done = [0] * len(stream.datasets)
    if r == 0 and first["datasets"]:  # the old ranks' counts go on in rank 0's
        done = np.sum([[int(x["overflow"]) for x in st["datasets"]] for st in states], 0).tolist()
    return stream.public_from(new[r], done)


def _identity(x):
    return x


def _one_line_errors(it):
    """A StreamError raised in a DataLoader worker reaches the parent as one StreamError line
    (torch re-raises it with the worker's whole traceback in the message)."""
    try:
        yield from it
    except StreamError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        if len(lines) > 1 and "DataLoader worker" in lines[0]:
            last = lines[-1]
            raise StreamError(last.split("StreamError: ", 1)[-1]) from None
        raise


class ResumeState:
    """The one holder of a resume state (a stream's or a loader's): the public state, and the
    compact position of the last batch taken, made public only when state_dict() is asked
    for (building it costs O(datasets) of Python; every batch carries a position)."""

    def __init__(self, state: dict):
        self._state, self._last = state, None

    def took(self, position: tuple) -> None:
        self._last = position

    def start(self) -> dict:
        """The state the next iteration starts from (set by the last state_dict or load)."""
        return self._state

    def state_dict(self, public) -> dict:
        """public: position tuple -> public state (MixtureStream.public_state)."""
        if self._last is not None:
            self._state, self._last = public(self._last), None
        return copy.deepcopy(self._state)


def overflow_stats(datasets, state: dict) -> dict:
    """{"overflow": {task: samples longer than seq_len seen}} of a public state."""
    return {"overflow": {d.task: x["overflow_seen"] for d, x in zip(datasets, state["datasets"])}}


class StreamLoader:
    """Iterable of collated batches with an exact, prefetch-proof state_dict()."""

    def __init__(self, stream, num_workers: int = 0, **kw):
        self.stream, self.num_workers, self.kw = stream, int(num_workers), kw
        self._resume = ResumeState(stream.state_dict())

    def __iter__(self):
        feed = self.stream.feeder(self._resume.start())
        if self.num_workers == 0:  # opened once in this process, shared by the copies
            feed._store = self.stream._tokens()
            it = feed._iter_batches(0, 1, feed._feed_start)
        else:  # each worker memory-maps the shards itself
            warm_up()  # once per process; forked workers inherit the loaded kernels
            raise_open_file_limit()
            it = _one_line_errors(iter(DataLoader(feed, batch_size=None,
                                                  num_workers=self.num_workers,
                                                  collate_fn=_identity, **self.kw)))
        for batch in it:
            self._resume.took(batch.pop("_state"))  # compact; made public when asked for
            yield batch

    def state_dict(self) -> dict:
        return self._resume.state_dict(self.stream.public_state)

    def load_state_dict(self, state) -> None:
        """This rank's state, or the list of every rank's (see `adopt`)."""
        self.stream.load_state_dict(state)
        self._resume = ResumeState(self.stream.state_dict())

    def stats(self) -> dict:
        return overflow_stats(self.stream.datasets, self.state_dict())
