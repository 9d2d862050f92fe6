"""Encoded samples (ids + trained spans), and how a record's rendered layout becomes one."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .errors import RecordError
from .jinja_env import GEN_CLOSE, GEN_OPEN, PIECE_BREAK

GEN_RE = re.compile(f"[{GEN_OPEN}{GEN_CLOSE}]")


@dataclass
class Encoded:
    ids: np.ndarray  # int64
    spans: np.ndarray | None  # int32 (m, 2) trained [start, end); None = every token trained
    notes: tuple[str, ...] = ()  # what the layout rules decided for this record (layouts.NOTES)
    parts: list | None = None  # loss per_turn: one Encoded per assistant turn (each its own sample)

    @property
    def n_trained(self) -> int:
        if self.spans is None:
            return len(self.ids)
        return int((self.spans[:, 1] - self.spans[:, 0]).sum())


@dataclass
class Explained:
    """One record encoded, with where each part came from (for `pipeline show`).
    regions: trained token ranges [(start, end, message_index, role)] (message_index -1 and
    role 'all' for loss: all); data: [(start, end, message_index, role, field)] token ranges
    of each data string; text: the rendered conversation."""
    encoded: Encoded
    regions: list[tuple[int, int, int, str]]
    data: list[tuple[int, int, int, str, str]]
    text: str


@dataclass
class Layout:
    text: str  # the real rendered conversation
    cuts: list[tuple[int, int, int]]  # template control tokens: (start, end, id)
    regions: list[tuple[int, int, int]]  # trained char ranges (start, end, message index)
    data: list[tuple[int, int, int, str]] = field(default_factory=list)  # (start, end, msg, field)
    notes: tuple[str, ...] = ()


def assemble(layout: Layout, sections, encoded, explain: bool, unk_id, unk_token):
    """One record's ids and trained spans from its layout and its encoded text pieces."""
    ids_parts, starts, ends = [], [], []
    items = [(s, e, ("ctl", tid)) for s, e, tid in layout.cuts]
    items += [(a, b, ("text", enc)) for (a, b), enc in zip(sections, encoded)]
    items.sort(key=lambda x: x[0])
    for s, e, (kind, val) in items:
        if kind == "ctl":
            if val < 0:  # a piece break: a boundary, no token
                continue
            ids_parts.append(np.array([val], dtype=np.int64))
            starts.append(np.array([s], dtype=np.int64))
            ends.append(np.array([e], dtype=np.int64))
        else:
            ids, ts, te = val
            ids_parts.append(ids)
            starts.append(ts + s)
            ends.append(te + s)
    ids_a = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    s_a = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    e_a = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    if unk_id is not None and (ids_a == unk_id).any():
        return RecordError("unknown_token", "the tokenizer has no token for some of this text "
                           f"(it became {unk_token!r}), so it cannot round-trip")
    mask = np.zeros(len(ids_a), dtype=bool)
    tok_regions = []
    for rs, re_, msg in layout.regions:
        hit = (e_a > rs) & (s_a < re_)
        mask |= hit
        if explain and hit.any():
            where = np.flatnonzero(hit)
            tok_regions.append((int(where[0]), int(where[-1]) + 1, msg, "all" if msg < 0 else "assistant"))
    if not mask.any():
        return RecordError("no_trained_tokens", "no token is trained (every assistant turn "
                           "is empty or has loss_weight 0)")
    enc = Encoded(ids_a, mask_to_spans(mask), layout.notes)
    if not explain:
        return enc
    data = []
    for ds, de, msg, key in layout.data:
        where = np.flatnonzero((e_a > ds) & (s_a < de))
        if len(where):
            data.append((int(where[0]), int(where[-1]) + 1, msg, "", key))
    return Explained(enc, tok_regions, data, layout.text.replace(PIECE_BREAK, ""))


def strip_generation_marks(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove generation marks; return the clean text and each outermost block's range."""
    out, blocks, depth, pos, removed, start = [], [], 0, 0, 0, 0
    for m in GEN_RE.finditer(marked):
        out.append(marked[pos:m.start()])
        here = m.start() - removed
        if m.group() == GEN_OPEN:
            if depth == 0:
                start = here
            depth += 1
        else:
            depth -= 1
            if depth == 0 and here > start:
                blocks.append((start, here))
        removed += 1
        pos = m.end()
    out.append(marked[pos:])
    return "".join(out), blocks


def mask_to_spans(mask: np.ndarray) -> np.ndarray:
    """Boolean mask → int32 (m, 2) [start, end) runs of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges.reshape(-1, 2).astype(np.int32)
