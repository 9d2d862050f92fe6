"""Every family in ../shared/templates, with its own real chat template (issue 26): ids equal
transformers' rendering + the tokenizer's encoding (apply_chat_template, clock fixed as the
build fixes it), and trained positions equal a reference computed another way — from a hand-written
table of each family's assistant header and stop tokens, found in transformers' rendered text:
a turn trains from the end of its header (plus whatever the generation prompt inference renders
supplies after the header, taken from transformers' own render of the prompt) through the first
stop token after it. Cases: multi-turn with system, tool call + result, reasoning in history and
last turn, × each family's thinking switches × the policies (final: every assistant turn of
the full rendering; last: the last turn; per_turn: one sample per turn, each compared with the
conversation up to that turn). A case the template does not render (transformers
raises) is n/a; no case may be refused as template_not_prefix_stable.

    python tests/test_family_parity.py      # prints the table
"""
from __future__ import annotations

import re
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from family_templates import FAMILIES, QWEN, TEMPLATES, family_tokenizer  # noqa: E402

from stages.errors import RecordError  # noqa: E402
from stages.render import Renderer, resolve_template  # noqa: E402
from stages.template_check import _reference_ids, _reference_render  # noqa: E402
from stages.tokenizer import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not (TEMPLATES.is_dir() and QWEN.is_dir()),
                                reason="../shared/templates or ../shared/tokenizers absent")

# the assistant header (what the prompt ends with) and the tokens a turn stops with, per family
# (PROVENANCE.md of each family; GLM has no end-of-turn: the next message's role token stops it)
HEADER = {
    "deepseek-r1": r"<｜Assistant｜>|<｜tool▁outputs▁end｜>",
    "deepseek-v3.1": r"<｜Assistant｜>|<｜tool▁output▁end｜>",
    "gemma-2": r"<start_of_turn>model\n", "glm-4.6": r"<\|assistant\|>",
    "gpt-oss": r"<\|start\|>assistant", "hy3-preview": r"<｜hy_Assistant｜>",
    "kimi-k2": r"<\|im_assistant\|>assistant<\|im_middle\|>",
    "llama-3.1": r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n",
    "llama-3.2": r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n",
    "mistral-nemo": r"\[/INST\]|\[/TOOL_RESULTS\]", "mistral-small-3.2": r"\[/INST\]|\[/TOOL_RESULTS\]",
    "phi-3.5": r"<\|assistant\|>\n", "qwen3": r"<\|im_start\|>assistant\n", "seed-oss": r"<seed:bos>assistant\n",
}
STOPS = {
    "deepseek-r1": ["<｜end▁of▁sentence｜>"], "deepseek-v3.1": ["<｜end▁of▁sentence｜>"],
    "gemma-2": ["<end_of_turn>"], "glm-4.6": ["<|user|>", "<|observation|>", "<|system|>"],
    "gpt-oss": ["<|return|>", "<|call|>", "<|end|>"], "hy3-preview": ["<｜hy_eos｜>"],
    "kimi-k2": ["<|im_end|>"], "llama-3.1": ["<|eot_id|>", "<|eom_id|>"], "llama-3.2": ["<|eot_id|>"],
    "mistral-nemo": ["</s>"], "mistral-small-3.2": ["</s>"], "phi-3.5": ["<|end|>"], "qwen3": ["<|im_end|>"],
    "seed-oss": ["<seed:eos>"],
}
# the token appended where the template closes the last turn with nothing
CLOSE = {"glm-4.6": "<|user|>", "hy3-preview": "<｜hy_eos｜>"}
SWITCHES = {
    "qwen3": [{}, {"enable_thinking": False}], "glm-4.6": [{}, {"enable_thinking": False}],
    "deepseek-v3.1": [{}, {"thinking": True}], "gpt-oss": [{}, {"reasoning_effort": "high"}],
    "hy3-preview": [{}, {"reasoning_effort": "high"}, {"reasoning_effort": "high", "is_training": True},
                    {"reasoning_effort": "high", "interleaved_thinking": True}],
    "seed-oss": [{}, {"thinking_budget": 0}],
}
POLICIES = {"final": "assistant", "last": "last", "per_turn": "per_turn"}

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _call(args):
    return [{"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": args}}]


