"""`check_template`: tokenmill's samples compared with an independent reference.

The reference is transformers' own chat-template renderer (`render_jinja_template`, as
`apply_chat_template` uses it) with the tokenizer's own whole-string encoding; trained
positions come from the reference's generation-block indices, or from prefix renders for a
template without them. Only the renderer's public methods are used (`encode_batch`,
`prepare`, `trained_turns`, `data_has_control_text`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from . import markup
from .errors import RecordError
from .formats import record_kind
from .jinja_env import DEFAULT_NOW, PIECE_BREAK, ChatTemplate
from .render import Renderer
from .tokenizer import Tokenizer


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
    stop_notes: dict = field(default_factory=dict)  # stop_token_appended / stop_token_untrained: samples

    @property
    def ok(self) -> bool:
        return not self.differ

    def count(self, reason: str):
        self.not_checked[reason] = self.not_checked.get(reason, 0) + 1

    def summary(self) -> str:
        head = (f"template {self.template!r}: {self.ids_equal}/{self.checked} samples with the reference's ids, "
                f"{self.masks_equal}/{self.masks_checked} with its trained positions")
        if self.stop_notes:
            head += "; stop token: " + ", ".join(f"{k[len('stop_token_'):]} {v}"
                                                 for k, v in sorted(self.stop_notes.items()))
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
    selected = set(renderer.trained_turns(messages))
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
    stops = renderer.stop_set({**renderer.tok.template_kwargs(), **kwargs})
    stop_ids = {renderer.tok.control_tokens[t] for t in stops.tokens if t in renderer.tok.control_tokens}
    for i in sorted(selected):
        before = _reference_render(renderer, messages[:i], tools, kwargs, add_gen=True, template=template)[0]
        upto = _reference_render(renderer, messages[: i + 1], tools, kwargs, template=template)[0]
        if not (upto.startswith(before) and text.startswith(upto)):
            return "reference_not_prefix"
        start, end = len(before), len(upto)
        # the turn ends at its first stop token (its end-of-turn), else at its last control
        # token, else it trains whole; a template without an end-of-turn (GLM) is stopped by
        # the control token that opens the next message, which trains with the turn
        inside = np.flatnonzero(is_ctl & (s_a >= start) & (e_a <= end))
        stopping = [k for k in inside if ids2[k] in stop_ids]
        if stopping:
            stop = int(e_a[stopping[0]])
        elif stops.opener is not None or not len(inside):  # no end-of-turn: the whole turn
            stop = end
        else:
            stop = int(e_a[inside[-1]])
        if not stopping and stops.opener is not None:
            nxt = np.flatnonzero(s_a >= stop)
            if len(nxt) and s_a[nxt[0]] == stop and ids2[nxt[0]] in controls:
                stop = int(e_a[nxt[0]])
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
    if renderer.loss == "per_turn":  # each turn's own sample, checked as the conversation up to it
        records = [sub for rec in records for sub in renderer.turn_records(rec)]
        renderer = Renderer(renderer.tok, renderer.template, "assistant", template_kwargs=renderer.template_kwargs)
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
        if markup.writes_controls(rec, renderer.control_re):  # a transform's markers (stages/markup.py)
            report.count("transform_markup_unverifiable")  # are tokens: no reference renders them so
            continue
        messages, kwargs, _ = renderer.prepare(rec)  # as the renderer rendered it
        tools = rec.get("tools")
        data_ctl = renderer.data_has_control_text(messages)
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
        for note in enc.notes:
            if note.startswith("stop_token_"):  # counted and shown: the stop token check
                report.stop_notes[note] = report.stop_notes.get(note, 0) + 1
        if "stop_token_appended" in enc.notes:  # apply_chat_template's ids + the stop token the build appends
            ids = ids[:-1]
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
        if "stop_token_appended" in enc.notes:
            ref_mask = np.append(ref_mask, True)
            ids = enc.ids.tolist()
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
