"""Manifest JSON/YAML in and fault text out: strict parsing (duplicate keys, NaN, overflow,
nesting depth) and JSON Schema violations as ``<json path>: <readable problem>`` pairs. Shared
by the manifest and the lock (mixtures/manifest.py, mixtures/lock.py).

A ``.yaml``/``.yml`` manifest is the same document written in YAML (LLaMA-Factory's users
write YAML): it must parse to what JSON can hold — string keys, strings, numbers, booleans,
null, lists, objects — and is then validated exactly as the JSON one. Parse faults name the
line and column; a repeated key is a fault (PyYAML would keep the last silently); a YAML date
stays the string as written; ``.nan``/``.inf`` are refused as NaN/Infinity are in JSON."""
from __future__ import annotations

import difflib
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from jsonschema import Draft202012Validator

MAX_FLOAT = sys.float_info.max  # JSON numbers past it parse as inf: refused by "maximum"


class ManifestError(ValueError):
    """A manifest fault. ``str()`` is one ``<file>: <json path>: <problem>`` line per fault."""

    def __init__(self, file: str | os.PathLike, problems: list[tuple[str, str]]):
        self.file = str(file)
        self.problems = problems
        self.json_path, self.problem = problems[0]
        super().__init__("\n".join(f"{self.file}: {p}: {what}" for p, what in problems))

    def __reduce__(self):  # survives pickling to and from worker processes
        return (type(self), (self.file, self.problems))


# --------------------------------------------------------------------------- error text