def _tool_case(args, content):
    return {"messages": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": content, "tool_calls": _call(args)},
                         {"role": "tool", "content": "21C", "tool_call_id": "call00001", "name": "get_weather"},
                         {"role": "assistant", "content": "It is 21C."}], "tools": [TOOL]}


CASES = {  # each: the forms to try in order (the first one transformers renders is the case)
    "multi+system": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                      {"role": "assistant", "content": "6"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}],
    "tool": [_tool_case({"city": "Paris"}, ""), _tool_case('{"city": "Paris"}', ""),
             _tool_case({"city": "Paris"}, None), _tool_case('{"city": "Paris"}', None)],
    "reasoning": [
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
                      {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4", "reasoning_content": "add them"}]}],
}


@lru_cache(maxsize=None)
def family_renderer(family: str, loss: str, switches: tuple) -> Renderer:
    tok = load_tokenizer(family_tokenizer(family))
    return Renderer(tok, resolve_template("tokenizer", tok), loss, template_kwargs=dict(switches))


def _renders(r: Renderer, rec: dict, kw: dict) -> str | None:
    try:
        return _reference_render(r, _msgs(rec), rec.get("tools"), kw)[0]
    except Exception:
        return None


def _msgs(rec):
    out = []
    for m in rec["messages"]:
        m = dict(m)
        if "reasoning_content" in m:
            m["thinking"] = m["reasoning_content"]
        out.append(m)
    return out


def reference_mask(family, r: Renderer, rec, kw, text, ids) -> np.ndarray:
    """Header → first stop token, per trained assistant turn, in transformers' text."""
    _, offs = _reference_ids(r.tok, text, offsets=True)
    s_a = np.array([a for a, _ in offs])
    e_a = np.array([b for _, b in offs])
    msgs = _msgs(rec)
    mask = np.zeros(len(ids), bool)
    bounds = set(e_a.tolist())
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    trained = assistant[-1:] if r.loss in ("last", "per_turn") else assistant  # per_turn: each sub-conversation
    head, stops = re.compile(HEADER[family]), STOPS[family]
    pos = 0
    for i in assistant:
        m = head.search(text, pos)
        assert m is not None, f"{family}: no header for turn {i}"
        start = m.end()
        # what the generation prompt supplies after the header (e.g. an empty think block)
        prompt = _reference_render(r, msgs[:i], rec.get("tools"), kw, add_gen=True)[0]
        hm = list(head.finditer(prompt))
        if hm:
            supplied = prompt[hm[-1].end():]
            k = 0
            while k < len(supplied) and start + k < len(text) and supplied[k] == text[start + k]:
                k += 1
            while k and start + k not in bounds:  # whole tokens only
                k -= 1
            start += k
        ends = [(text.find(s, start), s) for s in stops if text.find(s, start) >= 0]
        if family == "gpt-oss":  # an analysis message continues in the same turn
            ends = [(p, s) for p, s in ends if not (s == "<|end|>" and text.startswith(
                "<|start|>assistant<|channel|>final", p + len(s)))]
        end = min(p + len(s) for p, s in ends) if ends else len(text)
        if i in trained:
            mask |= (e_a > start) & (s_a < end)
        pos = end
    return mask


def run_case(family, policy, switches, case):
    """→ (status, detail); status one of ok, n/a, FAIL, refused:<reason>."""
    r = family_renderer(family, POLICIES[policy], tuple(sorted(switches.items())))
    kw = dict(switches)
    rec = text = None
    for form in CASES[case]:
        text = _renders(r, form, kw)
        if text is not None:
            rec = form
            break
    if rec is None:
        return "n/a", "the template does not render this case"
    enc = r.encode_batch([rec])[0]
    if isinstance(enc, RecordError):
        if enc.reason == "template_not_prefix_stable":
            return "FAIL", str(enc)
        return f"refused:{enc.reason}", str(enc)
    if policy != "per_turn":
        return _compare(family, r, rec, kw, text, enc)
    subs = r.turn_records(rec)
    parts = enc.parts or [enc]
    if len(subs) != len(parts):
        return "FAIL", f"{len(parts)} samples for {len(subs)} turns"
    got = [_compare(family, r, sub, kw, _renders(r, sub, kw), part) for sub, part in zip(subs, parts)]
    bad = [d for st, d in got if st != "ok"]
    if bad:
        return "FAIL", "; ".join(bad)
    return "ok", ",".join(sorted({n for p in parts for n in p.notes}))


def _compare(family, r, rec, kw, text, enc):
    ref = _reference_ids(r.tok, text)
    ids = enc.ids.tolist()
    if "stop_token_appended" in enc.notes:
        text += CLOSE[family]
        ref = ref + [r.tok.control_tokens[CLOSE[family]]]
    if ids != ref:
        k = next((j for j, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
        return "FAIL", f"ids differ at {k}: {r.tok.decode(ids[k:k + 8])!r} vs {r.tok.decode(ref[k:k + 8])!r}"
    try:
        want = reference_mask(family, r, rec, kw, text, ids)
    except AssertionError as e:
        return "FAIL", f"reference: {e}; text {text[-300:]!r}"
    mine = np.zeros(len(ids), bool)
    for s, e in enc.spans:
        mine[s:e] = True
    if not (mine == want).all():
        k = int(np.flatnonzero(mine != want)[0])
        return "FAIL", (f"trained positions differ at token {k} ({r.tok.decode(ids[k:k + 1])!r}): ours "
                        f"{'trained' if mine[k] else 'not'}; context {r.tok.decode(ids[max(0, k - 6):k + 6])!r}")
    # every trained span ends with a stop token
    stop_ids = {r.tok.control_tokens[s] for s in STOPS[family] if s in r.tok.control_tokens}
    if any(ids[e - 1] not in stop_ids for _, e in enc.spans):
        return "FAIL", "a trained span does not end with a stop token"
    return "ok", ",".join(enc.notes)


def grid():
    for family in FAMILIES:
        for switches in SWITCHES.get(family, [{}]):
            for case in CASES:
                for policy in POLICIES:
                    yield family, policy, switches, case


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_parity(family):
    bad = []
    for fam, policy, switches, case in grid():
        if fam != family:
            continue
        status, detail = run_case(fam, policy, switches, case)
        if status == "FAIL":
            bad.append(f"{policy} {switches} {case}: {detail}")
    assert not bad, "\n".join(bad)


def main() -> int:
    print(f"{'family':18s} {'switches':44s} {'case':13s} {'final':22s} {'last':22s} {'per_turn':22s} notes")
    fails = 0
    rows: dict = {}
    for family, policy, switches, case in grid():
        status, detail = run_case(family, policy, switches, case)
        fails += status == "FAIL"
        rows.setdefault((family, str(switches or ""), case), {})[policy] = (status, detail)
    for (family, sw, case), got in rows.items():
        notes = "; ".join(sorted({d for s, d in got.values() if d and s in ("ok",)}))
        fail = "; ".join(d for s, d in got.values() if s == "FAIL")
        print(f"{family:18s} {sw:44s} {case:13s} {got['final'][0]:22s} {got['last'][0]:22s} {got['per_turn'][0]:22s} "
              f"{notes}{fail}", flush=True)
    print(f"{fails} failing")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())


def _apply(family, messages, **kw):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(family_tokenizer(family))
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def test_inline_reasoning_is_parsed_on_qwen3():
    """`<think>r</think>a` in content (TRL's Qwen3 form) is reasoning + answer, not a refusal."""
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}]
    r = family_renderer("qwen3", "assistant", ())
    enc = r.encode_batch([{"messages": msgs}])[0]
    assert not isinstance(enc, RecordError), enc
    assert "inline_reasoning_parsed" in enc.notes
    assert enc.ids.tolist() == _apply("qwen3", msgs)
    (s, e), = enc.spans.tolist()
    assert r.tok.decode(enc.ids[s:e].tolist()) == "<think>\nadd them\n</think>\n\n4<|im_end|>"


