"""Canonical records → token ids + loss spans, through a Jinja chat template.

How ids and trained positions are found, without searching for marker strings:
1. Every data string (message content, reasoning) is replaced by a placeholder and the
   conversation is rendered once. The placeholders tell which characters of the rendered
   text came from data and which from the template's own literal text. A placeholder carries
   its data's leading/trailing whitespace, so templates that `trim` content still line up.
2. Trained character regions come from the template itself: its `{% generation %}` blocks
   where it has them (found in that same render), otherwise prefix renders — assistant turn
   i trains on what render(messages[:i+1]) adds to render(messages[:i], add_generation_prompt=True),
   up to its end-of-turn (the first stop token after its data, else its last control token),
   not the plain text after it. A template that re-renders history (not prefix-stable) has
   every turn read from the final rendering instead (final_turns.py). Every trained region
   then ends with a stop token where it can (stop_tokens.py).
3. The real conversation is rendered once more and must equal the placeholder render with
   the data put back ("round trip"): a template that rewrites message text is refused, never
   mis-masked.
4. Control tokens are taken only from template literal text; the text between them is
   encoded in one piece with control tokens disabled, so ids equal the tokenizer's own
   whole-string encoding and user text can never inject a control token. Control-token text
   inside data is encoded as a text piece of its own, exactly as transformers'
   `apply_chat_template(..., sanitize_control_tokens=True)` does. A template may also write
   `piece_break` (a variable): a token boundary that adds no token, after which the text is
   encoded as a string of its own (FM9G's tok(input) + tok(output); see none.jinja).
5. Guardrails, each a RecordError with a stable reason (counted under --on-error skip):
   template_error, template_round_trip, template_turn_unlocated, reasoning_not_rendered
   (the record has reasoning the template drops entirely), control_token_in_data (control
   text in tool calls / tools, which are not placeholders), reserved_char, unknown_token,
   no_trained_tokens. `check_template` compares samples with an independent reference.

Per record that is 2 renders with generation blocks, 2 + 2·(assistant turns) without.
Templates, their sandbox and `render` live in jinja_env.py; the layout rules a template opts
into in layouts.py; the control-string check in template_tokens.py; Encoded and the assembly of
ids in encoded.py; trained regions per turn (generation blocks, prefix renders, one-render bounds) in
turn_regions.py and turn_bounds.py; turns of templates that re-render
history in final_turns.py; stop tokens in stop_tokens.py; loss per_turn in per_turn.py; the
reference check (`check_template`) in template_check.py; the terminal display in pipeline/show.py.
"""
from __future__ import annotations

import bisect
import json
import re

import numpy as np

from . import markup
from .constants import LOSS_MODES, RECORD_TEMPLATE_VARS
from .encoded import Encoded, Explained, Layout, assemble, mask_to_spans, strip_generation_marks
from .errors import BuildError, RecordError
from .final_turns import PH_RE
from .formats import record_kind
from .jinja_env import (PH_CLOSE, PH_OPEN, PIECE_BREAK, RESERVED_RE, ChatTemplate, available_templates,
                        compile_template, find_template, render, template_literal_text)
from .layouts import prepare, template_directives
from .per_turn import PerTurn
from .stop_tokens import StopSet
from .template_tokens import CONTROL_STRING_RE, check_control_strings
from .tokenizer import Tokenizer
from .turn_regions import DATA_FIELDS, TurnRegions

__all__ = ["RENDER_VERSION", "ChatTemplate", "Encoded", "Explained", "Renderer", "available_templates",
           "compile_template", "mask_to_spans", "resolve_template", "template_literal_text"]

RENDER_VERSION = 4  # bump when the same inputs would give other ids or spans (belongs in cache keys)


def resolve_template(name: str, tokenizer: Tokenizer) -> ChatTemplate:
    """The template a build names (see jinja_env.find_template), refused when a control string
    it writes (`<|…|>`, `<｜…｜>`) is not one token of the tokenizer: rendered as plain text it
    would train the wrong tokens, and the first trained token would straddle the boundary."""
    tmpl = find_template(name, tokenizer)
    check_control_strings(tmpl, tokenizer)
    return tmpl


