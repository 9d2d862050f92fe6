"""Test tokenizers for every family in ../shared/templates: the shared Qwen2.5 byte-level BPE
(its InternVL extras, ids >= 151665, dropped) plus the family's control tokens, read from the
family's PROVENANCE.md, as special tokens, with the family's chat template as the tokenizer's
own. Qwen3's four extra tokens land on their real ids (151665-151668). Hy3-preview: a
byte-level tokenizer with Hy3's control tokens at their real ids from its tokenizer_config.json.
Built in a temporary directory; nothing from ../shared is copied into the repo."""
from __future__ import annotations

import json
import re
import tempfile
from functools import lru_cache
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
TEMPLATES = SHARED / "templates"
QWEN = SHARED / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
FAMILIES = sorted(p.name for p in TEMPLATES.iterdir() if (p / "chat_template.jinja").is_file()) \
    if TEMPLATES.is_dir() else []
# bos / eos text each template's data expects (the publishers' tokenizer configs)
SPECIALS = {
    "deepseek-r1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "deepseek-v3.1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "gemma-2": ("<bos>", "<eos>"),
    "glm-4.6": (None, "<|endoftext|>"),
    "gpt-oss": (None, "<|return|>"),
    "kimi-k2": (None, "<|im_end|>"),
    "llama-3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama-3.2": ("<|begin_of_text|>", "<|eot_id|>"),
    "mistral-nemo": ("<s>", "</s>"),
    "mistral-small-3.2": ("<s>", "</s>"),
    "phi-3.5": ("<s>", "<|endoftext|>"),
    "qwen3": (None, "<|im_end|>"),
    "seed-oss": ("<seed:bos>", "<seed:eos>"),
}
QWEN3_IDS = {"<tool_response>": 151665, "</tool_response>": 151666, "<think>": 151667, "</think>": 151668}


def control_tokens(family: str) -> list[str]:
    """The control tokens PROVENANCE.md lists for the family (backticked, after its heading)."""
    text = (TEMPLATES / family / "PROVENANCE.md").read_text(encoding="utf-8")
    m = re.search(r"## Control tokens[^\n]*\n(.*?)(?=\n## |\Z)", text, re.S)
    body = m.group(1) if m else ""
    return [t for t in dict.fromkeys(re.findall(r"`([^`\s]+)`", body)) if re.fullmatch(r"[<\[].+[>\]]", t)]


@lru_cache(maxsize=None)
def family_tokenizer(family: str) -> str:
    """A tokenizer directory for `family` (temporary), its template as the tokenizer's own."""
    from transformers import PreTrainedTokenizerFast
    template = (TEMPLATES / family / "chat_template.jinja").read_text(encoding="utf-8")
    out = Path(tempfile.mkdtemp(prefix=f"tokenmill-{family}-"))
    if family == "hy3-preview":
        return _hy3(out, template)
    data = json.loads((QWEN / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 151665]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    bos, eos = SPECIALS.get(family, (None, None))
    hf = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    have = set(hf.get_vocab())
    new = [t for t in control_tokens(family) + [x for x in (bos, eos) if x] if t not in have]
    new.sort(key=lambda t: QWEN3_IDS.get(t, 0))  # Qwen3's four extras on their real ids
    hf.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(new))},
                          replace_extra_special_tokens=False)
    hf.bos_token, hf.eos_token = bos, eos
    hf.chat_template = template
    hf.save_pretrained(str(out))
    return str(out)


def _hy3(out: Path, template: str) -> str:
    """Hy3-preview: byte-level BPE (no merges) + every added token of its tokenizer_config.json at its id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    cfg = json.loads((TEMPLATES / "hy3-preview" / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = {int(k): v for k, v in cfg["added_tokens_decoder"].items()}
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    # fill the ids below the first added token so each added token gets exactly its id
    first = min(added)
    for k in range(len(vocab), first):
        vocab[f"<unused_{k}>"] = k
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    for k in sorted(added):
        while tk.get_vocab_size(with_added_tokens=True) < k:
            tk.add_tokens([AddedToken(f"<hy_gap_{tk.get_vocab_size(with_added_tokens=True)}>", special=True)])
        tk.add_special_tokens([AddedToken(added[k]["content"], special=True, normalized=False)])
        assert tk.token_to_id(added[k]["content"]) == k, (k, added[k]["content"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=cfg.get("bos_token"),
                                 eos_token=cfg.get("eos_token"))
    hf.chat_template = template
    hf.save_pretrained(str(out))
    return str(out)
