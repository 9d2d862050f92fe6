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

import base64
import copy
import hashlib
import json
import os
import tempfile
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import orjson

from .constants import TOKENIZER_FILES
from .errors import BuildError
from .jinja_env import template_literal_text
# Continuation marker: an extra added token put in front of a piece that does not start the
# rendered text, then dropped. U+FDD0… are Unicode noncharacters: never in real text (render.py
# refuses data that holds them).
CONT_MARK = "\ufdd4"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def tokenizer_sha256(path: str) -> str:
    """Hash of the files that define the tokenizer (and its template): a changed tokenizer
    can never reuse shards built with the old one."""
    h = hashlib.sha256()
    p = Path(path)
    files = [p] if p.is_file() else sorted(
        f for f in p.iterdir() if f.is_file() and (f.name in TOKENIZER_FILES or f.suffix in (".tiktoken", ".model", ".py")))
    if p.is_file() and (p.parent / "tokenizer_config.json").is_file() and p.suffix in (".tiktoken", ".model"):
        files.append(p.parent / "tokenizer_config.json")
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _token_text(tok) -> str | None:
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


class Pieces:
    """Encoded pieces, flat: piece i is ids[bounds[i]:bounds[i+1]], with each token's char
    [start, end) in its piece."""
    __slots__ = ("ids", "starts", "ends", "bounds")

    def __init__(self, ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, bounds: np.ndarray):
        self.ids, self.starts, self.ends, self.bounds = ids, starts, ends, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = self.bounds[i], self.bounds[i + 1]
        return self.ids[a:b], self.starts[a:b], self.ends[a:b]


def _bounds(counts) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


class Tokenizer:
    """What the pipeline needs from a tokenizer, whatever library is behind it.

    Attributes: path, kind ('hf' | 'tiktoken'), hf (the transformers tokenizer; for tiktoken a
    small stand-in with `decode` and `apply_chat_template`), vocab_size, bos/eos/pad/unk token
    texts and ids, chat_template (str or None), control_tokens (every added/special token the
    tokenizer matches in raw text, text → id), special_tokens (the texts of the *special* ones),
    sha256.
    """
    kind = "base"
    encoder = "base"  # the library that encodes data text: tokenizers | tiktoken | sentencepiece
    path: str
    hf: object
    vocab_size: int
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    chat_template: str | None = None
    control_tokens: dict[str, int]
    special_tokens: frozenset[str]
    sha256: str = ""

    # -- encoding -------------------------------------------------------------------
    def encode_documents(self, texts: list[str]) -> list[np.ndarray]:
        """Ids (int64 arrays) of data texts (documents), every control-token string kept as text."""
        p = self.encode_pieces(texts, [False] * len(texts), self.special_tokens)
        return [p.ids[p.bounds[i]:p.bounds[i + 1]] for i in range(len(texts))]

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """`encode_documents` as lists."""
        return [ids.tolist() for ids in self.encode_documents(texts)]

    def encode_pieces(self, texts: list[str], continued: list[bool], as_text: frozenset[str] | set[str]
                      ) -> "Pieces":
        """Encode pieces of rendered conversations, all at once.
        `continued[i]`: piece i does not start its text (it follows a control token).
        `as_text`: token strings that must never be matched inside a piece (the template's
        control tokens); other added tokens are matched as the tokenizer itself does."""
        raise NotImplementedError

    def reference_encode(self, text: str) -> list[int]:
        """Ids of a rendered chat exactly as the tokenizer's own loader encodes it (control
        tokens enabled everywhere): the reference for `--check-template`."""
        raise NotImplementedError

    def reference_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`reference_encode` plus each token's char span in `text`."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def normalize_data(self, text: str) -> str:
        """What the tokenizer's own loader does to text before encoding, applied to data
        strings before rendering (identity unless the loader normalises, e.g. Hunyuan NFC)."""
        return text

    # -- templates --------------------------------------------------------------------
    def template_kwargs(self) -> dict:
        """Special tokens as the Jinja template sees them (as in apply_chat_template)."""
        return {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                if v is not None}

    def chat_control_tokens(self, template_text: str) -> frozenset[str]:
        """Tokens that are *control* tokens for a chat template: never produced from data
        text. As transformers' `sanitize_control_tokens`: every special token, plus the added
        tokens the template's literal text contains (not whitespace-only ones)."""
        literal = template_literal_text(template_text)
        return frozenset(self.special_tokens) | frozenset(
            t for t in self.control_tokens if t in literal and not t.isspace())

    def info(self) -> dict:
        """What meta.json and the lock record of the tokenizer: the stream reads the special
        ids from here instead of parsing tokenizer files (None: the tokenizer has no such token)."""
        return {"path": self.path, "vocab_size": self.vocab_size, "sha256": self.sha256,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} vocab={self.vocab_size}>"


