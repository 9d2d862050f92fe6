"""The fast engines (stages/fastokens_bpe.py, stages/fast_bpe.py, pipeline/encoders.py): ids equal HF `tokenizers`
(the independent reference, special-token-safe) on real text, the per-dataset check falls back
when they differ, and the built shards never depend on which encoder ran."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SAMPLE, SHARED
from pipeline.build import build_mixture
from stages.fast_bpe import FastBPE, added_token_re
from stages.tokenizer import load_tokenizer

QWEN = SHARED / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
CORPORA = SHARED / "corpora"
needs_shared = pytest.mark.skipif(not (QWEN / "tokenizer.json").is_file() or not CORPORA.is_dir(),
                                  reason=f"{SHARED} is absent: the real tokenizer and corpora live there")


def _strings(x):
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list):
        for v in x:
            yield from _strings(v)


def real_texts() -> list[str]:
    """Every string of every corpus file in ../shared/corpora (contents, tool JSON, system prompts)."""
    out = []
    for f in sorted(CORPORA.rglob("*")):
        if f.suffix == ".txt":
            out += [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif f.suffix == ".jsonl":
            for line in f.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    out += list(_strings(json.loads(line)))
        elif f.suffix == ".json" and f.name != "dataset_info.json":
            out += list(_strings(json.loads(f.read_text(encoding="utf-8"))))
    return [t for t in out if t]


def hf_reference(path: Path):
    """The `tokenizers` library on its own, special tokens encoded as text."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.encode_special_tokens = True
    return tok


@needs_shared
@pytest.mark.parametrize("engine", ["fastokens", "tiktoken"])
def test_engine_equals_hf_on_every_real_string(engine):
    if engine == "fastokens":
        pytest.importorskip("fastokens", reason="fastokens is not installed (pip install '.[fast]')")
    texts = real_texts()
    assert len(texts) > 10_000
    tok = load_tokenizer(str(QWEN))
    fast = tok.engine(engine)
    ref = hf_reference(QWEN)
    matched = added_token_re(t for t in tok.control_tokens if t not in tok.special_tokens)
    claimed = [t for t in texts if fast.claims(t, matched)]
    assert len(claimed) > 0.99 * len(texts)  # NFC changes or added-token text are rare
    encs = ref.encode_batch(claimed, add_special_tokens=False)
    ours = fast.encode_many(claimed)
    differ = [t[:60] for t, e, o in zip(claimed, encs, ours) if o.tolist() != e.ids]
    assert not differ, f"{len(differ)} strings differ, e.g. {differ[:3]}"
    # char spans agree with HF's offsets (what loss spans are computed from)
    for t, e, o in zip(claimed[:3000], encs[:3000], ours):
        s, end = fast.char_spans(t, o)
        assert list(zip(s.tolist(), end.tolist())) == [tuple(o) for o in e.offsets]


def _pieces_equal(a, b):
    return (np.array_equal(a.ids, b.ids) and np.array_equal(a.starts, b.starts)
            and np.array_equal(a.ends, b.ends) and np.array_equal(a.bounds, b.bounds))


@pytest.mark.parametrize("engine", ["fastokens", "tiktoken"])
@pytest.mark.parametrize("which", ["sample", pytest.param("qwen", marks=needs_shared)])
def test_fast_twin_encodes_pieces_like_hf(which, engine, sample_tokenizer):
    if engine == "fastokens":
        pytest.importorskip("fastokens", reason="fastokens is not installed (pip install '.[fast]')")
    tok = load_tokenizer(sample_tokenizer if which == "sample" else str(QWEN))
    fast = tok.with_engine(engine)
    assert (tok.encoder, fast.encoder) == ("tokenizers", engine)
    specials = sorted(tok.control_tokens)
    pieces = ["Hello world", "", " 你好，世界！\n\n", "Cafe\u0301 (not NFC) ok",  # NFC changes it: HF encodes
              "call <tool_call>{\"a\": 1}</tool_call> now",  # an added token HF matches in text
              "literal " + " ".join(specials) + " as text", "emoji 🚀🚀 and tabs\t\t", "  lead and trail  "]
    continued = [i % 2 == 1 for i in range(len(pieces))]
    as_text = frozenset(specials[:3])
    assert _pieces_equal(fast.encode_pieces(pieces, continued, as_text),
                         tok.encode_pieces(pieces, continued, as_text))
    docs = [p for p in pieces if p] + [SAMPLE.joinpath("pretrain_en.txt").read_text(encoding="utf-8")[:5000]]
    assert fast.encode_texts(docs) == tok.encode_texts(docs)


