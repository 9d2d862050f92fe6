"""The exhaustive code-point probe that gates a fast encoder engine (pipeline/encoders.py).

A per-dataset sample check sees only the characters of its sample: an engine that splits
three rare code points differently from HF `tokenizers` passes it and corrupts the datasets
that hold them. So before an engine builds anything with a tokenizer, every Unicode scalar
value (U+0000..U+10FFFF without surrogates) is encoded in a few contexts by the engine — the
way the build runs it, HF still taking the pieces the engine does not claim — and by HF
itself, and every id must be equal. Code points are joined 32 to a document (each context
its own documents) to keep the cost at ~40 MB of text per engine; a differing document is
narrowed down to its code points for the message.

The verdict is cached per (tokenizer files, engine, engine version, `tokenizers` version,
probe version) as a small JSON file in $TOKENMILL_PROBE_DIR, else beside numba's cache
($NUMBA_CACHE_DIR, else ~/.cache/tokenmill/encoder-probes). It never changes tokens.
"""
from __future__ import annotations

import hashlib
import os
import time
import unicodedata
from pathlib import Path

import numpy as np
import orjson

PROBE_VERSION = 1
CONTEXTS = ("{0}", " {0}", "a{0}b", "{0}{0}", "\n{0} 1")  # alone, after a space, inside a word, doubled, mixed
BLOCK = 32
BATCH = 4096  # documents per encode call


def scalars(limit: int | None = None) -> range | list[int]:
    """Every Unicode scalar value (or the first `limit` of them)."""
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    return cps[:limit] if limit else cps


def documents(cps) -> list[tuple[str, list[int]]]:
    """(text, code points it holds) per probe document. A document NFC would change is split
    into one document per code point: the build hands such text to HF whole, and it must not
    hide its neighbours from the engine."""
    out = []
    for ctx in CONTEXTS:
        for k in range(0, len(cps), BLOCK):
            block = cps[k:k + BLOCK]
            items = [ctx.format(chr(c)) for c in block]
            doc = "".join(items)
            if unicodedata.is_normalized("NFC", doc):
                out.append((doc, block))
            else:
                out += [(t, [c]) for t, c in zip(items, block)]
    return out


def differing(engine_tok, ref_tok, cps, max_report: int = 16) -> list[int]:
    """Code points whose ids differ between `engine_tok.encode_documents` and
    `ref_tok.encode_documents` (both `stages.tokenizer.Tokenizer`s) in any context."""
    docs = documents(cps)
    bad: list[int] = []
    for k in range(0, len(docs), BATCH):
        chunk = docs[k:k + BATCH]
        texts = [t for t, _ in chunk]
        for (text, block), a, b in zip(chunk, engine_tok.encode_documents(texts), ref_tok.encode_documents(texts)):
            if np.array_equal(a, b):
                continue
            if len(block) == 1:
                bad += block
                continue
            ctx = next(c for c in CONTEXTS if "".join(c.format(chr(x)) for x in block) == text)
            items = [ctx.format(chr(x)) for x in block]
            one = [x for x, p, q in zip(block, engine_tok.encode_documents(items), ref_tok.encode_documents(items))
                   if not np.array_equal(p, q)]
            bad += one or block  # equal alone, different together: name the whole block
        if len(bad) >= max_report:
            break
    return sorted(set(bad))[:max_report]


class HFReference:
    """HF `tokenizers` alone on the tokenizer's own tokenizer.json, special tokens encoded as
    text (what the build's data text is): the reference the probe compares with."""

    def __init__(self, tok):
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_str(tok._json)
        self._tok.no_padding()
        self._tok.no_truncation()
        self._tok.encode_special_tokens = True

    def encode_documents(self, texts):
        return [np.asarray(e.ids, dtype=np.int64) for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]


def probe_dir() -> Path:
    env = os.environ.get("TOKENMILL_PROBE_DIR")
    if env:
        return Path(env)
    numba = os.environ.get("NUMBA_CACHE_DIR")
    base = Path(numba) if numba else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenmill"
    return base / "encoder-probes"


def probe_key(tok, engine) -> str:
    import tokenizers
    parts = [tok.sha256, engine.name, engine.version, tokenizers.__version__, str(PROBE_VERSION)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


PARTS = 16  # slices of the code points, spread over the build's workers


def probe_part(path: str, trust_remote_code: bool, engine_name: str, part: int) -> list[int]:
    """The differing code points of one slice (in a worker: the tokenizer is loaded there)."""
    from stages.tokenizer import load_tokenizer
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    cps = scalars()
    n = len(cps)
    return differing(tok.with_engine(engine_name), HFReference(tok), cps[part * n // PARTS:(part + 1) * n // PARTS])


def probe(tok, engine_name: str, run=None, trust_remote_code: bool = False) -> dict:
    """The verdict for `tok`'s files with `engine_name` ({"ok", "differs": [code points],
    "seconds", "cached"}), from the cache or computed now (and cached when it can be).
    `run(fn, calls)` spreads the slices over workers (pipeline.executors.map_calls)."""
    twin = tok.with_engine(engine_name)
    path = probe_dir() / f"{probe_key(tok, twin._fast)}.json"
    try:
        got = orjson.loads(path.read_bytes())
        return dict(got, cached=True)
    except (OSError, ValueError):
        pass
    t0 = time.perf_counter()
    calls = [(tok.path, trust_remote_code, engine_name, k) for k in range(PARTS)]
    bad = sorted(set().union(*(run or _serial)(probe_part, calls)))[:16]
    verdict = {"ok": not bad, "differs": bad, "seconds": round(time.perf_counter() - t0, 1),
               "engine": engine_name, "engine_version": twin._fast.version}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(orjson.dumps(verdict))
        os.replace(tmp, path)
    except OSError:
        pass  # not cached: the next build probes again
    return dict(verdict, cached=False)


def _serial(fn, calls):
    return [fn(*args) for args in calls]


def describe(cps: list[int]) -> str:
    return ", ".join(f"U+{c:04X}" for c in cps[:5]) + (" …" if len(cps) > 5 else "")
