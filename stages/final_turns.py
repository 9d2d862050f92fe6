"""Assistant turns located in the *final* rendering of the whole conversation (templates that
are not prefix-stable: Qwen3, DeepSeek-R1, GLM-4.6, gpt-oss, Mistral).

Prefix renders (render.py) find turn i's target as what render(messages[:i+1]) adds to
render(messages[:i], add_generation_prompt=True). A template that re-renders history (drops
reasoning from earlier turns, moves the system prompt into the last user message) breaks that:
the turn is rendered differently once later turns exist. Here the target is read from the one
render of the whole conversation (every data string already a placeholder there):

1. Where message i is written: one streaming render notes how much text had been written when
   the conversation loop first looked at each message (turn_bounds.message_starts), so message
   i's text is [start(i), start(i+1)). The placeholders must agree (turn i's own inside, no other
   message's); where they do not, the gap between the neighbouring messages' placeholders is used.
2. Where the target starts: the prompt inference renders for the turn,
   render(messages[:i], add_generation_prompt=True), is compared with the final text from the
   last data string written before the turn (found in both); where they stop agreeing the
   target starts. So the role header is prompt, and so is text the generation prompt supplies
   at inference that the turn also renders (Qwen3's empty think block with thinking off,
   DeepSeek-R1's `<think>\\n`, Hy3's `<think>` under is_training): never a target.
3. Where it ends: at the first stop token (stop_tokens.py) after the turn's last data — its
   end-of-turn, not an EOS a template writes after the whole conversation (Phi-3.5) —, else at
   the last control token written for the message, as for prefix renders; plain text after it
   (a newline) does not train.
A turn that cannot be located this way is refused (`template_turn_unlocated`), never guessed.
"""
from __future__ import annotations

import re

from .errors import RecordError
from .jinja_env import PH_CLOSE, PH_OPEN, compile_template, render
from .turn_bounds import message_starts

PH_RE = re.compile(f"{PH_OPEN}(\\d+){PH_CLOSE}")  # a placeholder (render.py puts them in)


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _unlocated(i: int, why: str) -> RecordError:
    return RecordError("template_turn_unlocated", f"assistant turn {i} cannot be located in the "
                       f"rendered conversation ({why}); add {{% generation %}} blocks to the template",
                       field=f"messages[{i}]")


def final_bounds(template, control_re, stops, ph_messages, ph_text, tools, extra, turns, owner
                 ) -> list[tuple[int, int]]:
    """[(start, end)] of each turn in `turns` in `ph_text` (placeholder text); `owner`:
    {placeholder number: message index}."""
    marks = [(m.start(), m.end(), m.group()) for m in PH_RE.finditer(ph_text)]
    phs: dict[int, list[tuple[int, int]]] = {}
    for s, e, ph in marks:
        phs.setdefault(owner[int(ph[1:-1])], []).append((s, e))
    starts = message_starts(compile_template(template.text, False), ph_messages, tools, extra, ph_text)
    n = len(ph_messages)
    out = []
    for i in turns:
        own = phs.get(i, [])
        lo = hi = None
        if starts and i in starts:
            lo = starts[i]
            later = [starts[k] for k in range(i + 1, n) if k in starts and starts[k] > lo]
            hi = min(later) if later else len(ph_text)
            if not (all(lo <= s and e <= hi for s, e in own) and not any(
                    lo <= s < hi for k, v in phs.items() if k != i for s, _ in v)):
                lo = hi = None
        if lo is None and not own:
            raise _unlocated(i, "it renders no data and the template's loop cannot be followed")
        first = own[0][0] if own else hi  # a turn with no data (tool calls only): up to its end
        start = _target_start(template, control_re, ph_messages, tools, extra, i, ph_text, marks, first)
        if own and start > own[0][0]:
            raise _unlocated(i, "its prompt runs into its text")
        if hi is None:  # no message bounds: end at the turn's end-of-turn after its last data
            end = _gap_end(control_re, stops, ph_text, own[-1][1],
                           min((s for s, _, _ in marks if s >= own[-1][1]), default=len(ph_text)))
        else:
            end = _gap_end(control_re, stops, ph_text, own[-1][1] if own else start, hi, default=None)
            if end is None:
                end = _last_control(control_re, ph_text, start, hi, own)
        out.append((start, end))
    return out


def _target_start(template, control_re, ph_messages, tools, extra, i, ph_text, marks, first) -> int:
    """Where the prompt inference renders for turn i stops matching the final text: from the
    last data string written before the turn (found in both renders), the two are compared."""
    prompt = render(template, ph_messages[:i], tools, extra, False, True)
    anchor_final = anchor_prompt = 0
    for s, e, ph in reversed([x for x in marks if x[1] <= first]):
        at = prompt.rfind(ph)
        if at >= 0:
            anchor_final, anchor_prompt = e, at + len(ph)
            break
    cut = anchor_final + _lcp(prompt[anchor_prompt:], ph_text[anchor_final:first])
    if control_re is not None:  # never inside a control token: a part of one is no prompt
        for m in control_re.finditer(ph_text, max(0, cut - 64), cut + 64):
            if m.start() < cut < m.end():
                return m.start()
    return cut


def _last_control(control_re, text: str, start: int, hi: int, own) -> int:
    """The message's last control token (its end-of-turn), or its last data when it has none after that."""
    ctl = [m.end() for m in control_re.finditer(text, start, hi)] if control_re else []
    data = own[-1][1] if own and own[-1][1] > start else start
    if not ctl:
        return data if own else hi
    return max(ctl[-1], data)
def _gap_end(control_re, stops, text: str, data_end: int, hi: int, default: int | None = -1) -> int | None:
    """The first stop token after the turn's last data (its end-of-turn) before `hi`; else `default`
    (-1: the data's end)."""
    for m in control_re.finditer(text, data_end, hi) if control_re else ():
        if m.group() in stops:
            return m.end()
    return data_end if default == -1 else default
