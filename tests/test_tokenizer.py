"""Tokenizer loading and encoding: tiktoken (Hunyuan), SentencePiece (Mistral), HF
(Qwen2.5), remote-code loaders, and pieces encoded as the tokenizer's own whole-string encoding."""
import json
import os

import pytest
from render_helpers import ALPACA, DATA, HY, MISTRAL, QWEN, TWO_TURNS, needs_tokenizers, renderer

from stages.errors import BuildError
from stages.formats import ADAPTERS
from stages.render import Renderer, resolve_template
from stages.template_check import check_template
from stages.tokenizer import load_tokenizer

pytestmark = needs_tokenizers


def test_tiktoken_hunyuan_loader():
    tok = load_tokenizer(str(HY))
    assert tok.kind == "tiktoken" and tok.vocab_size == 128167
    assert (tok.eos_token, tok.eos_id, tok.pad_id) == ("<|eos|>", 127960, 127961)
    assert tok.control_tokens["<|extra_0|>"] == 127962 and tok.control_tokens["<|startoftext|>"] == 127958
    text = "混合 text, code: def f(x): return x**2 — ünïcode"
    ids = tok.encode_texts([text])[0]
    assert tok.decode(ids) == text
    # a special token written in data stays text
    ids = tok.encode_texts(["a <|eos|> b"])[0]
    assert 127960 not in ids and tok.decode(ids) == "a <|eos|> b"
    assert load_tokenizer(str(HY / "hy.tiktoken")).vocab_size == 128167  # the file alone
    assert load_tokenizer(str(HY)) is tok  # loaded once per process


def test_tiktoken_nfc_like_the_reference_loader():
    tok = load_tokenizer(str(HY))
    decomposed = "cafe\u0301"
    r = Renderer(tok, resolve_template("hunyuan", tok))
    rec = {"messages": [{"role": "user", "content": decomposed}, {"role": "assistant", "content": "ok"}]}
    enc = r.encode_batch([rec])[0]
    assert tok.decode(enc.ids).startswith("<|startoftext|>café<|extra_0|>")
    assert check_template(r, [rec]).ok


def test_sentencepiece_model_file(tmp_path):
    os.symlink(MISTRAL / "tokenizer.model", tmp_path / "mistral-v1.model")
    tok = load_tokenizer(str(tmp_path / "mistral-v1.model"))
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("hf", 32000, 1, 2)
    assert tok.encode_texts(["Hello world"])[0] == load_tokenizer(str(MISTRAL)).encode_texts(["Hello world"])[0]


def test_sentencepiece_pieces_after_control_tokens_continue_the_text():
    # Mistral's [INST] layout: text after </s> must not get SentencePiece's first-word prefix space
    r = renderer(MISTRAL, DATA / "mistral_inst.jinja")
    rec = ADAPTERS["messages"]({"messages": [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}]})
    report = check_template(r, [rec, ALPACA, TWO_TURNS])
    assert report.ok and report.ids_equal == 3, report.summary()


def test_trust_remote_code_loader(tmp_path):
    from tokenizers import Tokenizer as TkTokenizer
    d = tmp_path / "custom"
    d.mkdir()
    (d / "my_tokenizer.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n"
        "class MyTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    TkTokenizer.from_file(str(QWEN / "tokenizer.json")).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "MyTokenizer", "auto_map": {"AutoTokenizer": [None, "my_tokenizer.MyTokenizer"]},
        "eos_token": "<|im_end|>"}))
    with pytest.raises(BuildError, match="trust_remote_code"):
        load_tokenizer(str(d))
    tok = load_tokenizer(str(d), trust_remote_code=True)
    assert type(tok.hf).__name__ == "MyTokenizer" and tok.eos_id == 151645
    assert tok.encode_texts(["你好"])[0] == [108386]


def test_unknown_and_missing_tokenizers(tmp_path):
    with pytest.raises(BuildError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "x.tiktoken").write_bytes(b"YQ== 0\n")
    with pytest.raises(BuildError, match="pat_str"):
        load_tokenizer(str(tmp_path / "x.tiktoken"))


def test_tokenizer_json_file_alone():
    tok = load_tokenizer(str(QWEN / "tokenizer.json"))
    assert tok.kind == "hf" and tok.chat_template is None
    assert tok.encode_texts(["你好 <|im_end|>"])[0] == load_tokenizer(str(QWEN)).encode_texts(["你好 <|im_end|>"])[0]
    assert 151645 not in tok.encode_texts(["<|im_end|>"])[0]
