"""Mixture manifests (DESIGN §3): parse and validate both accepted forms.

* FM9G list form — a JSON list of dataset entries, accepted verbatim as the FM9G README
  writes it (``weight``, ``oversize_rule``, ``incontext_weight``, ``do_compact``, ``is_long``
  and the ``ave_tokens`` aliases included). Tokenizer, template, max length and seed come
  from the keyword arguments (the command line). Its entries may also use the object
  form's ``format``, ``language`` and ``overflow``. ``task_name`` is required (as in FM9G)
  but need not be unique: datasets are keyed by ``dataset_name``. ``abs_weight`` is
  required, so FM9G's ``weight`` fallback never applies and ``weight`` is ignored, as are
  ``is_long`` and ``do_compact`` (the latter with a warning when true).
* Object form — ``{"tokenizer", "template", "max_length", "seed", "trust_remote_code",
  "datasets": [...]}``; ``task_name`` defaults to ``dataset_name``. ``trust_remote_code: true``
  lets transformers run a loader shipped in the tokenizer dir (its ``auto_map``); it does not
  change tokens, so it is not part of any cache key.

Shape and types are checked by JSON Schema (Draft 2020-12); only what a schema cannot say
(files exist, names unique, not every weight zero, alias conflicts) is checked by hand.
Every problem is reported as ``<manifest file>: <json path>: <what is wrong>``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from stages import constants
from stages.columns import COLUMN_KEYS, TAG_KEYS, DatasetFormat, mapping_problems
from stages.fm9g_index import index_language
from stages.constants import DEFAULT_SEED, DEFAULT_SHARD_TOKENS, LOSS_MODES, OVERFLOW_MODES

from .manifest_io import (MAX_FLOAT, ManifestError, _find_duplicate_keys, _json_type, _parse_json,  # noqa: F401
                          format_json_path, parse_manifest, schema_problems)
from .registry import RegistryError, mapped_base_format, registry_entry

FORMATS = constants.MANIFEST_FORMATS
OVERFLOWS = OVERFLOW_MODES
TEXT_UNITS = ("line", "paragraph")  # txt sources: one document per line, or per blank-line paragraph
# FM9G's oversize_rule values; "head" is FM9G's name for truncation.
OVERSIZE_RULES = {"segment": "segment", "head": "truncate", "truncate": "truncate", "drop": "drop"}
# Spellings of the declared mean tokens per line seen in FM9G mixtures and forks.
AVE_TOKENS_KEYS = ("ave_tokens_per_line", "avg_tokens_per_line", "ave_tokens", "avg_tokens")

DEFAULT_TEMPLATE = "tokenizer"
# The FM9G list form's input/output strings are already the training text (FM9G trains
# tok(input) + tok(output)): no chat template unless --template names one.
DEFAULT_FM9G_TEMPLATE = "none"
DEFAULT_MAX_LENGTH = 4096
FORMATTINGS = ("alpaca", "sharegpt")  # LLaMA-Factory's `formatting` values
# How abs_weight becomes a token share: as given (FM9G), or times each dataset's built tokens
# (`tokens`: abs_weight 1 everywhere = the natural proportion, as if the sources were concatenated).
WEIGHTINGS = ("abs_weight", "tokens")


def default_overflow(base_format: str) -> str:
    """The overflow policy of a dataset whose manifest gives none: `segment` for plain text
    (a long document is split into max_length pieces, all kept), `truncate` for every chat
    format (an over-long SFT record keeps its prompt and the head of its response, as
    LLaMA-Factory's cutoff_len and HF truncation do; a tail piece without its prompt would
    train on a response to nothing)."""
    return "segment" if base_format == "text" else "truncate"


@dataclass(frozen=True)
class DatasetSpec:
    dataset_name: str
    task_name: str
    abs_weight: float
    path: str  # absolute; may be a file, a dir (FM9G index dir or a folder of sources) or a glob
    format: DatasetFormat = DatasetFormat("auto")  # base "auto": detected at build time
    language: str | None = None
    transforms: str | None = None  # absolute path of the transform script
    allow_repeat: bool = True
    overflow: str | None = None  # None: by format (`default_overflow`), decided once it is known
    incontext_weight: tuple[float, ...] = (1.0,)  # num_sample is drawn with these weights
    declared_nlines: float | None = None
    declared_ave_tokens_per_line: float | None = None
    declared_total_tokens: float | None = None  # billions
    loss: str = "assistant"
    template_kwargs: str | None = None  # the dataset's template switches, JSON (sorted keys)
    text_unit: str = "line"
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # shard target size in tokens


@dataclass(frozen=True)
class Mixture:
    manifest_path: str
    manifest_sha256: str
    form: str  # "fm9g" | "object"
    tokenizer: str | None
    template: str  # a name from TEMPLATES or the absolute path of a .jinja file
    max_length: int
    seed: int
    datasets: tuple[DatasetSpec, ...]
    trust_remote_code: bool = False  # run the tokenizer dir's own loader (auto_map)
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # the top-level / --shard-tokens value
    weights: str = "abs_weight"  # WEIGHTINGS: token share ∝ abs_weight, or ∝ abs_weight × built tokens
    notes: tuple[str, ...] = ()  # things ignored on purpose (LLaMA-Factory `ranking`, ...): show them


# --------------------------------------------------------------------------- schemas
# "x-message" is our own annotation: the text shown when that subschema fails.

_NULLABLE_STRING = {"type": ["string", "null"]}
_COUNT = {"type": ["number", "null"], "minimum": 0, "maximum": MAX_FLOAT}
_WEIGHT = {"type": "number", "minimum": 0, "maximum": MAX_FLOAT}
_SHARD_TOKENS = {"type": "integer", "minimum": 1}
_AVE_TOKENS = {
    "anyOf": [{"type": "null"}, {"type": "number", "minimum": 0, "maximum": MAX_FLOAT}, {"const": -1}],
    "x-message": "must be a number >= 0 (or -1, FM9G's 'use max_length')",
}

_DATASET_PROPERTIES: dict[str, Any] = {
    "dataset_name": {
        "type": "string",
        # It names the output folder: no separators, not empty, no leading dot (so no "..").
        "pattern": r"^(?!\.)[^/\\\x00]+$",
        "x-message": "must be a plain folder name: not empty, no '/', '\\' or NUL, "
        "and not starting with '.'",
    },
    "task_name": {"type": "string", "minLength": 1},
    "abs_weight": _WEIGHT,
    "path": {"type": "string", "minLength": 1},
    "format": {"enum": list(FORMATS)},
    # LLaMA-Factory's column mapping vocabulary (stages/columns.py) and registry source.
    "formatting": {"enum": list(FORMATTINGS)},
    "columns": {"type": "object", "properties": {k: {"type": "string", "minLength": 1} for k in COLUMN_KEYS},
                "additionalProperties": False},
    "tags": {"type": "object", "properties": {k: {"type": "string", "minLength": 1} for k in TAG_KEYS},
             "additionalProperties": False},
    "dataset_info": {"type": "string", "minLength": 1},
    "dataset": {"type": "string", "minLength": 1},
    "dataset_dir": {"type": "string", "minLength": 1},
    "shard_tokens": _SHARD_TOKENS,
    "language": _NULLABLE_STRING,
    "transforms": _NULLABLE_STRING,
    "allow_repeat": {"type": "boolean"},
    "overflow": {"enum": list(OVERFLOWS)},
    "loss": {"enum": list(LOSS_MODES)},
    "multi_turn": {"enum": ["final", "last", "per_turn"]},
    "template_kwargs": {"type": "object"},
    "text_unit": {"enum": list(TEXT_UNITS)},
    "incontext_weight": {
        "type": "array",
        "items": _WEIGHT,
        "minItems": 1,
    },
    "nlines": _COUNT,
    "total_tokens": _COUNT,
    **{key: _AVE_TOKENS for key in AVE_TOKENS_KEYS},
}

_OBJECT_DATASET = {
    "type": "object",
    "properties": _DATASET_PROPERTIES,
    "required": ["abs_weight"],  # dataset_name and path (or dataset_info + dataset): checked by hand
    "additionalProperties": False,
}

# FM9G entries: our keys plus FM9G's own (weight, oversize_rule, do_compact, is_long), and
# task_name is required as in FM9G.
_FM9G_DATASET = {
    "type": "object",
    "properties": {
        **_DATASET_PROPERTIES,
        "weight": _WEIGHT,
        "oversize_rule": {"enum": list(OVERSIZE_RULES)},
        "do_compact": {"type": "boolean"},
        "is_long": {"type": "boolean"},
    },
    "required": ["dataset_name", "task_name", "abs_weight"],
    "additionalProperties": False,
}

def _settings_properties(templates: tuple[str, ...]) -> dict[str, Any]:
    return {
        "tokenizer": {"type": "string", "minLength": 1},
        "template": {
            "anyOf": [{"enum": list(templates)}, {"type": "string", "pattern": r"\.jinja$"}],
            "x-message": f"must be one of {', '.join(templates)} or the path of a .jinja file",
        },
        "max_length": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer", "minimum": 0},
        "trust_remote_code": {"type": "boolean"},
        "shard_tokens": _SHARD_TOKENS,
        "weights": {"enum": list(WEIGHTINGS)},
    }


@lru_cache(maxsize=4)
def _validators(templates: tuple[str, ...]) -> dict[str, Draft202012Validator]:
    """The three schemas for a set of template names (stages.constants.template_names(): a
    .jinja added to stages/templates/ is a template name as soon as it is there)."""
    settings = _settings_properties(templates)
    schemas = {
        "fm9g": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "array",
                 "items": _FM9G_DATASET, "minItems": 1},
        "object": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                   "properties": {**settings,
                                  "datasets": {"type": "array", "items": _OBJECT_DATASET, "minItems": 1}},
                   "required": ["datasets"], "additionalProperties": False},
        # Keyword overrides (command-line flags) are checked with the same rules as the manifest.
        "settings": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                     "properties": settings},
    }
    out = {}
    for name, schema in schemas.items():
        Draft202012Validator.check_schema(schema)
        out[name] = Draft202012Validator(schema)
    return out


def _resolve(base: Path, value: str) -> str:
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def load_manifest(
    path: str | os.PathLike,
    *,
    tokenizer: str | None = None,
    template: str | None = None,
    max_length: int | None = None,
    seed: int | None = None,
    trust_remote_code: bool | None = None,
    shard_tokens: int | None = None,
) -> Mixture:
    """Read, validate and resolve a mixture manifest.

    Keyword arguments override the manifest's settings (and supply them for the FM9G list
    form, which has none); their relative paths are taken from the current directory, the
    manifest's from its folder. ``shard_tokens`` (``--shard-tokens``) replaces the top-level
    value; a dataset's own ``shard_tokens`` wins over both. Raises ManifestError listing every
    fault found.
    """
    manifest = Path(path).absolute()
    try:
        raw = manifest.read_bytes()
    except OSError as e:
        raise ManifestError(manifest, [("$", f"cannot read manifest: {e.strerror or e}")]) from None
    doc = parse_manifest(manifest, raw)  # JSON, or YAML for .yaml/.yml
    base = manifest.parent

    if isinstance(doc, list):
        form, entries, settings, prefix = "fm9g", doc, {}, []
    elif isinstance(doc, dict):
        form, entries, settings, prefix = "object", doc.get("datasets"), doc, ["datasets"]
    else:
        raise ManifestError(manifest, [("$", f"expected a JSON list (FM9G form) or object, got {_json_type(doc)}")])

    templates = tuple(constants.template_names())
    validators = _validators(templates)
    problems = _find_duplicate_keys(doc, []) + schema_problems(validators[form], doc)
    if problems:
        raise ManifestError(manifest, problems)

    # Settings: manifest values (relative to its folder), then overrides (relative to cwd).
    overrides = {k: v for k, v in (("tokenizer", tokenizer), ("template", template),
                                   ("max_length", max_length), ("seed", seed),
                                   ("trust_remote_code", trust_remote_code),
                                   ("shard_tokens", shard_tokens)) if v is not None}
    bad = schema_problems(validators["settings"], overrides)
    if bad:
        raise ManifestError(manifest, [(f"{p} (override)", what) for p, what in bad])
    cwd = Path.cwd()
    tok = _resolve(cwd, tokenizer) if tokenizer is not None else (
        _resolve(base, settings["tokenizer"]) if "tokenizer" in settings else None)
    tmpl = template if template is not None else settings.get(
        "template", DEFAULT_FM9G_TEMPLATE if form == "fm9g" else DEFAULT_TEMPLATE)
    tmpl_base = cwd if template is not None else base
    if tmpl not in templates:
        tmpl = _resolve(tmpl_base, tmpl)
        if not os.path.isfile(tmpl):
            problems.append(("template", f"template file not found: {tmpl}"))
    if tok is None:
        problems.append(("tokenizer", "no tokenizer given (the FM9G list form needs --tokenizer)"))
    elif not os.path.exists(tok):
        problems.append(("tokenizer", f"no such file or directory: {tok}"))

    top_shard_tokens = shard_tokens if shard_tokens is not None else settings.get(
        "shard_tokens", DEFAULT_SHARD_TOKENS)
    datasets, seen_names, notes = [], {}, []
    for i, entry in enumerate(entries):
        at = prefix + [i]
        spec, entry_problems, entry_notes = _dataset_spec(entry, manifest, at, top_shard_tokens)
        problems += entry_problems
        notes += entry_notes
        if spec is None:
            continue
        first = seen_names.setdefault(spec.dataset_name, i)
        if first != i:
            problems.append((format_json_path(at + ["dataset_name"]),
                             f"duplicate dataset_name {spec.dataset_name!r} (first used at "
                             f"{format_json_path(prefix + [first])})"))
        datasets.append(spec)
    if datasets and not any(spec.abs_weight > 0 for spec in datasets):
        problems.append((format_json_path(prefix) + "[*].abs_weight" if prefix else "[*].abs_weight",
                         "every abs_weight is 0; at least one dataset needs a positive weight"))
    if problems:
        raise ManifestError(manifest, problems)

    return Mixture(
        manifest_path=str(manifest),
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        form=form,
        tokenizer=tok,
        template=tmpl,
        max_length=max_length if max_length is not None else settings.get("max_length", DEFAULT_MAX_LENGTH),
        seed=seed if seed is not None else settings.get("seed", DEFAULT_SEED),
        datasets=tuple(datasets),
        trust_remote_code=(trust_remote_code if trust_remote_code is not None
                           else settings.get("trust_remote_code", False)),
        shard_tokens=top_shard_tokens,
        weights=settings.get("weights", "abs_weight"),
        notes=tuple(notes),
    )


def _dataset_spec(entry: dict, manifest: Path, at: list, shard_tokens: int,
                  ) -> tuple[DatasetSpec | None, list[tuple[str, str]], list[str]]:
    """Build one DatasetSpec from a schema-valid entry; return it (None when it cannot be
    made) with the file/alias faults and the notes (things ignored on purpose)."""
    problems, notes, base = [], [], manifest.parent
    where = lambda key: format_json_path(at + [key])  # noqa: E731

    source = _source(entry, manifest, at, problems, notes)
    if source is None:
        return None, problems, notes
    data_path, registry = source
    name = entry.get("dataset_name", entry.get("dataset"))
    if "dataset_name" not in entry and (name.startswith(".") or any(c in name for c in "/\\\x00")):
        problems.append((where("dataset_name"), f"registry name {name!r} is not a plain folder name: "
                         "give dataset_name"))

    transforms = entry.get("transforms")
    if transforms in (None, ""):  # FM9G: an empty or null transforms means none
        transforms = None
    else:
        transforms = _resolve(base, transforms)
        if not os.path.isfile(transforms):
            problems.append((where("transforms"), f"transform script not found: {transforms}"))

    if not any(w > 0 for w in entry.get("incontext_weight", [1.0])):
        problems.append((where("incontext_weight"), "needs at least one weight > 0"))

    ave_keys = [k for k in AVE_TOKENS_KEYS if k in entry]
    if len(ave_keys) > 1:
        problems.append((where(ave_keys[1]), f"give only one of {', '.join(ave_keys)}"))
    ave = entry[ave_keys[0]] if ave_keys else None
    if ave == -1:  # FM9G: "-1 means max_length", i.e. no declaration to check against
        ave = None

    overflow = entry.get("overflow")  # None: by format, see default_overflow
    if "oversize_rule" in entry:
        if "overflow" in entry:
            problems.append((where("oversize_rule"), "give only one of overflow, oversize_rule"))
        overflow = OVERSIZE_RULES[entry["oversize_rule"]]
    if entry.get("do_compact"):
        warnings.warn(f"{manifest}: {where('do_compact')}: do_compact is not supported and is ignored", stacklevel=3)

    spec = DatasetSpec(
        dataset_name=name,
        task_name=entry.get("task_name", name),
        abs_weight=float(entry["abs_weight"]),
        path=data_path,
        format=_format(entry, registry, data_path, at, problems),
        # the manifest's word, else what an FM9G index dir's own meta.json says
        language=entry["language"] if "language" in entry else index_language(data_path),
        transforms=transforms,
        allow_repeat=entry.get("allow_repeat", True),
        overflow=overflow,
        incontext_weight=tuple(float(w) for w in entry.get("incontext_weight", [1.0])),
        declared_nlines=_opt_float(entry.get("nlines")),
        declared_ave_tokens_per_line=_opt_float(ave),
        declared_total_tokens=_opt_float(entry.get("total_tokens")),
        # multi_turn (final by default): last = loss last, per_turn = loss per_turn
        loss=entry["multi_turn"] if entry.get("multi_turn") in ("last", "per_turn")
        and entry.get("loss", "assistant") == "assistant" else entry.get("loss", "assistant"),
        template_kwargs=json.dumps(entry["template_kwargs"], sort_keys=True)
        if entry.get("template_kwargs") else None,
        text_unit=entry.get("text_unit", "line"),
        shard_tokens=entry.get("shard_tokens", shard_tokens),
    )
    for note in notes:
        warnings.warn(note, stacklevel=3)
    return spec, problems, notes


def _source(entry: dict, manifest: Path, at: list, problems: list, notes: list):
    """(absolute data path, registry entry or None) of a dataset entry: its ``path``, or the
    LLaMA-Factory registry entry it names (``dataset_info`` + ``dataset``). None on a fault."""
    where = lambda key: format_json_path(at + [key])  # noqa: E731
    base = manifest.parent
    if "dataset_info" in entry or "dataset" in entry:
        for key, other in (("dataset_info", "dataset"), ("dataset", "dataset_info")):
            if key not in entry:
                problems.append((where(key), f"missing required key (given with {other})"))
                return None
        if "path" in entry:
            problems.append((where("path"), "give either path or dataset_info + dataset, not both"))
            return None
        ddir = _resolve(base, entry["dataset_dir"]) if "dataset_dir" in entry else None
        try:
            reg = registry_entry(_resolve(base, entry["dataset_info"]), entry["dataset"], ddir)
        except RegistryError as e:
            problems.append((where("dataset"), str(e)))
            return None
        notes.extend(reg.notes)
        return reg.path, reg
    if "dataset_dir" in entry:
        problems.append((where("dataset_dir"), "only used with dataset_info + dataset"))
    if "dataset_name" not in entry:
        problems.append((where("dataset_name"), "missing required key"))
    if "path" not in entry:
        problems.append((where("path"), "missing required key (or give dataset_info + dataset)"))
        return None
    data_path = _resolve(base, entry["path"])
    if os.path.exists(data_path):
        pass  # a file or folder (possibly with glob characters in its name)
    elif _has_glob(data_path):
        if not glob.glob(data_path, recursive=True):
            problems.append((where("path"), f"glob matches no file: {data_path}"))
    else:
        problems.append((where("path"), f"no such file or directory: {data_path}"))
    if "dataset_name" not in entry:
        return None
    return data_path, None


def _format(entry: dict, registry, data_path: str, at: list, problems: list) -> DatasetFormat:
    """The dataset's format: its base format and column mapping (stages/columns.py). The
    manifest's formatting/columns/tags replace the registry's."""
    formatting = entry.get("formatting", registry.formatting if registry else None)
    columns = entry.get("columns", registry.columns if registry else {})
    tags = entry.get("tags", registry.tags if registry else {})
    where = lambda key: format_json_path(at + [key])  # noqa: E731
    fmt = entry.get("format", "auto")
    if fmt == "auto":
        fmt = mapped_base_format(formatting, columns, tags, data_path, registry is not None)
    elif formatting and formatting != fmt:
        problems.append((where("formatting"), f"formatting {formatting!r} contradicts format {fmt!r}"))
    if (columns or tags) and fmt == "auto":
        fmt = "alpaca"
    for key, problem in mapping_problems(fmt, columns, tags) if (columns or tags) else []:
        problems.append((format_json_path(at + key.split(".")), problem))
    return DatasetFormat.of(fmt, columns, tags)


def _opt_float(value: float | None) -> float | None:
    return None if value is None else float(value)
