"""A `fastokens` encoder for Hugging Face byte-level BPE tokenizers (Qwen2/2.5, Llama-3, GPT-2).

`fastokens` (optional: `pip install '.[fast]'`) runs a `tokenizer.json` itself, several
times faster than tiktoken on one core when given a batch. It is used only for the ordinary
text of pieces (no added or special tokens: they are removed from the spec it is given, so a
literal `<|im_end|>` in data is text), and only for byte-level BPE whose tokens' char spans
follow from their byte lengths (the same shape of tokenizer `fast_bpe.FastBPE` accepts, but
any pre-tokenizer fastokens runs). Like the tiktoken path it is gated, not trusted: an
exhaustive code-point probe and a per-dataset sample check against HF `tokenizers`
(pipeline/encoders.py), and a piece it cannot answer for exactly (text NFC would change, an
added token HF matches inside the text) is handed back to HF by `claims`.

It runs its own thread pool: a build worker is one core, so the pool is pinned to one thread
(FASTOKENS_BPE_THREADS / RAYON_NUM_THREADS, read when the first tokenizer is built).
"""
from __future__ import annotations

import os
import re
import unicodedata

import numpy as np
import orjson

from .fast_bpe import NotExpressible, _byte_decoder, _normalizer, char_spans_many, plain_bpe_model

THREAD_VARS = ("FASTOKENS_BPE_THREADS", "RAYON_NUM_THREADS")


def available() -> str | None:
    """fastokens' version, or None when it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        import fastokens  # noqa: F401
        return version("fastokens")
    except (ImportError, PackageNotFoundError):
        return None


def pin_threads(n: int = 1) -> None:
    """One fastokens thread per process (before its first tokenizer: the pool is global)."""
    for var in THREAD_VARS:
        os.environ[var] = str(n)


def _prefix_space(pre) -> bool:
    if isinstance(pre, dict):
        if pre.get("type") == "Metaspace" or pre.get("add_prefix_space") or pre.get("prepend_scheme") in ("always", "first"):
            return True
        return any(_prefix_space(p) for p in pre.get("pretokenizers") or [])
    return False


class FastokensBPE:
    """Ordinary-text encoding (no added or special tokens) of a byte-level BPE tokenizer."""
    name = "fastokens"

    def __init__(self, spec: dict, threads: int = 1):
        model = plain_bpe_model(spec)
        self.normalize = _normalizer(spec.get("normalizer"))
        if _prefix_space(spec.get("pre_tokenizer")):
            raise NotExpressible("a pre-tokenizer that adds a prefix space (spans would not follow bytes)")
        added = {t["content"] for t in spec.get("added_tokens") or []}
        vocab = {t: i for t, i in model["vocab"].items() if t not in added}  # as fast_bpe
        byte_of = _byte_decoder()
        if not vocab or not set("".join(vocab)) <= byte_of.keys():
            raise NotExpressible("vocabulary is not byte-level (a token has a char outside the byte map)")
        version = available()
        if version is None:
            raise NotExpressible("fastokens is not installed (pip install fastokens)")
        self.version = version
        # a byte-level token's chars stand for one byte each: its byte length is its length
        self._byte_lens = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
        for tok, i in vocab.items():
            self._byte_lens[i] = len(tok)
        plain = dict(spec, added_tokens=[], post_processor=None, truncation=None, padding=None)
        pin_threads(threads)
        import fastokens
        try:
            self._tok = fastokens.Tokenizer.from_json_str(orjson.dumps(plain).decode())
        except Exception as e:
            raise NotExpressible(f"fastokens cannot load it: {e}") from None

    def claims(self, text: str, matched: re.Pattern | None) -> bool:
        """True when HF would encode `text` as plain BPE (see fast_bpe.FastBPE.claims)."""
        if self.normalize and not unicodedata.is_normalized(self.normalize, text):
            return False
        return matched is None or matched.search(text) is None

    def encode(self, text: str) -> np.ndarray:
        return self.encode_many([text])[0]

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        """Ids (int64) of texts this encoder `claims`, in one call (no per-token objects)."""
        if not texts:
            return []
        ids, offs = self._tok.encode_batch_flat(texts, add_special_tokens=False)
        ids = np.frombuffer(ids, np.uint32).astype(np.int64)
        offs = np.frombuffer(offs, np.uint64).astype(np.int64)
        return [ids[a:b] for a, b in zip(offs[:-1].tolist(), offs[1:].tolist())]

    def char_spans_many(self, texts: list[str], ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """`char_spans` of every text at once, in one vectorised pass."""
        return char_spans_many(self._byte_lens, texts, ids)

    def char_spans(self, text: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Char [start, end) of each token (a token ending inside a multi-byte char covers it)."""
        lens = self._byte_lens[ids]
        bend = np.cumsum(lens)
        bstart = bend - lens
        raw = text.encode("utf-8")
        if len(raw) == len(text):
            return bstart, bend
        b = np.frombuffer(raw, dtype=np.uint8)
        char_of_byte = np.cumsum((b & 0xC0) != 0x80) - 1
        return char_of_byte[bstart], char_of_byte[bend - 1] + 1
