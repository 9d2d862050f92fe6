"""Shared by the renderer and tokenizer tests: the real tokenizers in ../shared/tokenizers,
a renderer factory, and the decoded-with-⟦trained⟧ view every expected string is written in."""
import json
from pathlib import Path

import pytest

from pipeline.show import marked_text
from stages.errors import RecordError
from stages.formats import ADAPTERS
from stages.render import Renderer, resolve_template
from stages.tokenizer import load_tokenizer

TOKS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
QWEN, HY, MISTRAL = TOKS / "qwen2.5-family-internvl2_5-1b", TOKS / "hunyuan-a13b", TOKS / "mistral-sentencepiece"
DATA = Path(__file__).resolve().parent / "data"

needs_tokenizers = pytest.mark.skipif(not (QWEN.is_dir() and HY.is_dir() and MISTRAL.is_dir()),
                                      reason="../shared/tokenizers is not available")

TOOL = {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOL_JSON = json.dumps(TOOL, ensure_ascii=False)


def renderer(tok_path, template, loss="assistant", **kw):
    tok = load_tokenizer(str(tok_path))
    return Renderer(tok, resolve_template(str(template), tok), loss, **kw)


def marked(r: Renderer, record) -> str:
    enc = r.encode_batch([record])[0]
    if isinstance(enc, RecordError):
        raise enc
    return marked_text(r.tok, enc.ids, enc.spans)


def reason(r: Renderer, record) -> str:
    enc = r.encode_batch([record])[0]
    assert isinstance(enc, RecordError), f"expected a refusal, got {marked_text(r.tok, enc.ids, enc.spans)!r}"
    return enc.reason


ALPACA = ADAPTERS["alpaca"]({"instruction": "Translate", "input": "你好", "output": "Hello",
                             "system": "Be brief.", "history": [["Hi", "Hi!"]]})

TWO_TURNS = ADAPTERS["messages"]({"messages": [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "loss_weight": 0},
    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
    {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}]})
