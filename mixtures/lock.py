"""The mixture lock file (DESIGN §5): what training reads, and all it reads.

Weights follow FM9G: ``abs_weight`` is a token share (under the manifest's ``weights:
tokens``, ``abs_weight × the built tokens`` is), so dataset *i* is drawn with
probability ∝ ``abs_weight_i / ave_tokens_per_line_i``; then the expected tokens drawn from
*i* per draw are ∝ ``abs_weight_i``. Unlike FM9G (a declared or EMA-estimated mean), the
mean here is the exact one of the built data (``n_tokens / nlines`` from meta.json).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from stages.fsutil import atomic_write_bytes
from stages.markup import template_markup_warnings

from .manifest import DatasetSpec, Mixture, format_json_path, schema_problems

SCHEMA_VERSION = 1
MISMATCH_TOLERANCE = 0.05  # relative; declared manifest statistics vs built ones


class LockError(ValueError):
    """A lock that cannot be made or read. ``str()`` names the file or dataset at fault."""


# The part of meta.json the lock is made from.
_META_SCHEMA = Draft202012Validator({
    "type": "object",
    "properties": {
        "key": {"type": "string", "minLength": 1},
        "nlines": {"type": "integer", "minimum": 0},
        "n_tokens": {"type": "integer", "minimum": 0},
        "tokenizer": {
            "type": "object",
            "properties": {"sha256": {"type": "string"}},
            "required": ["sha256"],
        },
    },
    "required": ["key", "nlines", "n_tokens", "tokenizer"],
})

_LOCK_DATASET = {
    "type": "object",
    "properties": {
        "dataset_name": {"type": "string", "minLength": 1},
        "task_name": {"type": "string"},
        "abs_weight": {"type": "number", "minimum": 0},
        "token_share": {"type": "number", "minimum": 0, "maximum": 1},
        "sample_probability": {"type": "number", "minimum": 0, "maximum": 1},
        "path": {"type": "string", "minLength": 1},
        "key": {"type": "string", "minLength": 1},
        "allow_repeat": {"type": "boolean"},
        "nlines": {"type": "integer", "minimum": 0},
        "n_tokens": {"type": "integer", "minimum": 0},
        "ave_tokens_per_line": {"type": "number", "minimum": 0},
        "total_tokens": {"type": "number", "minimum": 0},
    },
    "required": ["dataset_name", "task_name", "abs_weight", "token_share", "sample_probability",
                 "path", "key", "allow_repeat", "nlines", "ave_tokens_per_line", "total_tokens"],
}

_LOCK_SCHEMA = Draft202012Validator({
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "manifest_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "seed": {"type": "integer"},
        "max_length": {"type": "integer", "minimum": 1},
        "tokenizer": {"type": "object"},
        "datasets": {"type": "array", "items": _LOCK_DATASET, "minItems": 1},
    },
    "required": ["schema_version", "manifest_sha256", "seed", "max_length", "tokenizer", "datasets"],
})


def make_lock(mixture: Mixture, built: list[tuple[DatasetSpec, str, dict]]) -> tuple[dict, list[str]]:
    """The lock for ``mixture`` from its built datasets (manifest order), and the warnings
    (declared statistics off by more than 5%, datasets with no samples)."""
    if [spec.dataset_name for spec, _, _ in built] != [d.dataset_name for d in mixture.datasets]:
        raise LockError("built datasets do not match the manifest's datasets (names or order)")
    warnings: list[str] = []
    tokenizer = None
    for spec, built_dir, meta in built:
        problems = schema_problems(_META_SCHEMA, meta)
        if problems:
            raise LockError("\n".join(f"{built_dir}/meta.json: {p}: {what}" for p, what in problems))
        if tokenizer is None:
            tokenizer = dict(meta["tokenizer"])
        elif meta["tokenizer"]["sha256"] != tokenizer["sha256"]:
            raise LockError(
                f"dataset {spec.dataset_name!r} was built with tokenizer sha256 "
                f"{meta['tokenizer']['sha256']}, but {built[0][0].dataset_name!r} with "
                f"{tokenizer['sha256']}; a mixture needs one tokenizer")

    weights = [spec.abs_weight for spec, _, _ in built]
    if mixture.weights == "tokens":  # share ∝ abs_weight × the dataset's built tokens
        weights = [w * m["n_tokens"] for w, (_, _, m) in zip(weights, built)]
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise LockError(f"abs_weight must be finite and >= 0, got {weights}")
    # Weights near the float limit (1e308 + 1e308 = inf) are scaled by the largest first;
    # other weights are used as given, so ordinary locks keep their exact bytes.
    scaled = weights
    min_ave = _min_ave(built)
    if not (math.isfinite(sum(weights)) and math.isfinite(sum(w / min_ave for w in weights))):
        top = max(weights)
        scaled = [w / top for w in weights]
    total_weight = sum(scaled)
    entries, draw_weights = [], []
    for (spec, built_dir, meta), weight in zip(built, scaled):
        # Samples, not source records: `segment` can split a record into several samples, and
        # the draw probability needs the mean length of what is drawn.
        nlines, n_tokens = meta.get("n_samples", meta["nlines"]), meta["n_tokens"]
        ave = n_tokens / nlines if nlines else 0.0
        total = n_tokens / 1e9
        warnings += _declared_mismatches(spec, nlines, ave, total)
        warnings += template_markup_warnings(spec.dataset_name, meta, mixture.template)  # stages/markup.py
        if nlines == 0 or n_tokens == 0:
            warnings.append(f"dataset {spec.dataset_name!r}: the built data has no tokens; "
                            "it is never drawn (sample_probability 0)")
            draw_weights.append(0.0)
        else:
            draw_weights.append(weight / ave)
        entries.append({
            "dataset_name": spec.dataset_name,
            "task_name": spec.task_name,
            "abs_weight": spec.abs_weight,  # as the manifest gives it; token_share says the share
            "token_share": weight / total_weight if total_weight else 0.0,
            "path": os.path.abspath(built_dir),
            "key": meta["key"],
            "allow_repeat": spec.allow_repeat,
            "nlines": nlines,
            "n_tokens": n_tokens,
            "ave_tokens_per_line": ave,
            "total_tokens": total,
        })

    norm = sum(draw_weights)
    if norm <= 0:
        raise LockError("no dataset with a positive abs_weight has any built samples; nothing to train on")
    for entry, w in zip(entries, draw_weights):
        entry["sample_probability"] = w / norm

    lock = {
        "schema_version": SCHEMA_VERSION,
        "manifest_sha256": mixture.manifest_sha256,
        "seed": mixture.seed,
        "max_length": mixture.max_length,
        "tokenizer": tokenizer,
        "datasets": entries,
    }
    bad = [(d["dataset_name"], k) for d in entries for k, v in d.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # orjson would write null
        raise LockError(f"dataset {bad[0][0]!r}: {bad[0][1]} is not a finite number")
    return lock, warnings


def _min_ave(built) -> float:
    """The smallest mean sample length (> 0): the divisor that makes draw weights largest."""
    aves = [m["n_tokens"] / m.get("n_samples", m["nlines"]) for _, _, m in built
            if m.get("n_samples", m["nlines"]) and m["n_tokens"]]
    return min(aves, default=1.0)


def _declared_mismatches(spec: DatasetSpec, nlines: int, ave: float, total: float) -> list[str]:
    out = []
    for key, declared, actual in (
        ("nlines", spec.declared_nlines, float(nlines)),
        ("ave_tokens_per_line", spec.declared_ave_tokens_per_line, ave),
        ("total_tokens", spec.declared_total_tokens, total),
    ):
        if declared is None or abs(declared - actual) <= MISMATCH_TOLERANCE * abs(actual):
            continue
        ratio = f" ({actual / declared:.3g}× the declared value)" if declared else ""
        unit = " (billions)" if key == "total_tokens" else ""
        out.append(f"dataset {spec.dataset_name!r}: the manifest declares {key} = {declared:g}{unit} "
                   f"but the built data has {actual:.6g}{ratio}; the built value is used")
    return out


def write_lock(lock: dict, path: str | os.PathLike) -> None:
    """Write the lock atomically (stages/fsutil): 2-space indent, sorted keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = orjson.dumps(lock, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE)
    atomic_write_bytes(path, data, fsync=True)


