"""A tiktoken encoder for Hugging Face byte-level BPE tokenizers (Qwen2/2.5, Llama-3, GPT-2).

tiktoken's BPE core is several times faster than `tokenizers` on one core. A byte-level BPE
`tokenizer.json` can be expressed for it when its model is plain BPE (no dropout, no byte
fallback, no subword affixes), its normaliser is nothing or NFC, and its pre-tokeniser is one
regex split followed by the byte-level mapping (or a byte-level pre-tokeniser with GPT-2's own
regex). `FastBPE.from_tokenizer_json` says why when it cannot.

Equal ids are not guaranteed by construction: tiktoken merges by the rank of the merged bytes,
`tokenizers` by the rank of the pair, and the two regex engines differ in corner cases. So the
pipeline only uses this encoder on a dataset after checking it against the HF tokenizer on a
sample of that dataset's own text (`pipeline.encoders`), and a piece it cannot answer for
exactly — text that NFC would change, or that holds an added token the HF tokenizer matches
inside text — is handed back to the caller (`None`) to encode with HF.
"""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np
import orjson

from .errors import BuildError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable char that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def char_spans_many(byte_lens: np.ndarray, texts: list[str], ids: list[np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Char [start, end) of every token of every text, each in its own text's coordinates,
    in one vectorised pass (`byte_lens`: the byte length of each token in `ids`, which cover
    each text's UTF-8 bytes exactly, as byte-level BPE ids equal to HF's do). A token that
    ends inside a multi-byte char covers that char."""
    counts = np.fromiter(map(len, ids), np.int64, len(ids))
    lens = byte_lens[np.concatenate(ids)] if len(ids) else np.zeros(0, np.int64)
    bend = np.cumsum(lens)
    bstart = bend - lens
    joined = "".join(texts)
    raw = joined.encode("utf-8")
    if (bend[-1] if len(bend) else 0) != len(raw):
        raise BuildError("fast encoder: token byte lengths do not add up to the text (ids unlike HF's)")
    if len(raw) == len(joined):  # ASCII: bytes are chars
        cstart, cend = bstart, bend
    else:
        b = np.frombuffer(raw, dtype=np.uint8)
        char_of_byte = np.cumsum((b & 0xC0) != 0x80) - 1
        cstart = char_of_byte[bstart]
        cend = char_of_byte[bend - 1] + 1 if len(bend) else bend
    first_char = np.zeros(len(texts), np.int64)
    np.cumsum(np.fromiter(map(len, texts[:-1]), np.int64, max(len(texts) - 1, 0)), out=first_char[1:])
    shift = np.repeat(first_char, counts)
    return cstart - shift, cend - shift


def added_token_re(tokens) -> re.Pattern | None:
    """A regex for token strings, longest first (None when there are none)."""
    tokens = sorted(tokens, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


class NotExpressible(Exception):
    """The tokenizer cannot be run by tiktoken with the same ids (the message says why)."""


def _pattern(pre: dict | None) -> str:
    if pre is None:
        raise NotExpressible("no pre-tokenizer")
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            raise NotExpressible("byte-level pre-tokenizer with add_prefix_space or without its regex")
        return GPT2_PATTERN
    if kind == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
            split, byte_level = steps
            if byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
                raise NotExpressible("byte-level step with its own regex or add_prefix_space")
            if split.get("behavior") != "Isolated" or split.get("invert"):
                raise NotExpressible(f"split behaviour {split.get('behavior')!r} (only Isolated)")
            regex = (split.get("pattern") or {}).get("Regex")
            if not regex:
                raise NotExpressible("split on a plain string, not a regex")
            return regex
    raise NotExpressible(f"pre-tokenizer {kind!r} is not regex split + byte level")


def _normalizer(norm: dict | None) -> str | None:
    if norm is None:
        return None
    if norm.get("type") == "NFC":
        return "NFC"
    if norm.get("type") == "Sequence" and all(n.get("type") == "NFC" for n in norm.get("normalizers") or []):
        return "NFC" if norm.get("normalizers") else None
    raise NotExpressible(f"normalizer {norm.get('type')!r} (only none or NFC)")


def plain_bpe_model(spec: dict) -> dict:
    """The `model` of a tokenizer.json that a fast engine can express: plain BPE (no dropout,
    byte fallback or subword affixes); NotExpressible says why not."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise NotExpressible(f"model {model.get('type')!r} is not BPE")
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise NotExpressible("BPE with dropout, byte fallback or subword affixes")
    return model


class FastBPE:
    """Ordinary-text encoding (no added or special tokens) of a byte-level BPE tokenizer."""
    name = "tiktoken"
    version = ""  # set below: part of the code-point probe's key (pipeline/encoder_probe.py)

    def __init__(self, ranks: dict[bytes, int], pattern: str, rank_to_id: np.ndarray | None,
                 normalize: str | None):
        import tiktoken
        self.version = tiktoken.__version__
        self._enc = tiktoken.Encoding("tokenmill-fast-bpe", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens={})
        self._core = self._enc._core_bpe
        self._rank_to_id = rank_to_id
        self.normalize = normalize
        self._byte_lens = np.zeros(max(ranks.values()) + 1, dtype=np.int64)
        for token, rank in ranks.items():
            self._byte_lens[rank] = len(token)

    @classmethod
    def from_tokenizer_json(cls, text: str) -> "FastBPE":
        return cls.from_spec(orjson.loads(text))

    @classmethod
    def from_spec(cls, spec: dict) -> "FastBPE":
        """From a parsed tokenizer.json."""
        model = plain_bpe_model(spec)
        pattern = _pattern(spec.get("pre_tokenizer"))
        normalize = _normalizer(spec.get("normalizer"))
        # added tokens the trainer put in the model's vocabulary are not BPE tokens: leave them out
        added = {t["content"] for t in spec.get("added_tokens") or []}
        vocab: dict[str, int] = {t: i for t, i in model["vocab"].items() if t not in added}
        byte_of = _byte_decoder()
        if not set("".join(vocab)) <= byte_of.keys():
            raise NotExpressible("vocabulary is not byte-level (a token has a char outside the byte map)")
        to_latin1 = {ord(c): b for c, b in byte_of.items()}  # byte-map char → the char of that byte
        as_bytes = {tok: tok.translate(to_latin1).encode("latin-1") for tok in vocab}
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or []]
        made = [vocab.get(a + b) for a, b in merges]
        if None in made:
            raise NotExpressible("a merge makes a token outside the vocabulary")
        singles = [t for t in vocab if len(as_bytes[t]) == 1]
        if len(singles) != 256 or len(set(made)) + 256 != len(vocab):
            raise NotExpressible("vocabulary tokens that no merge makes")
        # tiktoken merges the adjacent pair whose merged bytes rank lowest, so a merged token's
        # rank must follow merge order (single bytes never compete). When the ids already do
        # (GPT-2, Qwen, Llama-3 vocabularies), ranks are the ids and need no mapping.
        made_ids = np.asarray(made, dtype=np.int64)
        if (np.diff(made_ids) > 0).all() and max(vocab[t] for t in singles) < made_ids[0]:
            return cls({b: vocab[t] for t, b in as_bytes.items()}, pattern, None, normalize)
        by_id = {vocab[t]: b for t, b in as_bytes.items()}
        ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
        for i in made:
            ranks.setdefault(by_id[i], len(ranks))
        rank_to_id = np.zeros(len(ranks), dtype=np.int64)
        for tok, i in vocab.items():
            rank_to_id[ranks[as_bytes[tok]]] = i
        return cls(ranks, pattern, rank_to_id, normalize)

    def claims(self, text: str, matched: re.Pattern | None) -> bool:
        """True when this encoder gives exactly the HF ids for `text` (else encode it with HF).
        `matched`: the added tokens HF would match inside this text (`added_token_re`)."""
        if self.normalize and not unicodedata.is_normalized(self.normalize, text):
            return False
        return matched is None or matched.search(text) is None

    def encode(self, text: str) -> np.ndarray:
        """Ids (int64) of a text this encoder `claims`."""
        # encode_ordinary + fromiter: ~30% faster than encode_to_tiktoken_buffer, whose
        # special-token handling we do not need (ordinary text only)
        ranks = self._core.encode_ordinary(text)
        ranks = np.fromiter(ranks, np.int64, len(ranks))
        return ranks if self._rank_to_id is None else self._rank_to_id[ranks]

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def char_spans_many(self, texts: list[str], ids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """`char_spans` of every text at once (see the module function)."""
        lens = self.__dict__.get("_id_lens")
        if lens is None:  # byte length by id (ids of no BPE token never occur)
            lens = self._id_lens = (self._byte_lens if self._rank_to_id is None
                                    else self._byte_lens[self._id_to_rank])
        return char_spans_many(lens, texts, ids)

    def char_spans(self, text: str, ranks_or_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Char [start, end) of each token of `encode(text)` (a token that ends inside a
        multi-byte character covers that character)."""
        lens = self._byte_lens[self._to_ranks(ranks_or_ids)]
        bend = np.cumsum(lens)
        bstart = bend - lens
        raw = text.encode("utf-8")
        if len(raw) == len(text):  # ASCII: bytes are chars
            return bstart, bend
        b = np.frombuffer(raw, dtype=np.uint8)
        char_of_byte = np.cumsum((b & 0xC0) != 0x80) - 1
        return char_of_byte[bstart], char_of_byte[bend - 1] + 1

    @property
    def _id_to_rank(self) -> np.ndarray:
        inv = getattr(self, "_inv", None)
        if inv is None:
            inv = np.full(int(self._rank_to_id.max()) + 1, -1, dtype=np.int64)
            inv[self._rank_to_id] = np.arange(len(self._rank_to_id))
            self._inv = inv
        return inv

    def _to_ranks(self, ids: np.ndarray) -> np.ndarray:
        return ids if self._rank_to_id is None else self._id_to_rank[ids]
