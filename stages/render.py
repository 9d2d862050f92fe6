"""Canonical records → token ids + loss spans, through a Jinja chat template.

How ids and trained positions are found, without searching for marker strings:
1. Every data string (message content, reasoning) is replaced by a placeholder and the
   conversation is rendered once. The placeholders tell which characters of the rendered
   text came from data and which from the template's own literal text. A placeholder carries
   its data's leading/trailing whitespace, so templates that `trim` content still line up.
2. Trained character regions come from the template itself: its `{% generation %}` blocks
   where it has them (found in that same render), otherwise prefix renders — assistant turn
   i trains on what render(messages[:i+1]) adds to render(messages[:i], add_generation_prompt=True),
   up to the last control token of that turn (its end-of-turn), not the plain text after it.
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
   template_error, template_round_trip, template_not_prefix_stable, reasoning_not_rendered
   (the record has reasoning the template drops entirely), control_token_in_data (control
   text in tool calls / tools, which are not placeholders), reserved_char, unknown_token,
   no_trained_tokens. `check_template` compares samples with an independent reference.

Per record that is 2 renders with generation blocks, 2 + 2·(assistant turns) without.
Templates render in a sandboxed Jinja environment equal to transformers' chat-template one
(same filters and globals, trim_blocks/lstrip_blocks), except that `strftime_now` reads a
fixed time (template variable `tokenmill_now`, ISO format; default 2025-01-01T00:00:00), so
builds are reproducible.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import BuildError, RecordError
from .formats import record_kind
from .tokenizer import Tokenizer

BUILTIN_TEMPLATES = ("chatml", "none", "hunyuan", "hy3")
RENDER_VERSION = 2  # bump when the same inputs would give other ids or spans (belongs in cache keys)
# Unicode noncharacters (never in real text): placeholder brackets, generation-block marks.
PH_OPEN, PH_CLOSE, GEN_OPEN, GEN_CLOSE = "\ufdd0", "\ufdd1", "\ufdd2", "\ufdd3"
PIECE_BREAK = "\ufdd5"  # template variable `piece_break`: a token boundary, no token
RESERVED_RE = re.compile("[\ufdd0-\ufdd5]")
PH_RE = re.compile(f"{PH_OPEN}(\\d+){PH_CLOSE}")
GEN_RE = re.compile(f"[{GEN_OPEN}{GEN_CLOSE}]")
DATA_FIELDS = ("content", "reasoning_content")
LOSS_MODES = ("assistant", "last", "all")
DEFAULT_NOW = "2025-01-01T00:00:00"


# ---------------------------------------------------------------------------------------
# templates
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatTemplate:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def has_generation_blocks(self) -> bool:
        return re.search(r"\{%-?\s*generation\s*-?%\}", self.text) is not None


def resolve_template(name: str, tokenizer: Tokenizer) -> ChatTemplate:
    """`tokenizer` (the tokenizer's own), a built-in name, or a path to a .jinja file.
    Built-ins are files in stages/templates/: a .jinja file placed there is a new built-in."""
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise BuildError(f"{tokenizer.path}: template 'tokenizer' asked for, but the tokenizer "
                             f"has no chat template; choose one of {', '.join(available_templates())}")
        tmpl = ChatTemplate("tokenizer", tokenizer.chat_template)
    elif Path(name).suffix == ".jinja" or "/" in name:
        if not Path(name).is_file():
            raise BuildError(f"template file {name!r} not found")
        tmpl = ChatTemplate(Path(name).stem, Path(name).read_text(encoding="utf-8"))
    else:
        res = resources.files("stages") / "templates" / f"{name}.jinja"
        if not res.is_file():
            raise BuildError(f"unknown template {name!r}: use tokenizer, {', '.join(available_templates())} "
                             "or a path to a .jinja file")
        tmpl = ChatTemplate(name, res.read_text(encoding="utf-8"))
    try:
        compile_template(tmpl.text, False)
    except Exception as e:
        raise BuildError(f"template {tmpl.name!r} does not compile: {type(e).__name__}: {e}") from None
    return tmpl


def available_templates() -> list[str]:
    folder = resources.files("stages") / "templates"
    return sorted(p.name[:-6] for p in folder.iterdir() if p.name.endswith(".jinja"))


@lru_cache(maxsize=32)
def compile_template(text: str, mark_generation: bool):
    """The template compiled in a sandbox equal to transformers' chat-template environment.
    With `mark_generation`, `{% generation %}` blocks wrap their output in GEN marks."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return nodes.CallBlock(self.call_method("_block"), [], [], body).set_lineno(lineno)

        def _block(self, caller):
            out = caller()
            return f"{GEN_OPEN}{out}{GEN_CLOSE}" if mark_generation else out

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    @jinja2.pass_context
    def strftime_now(ctx, fmt):
        return datetime.fromisoformat(ctx.get("tokenmill_now") or DEFAULT_NOW).strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=TemplateDict(), namespace=TemplateNamespace, piece_break=PIECE_BREAK)
    return env.from_string(text)


