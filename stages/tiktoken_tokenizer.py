"""Tokenizers given as a tiktoken BPE file (e.g. Tencent Hunyuan's `hy.tiktoken`) with their
special tokens and chat template from tokenizer_config.json."""
from __future__ import annotations

import base64
import unicodedata
from pathlib import Path

import numpy as np

from .errors import BuildError
from .tokenizer_base import SPECIAL_KEYS, Pieces, Tokenizer, _bounds, _token_text

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
