"""Text a transform writes around the data ("markup"), told apart from the data itself.

FM9G's ``add_template.py`` wraps each record in ``<|im_start|>…User\\n{input}<|im_end|>…``. Its
markers are the transform's own text: they must become the tokenizer's control tokens, while
control-token text inside the *data* stays text (the injection guard). The transform is run a
second time on a copy of the record whose data strings are placeholders (as the renderer does
for chat templates), so the text it adds is known to be its own:

* ``placeholder_record(data)`` → (the copy, the data strings by placeholder number);
* ``derive(ph_result, result, values)`` → the markup, when putting the data back into the
  placeholder result gives exactly the real result ("round trip"); else None: the transform
  rewrote, cut or branched on the data, and who wrote which character cannot be shown.

The markup travels on the canonical record as an attribute (``Marked``, a dict subclass: the
record's keys, equality and JSON are unchanged, and no file can supply it):
``{"record": {"input"|"output"|"text": segs}, "messages": [{"content"|"reasoning_content": segs}]}``,
``segs`` a list of ``[text, written_by_transform]``; a record whose round trip failed carries
``{UNATTRIBUTED: why}`` instead. The renderer (stages/render.py) gets each turn with its part
under ``MARKUP_KEY`` from ``messages_of`` and reads it through ``segments``: transform text is
rendered as template text (control tokens are tokens), data as data; an unattributed record
whose text holds control-token text is refused (``transform_markup_unknown``) — never encoded half one way, half the other.
"""
from __future__ import annotations

import re
from typing import Any

from .errors import RecordError
from .template_tokens import CONTROL_STRING_RE

MARKUP_KEY = "_markup"
UNATTRIBUTED = "unattributed"
DATA_KEYS = ("content", "reasoning_content")  # chat message fields rendered as data
# Placeholders: reserved noncharacters (a data string holding them is refused by the renderer,
# reserved_char), so they cannot collide with data.
_PH_OPEN, _PH_CLOSE = "\ufdd4", "\ufdd5"
_PH_RE = re.compile(f"{_PH_OPEN}(\\d+){_PH_CLOSE}")
_RESERVED_RE = re.compile("[\ufdd0-\ufdd5]")


# -- derivation (mixtures/transforms.py) -------------------------------------------------
def _fields(record: dict) -> list[tuple[dict, str]]:
    """(container, key) of every string the renderer treats as data in a canonical record."""
    if "messages" in record and isinstance(record["messages"], list):
        return [(m, k) for m in record["messages"] if isinstance(m, dict) for k in DATA_KEYS
                if isinstance(m.get(k), str)]
    if "output" in record:
        return [(record, k) for k in ("input", "output") if isinstance(record.get(k), str)]
    return [(record, "text")] if isinstance(record.get("text"), str) else []


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def placeholder_record(data: dict) -> tuple[dict, list[str]] | None:
    """A deep copy of the canonical record ``data`` with each non-empty data string replaced
    by a placeholder, and the strings by placeholder number. None when a data string already
    holds a reserved character (the renderer refuses such a record anyway)."""
    ph, values = _copy(data), []
    for container, key in _fields(ph):
        v = container[key]
        if _RESERVED_RE.search(v):
            return None
        if v:  # an empty string stays empty: transforms test truthiness
            container[key] = f"{_PH_OPEN}{len(values)}{_PH_CLOSE}"
            values.append(v)
    return ph, values


