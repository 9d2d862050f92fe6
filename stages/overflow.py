"""Samples longer than max_length: segment, truncate or drop — always counted."""
from __future__ import annotations

import numpy as np

from .errors import RecordError
from .render import Encoded

POLICIES = ("segment", "truncate", "drop")


def _cut(enc: Encoded, start: int, end: int) -> Encoded:
    ids = enc.ids[start:end]
    if enc.spans is None:
        return Encoded(ids, None)
    s = np.clip(enc.spans - start, 0, end - start)
    s = s[s[:, 1] > s[:, 0]]
    return Encoded(ids, s.astype(np.int32).reshape(-1, 2))


def apply_overflow(enc: Encoded, max_length: int, policy: str) -> tuple[list[Encoded], int]:
    """→ (samples, tokens dropped). Raises RecordError when the record yields no sample."""
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
    for start in range(0, n, max_length):
        piece = _cut(enc, start, min(start + max_length, n))
        if piece.spans is not None and len(piece.spans) == 0:
            lost += len(piece.ids)
        else:
            pieces.append(piece)
    if not pieces:
        raise RecordError("no_trained_tokens", "no segment has a trained token")
    return pieces, lost
