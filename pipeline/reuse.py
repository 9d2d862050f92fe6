"""What the driver needs to compute cache keys, without loading the tokenizer.

A fully reused build (or a `plan` of built datasets) needs only the tokenizer's content hash
and the template's sha256 to find its dirs. Loading a Hugging Face tokenizer imports
transformers (~1 s); so the tokenizer is a `LazyTokenizer` (hash now, load on first real use)
and the template's sha256 is memoised in the cache dir, keyed on everything that decides it
(the tokenizer's hash, the template name, a .jinja file's bytes). A build that has work to do
loads both for real and checks the memo agreed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from stages.fsutil import atomic_write_bytes
from stages.tokenizer import load_tokenizer, tokenizer_sha256

MEMO = ".templates.json"


class LazyTokenizer:
    """`path` and `sha256` at once; anything else loads the tokenizer (once)."""

    def __init__(self, path: str, trust_remote_code: bool):
        from stages.errors import BuildError
        if not os.path.exists(path):
            raise BuildError(f"{path}: tokenizer not found")
        self.path, self.trust_remote_code = str(path), bool(trust_remote_code)
        self.sha256 = tokenizer_sha256(self.path)
        self._real = None

    @property
    def real(self):
        if self._real is None:
            self._real = load_tokenizer(self.path, trust_remote_code=self.trust_remote_code)
        return self._real

    @property
    def loaded(self) -> bool:
        return self._real is not None

    def __getattr__(self, name):  # only for attributes not set above
        return getattr(self.real, name)


@dataclass(frozen=True)
class TemplateStub:
    """name + sha256 of a template resolved by an earlier build (all a cache key needs)."""
    name: str
    sha256: str


def _memo_key(template: str, tok: LazyTokenizer) -> str:
    parts = [tok.sha256, template, tok.trust_remote_code]
    p = Path(template)
    if template.endswith(".jinja") and p.is_file():
        parts.append(hashlib.sha256(p.read_bytes()).hexdigest())
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _read(cache_dir: Path) -> dict:
    try:
        data = json.loads((cache_dir / MEMO).read_bytes())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def memoised_template(cache_dir: Path, template: str, tok: LazyTokenizer) -> TemplateStub | None:
    hit = _read(cache_dir).get(_memo_key(template, tok))
    if isinstance(hit, list) and len(hit) == 2 and all(isinstance(x, str) for x in hit):
        return TemplateStub(*hit)
    return None


def remember_template(cache_dir: Path, template: str, tok: LazyTokenizer, resolved) -> None:
    """Best effort: a read-only cache just keeps loading the tokenizer."""
    data = _read(cache_dir)
    key = _memo_key(template, tok)
    if data.get(key) == [resolved.name, resolved.sha256]:
        return
    data[key] = [resolved.name, resolved.sha256]
    try:
        atomic_write_bytes(cache_dir / MEMO, json.dumps(data, sort_keys=True).encode())
    except OSError:
        pass


def resolve(cache_dir: Path, template: str, tok: LazyTokenizer, *, real: bool):
    """The template for keys: the memoised stub when one is known and `real` is not asked,
    else resolved with the loaded tokenizer (and remembered)."""
    if not real:
        stub = memoised_template(cache_dir, template, tok)
        if stub is not None:
            return stub
    from stages.render import resolve_template
    tmpl = resolve_template(template, tok.real)
    remember_template(cache_dir, template, tok, tmpl)
    return tmpl
