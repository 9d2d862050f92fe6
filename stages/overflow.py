"""Samples longer than max_length: segment, truncate or drop — always counted.

The one overflow rule, used by the build (`apply_overflow`), the training stream
(`piece_bounds`, at its seq_len) and `pipeline show` (`stored_piece_starts`, to find which
piece of a record a stored sample is):

* segment: consecutive pieces [s, s + max_length) for s = 0, max_length, …; the build keeps
  only pieces with a trained token (a piece with nothing to train is counted as lost tokens);
* truncate: the first max_length tokens;
* drop: nothing.

Imports only numpy (and stages.errors): the stream uses it without the renderer.
"""
from __future__ import annotations

import numpy as np

from .constants import OVERFLOW_MODES
from .errors import RecordError


def cut_starts(n: int, max_length: int, policy: str) -> np.ndarray:
    """Start of every piece a sample of n tokens gives under the policy (before the build's
    rule that a segment needs a trained token)."""
    if n <= max_length:
        return np.zeros(1, np.int64)
    if policy == "segment":
        return np.arange(0, n, max_length, dtype=np.int64)
    if policy == "truncate":
        return np.zeros(1, np.int64)
    if policy == "drop":
        return np.zeros(0, np.int64)
    raise ValueError(f"overflow policy must be one of {OVERFLOW_MODES}, got {policy!r}")


def piece_bounds(lengths: np.ndarray, max_length: int, policies) -> tuple[np.ndarray, ...]:
    """Vectorised cut of samples into pieces: → (item, start, end), items in order and the
    pieces of one item consecutive. `policies`: one policy, or one per item. Items of length
    <= max_length give one piece [0, n)."""
    n = np.asarray(lengths, np.int64)
    pol = np.broadcast_to(np.asarray(policies), n.shape)
    count = np.ones(len(n), np.int64)
    long_ = n > max_length
    seg = long_ & (pol == "segment")
    count[seg] = (n[seg] + max_length - 1) // max_length
    count[long_ & (pol == "drop")] = 0
    item = np.repeat(np.arange(len(n), dtype=np.int64), count)
    first = np.cumsum(count) - count
    start = (np.arange(len(item), dtype=np.int64) - first[item]) * max_length
    end = np.minimum(start + max_length, n[item])
    return item, start, end


def stored_piece_starts(n: int, max_length: int, policy: str, spans) -> list[int]:
    """Starts of the pieces the build stores for a record of n tokens with loss spans
    (None: every token trains) — segment keeps only pieces that train a token."""
    starts = cut_starts(n, max_length, policy).tolist()
    if policy != "segment" or n <= max_length or spans is None:
        return starts
    sp = [(int(a), int(b)) for a, b in spans]
    return [s for s in starts if any(a < s + max_length and b > s and b > a for a, b in sp)]


def _cut(enc, start: int, end: int):
    ids = enc.ids[start:end]
    if enc.spans is None:
        return type(enc)(ids, None)
    s = np.clip(enc.spans - start, 0, end - start)
    s = s[s[:, 1] > s[:, 0]]
    return type(enc)(ids, s.astype(np.int32).reshape(-1, 2))


def apply_overflow(enc, max_length: int, policy: str) -> tuple[list, int]:
    """enc: an Encoded (ids, spans). → (samples, tokens dropped). Raises RecordError when the
    record yields no sample."""
    n = len(enc.ids)
    if n <= max_length:
        return [enc], 0
    if policy == "drop":
        raise RecordError("too_long", f"{n} tokens > max_length {max_length} (overflow: drop)")
    if policy == "truncate":
        cut = _cut(enc, 0, max_length)
        if cut.spans is not None and len(cut.spans) == 0:
            raise RecordError("no_trained_tokens_after_truncation",
                              f"{n} tokens truncated to {max_length} leave no trained token")
        return [cut], n - max_length
    # segment: consecutive max_length pieces; a piece with nothing to train is not kept
    pieces, lost = [], 0
    for start in cut_starts(n, max_length, policy).tolist():
        piece = _cut(enc, start, min(start + max_length, n))
        if piece.spans is not None and len(piece.spans) == 0:
            lost += len(piece.ids)
        else:
            pieces.append(piece)
    if not pieces:
        raise RecordError("no_trained_tokens", "no segment has a trained token")
    return pieces, lost