@dataclass(frozen=True)
class LockEntry:
    """One dataset of a lock, as the schema above defines it (every field required but
    `n_tokens`, which locks written before it existed lack)."""
    dataset_name: str
    task_name: str
    abs_weight: float
    token_share: float
    sample_probability: float
    path: str
    key: str
    allow_repeat: bool
    nlines: int
    ave_tokens_per_line: float
    total_tokens: float
    n_tokens: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "LockEntry":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class Lock:
    """A validated mixture lock: read once (`load_lock`) and handed on. `raw` is the dict as
    read, for the readers that hash or copy it byte for byte."""
    path: Path
    manifest_sha256: str
    seed: int
    max_length: int
    tokenizer: dict
    datasets: tuple[LockEntry, ...]
    raw: dict

    def entry(self, dataset_name: str) -> LockEntry:
        for e in self.datasets:
            if e.dataset_name == dataset_name:
                return e
        names = ", ".join(e.dataset_name for e in self.datasets)
        raise LockError(f"{self.path}: no dataset {dataset_name!r} (it has: {names})")


def load_lock(path: str | os.PathLike) -> Lock:
    """Read and validate a lock file (`read_lock`) into a typed `Lock`."""
    raw = read_lock(path)
    return Lock(path=Path(path), manifest_sha256=raw["manifest_sha256"], seed=raw["seed"],
                max_length=raw["max_length"], tokenizer=raw["tokenizer"],
                datasets=tuple(LockEntry.from_dict(d) for d in raw["datasets"]), raw=raw)


def lock_content_sha256(lock: dict) -> str:
    """The lock's identity (a resume refuses another lock by it): sha256 of the lock's canonical JSON without its paths (built dirs are content-addressed
    by `key`, so moving the cache does not change the content)."""
    c = copy.deepcopy(lock)
    for ds in c.get("datasets", []):
        ds.pop("path", None)
    if isinstance(c.get("tokenizer"), dict):
        c["tokenizer"].pop("path", None)
    blob = json.dumps(c, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def read_lock(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a lock file; LockError names the file and JSON path at fault."""
    path = Path(path)
    try:
        lock = orjson.loads(path.read_bytes())
    except OSError as e:
        raise LockError(f"{path}: cannot read lock file: {e.strerror or e}") from None
    except orjson.JSONDecodeError as e:
        raise LockError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(lock, dict) and lock.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise LockError(f"{path}: schema_version: this tokenmill reads lock schema_version "
                        f"{SCHEMA_VERSION}, got {lock['schema_version']!r}; rebuild the lock")
    problems = schema_problems(_LOCK_SCHEMA, lock)
    if not problems:
        total = sum(d["sample_probability"] for d in lock["datasets"])
        if abs(total - 1.0) > 1e-6:
            problems.append((format_json_path(["datasets"]), f"sample_probability sums to {total}, not 1"))
    if problems:
        raise LockError("\n".join(f"{path}: {p}: {what}" for p, what in problems))
    return lock