def _put_back(value: Any, values: list[str]) -> Any:
    if isinstance(value, str):
        return _PH_RE.sub(lambda m: values[int(m.group(1))] if int(m.group(1)) < len(values) else m.group(),
                          value)
    if isinstance(value, dict):
        return {k: _put_back(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_put_back(v, values) for v in value]
    return value


def _segments(ph_text: str, values: list[str]) -> list[list]:
    segs, pos = [], 0
    for m in _PH_RE.finditer(ph_text):
        if m.start() > pos:
            segs.append([ph_text[pos:m.start()], True])
        segs.append([values[int(m.group(1))], False])
        pos = m.end()
    if pos < len(ph_text):
        segs.append([ph_text[pos:], True])
    return segs


def derive(ph_result: dict, result: dict, values: list[str]) -> tuple[dict, list[dict]] | None:
    """The markup of ``result`` given the transform's output on placeholders: (record-level
    markup, per-message markup in message order), or None when the round trip fails."""
    if _put_back(ph_result, values) != result:
        return None
    ph_fields, real_fields = _fields(ph_result), _fields(result)
    if len(ph_fields) != len(real_fields):
        return None
    record_markup: dict = {}
    message_markup: list[dict] = [{} for _ in result.get("messages", [])] if "messages" in result else []
    index = {id(m): i for i, m in enumerate(ph_result.get("messages", []) or [])}
    for container, key in ph_fields:
        segs = _segments(container[key], values)
        if any(_RESERVED_RE.search(t) for t, lit in segs if lit):
            return None  # the transform writes reserved characters itself: not ours to place
        if not any(lit for _, lit in segs):
            continue  # all data: nothing to mark
        if container is ph_result:
            record_markup[key] = segs
        else:
            message_markup[index[id(container)]][key] = segs
    return record_markup, message_markup


class Marked(dict):
    """A canonical record (a plain dict to everyone else: equality, keys and JSON are the
    record's own) with the markup of the transform that made it on ``.markup``:
    ``{"record": {field: segs}, "messages": [{field: segs}, …]}``, or ``{UNATTRIBUTED: why}``."""

    __slots__ = ("markup",)

    def __reduce__(self):  # survives pickling (a record sent to another process)
        return (_marked, (dict(self), self.markup))


def _marked(record: dict, markup: dict) -> Marked:
    out = Marked(record)
    out.markup = markup
    return out


def attach(result: dict, markup: tuple[dict, list[dict]] | None, why: str = "") -> dict:
    """``result`` with its markup (or the UNATTRIBUTED flag, when ``markup`` is None) attached;
    ``result`` itself when the transform wrote no text around the data."""
    if markup is None:
        return _marked(result, {UNATTRIBUTED: why or "rewrites its data"})
    record_markup, message_markup = markup
    if not record_markup and not any(message_markup):
        return result
    return _marked(result, {"record": record_markup, "messages": message_markup})


def _markup(record: dict) -> dict:
    return getattr(record, "markup", None) or {}


# -- use (stages/render.py) ---------------------------------------------------------------
def messages_of(record: dict) -> list[dict]:
    """The conversation a template renders for a canonical record (an input-output record as
    user + assistant turns), each turn with its part of the transform's markup under MARKUP_KEY."""
    markup = _markup(record)
    if "messages" in record:
        messages = record["messages"]
        if UNATTRIBUTED in markup:
            return [{**m, MARKUP_KEY: markup} for m in messages]
        per = markup.get("messages") or []
        return [{**m, MARKUP_KEY: per[i]} if i < len(per) and per[i] else m for i, m in enumerate(messages)]
    user = {"role": "user", "content": record["input"]}
    assistant = {"role": "assistant", "content": record["output"]}
    if UNATTRIBUTED in markup:
        user[MARKUP_KEY] = assistant[MARKUP_KEY] = markup
    else:
        rec = markup.get("record") or {}
        if "input" in rec:
            user[MARKUP_KEY] = {"content": rec["input"]}
        if "output" in rec:
            assistant[MARKUP_KEY] = {"content": rec["output"]}
    return [user, assistant]


def writes_controls(record: dict, control_re: re.Pattern | None) -> bool:
    """Whether the transform's own text in ``record`` holds control-token text (then the
    record's ids are not those of its text rendered as data; without it they are)."""
    markup = _markup(record)
    if not markup or control_re is None:
        return False
    if UNATTRIBUTED in markup:
        return False
    parts = [*(markup.get("record") or {}).values(), *(s for m in markup.get("messages") or () for s in m.values())]
    return any(lit and control_re.search(t) for segs in parts for t, lit in segs)


def segments(message: dict, key: str, value: str, control_re: re.Pattern | None) -> list[tuple[str, bool]]:
    """``value`` (the message's ``key`` as rendered) as [(text, written by the transform)].
    A layout rule may have cut the end off (the EOS a response ends with): the markup is cut
    to match. Raises RecordError when the markup cannot be placed, or when the record is
    unattributed and ``value`` holds control-token text."""
    markup = message.get(MARKUP_KEY)
    if not markup:
        return [(value, False)]
    if UNATTRIBUTED in markup:
        if control_re is not None and control_re.search(value):
            raise RecordError("transform_markup_unknown", f"the transform output holds control-token text "
                              f"({control_re.search(value).group()!r}) but it {markup[UNATTRIBUTED]}, so "
                              "whether the transform or the data wrote it cannot be shown",
                              field=f"transform.{key}")
        return [(value, False)]
    segs = markup.get(key)
    if segs is None:
        return [(value, False)]
    out, pos = [], 0
    for text, literal in segs:
        if pos >= len(value):
            break
        piece = text[: len(value) - pos]
        if value[pos:pos + len(piece)] != piece:
            break
        out.append((piece, bool(literal)))
        pos += len(piece)
    if pos != len(value):
        raise RecordError("transform_markup_lost", "a layout rule rewrote text around the transform's "
                          "markup, so its markers cannot be placed", field=f"transform.{key}")
    return out


TEMPLATE_MARKUP_NOTE = "template_markup_in_text"  # counted in meta.json render_notes


def controls_re(control_tokens, template_literal: str) -> re.Pattern | None:
    """The control tokens a chat template's literal text writes (None: it writes none, as
    template none)."""
    found = sorted((t for t in control_tokens if not t.isspace() and t in template_literal), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, found))) if found else None