@needs_shared
def test_not_expressible_tokenizers_say_why():
    from stages.fast_bpe import NotExpressible
    mistral = load_tokenizer(str(SHARED / "tokenizers" / "mistral-sentencepiece"))
    with pytest.raises(NotExpressible, match="byte fallback"):
        mistral.fast_bpe()
    spec = json.loads((QWEN / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "NFKC"}
    with pytest.raises(NotExpressible, match="normalizer 'NFKC'"):
        FastBPE.from_tokenizer_json(json.dumps(spec))
    spec["normalizer"] = None
    spec["model"]["vocab"]["a b"] = len(spec["model"]["vocab"])  # a plain space: not byte-level
    with pytest.raises(NotExpressible, match="not byte-level"):
        FastBPE.from_tokenizer_json(json.dumps(spec))


def write_mix(folder: Path, tokenizer: str) -> Path:
    data = folder / "docs.jsonl"
    src = [json.loads(x)["text"] for x in SAMPLE.joinpath("pretrain_zh.jsonl").read_text(encoding="utf-8").splitlines()]
    src += [x for x in SAMPLE.joinpath("pretrain_en.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in src), encoding="utf-8")
    chat = folder / "chat.jsonl"
    chat.write_text(SAMPLE.joinpath("messages_mixed.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    mix = folder / "mix.json"
    mix.write_text(json.dumps({"tokenizer": tokenizer, "template": "tokenizer", "max_length": 2048, "seed": 1,
                               "datasets": [{"dataset_name": "docs", "abs_weight": 1, "path": str(data), "format": "text"},
                                            {"dataset_name": "chat", "abs_weight": 1, "path": str(chat), "format": "messages"}]}))
    return mix


def shard_hashes(meta_dir: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(meta_dir.glob("shard-*.h5"))}


def test_encoder_choice_fallback_and_identical_shards(tmp_path, sample_tokenizer, monkeypatch):
    from pipeline import encoder_probe
    # the probe on a slice of the code points, in a probe dir of this test's own (the engines
    # are made wrong below: their verdicts must not reach the user's cache)
    cps = [c for c in range(0x250)] + [0x4E00 + i for i in range(256)]
    monkeypatch.setattr(encoder_probe, "scalars", lambda: cps)
    monkeypatch.setenv("TOKENMILL_PROBE_DIR", str(tmp_path / "probes"))
    mix = write_mix(tmp_path, sample_tokenizer)
    from stages.fastokens_bpe import FastokensBPE, available
    _, fast_plans, _ = build_mixture(str(mix), out=str(tmp_path / "a"), workers=1)
    for p in fast_plans:
        assert p.meta["build"]["encoder"] == ("fastokens" if available() else "tiktoken"), p.encoder_note
        assert "sampled records equal to HF" in p.encoder_note
    # fast engines that get one character wrong: the sampled check must catch it, and the
    # build falls back to HF tokenizers with the same bytes on disk
    real_encode, real_many = FastBPE.encode, FastokensBPE.encode_many

    def wrong(self, text):
        ids = real_encode(self, text)
        return ids[::-1].copy() if "的" in text or "the" in text else ids

    def wrong_many(self, texts):
        return [ids[::-1].copy() if "的" in t or "the" in t else ids for t, ids in zip(texts, real_many(self, texts))]
    monkeypatch.setattr(FastBPE, "encode", wrong)
    monkeypatch.setattr(FastokensBPE, "encode_many", wrong_many)
    _, slow_plans, _ = build_mixture(str(mix), out=str(tmp_path / "b"), workers=2)
    for fast, slow in zip(fast_plans, slow_plans):
        assert slow.meta["build"]["encoder"] == "tokenizers"
        assert "differ from HF" in slow.encoder_note
        assert shard_hashes(fast.entry.final) == shard_hashes(slow.entry.final)
        keep = {k: v for k, v in fast.meta.items() if k != "build"}
        assert keep == {k: v for k, v in slow.meta.items() if k != "build"}


@needs_shared
def test_declared_class_loads_like_autotokenizer(sample_tokenizer):
    from transformers import AutoTokenizer
    for path in (sample_tokenizer, str(QWEN)):
        ours, auto = load_tokenizer(path).hf, AutoTokenizer.from_pretrained(path)
        assert type(ours) is type(auto)
        assert {i: str(t) for i, t in ours.added_tokens_decoder.items()} == \
            {i: str(t) for i, t in auto.added_tokens_decoder.items()}
        assert ours.special_tokens_map == auto.special_tokens_map
        assert ours.chat_template == auto.chat_template
        text = "Hello <|im_end|> 你好 <tool_call>"
        assert ours(text)["input_ids"] == auto(text)["input_ids"]
