"""Vocabularies and constants shared by the build, the manifest, the stream and the trainer.

Each value is defined here once and imported everywhere else (the manifest schema, the
stream's checks and the trainer's loss take them from this module), so a new overflow mode or
template never has to be added in three places. Nothing here imports anything heavy.
"""
from __future__ import annotations

from importlib import resources

IGNORE = -100  # label of a position that does not train (torch's cross-entropy ignore_index)
DEFAULT_SEED = 1234

FORMATS = ("text", "input-output", "alpaca", "sharegpt", "messages", "firefly")  # what an adapter produces from
MANIFEST_FORMATS = ("auto",) + FORMATS
OVERFLOW_MODES = ("segment", "truncate", "drop")
# which turns train: every assistant turn, the last, everything, or one sample per assistant turn
# (each rendered with only its own prefix, as at inference: manifest multi_turn: per_turn)
LOSS_MODES = ("assistant", "last", "all", "per_turn")
# Template variables a record may carry at its top level (a record's `template_kwargs` object may set any)
RECORD_TEMPLATE_VARS = ("reasoning_effort", "enable_thinking", "token_suffix", "thinking", "is_training",
                        "interleaved_thinking", "thinking_budget")
TEMPLATE_SOURCES = ("tokenizer",)  # a template name that is not a file under stages/templates/

# Files that define a tokenizer (and its template): hashed into the cache key, copied with a model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "chat_template.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def builtin_templates() -> list[str]:
    """Names of the templates shipped as stages/templates/*.jinja (a file added there is one)."""
    folder = resources.files("stages") / "templates"
    return sorted(p.name[:-6] for p in folder.iterdir() if p.name.endswith(".jinja"))


def template_names() -> list[str]:
    """Every template name a manifest may give (besides a path to a .jinja file)."""
    from .lf_names import LF_TEMPLATES  # LLaMA-Factory names, resolved per tokenizer (stages/lf_names.py)
    ours = list(TEMPLATE_SOURCES) + builtin_templates()
    return ours + [n for n in LF_TEMPLATES if n not in ours]


DEFAULT_SHARD_TOKENS = 2**30  # a dataset's shard target size in tokens (manifest `shard_tokens`)