class Renderer(PerTurn, TurnRegions):
    """Renders and tokenizes batches of canonical records for one dataset.
    loss: `assistant` (every assistant turn whose loss_weight is not 0; default), `last` (the
    last assistant turn only), `all` (every token, prompts included).
    template_kwargs: extra template variables for every record (a record's own
    `template_kwargs` and its RECORD_TEMPLATE_VARS fields come on top)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, loss: str = "assistant",
                 template_kwargs: dict | None = None):
        if loss not in LOSS_MODES:
            raise BuildError(f"unknown loss mode {loss!r}: {', '.join(LOSS_MODES)}")
        self.tok, self.template, self.loss = tokenizer, template, loss
        # every token string the tokenizer matches, found in template text
        controls = sorted(tokenizer.control_tokens, key=len, reverse=True)
        self.control_re = re.compile("|".join(map(re.escape, controls))) if controls else None
        # where rendered template text is cut: control tokens, and piece breaks (no token)
        self.cut_re = re.compile("|".join(map(re.escape, controls + [PIECE_BREAK])))
        # tokens that must stay text inside data (specials + this template's control tokens)
        self.as_text = tokenizer.chat_control_tokens(template.text)
        data_ctl = sorted(self.as_text, key=len, reverse=True)
        self.data_control_re = re.compile("|".join(map(re.escape, data_ctl))) if data_ctl else None
        self.template_kwargs = {**tokenizer.template_kwargs(), **(template_kwargs or {})}
        self.generation = template.has_generation_blocks
        self.unk_id = tokenizer.unk_id
        self.directives = template_directives(template.text)
        # the template's own control tokens: text that already holds them is wrapped twice
        self.template_markup_re = markup.controls_re(tokenizer.control_tokens, template_literal_text(template.text))
        self._stops: dict[str, StopSet] = {}
        self._extra = self.template_kwargs

    def stop_set(self, extra: dict | None = None) -> StopSet:
        """The template's stop tokens under these template variables (stages/stop_tokens.py),
        read once per distinct set of variables from probe renders."""
        extra = self.template_kwargs if extra is None else extra
        key = json.dumps(extra, sort_keys=True, default=str)
        if key not in self._stops:
            if len(self._stops) > 64:
                self._stops.clear()
            self._stops[key] = StopSet(self.template, self.control_re, self.tok.eos_token, extra)
        return self._stops[key]

    @property
    def stops(self) -> StopSet:
        return self.stop_set()

    # -- record → placeholder messages ------------------------------------------------
    def messages(self, record: dict) -> list[dict]:
        """The record's conversation as the template sees it (input-output → user + assistant)."""
        return markup.messages_of(record)  # each turn with the transform's markup, if any

    def template_vars(self, record: dict) -> dict:
        """Template variables for this record: the tokenizer's, the dataset's, the record's own."""
        extra = dict(self.template_kwargs)
        for key in RECORD_TEMPLATE_VARS:
            if record.get(key) is not None:
                extra[key] = record[key]
        kw = record.get("template_kwargs")
        if kw is not None:
            if not isinstance(kw, dict):
                raise RecordError("wrong_type", "must be an object", field="template_kwargs")
            extra.update(kw)
        return extra

    def prepare(self, record: dict) -> tuple[list[dict], dict, tuple[str, ...]]:
        """(messages, template variables, notes) exactly as they are rendered: the template's
        layout rules applied (stages/layouts.py). Raises RecordError."""
        return prepare(self.directives, self.messages(record), self.template_vars(record), self.tok.eos_token)

    def _check_structured(self, value, where: str):
        """Strings the template renders that are not placeholders (tool calls, tools, template
        variables) must not hold control-token text: it could not be told from the template's."""
        if isinstance(value, str):
            if RESERVED_RE.search(value):
                raise RecordError("reserved_char", "contains a reserved Unicode noncharacter (U+FDD0–U+FDD5)",
                                  field=where)
            if self.data_control_re is not None and self.data_control_re.search(value):
                raise RecordError("control_token_in_data", "holds control-token text "
                                  f"({self.data_control_re.search(value).group()!r}) in a field the template "
                                  "renders as structure", field=where)
        elif isinstance(value, dict):
            for k, v in value.items():
                self._check_structured(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self._check_structured(v, f"{where}[{i}]")

    def _placeholders(self, messages: list[dict]):
        """→ (placeholder messages, real messages (data normalised as the tokenizer does),
        data [(core text, message index, field)])."""
        data: list[tuple[str, int, str]] = []
        ph_messages, real_messages = [], []
        norm = self.tok.normalize_data
        for i, m in enumerate(messages):
            ph, real = dict(m), dict(m)
            ph.pop(markup.MARKUP_KEY, None)
            real.pop(markup.MARKUP_KEY, None)
            for key in DATA_FIELDS:
                v = m.get(key)
                if v is None:
                    continue
                if not isinstance(v, str):
                    raise RecordError("wrong_type", f"must be a string, got {type(v).__name__}",
                                      field=f"messages[{i}].{key}")
                if RESERVED_RE.search(v):
                    raise RecordError("reserved_char", "contains a reserved Unicode noncharacter "
                                      "(U+FDD0–U+FDD5)", field=f"messages[{i}].{key}")
                ph_parts, real_parts = [], []
                # text a transform wrote (stages/markup.py) is template text; the rest is data
                for v, written in markup.segments(m, key, v, self.control_re):
                    if written:
                        markup.check_written(v, self.tok.control_tokens, key)
                        ph_parts.append(v)
                        real_parts.append(v)
                        continue
                    v = norm(v)
                    real_parts.append(v)
                    core = v.strip()
                    if core:  # empty / blank stays as is: templates test truthiness
                        lead = v[: len(v) - len(v.lstrip())]
                        trail = v[len(v.rstrip()):]
                        v = f"{lead}{PH_OPEN}{len(data)}{PH_CLOSE}{trail}"
                        data.append((core, i, key))
                    ph_parts.append(v)
                real[key], ph[key] = "".join(real_parts), "".join(ph_parts)
            for key in ("tool_calls", "name", "tool_call_id"):
                if key in m:
                    self._check_structured(m[key], f"messages[{i}].{key}")
            # transformers passes reasoning under `thinking` too (gpt-oss templates read it)
            if "reasoning_content" in m:
                ph["thinking"], real["thinking"] = ph["reasoning_content"], real["reasoning_content"]
            ph_messages.append(ph)
            real_messages.append(real)
        return ph_messages, real_messages, data

    # -- layout -----------------------------------------------------------------------
    def _layout(self, record: dict) -> Layout:
        messages, extra, notes = self.prepare(record)
        tools = record.get("tools")
        if tools is not None:
            self._check_structured(tools, "tools")
        for k, v in extra.items():
            if k not in self.template_kwargs:
                self._check_structured(v, f"template_kwargs.{k}")
        ph_messages, real_messages, data = self._placeholders(messages)

        marked = render(self.template, ph_messages, tools, extra, self.generation, False)
        blocks: list[tuple[int, int]] = []
        if self.generation:
            ph_text, blocks = strip_generation_marks(marked)
        else:
            ph_text = marked
        if any(self.template_kwargs.get(k, k) != v for k, v in extra.items()):
            self._check_control_strings(ph_text)  # the record's own variables chose control strings
        if self.loss == "all":
            ph_regions = [(0, len(ph_text), -1)]
        elif self.generation:
            ph_regions = self._block_regions(ph_messages, ph_text, blocks)
        else:
            ph_regions = self._prefix_regions(ph_messages, ph_text, tools, extra)
        appended = ""
        if self.loss != "all" and ph_regions and self.control_re is not None:  # else no stop to check
            fixed, ph_regions, stop_notes = self.stop_set(extra).fix(ph_text, ph_regions)
            appended, ph_text, notes = fixed[len(ph_text):], fixed, notes + stop_notes
        dropped = {data[k][1] for k in range(len(data)) if data[k][2] == "reasoning_content"
                   and f"{PH_OPEN}{k}{PH_CLOSE}" not in ph_text}
        if dropped & {i for _, _, i in ph_regions}:
            notes += ("history_reasoning_not_rendered",)

        layout = self._to_real(ph_text, data, ph_regions)
        layout.notes = notes + markup.template_markup_note(messages, self.template_markup_re)
        expected = render(self.template, real_messages, tools, extra, False, False) + appended
        if expected != layout.text:
            raise RecordError("template_round_trip", "the template changes message text (e.g. splits "
                              "or rewrites it), so data and template text cannot be told apart")
        reasoning = [k for k, (_, _, f) in enumerate(data) if f == "reasoning_content"]
        if reasoning and not any(f"{PH_OPEN}{k}{PH_CLOSE}" in ph_text for k in reasoning):
            raise RecordError("reasoning_not_rendered", f"the record has reasoning_content but template "
                              f"{self.template.name!r} renders none of it; use a template that does "
                              "(chatml, hunyuan, hy3) or drop the reasoning in a transform")
        return layout

    def data_has_control_text(self, messages: list[dict]) -> bool:
        """Whether a data string holds control-token text (encoded as text, never as the token)."""
        return self.data_control_re is not None and any(
            self.data_control_re.search(m.get(k) or "") for m in messages for k in DATA_FIELDS)

    def _check_control_strings(self, ph_text: str):
        for m in CONTROL_STRING_RE.finditer(ph_text):
            if m.group() not in self.tok.control_tokens:
                raise RecordError("control_string_not_a_token", f"with this record's template variables "
                                  f"the template writes {m.group()!r}, which is not one token of the tokenizer")

    def _to_real(self, ph_text: str, data, ph_regions) -> Layout:
        """Put the data back; find the template's control tokens; map regions to real text."""
        parts: list[str] = []
        cuts: list[tuple[int, int, int]] = []
        spans: list[tuple[int, int, int, str]] = []
        ph_pos: list[int] = []  # placeholder-text positions where a segment starts …
        real_pos: list[int] = []  # … and the matching real-text positions
        data_ends: list[tuple[int, int, int]] = []  # (ph_start, ph_end, real_start) of placeholders
        pos = real = 0
        ctl = self.cut_re
        dctl = self.data_control_re
        ids = self.tok.control_tokens

        def literal(seg: str):
            nonlocal real
            if ctl is not None:
                for m in ctl.finditer(seg):
                    cuts.append((real + m.start(), real + m.end(), ids.get(m.group(), -1)))
            parts.append(seg)
            real += len(seg)

        for m in PH_RE.finditer(ph_text):
            ph_pos.append(pos)
            real_pos.append(real)
            literal(ph_text[pos:m.start()])
            core, msg, key = data[int(m.group(1))]
            data_ends.append((m.start(), m.end(), real))
            spans.append((real, real + len(core), msg, key))
            if dctl is not None:  # control-token text in data: a text piece of its own, as
                for c in dctl.finditer(core):  # transformers' sanitize_control_tokens encodes it
                    cuts.append((real + c.start(), real + c.start(), -2))
                    cuts.append((real + c.end(), real + c.end(), -2))
            parts.append(core)
            real += len(core)
            pos = m.end()
        ph_pos.append(pos)
        real_pos.append(real)
        literal(ph_text[pos:])
        text = "".join(parts)

        def to_real(p: int) -> int:
            k = bisect.bisect_right(ph_pos, p) - 1  # segment k: literal text, then placeholder k
            if k < len(data_ends) and p >= data_ends[k][0]:
                return data_ends[k][2]  # at (or inside) placeholder k: its data's start
            return real_pos[k] + (p - ph_pos[k])

        regions = [(to_real(s), to_real(e), i) for s, e, i in ph_regions]
        return Layout(text, cuts, regions, spans)

    # -- batch ------------------------------------------------------------------------
    def _document_ids(self, ids: np.ndarray) -> np.ndarray:
        if self.tok.bos_id is None and self.tok.eos_id is None:
            return ids
        out = np.empty(len(ids) + (self.tok.bos_id is not None) + (self.tok.eos_id is not None), np.int64)
        start = 0
        if self.tok.bos_id is not None:
            out[0], start = self.tok.bos_id, 1
        out[start:start + len(ids)] = ids
        if self.tok.eos_id is not None:
            out[-1] = self.tok.eos_id
        return out

    def encode_batch(self, records: list[dict]) -> list[Encoded | RecordError]:
        if self.loss == "per_turn":
            return self._per_turn(records)
        return self._encode(records, False)

    def explain(self, record: dict) -> Explained | RecordError:
        """One record encoded, with each trained region's turn and each data string's tokens."""
        return self._encode([record], True)[0]

    def _encode(self, records: list[dict], explain: bool):
        out: list = [None] * len(records)
        doc_idx, doc_texts = [], []
        layouts: dict[int, tuple[Layout, list[tuple[int, int]], int]] = {}
        pieces: list[str] = []
        continued: list[bool] = []
        for i, rec in enumerate(records):
            if record_kind(rec) == "text":
                try:
                    markup.check_text(rec, self.control_re)
                except RecordError as e:
                    out[i] = e
                    continue
                text = rec["text"]
                doc_idx.append(i)
                doc_texts.append(self.tok.normalize_data(text))
                continue
            try:
                layout = self._layout(rec)
            except RecordError as e:
                out[i] = e
                continue
            # a piece after a control token continues the text; one after a piece break (or at
            # the start) is encoded as a string of its own
            sections, cont, pos, fresh = [], [], 0, True
            for s, e, tid in layout.cuts + [(len(layout.text), len(layout.text), -1)]:
                if s > pos:
                    sections.append((pos, s))
                    cont.append(not fresh)
                    fresh = False
                if e > s:
                    fresh = tid < 0
                pos = e
            first = len(pieces)
            pieces.extend(layout.text[a:b] for a, b in sections)
            continued.extend(cont)
            layouts[i] = (layout, sections, first)
        for i, ids in zip(doc_idx, self.tok.encode_documents(doc_texts) if doc_texts else []):
            enc = Encoded(self._document_ids(ids), None)
            out[i] = Explained(enc, [(0, len(enc.ids), -1, "text")], [], records[i]["text"]) if explain else enc
        encoded = self.tok.encode_pieces(pieces, continued, self.as_text) if pieces else []
        for i, (layout, sections, k) in layouts.items():
            out[i] = assemble(layout, sections, [encoded[j] for j in range(k, k + len(sections))], explain,
                              self.unk_id, self.tok.unk_token)
        return out
