"""The trainer's tokenizer: whatever the pipeline accepts (a HF dir or tokenizer.json, a
SentencePiece .model, a .tiktoken file or dir), loaded through the pipeline's own loader
(stages/tokenizer.py), so a lock that built also trains. The trainer needs three things of it:
its vocabulary size (`len()`: the ids the shards can hold, as the lock records it), its chat
template (to build data), and `save_pretrained(dir)`, which puts its files into every saved
model / adapter / checkpoint so the result loads with its tokenizer.

Remote code: the tokenizer is loaded as the pipeline loads it without `trust_remote_code`
(a Hunyuan dir naming `tokenization_hy.HYTokenizer` in auto_map is read as tiktoken); only a
tokenizer that cannot be read that way uses the run's --trust_remote_code.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .args import TrainError

# Files that make up a tokenizer in a model dir (copied as they are).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
TOKENIZER_GLOBS = ("*.tiktoken", "tokenization_*.py", "*.jinja")


class TrainTokenizer:
    def __init__(self, tok, path: str):
        self.tok, self.path = tok, str(path)
        self.kind = tok.kind
        self.vocab_size = int(tok.vocab_size)
        self.bos_id, self.eos_id, self.pad_id = tok.bos_id, tok.eos_id, tok.pad_id
        self.chat_template = tok.chat_template

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"<TrainTokenizer {self.kind} {self.path} vocab={self.vocab_size}>"

    def get_vocab(self) -> dict:
        """{token: id}; a tiktoken token is its bytes (hex), special tokens their text."""
        hf = getattr(self.tok, "hf", None)
        if hf is not None:
            return hf.get_vocab()
        enc = self.tok._enc
        return {**{b.hex(): i for b, i in enc._mergeable_ranks.items()}, **enc._special_tokens}

    def save_pretrained(self, out: str) -> None:
        """The tokenizer's files into `out`: a HF tokenizer writes its own (tokenizer.json, config,
        chat template); the source files (a .tiktoken + tokenizer_config.json, a .model) are copied."""
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        hf = getattr(self.tok, "hf", None)
        if hf is not None:
            hf.save_pretrained(str(out_dir))
        src = Path(self.path)
        if src.is_file():  # one file given: it, plus the config beside a .tiktoken
            name = "tokenizer.model" if src.suffix == ".model" else src.name
            shutil.copy2(src, out_dir / name)
            if src.suffix == ".tiktoken" and (src.parent / "tokenizer_config.json").is_file():
                shutil.copy2(src.parent / "tokenizer_config.json", out_dir / "tokenizer_config.json")
            return
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and (hf is None or not (out_dir / name).exists()):
                shutil.copy2(src / name, out_dir / name)
        for pattern in TOKENIZER_GLOBS:
            for f in src.glob(pattern):
                if not (out_dir / f.name).exists():
                    shutil.copy2(f, out_dir / f.name)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> TrainTokenizer:
    """The pipeline's loader; remote code only where the tokenizer cannot be read without it."""
    from stages.errors import BuildError
    from stages.tokenizer import load_tokenizer as load
    if not Path(path).exists():
        raise TrainError(f"tokenizer {path}: no such file or directory")
    try:
        return TrainTokenizer(load(path, trust_remote_code=False), path)
    except BuildError as e:
        if not trust_remote_code:
            raise TrainError(f"tokenizer {' '.join(str(e).split())}") from None
        first = e
    try:
        return TrainTokenizer(load(path, trust_remote_code=True), path)
    except BuildError as e:
        raise TrainError(f"tokenizer {' '.join(str(first).split())}; with --trust_remote_code: "
                         f"{' '.join(str(e).split())}") from None