@lru_cache(maxsize=32)
def template_literal_text(text: str) -> str:
    """The template's literal strings (raw text and string constants), joined by NULs — where
    transformers looks for a template's control tokens."""
    from jinja2 import nodes
    tmpl = compile_template(text, False)
    ast = tmpl.environment.parse(text)
    literals = {n.data for n in ast.find_all(nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(nodes.Const) if isinstance(n.value, str)}
    return "\0".join(sorted(literals))


def _render(template: ChatTemplate, messages, tools, extra: dict, mark: bool, add_gen: bool) -> str:
    try:
        return compile_template(template.text, mark).render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_gen, **extra)
    except Exception as e:
        raise RecordError("template_error", f"chat template {template.name!r} failed: "
                          f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------
# encoded samples
# ---------------------------------------------------------------------------------------
@dataclass
class Encoded:
    ids: np.ndarray  # int64
    spans: np.ndarray | None  # int32 (m, 2) trained [start, end); None = every token trained

    @property
    def n_trained(self) -> int:
        if self.spans is None:
            return len(self.ids)
        return int((self.spans[:, 1] - self.spans[:, 0]).sum())


@dataclass
class Explained:
    """One record encoded, with where each part came from (for `pipeline show`).
    regions: trained token ranges [(start, end, message_index, role)] (message_index -1 and
    role 'all' for loss: all); data: [(start, end, message_index, role, field)] token ranges
    of each data string; text: the rendered conversation."""
    encoded: Encoded
    regions: list[tuple[int, int, int, str]]
    data: list[tuple[int, int, int, str, str]]
    text: str


@dataclass
class _Layout:
    text: str  # the real rendered conversation
    cuts: list[tuple[int, int, int]]  # template control tokens: (start, end, id)
    regions: list[tuple[int, int, int]]  # trained char ranges (start, end, message index)
    data: list[tuple[int, int, int, str]] = field(default_factory=list)  # (start, end, msg, field)


class Renderer:
    """Renders and tokenizes batches of canonical records for one dataset.
    loss: `assistant` (every assistant turn whose loss_weight is not 0; default), `last` (the
    last assistant turn only), `all` (every token, prompts included).
    template_kwargs: extra template variables for every record (a record's own
    `template_kwargs` and `reasoning_effort` come on top)."""

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

    # -- record → placeholder messages ------------------------------------------------
    def _messages(self, record: dict) -> list[dict]:
        if record_kind(record) == "input-output":
            return [{"role": "user", "content": record["input"]},
                    {"role": "assistant", "content": record["output"]}]
        return record["messages"]

    def _extra(self, record: dict) -> dict:
        extra = dict(self.template_kwargs)
        if record.get("reasoning_effort") is not None:
            extra["reasoning_effort"] = record["reasoning_effort"]
        kw = record.get("template_kwargs")
        if kw is not None:
            if not isinstance(kw, dict):
                raise RecordError("wrong_type", "must be an object", field="template_kwargs")
            extra.update(kw)
        return extra

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
                v = norm(v)
                real[key] = v
                core = v.strip()
                if core:  # empty / blank stays as is: templates test truthiness
                    lead = v[: len(v) - len(v.lstrip())]
                    trail = v[len(v.rstrip()):]
                    ph[key] = f"{lead}{PH_OPEN}{len(data)}{PH_CLOSE}{trail}"
                    data.append((core, i, key))
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
    def _layout(self, record: dict) -> _Layout:
        messages = self._messages(record)
        extra = self._extra(record)
        tools = record.get("tools")
        if tools is not None:
            self._check_structured(tools, "tools")
        for k, v in extra.items():
            if k not in self.template_kwargs:
                self._check_structured(v, f"template_kwargs.{k}")
        ph_messages, real_messages, data = self._placeholders(messages)

        marked = _render(self.template, ph_messages, tools, extra, self.generation, False)
        blocks: list[tuple[int, int]] = []
        if self.generation:
            ph_text, blocks = _strip_generation_marks(marked)
        else:
            ph_text = marked
        if self.loss == "all":
            ph_regions = [(0, len(ph_text), -1)]
        elif self.generation:
            ph_regions = self._block_regions(ph_messages, ph_text, blocks)
        else:
            ph_regions = self._prefix_regions(ph_messages, ph_text, tools, extra)

        layout = self._to_real(ph_text, data, ph_regions)
        expected = _render(self.template, real_messages, tools, extra, False, False)
        if expected != layout.text:
            raise RecordError("template_round_trip", "the template changes message text (e.g. splits "
                              "or rewrites it), so data and template text cannot be told apart")
        reasoning = [k for k, (_, _, f) in enumerate(data) if f == "reasoning_content"]
        if reasoning and not any(f"{PH_OPEN}{k}{PH_CLOSE}" in ph_text for k in reasoning):
            raise RecordError("reasoning_not_rendered", f"the record has reasoning_content but template "
                              f"{self.template.name!r} renders none of it; use a template that does "
                              "(chatml, hunyuan, hy3) or drop the reasoning in a transform")
        return layout

    def _selected(self, messages: list[dict]) -> list[int]:
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
        keep = set(self._selected(ph_messages))
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

    def _prefix_regions(self, ph_messages, ph_text, tools, extra):
        regions = []
        for i in self._selected(ph_messages):
            before = _render(self.template, ph_messages[:i], tools, extra, False, True)
            upto = _render(self.template, ph_messages[: i + 1], tools, extra, False, False)
            if not (upto.startswith(before) and ph_text.startswith(upto)):
                raise RecordError("template_not_prefix_stable", "the template renders earlier "
                                  "turns differently once later turns exist; loss spans cannot be "
                                  "derived by prefix (add {% generation %} blocks to the template)")
            start, end = len(before), len(upto)
            regions.append((start, self._end_of_turn(ph_text, start, end), i))
        return regions

    def _end_of_turn(self, ph_text: str, start: int, end: int) -> int:
        """Trim plain template text that follows the turn's last control token (e.g. the
        newline after <|im_end|>): the end-of-turn token trains, the separator does not. A
        turn without control tokens trains whole; data is never trimmed."""
        ctl = [m.end() for m in self.control_re.finditer(ph_text, start, end)] if self.control_re else []
        if not ctl:
            return end
        data = [m.end() for m in PH_RE.finditer(ph_text, start, end)]
        return max(ctl[-1], data[-1] if data else start)

    def _to_real(self, ph_text: str, data, ph_regions) -> _Layout:
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
        return _Layout(text, cuts, regions, spans)

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
        return self._encode(records, False)

    def explain(self, record: dict) -> Explained | RecordError:
        """One record encoded, with each trained region's turn and each data string's tokens."""
        return self._encode([record], True)[0]

    def _encode(self, records: list[dict], explain: bool):
        out: list = [None] * len(records)
        doc_idx, doc_texts = [], []
        layouts: dict[int, tuple[_Layout, list[tuple[int, int]], int]] = {}
        pieces: list[str] = []
        continued: list[bool] = []
        for i, rec in enumerate(records):
            if record_kind(rec) == "text":
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
            out[i] = self._assemble(layout, sections, [encoded[j] for j in range(k, k + len(sections))], explain)
        return out

    def _assemble(self, layout: _Layout, sections, encoded, explain: bool):
        ids_parts, starts, ends = [], [], []
        items = [(s, e, ("ctl", tid)) for s, e, tid in layout.cuts]
        items += [(a, b, ("text", enc)) for (a, b), enc in zip(sections, encoded)]
        items.sort(key=lambda x: x[0])
        for s, e, (kind, val) in items:
            if kind == "ctl":
                if val < 0:  # a piece break: a boundary, no token
                    continue
                ids_parts.append(np.array([val], dtype=np.int64))
                starts.append(np.array([s], dtype=np.int64))
                ends.append(np.array([e], dtype=np.int64))
            else:
                ids, ts, te = val
                ids_parts.append(ids)
                starts.append(ts + s)
                ends.append(te + s)
        ids_a = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        s_a = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        e_a = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        if self.unk_id is not None and (ids_a == self.unk_id).any():
            return RecordError("unknown_token", "the tokenizer has no token for some of this text "
                               f"(it became {self.tok.unk_token!r}), so it cannot round-trip")
        mask = np.zeros(len(ids_a), dtype=bool)
        tok_regions = []
        for rs, re_, msg in layout.regions:
            hit = (e_a > rs) & (s_a < re_)
            mask |= hit
            if explain and hit.any():
                where = np.flatnonzero(hit)
                tok_regions.append((int(where[0]), int(where[-1]) + 1, msg, "all" if msg < 0 else "assistant"))
        if not mask.any():
            return RecordError("no_trained_tokens", "no token is trained (every assistant turn "
                               "is empty or has loss_weight 0)")
        enc = Encoded(ids_a, mask_to_spans(mask))
        if not explain:
            return enc
        data = []
        for ds, de, msg, key in layout.data:
            where = np.flatnonzero((e_a > ds) & (s_a < de))
            if len(where):
                data.append((int(where[0]), int(where[-1]) + 1, msg, "", key))
        return Explained(enc, tok_regions, data, layout.text.replace(PIECE_BREAK, ""))


def _strip_generation_marks(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove generation marks; return the clean text and each outermost block's range."""
    out, blocks, depth, pos, removed, start = [], [], 0, 0, 0, 0
    for m in GEN_RE.finditer(marked):
        out.append(marked[pos:m.start()])
        here = m.start() - removed
        if m.group() == GEN_OPEN:
            if depth == 0:
                start = here
            depth += 1
        else:
            depth -= 1
            if depth == 0 and here > start:
                blocks.append((start, here))
        removed += 1
        pos = m.end()
    out.append(marked[pos:])
    return "".join(out), blocks


def mask_to_spans(mask: np.ndarray) -> np.ndarray:
    """Boolean mask → int32 (m, 2) [start, end) runs of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges.reshape(-1, 2).astype(np.int32)


# ---------------------------------------------------------------------------------------
# --check-template: an independent reference
# ---------------------------------------------------------------------------------------
@dataclass
class TemplateCheck:
    """Result of `check_template`. `differ`: [(record index, what, detail)] for every sample
    whose ids or trained positions differ from the reference; `not_checked`: {reason: count}
    (records the renderer refuses, or where the reference cannot say)."""
    template: str
    checked: int = 0
    ids_equal: int = 0
    masks_checked: int = 0
    masks_equal: int = 0
    differ: list = field(default_factory=list)
    not_checked: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.differ

    def count(self, reason: str):
        self.not_checked[reason] = self.not_checked.get(reason, 0) + 1

    def summary(self) -> str:
        head = (f"template {self.template!r}: {self.ids_equal}/{self.checked} samples with the reference's ids, "
                f"{self.masks_equal}/{self.masks_checked} with its trained positions")
        if self.not_checked:
            head += "; not checked: " + ", ".join(f"{k} {v}" for k, v in sorted(self.not_checked.items()))
        lines = [head] + [f"  record {i}: {what} differ — {detail}" for i, what, detail in self.differ[:10]]
        if len(self.differ) > 10:
            lines.append(f"  … and {len(self.differ) - 10} more")
        return "\n".join(lines)


class _FixedClock:
    @staticmethod
    def now(tz=None):
        return datetime.fromisoformat(DEFAULT_NOW)


def _reference_render(renderer: Renderer, messages, tools, kwargs, add_gen=False, mask=False, template=None):
    """transformers' own Jinja renderer (as apply_chat_template uses it)."""
    from unittest import mock

    from transformers.utils import chat_template_utils as ctu
    kw = {**renderer.tok.template_kwargs(), **kwargs, "piece_break": PIECE_BREAK}
    now = kw.pop("tokenmill_now", None)
    clock = _FixedClock
    if now:
        class clock(_FixedClock):  # noqa: N801
            @staticmethod
            def now(tz=None):
                return datetime.fromisoformat(now)
    with mock.patch.object(ctu, "datetime", clock):
        texts, idx = ctu.render_jinja_template([messages], tools=tools,
                                               chat_template=(template or renderer.template).text,
                                               add_generation_prompt=add_gen, return_assistant_tokens_mask=mask,
                                               **kw)
    return texts[0], (idx[0] if mask else None)


def _reference_ids(tok: Tokenizer, text: str, offsets=False):
    """The tokenizer's own encoding of a rendered chat; a piece break splits it (each piece
    encoded alone, FM9G style)."""
    ids, offs, base = [], [], 0
    for part in text.split(PIECE_BREAK):
        if part:
            if offsets:
                got, o = tok.reference_offsets(part)
                offs += [(a + base, b + base) for a, b in o]
            else:
                got = tok.reference_encode(part)
            ids += list(got)
        base += len(part) + 1
    return (ids, offs) if offsets else ids


def _reference_mask(renderer: Renderer, template: ChatTemplate, messages, tools, kwargs, text, ids
                    ) -> np.ndarray | str:
    """Trained positions as the reference says, or a reason why it cannot say."""
    n = len(ids)
    if renderer.loss == "all":
        return np.ones(n, dtype=bool)
    selected = set(renderer._selected(messages))
    mask = np.zeros(n, dtype=bool)
    if template.has_generation_blocks:
        text2, blocks = _reference_render(renderer, messages, tools, kwargs, mask=True, template=template)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(blocks) != len(assistant):
            return "reference_blocks_unmatched"
        ids2, offs = _reference_ids(renderer.tok, text2, offsets=True)
        if ids2 != list(ids):
            return "reference_offsets_differ"
        s_a = np.array([a for a, _ in offs], dtype=np.int64)
        e_a = np.array([b for _, b in offs], dtype=np.int64)
        for (s, e), i in zip(sorted(blocks), assistant):
            if i in selected:
                mask |= (e_a > s) & (s_a < e)
        return mask
    controls = set(renderer.tok.control_tokens.values())
    ids2, offs = _reference_ids(renderer.tok, text, offsets=True)
    if ids2 != list(ids):
        return "reference_offsets_differ"
    s_a = np.array([a for a, _ in offs], dtype=np.int64)
    e_a = np.array([b for _, b in offs], dtype=np.int64)
    is_ctl = np.array([t in controls for t in ids2], dtype=bool)
    for i in sorted(selected):
        before = _reference_render(renderer, messages[:i], tools, kwargs, add_gen=True, template=template)[0]
        upto = _reference_render(renderer, messages[: i + 1], tools, kwargs, template=template)[0]
        if not (upto.startswith(before) and text.startswith(upto)):
            return "reference_not_prefix"
        start, end = len(before), len(upto)
        # the turn ends at its last control token (the end-of-turn), else it trains whole
        inside = np.flatnonzero(is_ctl & (s_a >= start) & (e_a <= end))
        stop = int(e_a[inside[-1]]) if len(inside) else end
        mask |= (e_a > start) & (s_a < stop)
    return mask


def check_template(renderer: Renderer, records: list[dict], reference: ChatTemplate | None = None
                   ) -> TemplateCheck:
    """Re-render chat records with the reference — transformers' own chat-template renderer
    and the tokenizer's own encoding (`apply_chat_template`; for tiktoken, the original
    loader's NFC + allowed_special="all") — and compare ids and trained positions with what
    `renderer` produces. Trained positions come from the reference's own generation-block
    indices, or from prefix renders for templates without them. `reference`: render the
    reference with another template (e.g. a built-in checked against the tokenizer's own)."""
    template = reference or renderer.template
    report = TemplateCheck(renderer.template.name if reference is None
                           else f"{renderer.template.name} vs {reference.name}")
    ours = renderer.encode_batch(records)
    for idx, (rec, enc) in enumerate(zip(records, ours)):
        if record_kind(rec) == "text":
            report.count("text_record")
            continue
        if isinstance(enc, RecordError):
            report.count(f"renderer:{enc.reason}")
            continue
        messages = renderer._messages(rec)
        tools = rec.get("tools")
        kwargs = renderer._extra(rec)
        data_ctl = renderer.data_control_re is not None and any(
            renderer.data_control_re.search(m.get(k) or "") for m in messages for k in DATA_FIELDS)
        try:
            if data_ctl:
                if renderer.tok.kind != "hf" or "piece_break" in template.text:
                    report.count("reference_cannot_keep_control_text")
                    continue
                own = renderer.tok.template_kwargs()
                user_kw = {k: v for k, v in kwargs.items() if k not in own or own[k] != v}
                ref = renderer.tok.hf.apply_chat_template(
                    messages, tools=tools, chat_template=template.text, tokenize=True,
                    return_dict=False, sanitize_control_tokens=True, **user_kw)
                text = None
            else:
                text, _ = _reference_render(renderer, messages, tools, kwargs, template=template)
                ref = _reference_ids(renderer.tok, text)
        except ValueError as e:
            report.count("reference_failed")
            if "sanitize" not in str(e):
                report.differ.append((idx, "render", f"reference failed: {e}"))
            continue
        except Exception as e:  # the reference template fails where ours did not
            report.differ.append((idx, "render", f"reference failed: {type(e).__name__}: {e}"))
            continue
        report.checked += 1
        ids = enc.ids.tolist()
        if ids != list(ref):
            k = next((j for j, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
            report.differ.append((idx, "ids", f"first difference at token {k} of {len(ids)}/{len(ref)}: "
                                  f"ours {ids[k:k + 5]} reference {list(ref)[k:k + 5]}"))
            continue
        report.ids_equal += 1
        if data_ctl:
            report.count("mask_unverifiable_control_text")
            continue
        try:
            ref_mask = _reference_mask(renderer, template, messages, tools, kwargs, text, ids)
        except Exception as e:
            report.differ.append((idx, "trained positions", f"reference failed: {type(e).__name__}: {e}"))
            continue
        if isinstance(ref_mask, str):
            report.count(ref_mask)
            continue
        report.masks_checked += 1
        mine = np.zeros(len(ids), dtype=bool)
        for s, e in enc.spans if enc.spans is not None else [(0, len(ids))]:
            mine[s:e] = True
        if (mine == ref_mask).all():
            report.masks_equal += 1
        else:
            k = int(np.flatnonzero(mine != ref_mask)[0])
            report.differ.append((idx, "trained positions", f"first difference at token {k}: ours "
                                  f"{'trained' if mine[k] else 'not trained'}, reference "
                                  f"{'trained' if ref_mask[k] else 'not trained'}"))
    return report


# ---------------------------------------------------------------------------------------
# showing a sample
# ---------------------------------------------------------------------------------------
GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def marked_text(tok: Tokenizer, ids, spans, color: bool = False, labels: list[str] | None = None) -> str:
    """The decoded sample with trained spans marked: green on a terminal (`color`), else
    ⟦…⟧. `labels[k]` (e.g. "assistant#3") is written in front of trained span k."""
    ids = np.asarray(ids)
    spans = [(0, len(ids))] if spans is None else [tuple(map(int, s)) for s in spans]
    out, pos = [], 0
    for k, (s, e) in enumerate(spans):
        if pos < s:
            text = tok.decode(ids[pos:s].tolist())
            out.append(f"{DIM}{text}{RESET}" if color else text)
        label = f"[{labels[k]}]" if labels and k < len(labels) and labels[k] else ""
        text = tok.decode(ids[s:e].tolist())
        out.append(f"{DIM}{label}{RESET}{GREEN}{text}{RESET}" if color else f"{label}⟦{text}⟧")
        pos = e
    if pos < len(ids):
        text = tok.decode(ids[pos:].tolist())
        out.append(f"{DIM}{text}{RESET}" if color else text)
    return "".join(out)


def span_labels(explained: Explained, messages: list[dict] | None = None) -> list[str]:
    """For each trained span of an explained sample, the role and turn it trains
    ("assistant#3"; "all" under loss: all; "text" for documents)."""
    out = []
    for s, e in (explained.encoded.spans if explained.encoded.spans is not None
                 else [(0, len(explained.encoded.ids))]):
        names = [f"{role}#{msg}" if msg >= 0 else role for rs, re_, msg, role in explained.regions
                 if rs < e and re_ > s]
        out.append("+".join(dict.fromkeys(names)))
    return out
