"""The token an assistant turn must end with so the model learns to stop — checked and trained.

A template's stop set is read from probe renders (placeholders for data), once per renderer:
* its end-of-turn: the last control token written for an assistant message after its text
  (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, gpt-oss's `<|return|>`/`<|end|>`/`<|call|>` …),
  in a last turn, a history turn and a tool-call turn; plus the tokenizer's EOS token;
* a template that writes no end-of-turn (GLM-4.6: the next `<|user|>`/`<|observation|>` closes
  the turn) has *openers* instead: the control token that starts the next message is the stop
  token of the turn before it (generation stops on those).

`StopSet.fix` then checks every trained region: one that ends with a stop-set token is kept; a
stop token written right after the region joins it (the end-of-turn a template writes only
once a later message exists — Hy3 —, or, in a template without an end-of-turn, the next
message's opening control token); the last turn of a conversation that the template closes
with nothing gets its stop token appended — the opener a following user message would start
with, else the EOS token (note `stop_token_appended`: the sample is apply_chat_template's ids
plus that one token); any other region is counted (`stop_token_untrained`) and reported by
--check-template.
"""
from __future__ import annotations

from .jinja_env import PH_CLOSE, PH_OPEN, compile_template
from .turn_bounds import message_starts

P = [f"{PH_OPEN}{k}{PH_CLOSE}" for k in range(3)]
_CALLS = (
    [{"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    [{"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
)


class StopSet:
    def __init__(self, template, control_re, eos_token: str | None, kwargs: dict):
        self.control_re = control_re
        self.tokens: set[str] = set()  # end-of-turn tokens (+ EOS)
        self.opener: str | None = None  # no end-of-turn: the token a following user message opens with
        self.eos: str | None = None
        if control_re is None:
            return
        compiled = compile_template(template.text, False)

        def go(messages):
            try:
                text = compiled.render(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=False, **kwargs)
            except Exception:
                return None
            return text, message_starts(compiled, messages, None, kwargs, text)

        def eot(messages, turn):
            got = go(messages)
            if got is None:
                return None
            text, starts = got
            a = text.find(P[1])
            if a < 0:
                return None
            end = starts.get(turn + 1, len(text)) if starts else text.find(P[2]) if P[2] in text else len(text)
            ctl = list(control_re.finditer(text, a + len(P[1]), end))
            return ctl[-1].group() if ctl else ""

        user, asst = {"role": "user", "content": P[0]}, {"role": "assistant", "content": P[1]}
        found = [eot([user, asst], 1), eot([user, asst, {"role": "user", "content": P[2]}], 1)]
        for calls in _CALLS:
            got = eot([user, {**asst, "tool_calls": calls},
                       {"role": "tool", "content": P[2], "tool_call_id": "call00001", "name": "get_weather"}], 1)
            if got is not None:
                found.append(got)
                break
        if found[:2] == ["", ""]:  # the next message closes the turn (GLM)
            got = go([user, asst, {"role": "user", "content": P[2]}])
            if got is not None:
                m = control_re.search(got[0], got[0].find(P[1]) + len(P[1]))
                self.opener = m.group() if m else None
            found = []  # a tool-call turn's last control token (</tool_call>) is no stop here
        self.tokens = {t for t in found if t}
        self.eos = eos_token if eos_token and control_re.fullmatch(eos_token) else None
        if self.eos and not self.opener:
            self.tokens.add(self.eos)

    def fix(self, ph_text: str, regions: list[tuple[int, int, int]]):
        """→ (text, regions, notes): each region made to end with its stop token where it can."""
        notes: list[str] = []
        out = []
        for s, e, i in regions:
            last = None  # the region's last control token (plain text after it is the caller's)
            for m in self.control_re.finditer(ph_text, s, e) if self.control_re else ():
                last = m.group()
            if last is not None and last in self.tokens:
                out.append((s, e, i))
                continue
            m = self.control_re.match(ph_text, e) if self.control_re else None
            if m is not None and (self.opener is not None or m.group() in self.tokens):
                out.append((s, m.end(), i))  # the stop token written right after the turn
                continue
            close = self.opener or self.eos
            if close and e == len(ph_text):  # the conversation's end: nothing closes the last turn
                ph_text += close
                out.append((s, len(ph_text), i))
                notes.append("stop_token_appended")
                continue
            out.append((s, e, i))
            notes.append("stop_token_untrained")
        return ph_text, out, tuple(dict.fromkeys(notes))
