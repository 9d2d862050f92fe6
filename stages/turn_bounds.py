"""Where each message's text starts in one render: turn bounds in linear time.

A template without `{% generation %}` blocks says which text an assistant turn trains only
through prefix renders (render.py): turn i trains on what render(messages[:i+1]) adds to
render(messages[:i], add_generation_prompt=True). Done for every turn that is 2·turns renders
of up to all turns — quadratic; a 10,000-turn record took hours. Here one streaming render gives
the same bounds: the messages list hands the template's loops proxies that note how much text
had been written when each message was first looked at (`message_starts`). Under prefix
stability, the start of message k in the loop that writes the conversation is
len(render(messages[:k])); the generation prompt is the text `render(messages[:i],
add_generation_prompt=True)` adds, taken once from exact prefix renders. The caller checks the
result against exact prefix renders of the first and the last trained turns and falls back to
prefix renders when anything disagrees.
"""
from __future__ import annotations


class _State:
    __slots__ = ("written", "passes")

    def __init__(self):
        self.written = 0  # characters of output streamed so far
        self.passes: list[dict[int, int]] = []  # per loop over the messages: {message index: first look}


class _Seen(dict):
    """A message as one loop over the messages yields it: notes its first look-up."""

    def __init__(self, data: dict, index: int, seen: dict, state: _State):
        super().__init__(data)
        self.__dict__.update(_index=index, _seen=seen, _state=state)

    def _look(self):
        self._seen.setdefault(self._index, self._state.written)

    def __getitem__(self, key):
        self._look()
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._look()
        return super().get(key, default)

    def __contains__(self, key):
        self._look()
        return super().__contains__(key)


class _Messages(list):
    """The messages list: each iteration is one pass; a slice keeps the original indices."""

    def __init__(self, items, offset: int, state: _State):
        super().__init__(items)
        self._offset, self._state = offset, state

    def __iter__(self):
        seen: dict[int, int] = {}
        self._state.passes.append(seen)
        for k in range(len(self)):
            yield _Seen(list.__getitem__(self, k), self._offset + k, seen, self._state)

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, _, step = key.indices(len(self))
            if step == 1:
                return _Messages(list.__getitem__(self, key), self._offset + start, self._state)
        return list.__getitem__(self, key)


def message_starts(compiled, messages: list[dict], tools, extra: dict, text: str) -> dict[int, int] | None:
    """{message index: characters written before the conversation loop first looks at it},
    from one streaming render that must give exactly `text`; None when no loop over the
    messages wrote text between its messages (nothing to read the bounds from)."""
    state = _State()
    out = []
    for chunk in compiled.generate(messages=_Messages(messages, 0, state), tools=tools, documents=None,
                                   add_generation_prompt=False, **extra):
        out.append(chunk)
        state.written += len(chunk)
    if "".join(out) != text:
        return None
    # the pass that writes the conversation: the one whose looks are spread over the most text
    best = max(state.passes, key=lambda p: (max(p.values()) - min(p.values())) if p else -1, default=None)
    if not best or max(best.values()) == min(best.values()):
        return None
    order = sorted(best)
    if any(best[a] > best[b] for a, b in zip(order, order[1:])):
        return None
    return best
