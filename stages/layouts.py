"""What a template's layout needs from a record before it renders (docs/formats.md "Reasoning layouts").

A template cannot look at data text itself (the renderer hands it placeholders, render.py),
so the few rules that depend on what the data already says are applied here, to the record,
before rendering. A template opts in with a directive comment in its text, kept by any copy:

* ``{#- tokenmill: reasoning=hunyuan -#}`` (hunyuan.jinja): under ``reasoning_effort: no_think``
  a user turn that already starts with ``/no_think`` and an assistant turn already written as
  ``<think>\\n\\n</think>\\n<answer>\\n…\\n</answer>`` (the seed's fast-thinking form) are
  rendered as written (message flag ``tokenmill_as_written``): the template adds its prefix and
  wrapper only where the data lacks them. Field and inline form that disagree are refused
  (``reasoning_effort_conflict``): reasoning (a field or a non-empty inline ``<think>``) under
  no_think, or a ``/no_think`` user turn under high/low.
* ``{#- tokenmill: reasoning=hy3 -#}`` (hy3.jinja): inline ``<think>r</think>a`` is parsed into
  reasoning ``r`` + answer ``a``; only the last assistant turn keeps its reasoning (history turns
  render an empty ``<think></think>``); a missing ``reasoning_effort`` is ``high`` when an
  assistant turn has reasoning, else ``no_think`` (noted, so the build can count it); reasoning
  in the last turn under no_think is refused (``reasoning_effort_conflict``).
* ``{#- tokenmill: appends_eos -#}`` (none.jinja): an assistant turn whose text already ends with
  the EOS token's text has that text taken off, so the template's EOS (the real token) is the
  only one — FM9G's add_template.py writes ``<|im_end|>`` itself (noted ``eos_in_data``).

* a template that splits inline reasoning itself (its text tests ``'</think>' in content``, as
  Qwen3's and GLM-4.6's do) and reads ``reasoning_content`` gets an assistant turn written ``<think>r</think>a`` with no
  ``reasoning_content`` field parsed into reasoning ``r`` + answer ``a`` exactly as the template
  would split it (``\n`` trimmed around both), so the data is placeholders again instead of
  being refused as ``template_round_trip`` (noted ``inline_reasoning_parsed``). The template
  renders the two fields exactly as it renders the inline form.

`prepare` returns the messages to render, the template variables, and notes (stable names a
build counts per dataset: see NOTES).
"""
from __future__ import annotations

import re

from .errors import RecordError

DIRECTIVE_RE = re.compile(r"\{#-?\s*tokenmill:\s*(.*?)\s*-?#\}")
AS_WRITTEN = "tokenmill_as_written"  # message flag: the content already has the template's wrapper
NO_THINK = "/no_think"
HY_INLINE_RE = re.compile(r"\A<think>(.*?)</think>\s*<answer>.*</answer>\s*\Z", re.S)
HY3_INLINE_RE = re.compile(r"\A<think>(.*?)</think>(.*)\Z", re.S)
# notes a record can carry (Encoded.notes): counted per dataset by the build
NOTES = ("reasoning_effort_default_high", "reasoning_effort_default_no_think",
         "history_reasoning_dropped", "eos_in_data", "inline_reasoning_parsed",
         "history_reasoning_not_rendered", "stop_token_appended", "stop_token_untrained")
SPLITS_THINK_RE = re.compile(r"""['"]</think>['"]\s+in\s+""")


def template_directives(text: str) -> dict[str, str]:
    """`{#- tokenmill: key=value flag -#}` comments of a template → {key: value, flag: ""}."""
    out = {}
    for body in DIRECTIVE_RE.findall(text):
        for item in body.split():
            key, _, value = item.partition("=")
            out[key] = value
    if SPLITS_THINK_RE.search(text) and "reasoning_content" in text:
        out["splits_think"] = ""
    return out


def _split_think(messages: list[dict], notes: list) -> list[dict]:
    out = []
    for m in messages:
        content = m.get("content")
        if (m["role"] == "assistant" and isinstance(content, str) and "</think>" in content
                and not isinstance(m.get("reasoning_content"), str)):
            # as the template does: content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n')
            head = content.split("</think>")[0].rstrip("\n")
            m = {**m, "reasoning_content": head.split("<think>")[-1].lstrip("\n"),
                 "content": content.split("</think>")[-1].lstrip("\n")}
            if "inline_reasoning_parsed" not in notes:
                notes.append("inline_reasoning_parsed")
        out.append(m)
    return out


