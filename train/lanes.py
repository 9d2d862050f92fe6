"""Which windows of the global stream each rank packs: one *lane* per rank.

The stream's windows (train/stream.py) are numbered 0, 1, 2, ... and each is a pure function of
its number. A lane is the sequence of windows one rank consumes, unit by unit (rows, or tokens in
concat mode): first an explicit queue of (window, start offset) items, then the arithmetic tail
`next, next + stride, next + 2 * stride, ...`. A fresh stream on `world_size` ranks gives rank r
the lane with an empty queue and tail r, r + world_size, ...: every window belongs to exactly
one rank, and a rank never looks at another rank's windows, so its cost per batch does not
depend on the world size.

`LanePos` is a lane's whole state (a few integers plus the queue, which is empty except right
after a world-size change). `replan` turns the positions of *every* lane of one world size into
fresh lanes for another: what each old lane had not consumed yet (the rest of its current item,
its queue, its tail) is handed out exactly once, partly consumed windows continuing at their
offset, so across a world-size change no unit is repeated or lost.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LanePos:
    lane: int
    lanes: int  # the stride of the tail (the world size this lane was planned for)
    next: int  # first window of the tail
    offset: int = 0  # units of the current item already consumed (absolute, in its window)
    queue: list = field(default_factory=list)  # [[window, start offset], ...]; [0] is current

    def current(self) -> int:
        """The window of the item the lane is in."""
        return int(self.queue[0][0]) if self.queue else self.next

    def finish_item(self) -> None:
        """Move to the next item (the current one is used up)."""
        if self.queue:
            self.queue = self.queue[1:]
        else:
            self.next += self.lanes
        self.offset = int(self.queue[0][1]) if self.queue else 0

    def to_json(self) -> dict:
        return {"lane": self.lane, "lanes": self.lanes, "next": self.next, "offset": self.offset,
                "queue": [[int(w), int(o)] for w, o in self.queue]}

    @classmethod
    def from_json(cls, d: dict) -> "LanePos":
        q = [[int(w), int(o)] for w, o in d.get("queue") or []]
        return cls(int(d["lane"]), int(d["lanes"]), int(d["next"]), int(d["offset"]), q)

    def copy(self) -> "LanePos":
        return LanePos(self.lane, self.lanes, self.next, self.offset, [list(x) for x in self.queue])


def fresh(lane: int, lanes: int) -> LanePos:
    return LanePos(lane, lanes, lane, 0, [])


def replan(old: list[LanePos], lanes: int, n_windows: int | None = None) -> list[LanePos]:
    """Fresh lanes for `lanes` ranks continuing the work of `old` (every lane of one plan).

    Items still owed: each old lane's current item from its offset, the rest of its queue, and
    its tail windows below M (the largest tail start past a current item). From M on, the old tails together hold every
    window exactly once (one lane per residue mod the old stride), as the new tails M + j,
    M + j + lanes, ... do. The owed items, sorted by window, are dealt round-robin into the new
    queues. Items at or past `n_windows` (a finite stream's end) are dropped."""
    if not old:
        raise ValueError("replan needs the state of every lane")
    stride = old[0].lanes
    got = sorted(p.lane for p in old)
    if got != list(range(stride)) or any(p.lanes != stride for p in old):
        raise ValueError(f"replan needs the state of every lane of {stride}, got lanes {got}")
    after = [p.next + (0 if p.queue else stride) for p in old]  # each tail past its current item
    top = max(after)
    owed = []
    for p, t in zip(old, after):
        w = p.current()
        owed.append((w, p.offset))
        owed += [(int(a), int(b)) for a, b in p.queue[1:]]
        while t < top:
            owed.append((t, 0))
            t += stride
    if n_windows is not None:
        owed = [x for x in owed if x[0] < n_windows]
    owed.sort()
    return [LanePos(j, lanes, top + j, owed[j][1] if j < len(owed) else 0,
                    [list(x) for x in owed[j::lanes]]) for j in range(lanes)]


class LaneCursor:
    """A lane's position while a stream iterates it: the window it is in (made by
    `make_window(w)`, an object with `.size` units and `.overflow` counts) and the units of it
    consumed; `done` sums the overflow counts of the windows it finished."""

    def __init__(self, pos: LanePos, overflow_done, make_window, n_windows: int | None):
        self.pos, self.make, self.n_windows = pos.copy(), make_window, n_windows
        self.done = np.asarray(overflow_done, np.int64)
        self.win = self._open()

    def _open(self):
        w = self.pos.current()
        win = None if self.n_windows is not None and w >= self.n_windows else self.make(w)
        self.seen = self.done + win.overflow if win is not None else self.done  # with this one
        return win

    def _settle(self) -> bool:
        while self.win is not None and self.pos.offset >= self.win.size:
            self.done = self.done + self.win.overflow
            self.pos.finish_item()
            self.win = self._open()
        return self.win is not None

    def exhausted(self) -> bool:
        return not self._settle()

    def advance(self, k: int, collect: bool = False) -> list:
        """Move k units on; with collect, the (window, u0, u1) pieces passed."""
        segs = []
        while k > 0 and self._settle():
            off = self.pos.offset
            m = min(k, self.win.size - off)
            if collect:
                segs.append((self.win, off, off + m))
            self.pos.offset = off + m
            k -= m
        return segs