# ---------------------------------------------------------------------------------------
# Hugging Face (fast backend)
# ---------------------------------------------------------------------------------------
class HFTokenizer(Tokenizer):
    kind = "hf"
    encoder = "tokenizers"
    _fast = None  # FastBPE on the twin that `with_fast_bpe` returns

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
        for i in fast:
            out[i] = self._fast.encode(texts[i])
        if slow:
            backend, _ = self._backend(self.special_tokens)
            for i, e in zip(slow, backend.encode_batch_fast([texts[i] for i in slow], add_special_tokens=False)):
                out[i] = np.asarray(e.ids, dtype=np.int64)
        return out

    # -- the tiktoken fast path --------------------------------------------------------
    def fast_bpe(self):
        """The tiktoken encoder for this tokenizer (built once), or raise NotExpressible."""
        from .fast_bpe import FastBPE
        got = self.__dict__.get("_fast_built")
        if got is None:
            try:
                got = FastBPE.from_spec(self._spec())
            except Exception as e:  # NotExpressible, or a tokenizer.json tiktoken refuses
                got = e
            self._fast_built = got
        if isinstance(got, Exception):
            raise got
        return got

    def with_fast_bpe(self) -> "HFTokenizer":
        """A twin that encodes data text with tiktoken (same ids: see fast_bpe.py; a piece the
        fast encoder does not claim still goes through `tokenizers`)."""
        twin = copy.copy(self)
        twin._fast, twin.encoder = self.fast_bpe(), "tiktoken"
        return twin

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
        matched = self._matched_re[key]
        fast, slow = [], []
        for i, t in enumerate(texts):
            (fast if self._fast.claims(t, matched) else slow).append(i)
        return fast, slow

    def _fast_pieces(self, texts, continued, as_text) -> Pieces:
        # Byte-level BPE without a prefix space encodes a piece alone exactly as inside the
        # whole text (control tokens split it in HF too), so `continued` changes nothing.
        fast, slow = self._split_claimed(texts, as_text)
        ids: list = [None] * len(texts)
        starts: list = [None] * len(texts)
        ends: list = [None] * len(texts)
        for i in fast:
            ids[i] = self._fast.encode(texts[i])
            starts[i], ends[i] = self._fast.char_spans(texts[i], ids[i])
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
# tiktoken
# ---------------------------------------------------------------------------------------
HY_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Known layouts for tokenizer_config.json files that name a remote-code loader instead of
# listing their special tokens: special tokens follow the BPE ranks in this order.
KNOWN_TIKTOKEN_LAYOUTS = {
    "HYTokenizer": {
        "pat_str": HY_PAT_STR,
        "special_tokens": ["<|endoftext|>", "<|startoftext|>", "<|bos|>", "<|eos|>", "<|pad|>"]
                          + [f"<|extra_{i}|>" for i in range(205)],
        "dedupe_ranks": True,  # the reference loader numbers lines in order, skipping duplicates
        "normalize": "NFC",
    },
}