def _conflict(detail: str, field: str) -> RecordError:
    return RecordError("reasoning_effort_conflict", detail, field=field)


def _hunyuan(messages: list[dict], extra: dict, notes: list) -> list[dict]:
    effort = extra.get("reasoning_effort")
    no_think = effort == "no_think"
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") or ""
        where = f"messages[{i}].content"
        if m["role"] == "user" and content.lstrip().startswith(NO_THINK):
            if effort in ("high", "low"):
                raise _conflict(f"starts with {NO_THINK} but reasoning_effort is {effort}", where)
            if no_think:
                m = {**m, AS_WRITTEN: True}
        elif m["role"] == "assistant" and no_think:
            if (m.get("reasoning_content") or "").strip():
                raise _conflict("has reasoning_content but reasoning_effort is no_think",
                                f"messages[{i}].reasoning_content")
            if content.lstrip().startswith("<think>"):
                think = HY3_INLINE_RE.match(content.lstrip())
                if think is None:
                    raise _conflict("opens <think> without closing it", where)
                if think.group(1).strip():
                    raise _conflict("is written with reasoning inside <think> but reasoning_effort is no_think",
                                    where)
                if not m.get("tool_calls") and HY_INLINE_RE.match(content.lstrip()) is None:
                    raise _conflict("has an empty <think> block but no <answer>…</answer> after it, so it is "
                                    "neither the inline no_think form nor plain text the template can wrap", where)
                m = {**m, AS_WRITTEN: True}
        out.append(m)
    return out


def _hy3(messages: list[dict], extra: dict, notes: list) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            inline = HY3_INLINE_RE.match(m.get("content") or "")
            if inline is not None:
                m = {k: v for k, v in m.items() if k != "reasoning_content"}
                m["content"] = inline.group(2)
                if inline.group(1).strip():
                    m["reasoning_content"] = inline.group(1)
        out.append(m)
    assistant = [i for i, m in enumerate(out) if m["role"] == "assistant"]
    has_reasoning = [i for i in assistant if (out[i].get("reasoning_content") or "").strip()]
    effort = extra.get("reasoning_effort")
    if not effort:
        effort = "high" if has_reasoning else "no_think"
        extra["reasoning_effort"] = effort
        notes.append(f"reasoning_effort_default_{effort}")
    last = assistant[-1] if assistant else -1
    if effort == "no_think" and last in has_reasoning:
        raise _conflict("has reasoning but reasoning_effort is no_think", f"messages[{last}]")
    dropped = [i for i in has_reasoning if i != last]
    for i in dropped:
        out[i] = {k: v for k, v in out[i].items() if k != "reasoning_content"}
    if dropped:
        notes.append("history_reasoning_dropped")
    return out


def _eos(messages: list[dict], eos: str | None, notes: list) -> list[dict]:
    if not eos:
        return messages
    out = []
    for m in messages:
        content = m.get("content")
        if m["role"] == "assistant" and isinstance(content, str) and content.endswith(eos):
            m = {**m, "content": content[: -len(eos)]}
            if "eos_in_data" not in notes:
                notes.append("eos_in_data")
        out.append(m)
    return out


def prepare(directives: dict, messages: list[dict], extra: dict, eos_token: str | None
            ) -> tuple[list[dict], dict, tuple[str, ...]]:
    """→ (messages to render, template variables, notes); raises RecordError for a record
    whose fields and inline text disagree. `messages` and `extra` are not changed in place."""
    notes: list[str] = []
    extra = dict(extra)
    style = directives.get("reasoning")
    if style == "hunyuan":
        messages = _hunyuan(messages, extra, notes)
    elif style == "hy3":
        messages = _hy3(messages, extra, notes)
    if "splits_think" in directives:
        messages = _split_think(messages, notes)
    if "appends_eos" in directives:
        messages = _eos(messages, eos_token, notes)
    return messages, extra, tuple(notes)