def test_hy3_seed_call():
    """The Hy3 seed: records with reasoning_effort + reasoning_content, the real Hy3-preview
    template, is_training=True (a dataset switch) → apply_chat_template(messages,
    is_training=True) ids, Hy3's control tokens at their real ids."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "reasoning_content": "greet back"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "add them"}]
    tok = load_tokenizer(family_tokenizer("hy3-preview"))
    r = Renderer(tok, resolve_template("tokenizer", tok), template_kwargs={"is_training": True})
    for effort in ("high", "low"):
        enc = r.encode_batch([{"messages": msgs, "reasoning_effort": effort}])[0]
        assert not isinstance(enc, RecordError), enc
        ref = _apply("hy3-preview", msgs, is_training=True, reasoning_effort=effort)
        assert enc.ids.tolist() == ref
        assert tok.control_tokens["<｜hy_Assistant｜>"] == 120007 and 120007 in ref and 120025 in ref
        texts = [tok.decode(enc.ids[s:e].tolist()) for s, e in enc.spans.tolist()]
        assert all(t.endswith("<｜hy_eos｜>") for t in texts), texts
        assert "greet back" in texts[0] and "add them" in texts[1], texts


def test_glm_every_span_ends_with_its_stop_token():
    r = family_renderer("glm-4.6", "assistant", ())
    rec = _tool_case({"city": "Paris"}, "")
    rec["messages"] += [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Bye."}]
    enc = r.encode_batch([rec])[0]
    ends = [r.tok.decode([int(enc.ids[e - 1])]) for _, e in enc.spans.tolist()]
    assert ends == ["<|observation|>", "<|user|>", "<|user|>"], ends
    assert "stop_token_appended" in enc.notes  # the last turn: the template closes it with nothing


def test_check_template_reports_the_stop_token_fix():
    """--check-template (check_template) on GLM-4.6: apply_chat_template's ids plus the appended
    stop token, trained positions equal, and the fix counted in its summary line."""
    from stages.template_check import check_template
    r = family_renderer("glm-4.6", "assistant", ())
    recs = [CASES["multi+system"][0], _tool_case({"city": "Paris"}, "")]
    report = check_template(r, recs)
    assert report.ok and report.ids_equal == report.checked == 2, report.summary()
    assert report.masks_equal == report.masks_checked == 2, report.summary()
    assert "stop token: appended 2" in report.summary()


def test_per_turn_trains_every_turns_reasoning_on_qwen3():
    """multi_turn per_turn: one sample per assistant turn, rendered with its own prefix, so
    the reasoning Qwen3 drops from history is trained in the sample that ends with its turn."""
    r = family_renderer("qwen3", "per_turn", ())
    rec = CASES["reasoning"][0]
    enc = r.encode_batch([rec])[0]
    assert len(enc.parts) == 2 and len(enc.ids) == sum(len(p.ids) for p in enc.parts)
    for k, (part, reasoning) in enumerate(zip(enc.parts, ("greet back", "add them"))):
        msgs = rec["messages"][: 2 * k + 2]
        assert part.ids.tolist() == _apply("qwen3", msgs)
        (s, e), = part.spans.tolist()
        assert r.tok.decode(part.ids[s:e].tolist()).startswith(f"<think>\n{reasoning}\n</think>")