def _load_ranks(path: Path, dedupe: bool) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines()):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token = base64.b64decode(parts[0])
            rank = len(ranks) if dedupe else int(parts[1])
        except Exception as e:
            raise BuildError(f"{path}:{n + 1}: not a tiktoken BPE line ({e})") from None
        if dedupe and token in ranks:
            continue
        ranks[token] = rank
    return ranks


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"
    encoder = "tiktoken"

    def __init__(self, path: str, bpe_file: Path, config: dict, sha256: str):
        import tiktoken
        self.path, self.sha256 = str(path), sha256
        layout = KNOWN_TIKTOKEN_LAYOUTS.get(config.get("tokenizer_class", ""), {})
        ranks = _load_ranks(bpe_file, layout.get("dedupe_ranks", False))
        specials: dict[str, int] = {}
        decoder = config.get("added_tokens_decoder")
        if decoder:
            specials = {v["content"]: int(k) for k, v in decoder.items()}
        elif layout:
            start = max(ranks.values(), default=-1) + 1
            specials = {t: start + i for i, t in enumerate(layout["special_tokens"])}
        else:
            named = [_token_text(config.get(k)) for k in SPECIAL_KEYS] + \
                [_token_text(t) for t in config.get("additional_special_tokens") or []]
            if any(named):
                raise BuildError(f"{path}: tokenizer_config.json names special tokens but not their ids; "
                                 "add an \"added_tokens_decoder\" {id: {content, special}} to it")
        pat_str = config.get("pat_str") or layout.get("pat_str")
        if not pat_str:
            raise BuildError(f"{path}: no pre-tokenizer pattern for this .tiktoken file: add \"pat_str\" "
                             "(tiktoken's split regex) to tokenizer_config.json")
        self._norm = config.get("normalize", layout.get("normalize"))
        try:
            self._enc = tiktoken.Encoding(Path(bpe_file).stem, pat_str=pat_str, mergeable_ranks=ranks,
                                          special_tokens=specials)
        except Exception as e:
            raise BuildError(f"{path}: cannot build the tiktoken encoding: {e}") from e
        self.vocab_size = self._enc.n_vocab
        self.control_tokens = dict(specials)
        self.special_tokens = frozenset(specials)
        for key in SPECIAL_KEYS:
            text = _token_text(config.get(key))
            if text is not None and text not in specials:
                raise BuildError(f"{path}: {key} {text!r} is not a special token of the encoding")
            setattr(self, key, text)
            setattr(self, key.replace("_token", "_id"), None if text is None else specials[text])
        self._additional = [_token_text(t) for t in config.get("additional_special_tokens") or []]
        template = config.get("chat_template")
        jinja_file = Path(bpe_file).parent / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if isinstance(template, list):  # [{name, template}] form
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template if isinstance(template, str) else None
        lens = np.zeros(self.vocab_size, dtype=np.int64)
        for tok_bytes, rank in ranks.items():
            lens[rank] = len(tok_bytes)
        for text, i in specials.items():
            lens[i] = len(text.encode("utf-8"))
        self._byte_lens = lens

    def normalize_data(self, text: str) -> str:
        if self._norm and not unicodedata.is_normalized(self._norm, text):
            return unicodedata.normalize(self._norm, text)
        return text

    def _char_spans(self, text: str, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Char [start, end) of each token, from token byte lengths (a token that ends inside
        a multi-byte character covers that character)."""
        raw = text.encode("utf-8")
        if len(raw) == len(text):  # ASCII: bytes are chars
            ends = np.cumsum(self._byte_lens[ids]) if ids else np.zeros(0, np.int64)
            return ends - self._byte_lens[ids], ends
        b = np.frombuffer(raw, dtype=np.uint8)
        char_of_byte = np.cumsum((b & 0xC0) != 0x80) - 1
        bend = np.cumsum(self._byte_lens[ids])
        bstart = bend - self._byte_lens[ids]
        if len(ids) and bend[-1] != len(raw):
            raise BuildError(f"{self.path}: token byte lengths do not add up to the text")
        return char_of_byte[bstart], char_of_byte[bend - 1] + 1

    def encode_pieces(self, texts, continued, as_text):
        norm = [self.normalize_data(t) for t in texts]
        for text, n in zip(texts, norm):
            if len(n) != len(text):
                raise BuildError("normalisation changed the length of a rendered piece")
        all_ids, starts, ends, counts = [], [], [], []
        for text, ids in zip(norm, map(self._enc._core_bpe.encode_ordinary, norm)):
            s, e = self._char_spans(text, ids)
            all_ids.append(np.asarray(ids, dtype=np.int64))
            starts.append(s)
            ends.append(e)
            counts.append(len(ids))
        cat = (lambda xs: np.concatenate(xs).astype(np.int64)) if texts else (lambda xs: np.zeros(0, np.int64))
        return Pieces(cat(all_ids), cat(starts), cat(ends), _bounds(counts))

    def encode_documents(self, texts):
        encode = self._enc._core_bpe.encode_ordinary  # no thread pool: one worker process is one core
        return [np.fromiter(ids, np.int64, len(ids)) for ids in (encode(self.normalize_data(t)) for t in texts)]

    def reference_encode(self, text):
        text = unicodedata.normalize(self._norm, text) if self._norm else text
        return self._enc.encode(text, allowed_special="all")

    def reference_offsets(self, text):
        text = unicodedata.normalize(self._norm, text) if self._norm else text
        ids = self._enc.encode(text, allowed_special="all")
        s, e = self._char_spans(text, ids)
        return ids, list(zip(s.tolist(), e.tolist()))

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def template_kwargs(self) -> dict:
        out = super().template_kwargs()
        if self._additional:
            out["additional_special_tokens"] = list(self._additional)
        return out


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