def template_markup_note(messages: list[dict], template_re: re.Pattern | None) -> tuple[str, ...]:
    """``(TEMPLATE_MARKUP_NOTE,)`` when a message's text (data or transform markup) already
    holds the template's own control strings — text templated once (FM9G's add_template.py)
    and now wrapped in a chat template again; said and counted, never silent."""
    if template_re is None:
        return ()
    for m in messages:
        for key in DATA_KEYS:
            v = m.get(key)
            if isinstance(v, str) and template_re.search(v):
                return (TEMPLATE_MARKUP_NOTE,)
    return ()


def template_markup_warnings(dataset_name: str, meta: dict, template: str) -> list[str]:
    """The build's warning for a dataset whose records were counted under TEMPLATE_MARKUP_NOTE."""
    n = (meta.get("render_notes") or {}).get(TEMPLATE_MARKUP_NOTE)
    if not n:
        return []
    return [f"dataset {dataset_name!r}: {n} records already hold the control strings of chat template "
            f"{template!r} and were wrapped in it again (meta.json render_notes.{TEMPLATE_MARKUP_NOTE}); "
            "text that is already templated (FM9G's add_template.py) wants --template none"]


def check_written(text: str, control_tokens, key: str) -> None:
    """A control string (``<|…|>``, ``<｜…｜>``) the transform writes must be one token of the
    tokenizer, as a chat template's must (stages/template_tokens.py): as text it would train
    the wrong tokens."""
    for m in CONTROL_STRING_RE.finditer(text):
        if m.group() not in control_tokens:
            raise RecordError("control_string_not_a_token", f"the transform writes {m.group()!r}, which is "
                              "not one token of the tokenizer", field=f"transform.{key}")


def check_text(record: dict, control_re: re.Pattern | None) -> None:
    """A text record is encoded whole, as data (control-token text in it stays text), so a
    transform may not write control-token text into one: refused (``transform_markup_in_text``),
    as is an unattributed one holding control-token text (``transform_markup_unknown``)."""
    markup = _markup(record)
    if not markup or control_re is None:
        return
    if UNATTRIBUTED in markup:
        segments({MARKUP_KEY: markup}, "text", record["text"], control_re)
        return
    literal = "".join(t for t, lit in (markup.get("record") or {}).get("text", ()) if lit)
    m = control_re.search(literal)
    if m:
        raise RecordError("transform_markup_in_text", f"the transform writes control-token text "
                          f"({m.group()!r}) into a text record, which is encoded as plain text; return "
                          "an input-output or messages record to train it as a control token",
                          field="transform.text")


__all__ = ["TEMPLATE_MARKUP_NOTE", "controls_re", "template_markup_note", "template_markup_warnings", "MARKUP_KEY", "UNATTRIBUTED", "Marked", "attach", "derive", "messages_of", "placeholder_record",
           "segments", "check_text", "check_written", "writes_controls"]
