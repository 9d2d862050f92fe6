"""LLaMA-Factory's dataset registry (``data/dataset_info.json``) as a source (issue 15).

A manifest entry ``{"dataset_info": "data/dataset_info.json", "dataset": "alpaca_en_demo"}``
reads that entry as LLaMA-Factory does: ``file_name`` is found in ``dataset_dir`` (default: the
registry's own folder, which is LLaMA-Factory's layout), and ``formatting``, ``columns`` and
``tags`` become the dataset's format and column mapping (stages/columns.py). What tokenmill
cannot honour is said, never guessed: hub-only entries (``hf_hub_url``, ``ms_hub_url``,
``om_hub_url``, ``script_url`` without a ``file_name``) and multimodal columns are refused;
``ranking`` (preference data) and keys that only select or sample data are ignored with a note.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from stages.columns import COLUMN_KEYS, TAG_KEYS

HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url")
MULTIMODAL_COLUMNS = ("images", "videos", "audios")
PREFERENCE_COLUMNS = ("chosen", "rejected", "kto_tag")
# Keys LLaMA-Factory reads that change nothing here, or that we do not apply (said in a note).
NOTED_KEYS = ("split", "subset", "folder", "num_samples", "load_from")


class RegistryError(ValueError):
    """An entry that cannot be built; ``str()`` is one line naming the registry and entry."""


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    path: str  # absolute file or folder
    formatting: str | None
    columns: dict
    tags: dict
    notes: tuple[str, ...] = field(default=())


def read_registry(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8-sig"))
    except OSError as e:
        raise RegistryError(f"{path}: cannot read dataset_info.json: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise RegistryError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{path}: expected a JSON object of dataset entries")
    return doc


def registry_entry(registry: str, name: str, dataset_dir: str | None = None) -> RegistryEntry:
    """Resolve entry ``name`` of the dataset_info.json at ``registry`` (absolute paths)."""
    doc = read_registry(registry)
    at = f"{registry}: dataset {name!r}"
    if name not in doc:
        close = sorted(k for k in doc if name.lower() in k.lower())[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise RegistryError(f"{at}: no such entry{hint}")
    info = doc[name]
    if not isinstance(info, dict):
        raise RegistryError(f"{at}: entry must be a JSON object")
    hub = [k for k in HUB_KEYS if info.get(k)]
    if "file_name" not in info:
        if hub:
            raise RegistryError(f"{at}: hub-only entry ({hub[0]}: {info[hub[0]]}); tokenmill builds local "
                                "files only: download it and give the entry a file_name")
        raise RegistryError(f"{at}: entry has no file_name")
    notes = []
    if hub:
        notes.append(f"{at}: {', '.join(hub)} ignored; building the local file_name")
    if not isinstance(info["file_name"], str) or not info["file_name"]:
        raise RegistryError(f"{at}: file_name must be a non-empty string, got {_json_value(info['file_name'])}")
    formatting = info.get("formatting")
    if formatting is not None and formatting not in ("alpaca", "sharegpt"):
        raise RegistryError(f"{at}: formatting {_json_value(formatting)} is not supported (alpaca, sharegpt)")
    for key in ("columns", "tags"):
        value = info.get(key)
        if value is not None and not isinstance(value, dict):
            raise RegistryError(f"{at}: {key} must be a JSON object of names, got {_json_value(value)}")
        for name, v in (value or {}).items():
            if not isinstance(v, str) or not v:
                raise RegistryError(f"{at}: {key}.{name} must be a non-empty string, got {_json_value(v)}")
    columns = dict(info.get("columns") or {})
    tags = dict(info.get("tags") or {})
    media = [c for c in columns if c in MULTIMODAL_COLUMNS]
    if media:
        raise RegistryError(f"{at}: multimodal column {media[0]!r} is not supported (tokenmill builds text)")
    if info.get("ranking"):
        notes.append(f"{at}: ranking: true ignored: built as SFT data from its messages "
                     "(chosen/rejected are not used)")
    for col in [c for c in columns if c in PREFERENCE_COLUMNS]:
        if not info.get("ranking"):
            notes.append(f"{at}: column {col!r} ignored (preference data is not built)")
        del columns[col]
    unknown = [c for c in columns if c not in COLUMN_KEYS]
    if unknown:
        raise RegistryError(f"{at}: unknown column {unknown[0]!r} (known: {', '.join(COLUMN_KEYS)})")
    bad_tags = [t for t in tags if t not in TAG_KEYS]
    if bad_tags:
        raise RegistryError(f"{at}: unknown tag {bad_tags[0]!r} (known: {', '.join(TAG_KEYS)})")
    for key in NOTED_KEYS:
        if key in info:
            notes.append(f"{at}: {key} = {json.dumps(info[key])} ignored (the whole file is built)")
    base = dataset_dir or os.path.dirname(registry)
    path = os.path.abspath(os.path.join(base, info["file_name"]))
    if not os.path.exists(path):
        raise RegistryError(f"{at}: file_name {info['file_name']!r} not found in {base}")
    return RegistryEntry(name, path, formatting, columns, tags, tuple(notes))


def _json_value(value) -> str:
    """A registry value as the user wrote it (JSON), shortened for one error line."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def mapped_base_format(formatting: str | None, columns: dict, tags: dict, path: str,
                       registry: bool) -> str:
    """The base format a mapping implies when ``format`` is auto: ``formatting`` if given; a
    mapping of ``prompt`` alone is text (LLaMA-Factory's pretraining convention, e.g.
    ``c4_demo``); ``messages`` or tags mean sharegpt; other columns alpaca. A registry entry
    without any mapping is alpaca (LLaMA-Factory's default), or text for a .txt file; a
    manifest dataset without one keeps ``auto``."""
    if formatting:
        return formatting
    if columns and set(columns) <= {"prompt"}:
        return "text"
    if "messages" in columns or tags:
        return "sharegpt"
    if columns:
        return "alpaca"
    if registry:
        return "text" if path.endswith(".txt") else "alpaca"
    return "auto"