def format_json_path(parts: Iterable[str | int]) -> str:
    """``("datasets", 2, "abs_weight")`` -> ``datasets[2].abs_weight``; the root is ``$``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "$"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def schema_problems(validator: Draft202012Validator, instance: Any) -> list[tuple[str, str]]:
    """All schema violations of ``instance`` as sorted ``(json path, readable problem)`` pairs."""
    found: set[tuple[tuple, str, str]] = set()  # (sort key, path, problem)

    def add(parts: list, problem: str) -> None:
        # Sort by position in the document, so datasets[2] comes before datasets[10].
        key = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in parts)
        found.add((key, format_json_path(parts), problem))

    for err in validator.iter_errors(instance):
        path = list(err.absolute_path)
        # Our own text only where the schema's keyword is about meaning, not type.
        custom = err.schema.get("x-message") if err.validator in ("pattern", "anyOf") else None
        if err.validator == "additionalProperties":
            known = list(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(known)):
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                add(path + [key], f"unknown key{hint}")
        elif err.validator == "required":
            for key in err.validator_value:
                if key not in err.instance:
                    add(path + [key], "missing required key")
        elif custom:
            add(path, f"{custom}; got {json.dumps(err.instance)}")
        elif err.validator == "type":
            wanted = err.validator_value
            wanted = " or ".join(wanted) if isinstance(wanted, list) else wanted
            add(path, f"expected {wanted}, got {_json_type(err.instance)} {json.dumps(err.instance)}")
        elif err.validator == "enum":
            choices = ", ".join(map(str, err.validator_value))
            add(path, f"must be one of {choices}; got {json.dumps(err.instance)}")
        elif err.validator == "minimum":
            add(path, f"must be >= {err.validator_value}; got {err.instance}")
        elif err.validator == "maximum" and err.validator_value == MAX_FLOAT:
            add(path, f"must be a finite number; got {err.instance} (too large for a float)")
        elif err.validator in ("minItems", "minLength"):
            add(path, "must not be empty")
        else:
            add(path, err.message)
    return [(path, problem) for _, path, problem in sorted(found)]


# --------------------------------------------------------------------------- parsing

class _DuplicateKeys(dict):
    """A parsed JSON object that had repeated keys (plain json keeps the last silently)."""

    duplicates: list[str]


def _object_hook(pairs: list[tuple[str, Any]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        dupes = [k for k, _ in pairs if k in seen or seen.add(k)]
        result = _DuplicateKeys(result)
        result.duplicates = sorted(set(dupes))
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _find_duplicate_keys(node: Any, path: list) -> list[tuple[str, str]]:
    found = []
    if isinstance(node, _DuplicateKeys):
        found += [(format_json_path(path + [k]), "key given more than once") for k in node.duplicates]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _find_duplicate_keys(value, path + [key])
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _find_duplicate_keys(value, path + [i])
    return found


MAX_DEPTH = 64  # a manifest nests ~5 levels; deeper is refused before any recursive walk
MAX_NODES = 1_000_000  # YAML aliases can expand a small file into billions of nodes
YAML_SUFFIXES = (".yaml", ".yml")


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(path, [("$", f"not UTF-8 text (byte {e.start})")]) from None


def _too_deep(path: Path) -> ManifestError:
    return ManifestError(path, [("$", f"nested more than {MAX_DEPTH} levels deep; a manifest is a "
                                      "list or object of dataset entries")])


def _check_depth(path: Path, doc: Any) -> None:
    """Iterative (a recursive walk would itself overflow on the documents it must refuse)."""
    stack, seen = [(doc, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise ManifestError(path, [("$", f"more than {MAX_NODES} values (YAML aliases expanding?); "
                                              "a manifest is a list or object of dataset entries")])
        if isinstance(node, (dict, list)):
            if depth > MAX_DEPTH:
                raise _too_deep(path)
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))


def parse_manifest(path: Path, raw: bytes) -> Any:
    """The manifest document: YAML for a .yaml/.yml file, JSON otherwise."""
    doc = _parse_yaml(path, raw) if path.suffix.lower() in YAML_SUFFIXES else _parse_json(path, raw)
    _check_depth(path, doc)
    return doc


def _parse_json(path: Path, raw: bytes) -> Any:
    text = _decode(path, raw)
    try:
        return json.loads(text, object_pairs_hook=_object_hook, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ManifestError(path, [("$", f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}")]) from None
    except RecursionError:
        raise _too_deep(path) from None
    except ValueError as e:  # NaN / Infinity
        raise ManifestError(path, [("$", str(e))]) from None


def _parse_yaml(path: Path, raw: bytes) -> Any:
    import yaml
    text = _decode(path, raw)
    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ManifestError(path, [("$", f"invalid YAML{where}: {what}")]) from None
    except yaml.YAMLError as e:
        raise ManifestError(path, [("$", f"invalid YAML: {' '.join(str(e).split())}")]) from None
    except RecursionError:
        raise _too_deep(path) from None


def _yaml_loader():
    """A SafeLoader that builds only what JSON can hold, each fault with its line."""
    import math

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            self.flatten_mapping(node)
            pairs = []
            for key_node, value_node in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, str):
                    raise yaml.MarkedYAMLError(
                        problem=f"a key must be a string, got {_json_type(key)} {key!r} (quote it)",
                        problem_mark=key_node.start_mark)
                pairs.append((key, self.construct_object(value_node, deep=deep)))
            return _object_hook(pairs)

        def construct_yaml_float(self, node):
            value = super().construct_yaml_float(node)
            if not math.isfinite(value):
                raise yaml.MarkedYAMLError(problem=f"{node.value} is not a finite number",
                                           problem_mark=node.start_mark)
            return value

        def construct_undefined(self, node):
            raise yaml.MarkedYAMLError(problem=f"tag {node.tag} is not allowed in a manifest "
                                               "(only strings, numbers, booleans, null, lists, objects)",
                                       problem_mark=node.start_mark)

    Loader.add_constructor("tag:yaml.org,2002:map", lambda loader, node: loader.construct_mapping(node, True))
    Loader.add_constructor("tag:yaml.org,2002:float", Loader.construct_yaml_float)
    Loader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))
    for tag in ("binary", "set", "omap", "pairs"):
        Loader.add_constructor(f"tag:yaml.org,2002:{tag}", Loader.construct_undefined)
    Loader.add_constructor(None, Loader.construct_undefined)
    return Loader
