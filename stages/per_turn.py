"""Multi-turn policy `per_turn` (manifest `multi_turn: per_turn`, = loss `per_turn`): one sample per
assistant turn.

Each trained assistant turn i becomes its own sample: the conversation up to it
(messages[:i+1]), earlier assistant turns with loss_weight 0, rendered exactly as the template
renders it at inference with i as the last turn — so reasoning a template drops from history
(Qwen3, GLM-4.6, gpt-oss) is trained in the sample that ends with its turn. The record's
Encoded holds the samples in `parts` (ids/spans: their concatenation, for counting); the worker
writes each part as a sample of its own. Used as a mixin of render.Renderer (needs its
`trained_turns` and `_encode`).
"""
from __future__ import annotations

import numpy as np

from .encoded import Encoded
from .errors import RecordError
from .formats import record_kind


class PerTurn:
    def turn_records(self, record: dict) -> list[dict]:
        """loss per_turn: one record per trained assistant turn — the conversation up to it,
        only that turn trained — so each is rendered with its own prefix, as at inference."""
        if record_kind(record) != "chat":
            return [record]
        messages = record["messages"]
        out = []
        for i in self.trained_turns(messages):
            sub = [m if j == i or m.get("role") != "assistant" else {**m, "loss_weight": 0}
                   for j, m in enumerate(messages[: i + 1])]
            out.append({**record, "messages": sub})
        return out or [record]

    def _per_turn(self, records: list[dict]) -> list[Encoded | RecordError]:
        subs = [self.turn_records(r) for r in records]
        flat = self._encode([s for group in subs for s in group], False)
        out, k = [], 0
        for group in subs:
            got, k = flat[k:k + len(group)], k + len(group)
            bad = next((g for g in got if isinstance(g, RecordError)), None)
            if bad is not None or len(got) == 1:
                out.append(bad if bad is not None else got[0])
                continue
            offsets = np.cumsum([0] + [len(g.ids) for g in got[:-1]])
            out.append(Encoded(np.concatenate([g.ids for g in got]),
                               np.concatenate([g.spans + o for g, o in zip(got, offsets)]).astype(np.int32),
                               tuple(dict.fromkeys(n for g in got for n in g.notes)), parts=got))
        return out

