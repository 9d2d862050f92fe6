"""Templates without {% generation %} blocks: turn bounds from one streaming render
(stages/turn_bounds.py) are exactly those of prefix renders, and a record of thousands of turns
renders in linear time."""
import re
import time

import numpy as np
import pytest
from render_helpers import DATA, HY, MISTRAL, QWEN, TOOL, needs_tokenizers

from stages.errors import RecordError
from stages.render import Renderer, resolve_template
from stages.tokenizer import load_tokenizer

pytestmark = needs_tokenizers


def pair(tok_path, template):
    tok = load_tokenizer(str(tok_path))
    tmpl = resolve_template(str(template), tok)
    assert not tmpl.has_generation_blocks
    linear, prefix = Renderer(tok, tmpl), Renderer(tok, tmpl)
    linear.LINEAR_FROM, prefix.LINEAR_FROM = 0, 10 ** 9  # always one render / always prefix renders
    return linear, prefix


def conversation(n, tools=False, system=True):
    msgs = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(n):
        msgs.append({"role": "user", "content": f"question {i}?"})
        if tools and i % 3 == 1:
            msgs.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": f"C{i}"}}}]})
            msgs += [{"role": "tool", "content": f"{i} °C"}, {"role": "tool", "content": "sunny"}]
        msgs.append({"role": "assistant", "content": f"answer {i}.", **({"loss_weight": 0} if i % 4 == 2 else {})})
    rec = {"messages": msgs}
    if tools:
        rec["tools"] = [TOOL]
    return rec


@pytest.mark.parametrize("tok_path,template,tools", [
    (QWEN, "tokenizer", False), (QWEN, "tokenizer", True), (HY, "tokenizer", False), (HY, "tokenizer", True),
    (MISTRAL, DATA / "mistral_inst.jinja", False)])
@pytest.mark.parametrize("loss", ["assistant", "last"])
def test_one_render_gives_the_prefix_renders_ids_and_spans(tok_path, template, tools, loss, tmp_path):
    if tok_path == MISTRAL:  # its [INST] layout, without the generation blocks
        text = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template.read_text(encoding="utf-8"))
        template = tmp_path / "mistral_prefix.jinja"
        template.write_text(text, encoding="utf-8")
    linear, prefix = pair(tok_path, template)
    linear.loss = prefix.loss = loss
    calls = []
    exact = linear._prefix_bounds
    linear._prefix_bounds = lambda *a: calls.append(a[-1]) or exact(*a)
    for n in (1, 2, 5, 12):
        rec = conversation(n, tools=tools, system=tok_path != MISTRAL)
        calls.clear()
        a, b = linear.encode_batch([rec])[0], prefix.encode_batch([rec])[0]
        assert not isinstance(b, RecordError), b
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.spans, b.spans), (n, tools)
        turns = len(b.spans)
        assert len(calls) <= min(turns, 4), "the bounds came from prefix renders, not the one render"


@pytest.mark.slow
def test_five_thousand_turns_render_in_linear_time():
    tok = load_tokenizer(str(QWEN))
    r = Renderer(tok, resolve_template("tokenizer", tok))
    rec = conversation(5000, system=True)
    r.encode_batch([conversation(2)])  # the tokenizer's one-time backend set-up is not the record's
    start = time.perf_counter()
    enc = r.encode_batch([rec])[0]
    took = time.perf_counter() - start
    assert not isinstance(enc, RecordError), enc
    assert len(enc.spans) == sum(1 for i in range(5000) if i % 4 != 2)  # every trained turn, one span each
    assert took < 30, f"{took:.1f} s for 5,000 turns"
