"""Canonical records → token ids + loss spans, through a Jinja chat template.

How the trained positions are found, without searching for marker strings:
1. Every data string (message content, reasoning) is replaced by a placeholder and the
   conversation is rendered once. The placeholders tell which characters of the rendered
   text came from data and which from the template's own literal text.
2. Trained character regions come from the template itself: its `{% generation %}` blocks
   where it has them, otherwise prefix renders — assistant turn i trains on what
   render(messages[:i+1]) adds to render(messages[:i], add_generation_prompt=True), up to
   the last control token of that turn (its end-of-turn), not the plain text after it.
3. Control tokens are taken only from template literal text; the text between them is
   encoded in one piece with control tokens disabled, so ids equal the tokenizer's own
   whole-string encoding and user text can never inject a control token.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import BuildError, RecordError
from .formats import record_kind
from .tokenizer import Tokenizer

BUILTIN_TEMPLATES = ("chatml", "none", "hunyuan", "hy3")
PH_OPEN, PH_CLOSE = "\ue000", "\ue001"
PH_RE = re.compile(f"{PH_OPEN}(\\d+){PH_CLOSE}")
DATA_FIELDS = ("content", "reasoning_content")
LOSS_MODES = ("assistant", "last", "all")


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
    """`tokenizer` (the tokenizer's own), a built-in name, or a path to a .jinja file."""
    if name == "tokenizer":
        if not tokenizer.chat_template:
            raise BuildError(f"{tokenizer.path}: template 'tokenizer' asked for, but the tokenizer "
                             f"has no chat template; choose one of {', '.join(BUILTIN_TEMPLATES)}")
        return ChatTemplate("tokenizer", tokenizer.chat_template)
    if name in BUILTIN_TEMPLATES:
        res = resources.files("stages") / "templates" / f"{name}.jinja"
        if not res.is_file():
            raise BuildError(f"template {name!r} is not available in this version")
        return ChatTemplate(name, res.read_text(encoding="utf-8"))
    if Path(name).is_file():
        return ChatTemplate(Path(name).stem, Path(name).read_text(encoding="utf-8"))
    raise BuildError(f"unknown template {name!r}: use tokenizer, {', '.join(BUILTIN_TEMPLATES)} "
                     "or a path to a .jinja file")


@dataclass
class Encoded:
    ids: np.ndarray  # int64
    spans: np.ndarray | None  # int32 (m, 2) trained [start, end); None = every token trained

    @property
    def n_trained(self) -> int:
        if self.spans is None:
            return len(self.ids)
        return int((self.spans[:, 1] - self.spans[:, 0]).sum())


def _render(template: ChatTemplate, messages, extra: dict, generation: bool, add_gen: bool):
    from transformers.utils.chat_template_utils import render_jinja_template
    try:
        texts, indices = render_jinja_template(
            [messages], chat_template=template.text, add_generation_prompt=add_gen,
            return_assistant_tokens_mask=generation, **extra)
    except Exception as e:
        raise RecordError("template_error", f"chat template {template.name!r} failed: "
                          f"{type(e).__name__}: {e}") from None
    return texts[0], (indices[0] if generation else None)


class Renderer:
    """Renders and tokenizes batches of canonical records for one dataset."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, loss: str = "assistant"):
        if loss not in LOSS_MODES:
            raise BuildError(f"unknown loss mode {loss!r}: {', '.join(LOSS_MODES)}")
        self.tok, self.template, self.loss = tokenizer, template, loss
        controls = sorted(tokenizer.control_tokens, key=len, reverse=True)
        self.control_re = re.compile("|".join(map(re.escape, controls))) if controls else None
        self.template_kwargs = tokenizer.template_kwargs()

    # -- text documents -------------------------------------------------------------
    def _document_ids(self, ids: list[int]) -> np.ndarray:
        head = [self.tok.bos_id] if self.tok.bos_id is not None else []
        tail = [self.tok.eos_id] if self.tok.eos_id is not None else []
        return np.array(head + ids + tail, dtype=np.int64)

    # -- chat -----------------------------------------------------------------------
    def _layout(self, record: dict):
        """Render one chat record with placeholders → (pieces, regions) in real-text terms.
        pieces: list of ("ctl", id) | ("text", str); regions: trained char ranges."""
        if record_kind(record) == "input-output":
            messages = [{"role": "user", "content": record["input"]},
                        {"role": "assistant", "content": record["output"]}]
        else:
            messages = record["messages"]
        data: list[str] = []
        ph_messages = []
        for m in messages:
            m2 = dict(m)
            for key in DATA_FIELDS:
                v = m2.get(key)
                if isinstance(v, str) and v:  # empty stays empty: templates test truthiness
                    if PH_OPEN in v or PH_CLOSE in v:
                        raise RecordError("reserved_char", "contains a reserved private-use "
                                          "character (U+E000/U+E001)", field=key)
                    m2[key] = f"{PH_OPEN}{len(data)}{PH_CLOSE}"
                    data.append(v)
            ph_messages.append(m2)
        extra = dict(self.template_kwargs)
        for key in ("tools", "reasoning_effort"):
            if key in record:
                extra[key] = record[key]
        extra.update(record.get("template_kwargs") or {})
        gen = self.template.has_generation_blocks
        ph_text, gen_idx = _render(self.template, ph_messages, extra, gen, False)

        if self.loss == "all":
            regions = [(0, len(ph_text))]
        else:
            regions = self._regions(ph_messages, ph_text, gen_idx, extra)
        return self._to_real(ph_text, data, regions, messages, extra)

    def _regions(self, ph_messages, ph_text, gen_idx, extra):
        assistant = [i for i, m in enumerate(ph_messages) if m["role"] == "assistant"
                     and m.get("loss_weight", 1) != 0]
        if self.loss == "last":
            assistant = assistant[-1:]
        if gen_idx is not None:
            blocks = sorted(gen_idx)
            all_assistant = [i for i, m in enumerate(ph_messages) if m["role"] == "assistant"]
            if len(blocks) != len(all_assistant):
                raise RecordError("template_error", f"{len(blocks)} generation blocks for "
                                  f"{len(all_assistant)} assistant turns")
            keep = {all_assistant.index(i) for i in assistant}
            return [blocks[k] for k in sorted(keep)]
        regions = []
        for i in assistant:
            before, _ = _render(self.template, ph_messages[:i], extra, False, True)
            upto, _ = _render(self.template, ph_messages[: i + 1], extra, False, False)
            if not (upto.startswith(before) and ph_text.startswith(upto)):
                raise RecordError("template_not_prefix_stable", "the template renders earlier "
                                  "turns differently once later turns exist; loss spans cannot be "
                                  "derived by prefix (add {% generation %} blocks to the template)")
            start, end = len(before), len(upto)
            regions.append((start, self._end_of_turn(ph_text, start, end)))
        return regions

    def _end_of_turn(self, ph_text: str, start: int, end: int) -> int:
        """Trim plain template text that follows the turn's last control token (e.g. the
        newline after <|im_end|>): the end-of-turn token trains, the separator does not."""
        last = start
        for m in PH_RE.finditer(ph_text, start, end):
            last = max(last, m.end())
        if self.control_re is not None:
            for m in self.control_re.finditer(ph_text, last, end):
                last = max(last, m.end())
        return last if last > start else end

    def _to_real(self, ph_text, data, regions, messages, extra):
        """Swap placeholders for data; split at template control tokens; map regions."""
        pieces: list[tuple] = []  # ("ctl", id, real_start, real_end) | ("text", str, real_start)
        ph_to_real: list[tuple[int, int]] = []  # (ph_pos, real_pos) at every segment start
        real_parts: list[str] = []
        real_pos, text_buf, text_start = 0, [], 0

        def add_literal(seg: str, ph_pos: int):
            nonlocal real_pos, text_start
            pos = 0
            for m in (self.control_re.finditer(seg) if self.control_re else ()):
                add_text(seg[pos:m.start()])
                flush()
                pieces.append(("ctl", self.tok.control_tokens[m.group()], real_pos, real_pos + len(m.group())))
                real_parts.append(m.group())
                real_pos += len(m.group())
                text_start = real_pos
                pos = m.end()
            add_text(seg[pos:])

        def add_text(s: str):
            nonlocal real_pos
            if s:
                text_buf.append(s)
                real_parts.append(s)
                real_pos += len(s)

        def flush():
            nonlocal text_start
            if text_buf:
                pieces.append(("text", "".join(text_buf), text_start))
                text_buf.clear()
            text_start = real_pos

        pos = 0
        for m in PH_RE.finditer(ph_text):
            ph_to_real.append((pos, real_pos))
            add_literal(ph_text[pos:m.start()], pos)
            ph_to_real.append((m.start(), real_pos))
            add_text(data[int(m.group(1))])
            pos = m.end()
            ph_to_real.append((pos, real_pos))
        ph_to_real.append((pos, real_pos))
        add_literal(ph_text[pos:], pos)
        flush()
        ph_to_real.append((len(ph_text), real_pos))

        real_text = "".join(real_parts)
        expected, _ = _render(self.template, messages, extra, False, False)
        if expected != real_text:
            raise RecordError("template_round_trip", "the template changes message text (e.g. "
                              "strips or splits it), so data and template text cannot be told apart")
        return pieces, [(self._map(ph_to_real, ph_text, s), self._map(ph_to_real, ph_text, e))
                        for s, e in regions]

    @staticmethod
    def _map(table, ph_text, p: int) -> int:
        """Placeholder-text position → real-text position (positions inside a placeholder
        map to its real start)."""
        best_ph, best_real = 0, 0
        for ph, real in table:
            if ph <= p and ph >= best_ph:
                best_ph, best_real = ph, real
        inside = PH_RE.match(ph_text, best_ph)
        if inside and p < inside.end():
            return best_real
        return best_real + (p - best_ph)

    # -- batch ------------------------------------------------------------------------
    def encode_batch(self, records: list[dict]) -> list[Encoded | RecordError]:
        out: list[Encoded | RecordError | None] = [None] * len(records)
        doc_idx, doc_texts = [], []
        chat_layouts: dict[int, tuple] = {}
        run_texts: list[str] = []
        for i, rec in enumerate(records):
            if record_kind(rec) == "text":
                doc_idx.append(i)
                doc_texts.append(rec["text"])
                continue
            try:
                pieces, regions = self._layout(rec)
            except RecordError as e:
                out[i] = e
                continue
            first = len(run_texts)
            run_texts.extend(p[1] for p in pieces if p[0] == "text")
            chat_layouts[i] = (pieces, regions, first)
        for i, ids in zip(doc_idx, self.tok.encode_texts(doc_texts) if doc_texts else []):
            out[i] = Encoded(self._document_ids(ids), None)
        encodings = self.tok.encode_with_offsets(run_texts) if run_texts else []
        for i, (pieces, regions, k) in chat_layouts.items():
            out[i] = self._assemble(pieces, regions, encodings, k)
        return out  # type: ignore[return-value]

    def _assemble(self, pieces, regions, encodings, k) -> Encoded | RecordError:
        ids, starts, ends = [], [], []
        for p in pieces:
            if p[0] == "ctl":
                ids.append(p[1]); starts.append(p[2]); ends.append(p[3])
            else:
                enc = encodings[k]; k += 1
                base = p[2]
                ids.extend(enc.ids)
                for s, e in enc.offsets:
                    starts.append(base + s); ends.append(base + e)
        ids_a = np.array(ids, dtype=np.int64)
        s_a, e_a = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
        mask = np.zeros(len(ids_a), dtype=bool)
        for rs, re_ in regions:
            mask |= (e_a > rs) & (s_a < re_)
        if not mask.any():
            return RecordError("no_trained_tokens", "no token is trained (every assistant turn "
                               "is empty or has loss_weight 0)")
        return Encoded(ids_a, mask_to_spans(mask))


def mask_to_spans(mask: np.ndarray) -> np.ndarray:
    """Boolean mask → int32 (m, 2) [start, end) runs of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges.reshape(-1, 2).astype(np.int32)
