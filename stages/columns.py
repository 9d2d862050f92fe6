"""Column mappings: a dataset's own keys → the keys a format adapter reads (issue 15).

The vocabulary is LLaMA-Factory's `dataset_info.json` one, so a registry entry is taken as
it is written:

* ``columns``: ``prompt``, ``query``, ``response``, ``history``, ``messages``, ``system``,
  ``tools`` — each names the file's key holding that part of the record;
* ``tags`` (sharegpt only): ``role_tag``, ``content_tag`` (the keys of one turn) and
  ``user_tag``, ``assistant_tag``, ``observation_tag``, ``function_tag``, ``system_tag``
  (the role values).

The mapping is one step applied to each raw record before the adapter; it renames, it never
reshapes. It travels in the dataset's ``DatasetFormat`` (base + columns + tags, as
LLaMA-Factory's DatasetAttr); its ``str()`` is what the cache key and meta.json ``build.format``
hold, and ``ADAPTERS[format]`` applies the mapping before the base adapter. A mapped key missing from a record is a ``missing_field`` naming the file's own key,
and the adapter's own errors are renamed back to the file's keys too.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .errors import RecordError

COLUMN_KEYS = ("prompt", "query", "response", "history", "messages", "system", "tools")
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag",
            "function_tag", "system_tag")
# LLaMA-Factory's defaults for the tags of a sharegpt file.
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
# The sharegpt adapter's own role names for each role tag.
_TAG_ROLES = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
              "function_tag": "function_call", "system_tag": "system"}

# For each base format: column name → the key its adapter reads.
CANONICAL_KEYS: dict[str, dict[str, str]] = {
    "text": {"prompt": "text"},
    "input-output": {"prompt": "input", "response": "output"},
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system", "tools": "tools"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "messages": {"messages": "messages", "tools": "tools"},
    "firefly": {"messages": "conversation", "system": "system"},
}
# Columns a record must have when the mapping names them (the rest may be absent).
REQUIRED = {"text": {"prompt"}, "input-output": {"response"}, "alpaca": {"prompt", "response"},
            "sharegpt": {"messages"}, "messages": {"messages"}, "firefly": {"messages"}}


def mapping_problems(base: str, columns: dict | None, tags: dict | None) -> list[tuple[str, str]]:
    """(key, problem) for columns/tags that the format `base` cannot use (the schema checked names/types)."""
    out = []
    allowed = CANONICAL_KEYS.get(base)
    if allowed is None:
        return [("columns", f"format {base!r} takes no column mapping")]
    for col in columns or {}:
        if col not in allowed:
            out.append((f"columns.{col}", f"format {base} has no {col!r} column (it takes "
                                         f"{', '.join(allowed)})"))
    seen: dict[str, str] = {}
    for col, key in (columns or {}).items():
        if key in seen:
            out.append((f"columns.{col}", f"file key {key!r} is already mapped to {seen[key]!r}"))
        seen.setdefault(key, col)
    if tags and base != "sharegpt":
        out.append(("tags", f"tags apply to sharegpt only (format is {base})"))
    elif tags:
        roles = {k: v for k, v in {**DEFAULT_TAGS, **tags}.items() if k in _TAG_ROLES}
        values = list(roles.values())
        for k, v in roles.items():
            if values.count(v) > 1:
                out.append((f"tags.{k}", f"role value {v!r} is given to more than one tag"))
                break
    return out


@dataclass(frozen=True, eq=False)
class DatasetFormat:
    """A dataset's format as a value with fields, as LLaMA-Factory's ``DatasetAttr``: the
    adapter (``base``: a FORMATS name, or "auto" before detection) and the column mapping
    (``columns``: column → file key, ``tags``), sorted, without entries that name what the
    adapter reads anyway (so ``{"prompt": "text"}`` on a text dataset is plain ``text``).

    ``str()`` is its one serialised form — ``base`` alone, or ``base {"columns":…,"tags":…}``
    (compact sorted JSON) — which the cache key hashes and meta.json ``build.format`` records
    (the same bytes as before the type existed); ``parse`` reads it back. It equals (and hashes
    as) that string, so ``fmt == "text"`` and ``ADAPTERS[fmt]`` work on either form."""

    base: str
    columns: tuple[tuple[str, str], ...] = ()
    tags: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, base: str, columns: dict | None = None, tags: dict | None = None) -> "DatasetFormat":
        keys = CANONICAL_KEYS.get(base, {})
        cols = tuple(sorted((c, k) for c, k in (columns or {}).items() if keys.get(c) != k))
        tgs = tuple(sorted((t, v) for t, v in (tags or {}).items() if DEFAULT_TAGS.get(t) != v))
        return cls(base, cols, tgs)

    @classmethod
    def parse(cls, text: "str | DatasetFormat") -> "DatasetFormat":
        """The inverse of ``str()`` (a DatasetFormat is returned as it is)."""
        if isinstance(text, DatasetFormat):
            return text
        base, _, rest = text.partition(" ")
        if not rest:
            return cls(base)
        spec = json.loads(rest)
        return cls.of(base, spec.get("columns", {}), spec.get("tags", {}))

    @property
    def column_map(self) -> dict[str, str]:
        return dict(self.columns)

    @property
    def tag_map(self) -> dict[str, str]:
        return dict(self.tags)

    @property
    def mapped(self) -> bool:
        return bool(self.columns or self.tags)

    @property
    def is_text(self) -> bool:
        """Plain documents (no chat, no loss spans)."""
        return self.base == "text"

    def __str__(self) -> str:
        spec = {}
        if self.columns:
            spec["columns"] = dict(self.columns)
        if self.tags:
            spec["tags"] = dict(self.tags)
        if not spec:
            return self.base
        return f"{self.base} {json.dumps(spec, sort_keys=True, ensure_ascii=False, separators=(',', ':'))}"

    def __eq__(self, other) -> bool:
        if isinstance(other, DatasetFormat):
            return (self.base, self.columns, self.tags) == (other.base, other.columns, other.tags)
        if isinstance(other, str):
            return str(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))


class ColumnMap:
    """One dataset's mapping, applied record by record."""

    def __init__(self, base: str, columns: dict, tags: dict):
        self.base, self.columns = base, dict(columns)
        self.tags = {**DEFAULT_TAGS, **tags} if tags else None
        keys = CANONICAL_KEYS[base]
        self.consumed = set(self.columns.values())  # file keys read through the mapping
        # canonical key → file key, for renaming the adapter's error fields back
        self.to_file = {keys[c]: k for c, k in self.columns.items()}
        if self.tags:
            self.roles = {self.tags[t]: role for t, role in _TAG_ROLES.items()}

    def apply(self, raw: Any) -> Any:
        if not isinstance(raw, dict):
            if self.base == "text" and isinstance(raw, str):
                return raw  # a .txt line is already the text
            raise RecordError("wrong_type", f"record must be a JSON object, got {type(raw).__name__}")
        keys = CANONICAL_KEYS[self.base]
        out = {k: v for k, v in raw.items() if k not in self.consumed}
        for col, key in self.columns.items():
            canon = keys[col]
            out.pop(canon, None)  # a same-named key of the file is not this column
            if key in raw:
                out[canon] = raw[key]
            elif col in REQUIRED[self.base]:
                raise RecordError("missing_field", f"missing (mapped as column {col!r})", field=key)
        if self.tags and isinstance(out.get("conversations"), list):
            out["conversations"] = [self._turn(t, i) for i, t in enumerate(out["conversations"])]
        return out

    def _turn(self, turn: Any, i: int) -> Any:
        if not isinstance(turn, dict):
            return turn  # the adapter names the wrong type
        where = f"{self.to_file.get('conversations', 'conversations')}[{i}]"
        role_tag, content_tag = self.tags["role_tag"], self.tags["content_tag"]
        if role_tag not in turn:
            raise RecordError("missing_field", "missing", field=f"{where}.{role_tag}")
        role = turn[role_tag]
        if not isinstance(role, str) or role not in self.roles:
            raise RecordError("unknown_role", f"unknown role {role!r} (tags: "
                              f"{', '.join(f'{v}' for v in self.roles)})", field=f"{where}.{role_tag}")
        # the turn's other fields (reasoning_content, tool_calls, loss_weight, …) are kept: the
        # adapter reads them as it reads a messages turn's, so a registry entry loses nothing
        out = {k: v for k, v in turn.items() if k not in (role_tag, content_tag)}
        out["from"] = self.roles[role]
        if content_tag in turn:  # else the adapter decides (an assistant turn with tool calls needs none)
            out["value"] = turn[content_tag]
        return out

    def file_field(self, field: str | None) -> str | None:
        """An adapter's error field (canonical keys) in the file's own keys."""
        if not field:
            return field
        m = re.match(r"^([A-Za-z_]+)(.*)$", field)
        if not m:
            return field
        head, rest = m.groups()
        head = self.to_file.get(head, head)
        if self.tags and m.group(1) == "conversations":
            rest = re.sub(r"\.from$", f".{self.tags['role_tag']}", rest)
            rest = re.sub(r"\.value(?=$|\[)", f".{self.tags['content_tag']}", rest)
        return head + rest
