"""Tokenizer loading and special-token-safe encoding, whatever library is behind it.

`Tokenizer` is the interface the pipeline uses; `load_tokenizer` picks an implementation:

* `HFTokenizer` — a Hugging Face tokenizer with a fast (`tokenizers`) backend: a tokenizer
  dir, a `tokenizer.json` file, a SentencePiece `tokenizer.model` (converted by transformers'
  `LlamaTokenizer`), or, with `trust_remote_code=True`, a dir whose own loader transformers runs.
* `TiktokenTokenizer` — a `.tiktoken` BPE file (a file, or a dir holding one) with its special
  tokens and chat template from `tokenizer_config.json` (e.g. Tencent Hunyuan's `hy.tiktoken`).

Text that comes from data is always encoded with control tokens disabled, so a literal
`<|im_end|>` typed by a user stays text. Control tokens are only ever produced from the chat
template's own literal text (see render.py), through `encode_pieces`: the rendered
conversation is cut at the template's control tokens and each piece between them is encoded
in one call with control tokens disabled, exactly as the tokenizer would encode that piece
inside the whole string (a piece that does not start the text is encoded as a continuation,
which matters for SentencePiece's "prefix space on the first word only").
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import orjson

from .errors import BuildError
from .tiktoken_tokenizer import TiktokenTokenizer
from .tokenizer_base import CONT_MARK, Pieces, SPECIAL_KEYS, Tokenizer, _bounds, _token_text, tokenizer_sha256

__all__ = ["HFTokenizer", "Pieces", "TiktokenTokenizer", "Tokenizer", "copy_without_fast", "load_tokenizer",
           "tokenizer_sha256"]


# ---------------------------------------------------------------------------------------
# Hugging Face (fast backend)
# ---------------------------------------------------------------------------------------
class HFTokenizer(Tokenizer):
    kind = "hf"
    encoder = "tokenizers"
    _fast = None  # the engine (FastBPE, FastokensBPE) on the twin that `with_engine` returns

    def __init__(self, path: str, hf, sha256: str):
        backend = getattr(hf, "_tokenizer", None)
        if backend is None:
            raise BuildError(f"{path}: tokenizer {type(hf).__name__} has no fast (tokenizers) backend; "
                             "convert it (save a tokenizer.json) or use a .tiktoken / .model file")
        self.path, self.hf, self.sha256 = str(path), hf, sha256
        self._json = backend.to_str()
        added = hf.added_tokens_decoder
        self.control_tokens = {t.content: i for i, t in added.items()}
        self.special_tokens = frozenset(t.content for t in added.values() if t.special)
        self.vocab_size = max(len(hf), max(self.control_tokens.values(), default=-1) + 1)
        for key in SPECIAL_KEYS:
            text = _token_text(getattr(hf, key, None))
            setattr(self, key, text)
            setattr(self, key.replace("_token", "_id"),
                    None if text is None else hf.convert_tokens_to_ids(text))
        template = hf.chat_template
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        self.chat_template = template if isinstance(template, str) else None
        self._backends: dict[frozenset, tuple] = {}
        self._matched_re: dict[frozenset, object] = {}  # as_text → added tokens HF matches in text

    def _spec(self) -> dict:
        """tokenizer.json, parsed once (shared by the backend copies and the fast path)."""
        if "_parsed" not in self.__dict__:
            self._parsed = orjson.loads(self._json)
        return self._parsed

    def _backend(self, as_text: frozenset[str]):
        """A private copy of the backend where the tokens in `as_text` (and every special
        token) are never matched, plus the continuation marker as an extra added token."""
        got = self._backends.get(as_text)
        if got is None:
            from tokenizers import AddedToken
            from tokenizers import Tokenizer as TkTokenizer
            spec = dict(self._spec())
            spec["added_tokens"] = [dict(t, special=True) if t["content"] in as_text else t
                                    for t in spec.get("added_tokens") or []]
            backend = TkTokenizer.from_str(orjson.dumps(spec).decode())
            backend.no_padding()
            backend.no_truncation()
            backend.add_tokens([AddedToken(CONT_MARK, special=False, normalized=False)])
            backend.encode_special_tokens = True
            got = (backend, backend.token_to_id(CONT_MARK))
            self._backends[as_text] = got
        return got

    def encode_pieces(self, texts, continued, as_text):
        if self._fast is not None:
            return self._fast_pieces(texts, continued, as_text)
        backend, mark = self._backend(frozenset(as_text) | self.special_tokens)
        inputs = [CONT_MARK + t if c else t for t, c in zip(texts, continued)]
        encs = backend.encode_batch(inputs, add_special_tokens=False)
        ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64)
        offs = np.fromiter((x for e in encs for o in e.offsets for x in o), dtype=np.int64).reshape(-1, 2)
        counts = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        bounds = _bounds(counts)
        cont = np.asarray(continued, dtype=bool)
        if cont.any():  # drop the continuation marks; offsets back to piece coordinates
            heads = bounds[:-1][cont]
            if (counts[cont] == 0).any() or (ids[heads] != mark).any():
                raise BuildError(f"{self.path}: the continuation marker was not kept by the tokenizer")
            keep = np.ones(len(ids), dtype=bool)
            keep[heads] = False
            shift = np.repeat(cont.astype(np.int64), counts)
            offs = offs - shift[:, None]
            ids, offs = ids[keep], offs[keep]
            bounds = _bounds(counts - cont)
        return Pieces(ids, offs[:, 0], offs[:, 1], bounds)

    def encode_documents(self, texts):
        fast, slow = self._split_claimed(texts, self.special_tokens)
        out: list = [None] * len(texts)
        for i, ids in zip(fast, self._fast.encode_many([texts[i] for i in fast]) if fast else ()):
            out[i] = ids
        if slow:
            backend, _ = self._backend(self.special_tokens)
            for i, e in zip(slow, backend.encode_batch_fast([texts[i] for i in slow], add_special_tokens=False)):
                out[i] = np.asarray(e.ids, dtype=np.int64)
        return out

    # -- fast engines (gated by pipeline/encoders.py) ------------------------------------
    ENGINES = ("fastokens", "tiktoken")  # fastest first

    def engine(self, name: str = "tiktoken"):
        """The named fast engine for this tokenizer (built once), or raise NotExpressible."""
        from .fast_bpe import FastBPE
        from .fastokens_bpe import FastokensBPE
        built = self.__dict__.setdefault("_engines", {})
        got = built.get(name)
        if got is None:
            try:
                got = FastBPE.from_spec(self._spec()) if name == "tiktoken" else FastokensBPE(self._spec())
            except Exception as e:  # NotExpressible, or a tokenizer.json the engine refuses
                got = e
            built[name] = got
        if isinstance(got, Exception):
            raise got
        return got

    def fast_bpe(self):
        """The tiktoken engine (see `engine`)."""
        return self.engine("tiktoken")

    def with_engine(self, name: str) -> "HFTokenizer":
        """A twin that encodes data text with a fast engine (same ids: see fast_bpe.py; a piece
        the engine does not claim still goes through `tokenizers`)."""
        twin = copy.copy(self)
        twin._fast, twin.encoder = self.engine(name), name
        return twin

    def with_fast_bpe(self) -> "HFTokenizer":
        return self.with_engine("tiktoken")

    def _split_claimed(self, texts, as_text: frozenset) -> tuple[list[int], list[int]]:
        """Indices of the texts the fast encoder claims, and of the rest (for HF). Tokens in
        `as_text` and special tokens are encoded as text by both; any other added token HF
        would match inside the text, so such a text goes to HF."""
        if self._fast is None:
            return [], list(range(len(texts)))
        key = frozenset(as_text) | self.special_tokens
        if key not in self._matched_re:
            from .fast_bpe import added_token_re
            self._matched_re[key] = added_token_re(t for t in self.control_tokens if t not in key)
        matched, claims = self._matched_re[key], self._fast.claims
        fast, slow = [], []
        for i, t in enumerate(texts):
            (fast if claims(t, matched) else slow).append(i)
        return fast, slow

    def _fast_pieces(self, texts, continued, as_text) -> Pieces:
        # Byte-level BPE without a prefix space encodes a piece alone exactly as inside the
        # whole text (control tokens split it in HF too), so `continued` changes nothing.
        fast, slow = self._split_claimed(texts, as_text)
        ids: list = [None] * len(texts)
        starts: list = [None] * len(texts)
        ends: list = [None] * len(texts)
        if fast:  # one engine call and one vectorised span pass for all claimed pieces
            claimed = [texts[i] for i in fast]
            got = self._fast.encode_many(claimed)
            s, e = self._fast.char_spans_many(claimed, got)
            at = 0
            for i, x in zip(fast, got):
                ids[i], starts[i], ends[i] = x, s[at:at + len(x)], e[at:at + len(x)]
                at += len(x)
        if slow:
            hf = copy_without_fast(self)
            p = hf.encode_pieces([texts[i] for i in slow], [continued[i] for i in slow], as_text)
            for k, i in enumerate(slow):
                ids[i], starts[i], ends[i] = p[k]
        counts = [len(x) for x in ids]
        cat = (lambda xs: np.concatenate(xs).astype(np.int64, copy=False)) if texts else \
            (lambda xs: np.zeros(0, np.int64))
        return Pieces(cat(ids), cat(starts), cat(ends), _bounds(counts))

    def reference_encode(self, text):
        return self.hf(text, add_special_tokens=False, verbose=False)["input_ids"]

    def reference_offsets(self, text):
        enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def template_kwargs(self) -> dict:
        # exactly what apply_chat_template passes: the tokenizer's special_tokens_map
        return {k: v for k, v in dict(self.hf.special_tokens_map).items() if v is not None}

    def chat_control_tokens(self, template_text: str) -> frozenset[str]:
        declared = getattr(self.hf, "chat_control_tokens", None)
        if declared is not None:
            return frozenset(self.special_tokens) | (frozenset(declared) & set(self.control_tokens))
        return super().chat_control_tokens(template_text)


def copy_without_fast(tok: HFTokenizer) -> HFTokenizer:
    if tok._fast is None:
        return tok
    plain = copy.copy(tok)
    plain._fast, plain.encoder = None, "tokenizers"
    return plain


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------
def _read_config(d: Path) -> dict:
    f = d / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except ValueError as e:
        raise BuildError(f"{f}: not valid JSON ({e})") from None


def _load_hf(path: str, target: Path, trust_remote_code: bool):
    if target.is_file() and target.suffix == ".json":
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast(tokenizer_file=str(target))
    if target.is_file() and target.suffix == ".model":
        return _load_sentencepiece(target)
    d = target
    config = _read_config(d)
    if config.get("auto_map") and not trust_remote_code:
        raise BuildError(f"{path}: tokenizer_config.json names its own loader "
                         f"({config.get('tokenizer_class')}); if you trust that code, pass trust_remote_code "
                         "(--trust-remote-code, or \"trust_remote_code\": true in the manifest), "
                         "or give a tokenizer.json / .tiktoken / .model file")
    if not config and not (d / "tokenizer.json").is_file() and (d / "tokenizer.model").is_file():
        return _load_sentencepiece(d / "tokenizer.model")
    declared = _declared_class(d, config)
    if declared is not None:
        return declared.from_pretrained(str(d))
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(d), trust_remote_code=trust_remote_code)


def _declared_class(d: Path, config: dict):
    """The class a plain tokenizer dir declares, when AutoTokenizer would load exactly that
    class. AutoTokenizer first builds a model config (which imports torch: ~4 s of every build
    and of every worker that loads a tokenizer) to handle model dirs and hub quirks; a dir with
    no config.json and no loader of its own has none of them. Llama/Mistral/Bloom and generic
    names keep AutoTokenizer, which special-cases them. tests/test_fast_encoder.py checks the
    two loads agree."""
    name = (config.get("tokenizer_class") or "").removesuffix("Fast")
    if not name or config.get("auto_map") or (d / "config.json").exists() or \
            name.startswith(("Llama", "Mistral", "Bloom", "PreTrained", "Python")):
        return None
    import transformers
    from transformers import TokenizersBackend
    cls = getattr(transformers, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, TokenizersBackend) else None


def _load_sentencepiece(model: Path):
    """A SentencePiece model through transformers' LlamaTokenizer conversion (a fast backend
    with offsets). from_pretrained needs a dir holding `tokenizer.model`."""
    from transformers import LlamaTokenizer
    if model.name == "tokenizer.model":
        return LlamaTokenizer.from_pretrained(str(model.parent))
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(model.resolve(), Path(tmp) / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(tmp)


@lru_cache(maxsize=8)
def _load_cached(path: str, trust_remote_code: bool, sha: str) -> Tokenizer:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = Path(path)
    try:
        if p.is_file() and p.suffix == ".tiktoken":
            return TiktokenTokenizer(path, p, _read_config(p.parent), sha)
        if p.is_dir() and not (trust_remote_code and _read_config(p).get("auto_map")) \
                and not (p / "tokenizer.json").is_file():
            bpe = sorted(p.glob("*.tiktoken"))
            if len(bpe) > 1:
                raise BuildError(f"{path}: several .tiktoken files ({', '.join(b.name for b in bpe)}); "
                                 "name the one to use")
            if bpe:
                return TiktokenTokenizer(path, bpe[0], _read_config(p), sha)
        return HFTokenizer(path, _load_hf(path, p, trust_remote_code), sha)
    except BuildError:
        raise
    except Exception as e:  # the library's message is the useful part
        raise BuildError(f"{path}: cannot load tokenizer: {type(e).__name__}: {e}") from e


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Tokenizer:
    """A tokenizer dir (HF files, a .tiktoken file + tokenizer_config.json, or a SentencePiece
    tokenizer.model), or one file: tokenizer.json, *.tiktoken, *.model. Loaded once per process.
    `trust_remote_code` lets transformers run a loader shipped in the dir (`auto_map`).
    Loaded once per process (and again when its files change)."""
    if not os.path.exists(path):
        raise BuildError(f"{path}: tokenizer not found")
    return _load_cached(str(path), bool(trust_remote_code), tokenizer_sha256(str(path)))
