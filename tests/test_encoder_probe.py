"""The encoder tier (pipeline/encoders.py, pipeline/encoder_probe.py): the exhaustive
code-point probe passes the real engines on Qwen2.5 and flags one that differs from HF
`tokenizers` on a few code points — code points a per-dataset sample check never sees — and
the build then falls back to the next engine with the same bytes on disk."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SAMPLE, SHARED
from pipeline import encoder_probe
from pipeline.encoder_probe import HFReference, differing, scalars
from stages.fastokens_bpe import FastokensBPE, available
from stages.tokenizer import load_tokenizer

QWEN = SHARED / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
needs_qwen = pytest.mark.skipif(not (QWEN / "tokenizer.json").is_file(),
                                reason=f"{QWEN} is absent: the real tokenizer lives in ../shared")
needs_fastokens = pytest.mark.skipif(available() is None, reason="fastokens is not installed (pip install '.[fast]')")
BAD = (0x0F3A, 0x1D11E, 0xE0101)  # Tibetan mark, a musical symbol, a variation selector: in no sample


def _engines():
    return [pytest.param("fastokens", marks=needs_fastokens), "tiktoken"]


@pytest.mark.slow
@needs_qwen
@pytest.mark.parametrize("engine", _engines())
def test_probe_passes_the_real_engines_on_qwen(engine):
    """Every Unicode scalar in every probe context: the engine (as the build runs it) gives
    HF's ids. HFReference is `tokenizers` itself on tokenizer.json, specials as text."""
    tok = load_tokenizer(str(QWEN))
    assert differing(tok.with_engine(engine), HFReference(tok), scalars()) == []


class _Wrong:
    """An engine that mis-encodes the BAD code points (and is right everywhere else)."""

    def __init__(self, real):
        self._real, self.name, self.version = real, "wrong", "0"

    def __getattr__(self, name):
        return getattr(self._real, name)

    def encode_many(self, texts):
        return _mangle(texts, self._real.encode_many(texts))


def _mangle(texts, encoded):
    """Ids of texts holding a BAD code point changed (one id more), the rest as given."""
    return [ids + 1 if any(chr(c) in t for c in BAD) else ids for t, ids in zip(texts, encoded)]


@pytest.mark.parametrize("engine", _engines())
def test_probe_flags_an_engine_that_differs_on_three_code_points(engine, sample_tokenizer):
    tok = load_tokenizer(sample_tokenizer)
    twin = tok.with_engine(engine)
    cps = [c for c in scalars() if c < 0x800] + list(BAD) + [0x4E00 + i for i in range(64)]
    assert differing(twin, HFReference(tok), cps) == []
    twin._fast = _Wrong(twin._fast)
    assert differing(twin, HFReference(tok), cps) == list(BAD)


def test_fake_engine_really_mis_encodes(sample_tokenizer):
    """The fake engine above differs from HF (else the test before could not fail)."""
    tok = load_tokenizer(sample_tokenizer)
    twin = tok.with_engine("tiktoken")
    twin._fast = _Wrong(twin._fast)
    texts = [f"a{chr(c)}b" for c in BAD]
    assert all(not np.array_equal(a, b) for a, b in zip(twin.encode_documents(texts),
                                                        HFReference(tok).encode_documents(texts)))


def _mix(folder, tokenizer):
    data = folder / "docs.jsonl"
    src = [json.loads(x)["text"] for x in SAMPLE.joinpath("pretrain_zh.jsonl").read_text(encoding="utf-8").splitlines()]
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in src), encoding="utf-8")
    mix = folder / "mix.json"
    mix.write_text(json.dumps({"tokenizer": tokenizer, "template": "none", "max_length": 4096, "seed": 1,
                               "datasets": [{"dataset_name": "docs", "abs_weight": 1, "path": str(data),
                                             "format": "text"}]}))
    assert not any(chr(c) in data.read_text(encoding="utf-8") for c in BAD)  # the sample cannot see them
    return mix


@needs_fastokens
def test_build_skips_an_engine_the_probe_flags(tmp_path, sample_tokenizer, monkeypatch):
    """fastokens wrong on three code points the data does not hold: the sample check would pass
    it, the probe does not; the build uses tiktoken, names why, and writes the same shards.
    (The probe runs on a slice of the code points here, in a fresh probe dir, to stay quick.)"""
    from pipeline.build import build_mixture
    cps = [c for c in scalars() if c < 0x300] + list(BAD)
    monkeypatch.setattr(encoder_probe, "scalars", lambda: cps)
    monkeypatch.setenv("TOKENMILL_PROBE_DIR", str(tmp_path / "probes"))
    mix = _mix(tmp_path, sample_tokenizer)
    _, good, _ = build_mixture(str(mix), out=str(tmp_path / "a"), workers=1)
    assert good[0].meta["build"]["encoder"] == "fastokens", good[0].encoder_note
    assert len(list((tmp_path / "probes").glob("*.json"))) == 1  # cached: fastokens' verdict

    real = FastokensBPE.encode_many
    monkeypatch.setattr(FastokensBPE, "encode_many", lambda self, texts: _mangle(texts, real(self, texts)))
    monkeypatch.setenv("TOKENMILL_PROBE_DIR", str(tmp_path / "probes-b"))  # as a new fastokens version would
    _, bad, _ = build_mixture(str(mix), out=str(tmp_path / "b"), workers=2)
    assert bad[0].meta["build"]["encoder"] == "tiktoken"
    assert "fastokens differs from HF on code points U+0F3A, U+1D11E, U+E0101" in bad[0].encoder_note
    a, b = (sorted(p.entry.final.glob("shard-*.h5")) for p in (good[0], bad[0]))
    assert [x.read_bytes() for x in a] == [x.read_bytes() for x in b]
