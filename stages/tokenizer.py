"""Tokenizer loading and special-token-safe encoding.

Text that comes from data is always encoded with control tokens disabled, so a literal
`<|im_end|>` typed by a user stays text. Control tokens are only ever produced from the
chat template's own literal text (see render.py).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BuildError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "chat_template.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def tokenizer_sha256(path: str) -> str:
    """Hash of the files that define the tokenizer (and its template): a changed tokenizer
    can never reuse shards built with the old one."""
    h = hashlib.sha256()
    p = Path(path)
    files = [p] if p.is_file() else sorted(
        f for f in p.iterdir() if f.is_file() and (f.name in TOKENIZER_FILES or f.suffix in (".tiktoken", ".model")))
    for f in files:
        h.update(f.name.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


@dataclass
class Tokenizer:
    """What the pipeline needs from a tokenizer, whatever library is behind it."""
    path: str
    hf: object  # transformers tokenizer: chat templates and the reference behaviour
    backend: object  # tokenizers.Tokenizer with special tokens disabled for data text
    vocab_size: int
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None
    control_tokens: dict[str, int] = field(default_factory=dict)  # added tokens, by text
    sha256: str = ""

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Ids of data texts, control-token strings kept as text."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_with_offsets(self, texts: list[str]):
        """Encodings (ids + char offsets) of texts, control-token strings kept as text."""
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def template_kwargs(self) -> dict:
        """Special tokens as the Jinja template sees them (as in apply_chat_template)."""
        return {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                  ("pad_token", self.pad_token)) if v is not None}

    def info(self) -> dict:
        return {"path": self.path, "vocab_size": self.vocab_size, "sha256": self.sha256}


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Tokenizer:
    """A Hugging Face tokenizer dir or tokenizer.json (fast backend required)."""
    if not os.path.exists(path):
        raise BuildError(f"{path}: tokenizer not found")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    try:
        if os.path.isfile(path) and path.endswith(".json"):
            hf = PreTrainedTokenizerFast(tokenizer_file=path)
        else:
            hf = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # the library's message is the useful part
        raise BuildError(f"{path}: cannot load tokenizer: {e}") from e
    backend = getattr(hf, "_tokenizer", None)
    if backend is None:
        raise BuildError(f"{path}: tokenizer has no fast (tokenizers) backend")
    backend = backend.__class__.from_str(backend.to_str())  # private copy: we change a flag
    backend.encode_special_tokens = True
    if hasattr(backend, "no_padding"):
        backend.no_padding()
        backend.no_truncation()
    control = {t.content: i for i, t in hf.added_tokens_decoder.items()}

    def tid(tok):
        return None if tok is None else hf.convert_tokens_to_ids(tok)

    template = hf.chat_template if isinstance(hf.chat_template, str) else None
    return Tokenizer(
        path=str(path), hf=hf, backend=backend, vocab_size=len(hf),
        bos_token=hf.bos_token, eos_token=hf.eos_token, pad_token=hf.pad_token,
        bos_id=tid(hf.bos_token), eos_id=tid(hf.eos_token), pad_id=tid(hf.pad_token),
        chat_template=template, control_tokens=control, sha256=tokenizer_sha256(path),
    )
