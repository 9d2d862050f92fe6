"""Where each trained assistant turn is in a placeholder render (stages/render.py step 2).

`TurnRegions` is the part of `Renderer` that turns one placeholder rendering into trained
character regions `(start, end, message index)`: from the template's `{% generation %}` blocks
when it has them, else from prefix renders (turn i trains on what render(messages[:i+1]) adds
to render(messages[:i], add_generation_prompt=True)), read from one streaming render when
there are many turns (turn_bounds.py), and from the final rendering for a template that
re-renders history (final_turns.py). Each region ends at the turn's stop token
(stop_tokens.py): the end-of-turn token trains, the separator after it does not.
"""
from __future__ import annotations

from .errors import RecordError
from .final_turns import PH_RE, final_bounds
from .jinja_env import compile_template, render
from .turn_bounds import message_starts

DATA_FIELDS = ("content", "reasoning_content")


class TurnRegions:
    """Mixed into Renderer: uses its template, loss, control_re, stop_set and _extra."""

    def trained_turns(self, messages: list[dict]) -> list[int]:
        """Indices of the assistant turns that train under this loss mode."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.loss == "last":
            turns = turns[-1:]
        return [i for i in turns if messages[i].get("loss_weight", 1) != 0]

    def _block_regions(self, ph_messages, ph_text, blocks):
        """Generation blocks → the assistant turns they belong to: in order when there is one
        block per assistant turn, else by the placeholders inside each block."""
        assistant = [i for i, m in enumerate(ph_messages) if m["role"] == "assistant"]
        if len(blocks) == len(assistant):
            owner = assistant
        else:
            owner = []
            msg_of_ph = self._ph_owner(ph_messages)
            for s, e in blocks:
                found = {msg_of_ph[int(m.group(1))] for m in PH_RE.finditer(ph_text, s, e)}
                if len(found) != 1:
                    raise RecordError("template_error", f"{len(blocks)} generation blocks for "
                                      f"{len(assistant)} assistant turns, and a block cannot be "
                                      "matched to its turn")
                owner.append(found.pop())
        keep = set(self.trained_turns(ph_messages))
        return [(s, e, i) for (s, e), i in zip(blocks, owner) if i in keep]

    @staticmethod
    def _ph_owner(ph_messages) -> dict[int, int]:
        out = {}
        for i, m in enumerate(ph_messages):
            for key in DATA_FIELDS:
                v = m.get(key)
                if isinstance(v, str):
                    for ph in PH_RE.finditer(v):
                        out[int(ph.group(1))] = i
        return out

    LINEAR_FROM = 8  # more trained turns than this: bounds from one streaming render (turn_bounds.py)
    PREFIX_TURN_LIMIT = 256  # when those cannot be confirmed: prefix renders up to this many turns

    def _prefix_regions(self, ph_messages, ph_text, tools, extra):
        turns = self.trained_turns(ph_messages)
        self._extra = extra  # the record's variables, for _end_of_turn's stop set
        try:
            bounds = self._prefix_turn_bounds(ph_messages, ph_text, tools, extra, turns)
        except RecordError as e:
            if e.reason != "template_not_prefix_stable":
                raise
            # the template re-renders history: every turn is read from the final rendering
            bounds = final_bounds(self.template, self.control_re, self.stop_set(extra).tokens, ph_messages, ph_text,
                                  tools, extra, turns, self._ph_owner(ph_messages))
            return [(start, end, i) for (start, end), i in zip(bounds, turns)]
        return [(start, self._end_of_turn(ph_text, start, end), i) for (start, end), i in zip(bounds, turns)]

    def _prefix_turn_bounds(self, ph_messages, ph_text, tools, extra, turns):
        bounds = None
        if len(turns) > self.LINEAR_FROM:
            bounds = self._linear_bounds(ph_messages, ph_text, tools, extra, turns)
            if bounds is None and len(turns) > self.PREFIX_TURN_LIMIT:
                raise RecordError("too_many_turns", f"{len(turns)} trained turns, and template "
                                  f"{self.template.name!r} (no {{% generation %}} blocks) cannot be read in one "
                                  f"render; over {self.PREFIX_TURN_LIMIT} turns are not rendered turn by turn")
        if bounds is None:
            bounds = [self._prefix_bounds(ph_messages, ph_text, tools, extra, i) for i in turns]
        return bounds

    def _prefix_bounds(self, ph_messages, ph_text, tools, extra, i) -> tuple[int, int]:
        """(len(render(messages[:i], generation prompt)), len(render(messages[:i+1])))."""
        before = render(self.template, ph_messages[:i], tools, extra, False, True)
        upto = render(self.template, ph_messages[: i + 1], tools, extra, False, False)
        if not (upto.startswith(before) and ph_text.startswith(upto)):
            raise RecordError("template_not_prefix_stable", "the template renders earlier "
                              "turns differently once later turns exist; loss spans cannot be "
                              "derived by prefix (add {% generation %} blocks to the template)")
        return len(before), len(upto)

    def _linear_bounds(self, ph_messages, ph_text, tools, extra, turns):
        """The same bounds as _prefix_bounds for every turn, from one streaming render plus exact
        prefix renders of the first three and the last turn (which must agree); None: use
        prefix renders."""
        starts = message_starts(compile_template(self.template.text, False), ph_messages, tools, extra, ph_text)
        if starts is None:
            return None
        n = len(ph_messages)
        first = turns[0]
        plain = render(self.template, ph_messages[:first], tools, extra, False, False)
        exact = {i: self._prefix_bounds(ph_messages, ph_text, tools, extra, i)
                 for i in dict.fromkeys(turns[:3] + turns[-1:])}
        if not ph_text.startswith(plain):
            return None
        gen = ph_text[len(plain):exact[first][0]]  # the generation prompt
        bounds = []
        for i in turns:
            begin, end = starts.get(i), len(ph_text) if i + 1 == n else starts.get(i + 1)
            if begin is None or end is None or not ph_text.startswith(gen, begin):
                return None
            bounds.append((begin + len(gen), end))
        if any(bounds[turns.index(i)] != b for i, b in exact.items()):
            return None
        return bounds

    def _end_of_turn(self, ph_text: str, start: int, end: int) -> int:
        """Trim plain template text that follows the turn's last control token (e.g. the
        newline after <|im_end|>): the end-of-turn token trains, the separator does not — nor
        what a template writes after it at the conversation's end (Phi-3.5's EOS after <|end|>):
        the turn ends at the first stop token after its last data. A turn without control
        tokens trains whole; data is never trimmed."""
        ctl = list(self.control_re.finditer(ph_text, start, end)) if self.control_re else []
        if not ctl:
            return end
        data = [m.end() for m in PH_RE.finditer(ph_text, start, end)]
        last_data = data[-1] if data else start
        stops = self.stop_set(self._extra).tokens
        first_stop = next((m.end() for m in ctl if m.start() >= last_data and m.group() in stops), None)
        return first_stop if first_stop is not None else max(ctl[-1].end(), last_data)
