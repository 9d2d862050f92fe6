"""The tokenizer interface the pipeline uses (`Tokenizer`), the flat `Pieces` result of
encoding, and the hash of a tokenizer's files. Implementations: tokenizer.py (Hugging Face,
and the loader), tiktoken_tokenizer.py."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .constants import TOKENIZER_FILES
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

    Attributes: path, kind ('hf' | 'tiktoken'), hf (the transformers tokenizer; HF only), vocab_size, bos/eos/pad/unk token
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
