"""Hugging Face datasets on disk, read with pyarrow alone (no `datasets` import).

Two layouts are sources like any other:

* a `Dataset.save_to_disk` dir: `state.json` lists its Arrow files (`_data_files`, in row
  order); `dataset_info.json` and `state.json` are metadata, never records. A
  `DatasetDict.save_to_disk` dir (`dataset_dict.json`) holds several splits: refused, naming
  them — the path must name one split's folder.
* a hub-cache snapshot or a datasets cache dir: `*.parquet` / `*.arrow` files, with HF's
  metadata files (`dataset_info.json`, `dataset_infos.json`, `state.json`) skipped. Files of more
  than one split (`train-00000-of-00002.parquet` beside `test-…`, or the splits a
  `dataset_info.json` names) are refused, naming them — a glob picks one.

An `.arrow` file is Arrow IPC (the stream format `datasets` writes, or the file format). A
stream file is split into work units of whole record batches, ~`UNIT_BYTES` each, found from
the batch message offsets (a memory map: the plan reads headers, not data); a unit reads its
own byte range zero-copy, so memory is bounded by one batch. Units depend only on the bytes.
Records are the rows, numbered within their file (the provenance), each a dict as
`Table.to_pylist` gives it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

from .errors import BuildError, RecordError

ARROW_SUFFIXES = (".arrow",)
HF_METADATA = ("dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json")
_SHARD_NAME = re.compile(r"^(?P<split>[^/]+?)-\d{5}-of-\d{5}\.(?:parquet|arrow)$")
_BATCH_ROWS = 4096  # rows converted to Python at once within a batch


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise BuildError(f"{path}: cannot read this Hugging Face dataset file: {e}") from None


def hf_dataset_files(path: str) -> list[str] | None:
    """The data files of an HF dataset dir, in row order, or None when `path` is not one."""
    root = Path(path)
    if (root / "dataset_dict.json").is_file():
        splits = (_read_json(root / "dataset_dict.json") or {}).get("splits") or sorted(
            p.name for p in root.iterdir() if (p / "state.json").is_file())
        example = f" (e.g. {root / splits[0]})" if splits else ""
        raise BuildError(f"{path}: a DatasetDict saved with save_to_disk (splits: {', '.join(splits)}); "
                         f"give one split's folder as the path{example}")
    if (root / "state.json").is_file():
        state = _read_json(root / "state.json")
        files = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(files, list) or not files or not all(
                isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
            raise BuildError(f"{root / 'state.json'}: no `_data_files` list: not a save_to_disk dir "
                             "this tokenmill reads")
        if state.get("_indices_data_files"):
            raise BuildError(f"{path}: the saved dataset has an indices mapping (select/shuffle not "
                             "flattened); save it again after .flatten_indices()")
        out = [str(root / f["filename"]) for f in files]
        missing = [f for f in out if not os.path.isfile(f)]
        if missing:
            raise BuildError(f"{missing[0]}: listed in {root / 'state.json'} but missing")
        return out
    data = _data_files(root)
    if not data or not any((root / m).is_file() for m in HF_METADATA[:2]) and not any(
            _SHARD_NAME.match(os.path.basename(f)) for f in data):
        return None  # a plain folder: the generic reader lists it
    check_one_split(path, data, _declared_splits(root))
    return data


def _data_files(root: Path) -> list[str]:
    suffixes = (".parquet",) + ARROW_SUFFIXES
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _declared_splits(root: Path) -> list[str]:
    for name in HF_METADATA[:2]:
        if (root / name).is_file():
            info = _read_json(root / name)
            if isinstance(info, dict) and isinstance(info.get("splits"), dict):
                return list(info["splits"])
            if isinstance(info, dict) and name == "dataset_infos.json":  # {config: {splits: …}}
                return [s for v in info.values() if isinstance(v, dict)
                        for s in (v.get("splits") or {}) if isinstance(v.get("splits"), dict)]
    return []


def _split_of(name: str, declared: list[str]) -> str | None:
    m = _SHARD_NAME.match(name)
    if m and (not declared or m["split"] in declared):
        return m["split"]
    stem = name.rsplit(".", 1)[0]
    for s in declared:  # datasets cache: <builder>-<split>[-NNNNN-of-NNNNN].arrow
        if stem.endswith(f"-{s}") or re.search(rf"-{re.escape(s)}-\d{{5}}-of-\d{{5}}$", stem):
            return s
    return None


def check_one_split(path: str, files: list[str], declared: list[str] = ()) -> None:
    """A folder whose data files belong to several splits would mix them: refused."""
    splits: dict[str, str] = {}
    for f in files:
        s = _split_of(os.path.basename(f), list(declared))
        if s is not None:
            splits.setdefault(s, f)
    if len(splits) > 1:
        names = ", ".join(sorted(splits))
        example = os.path.join(os.path.dirname(splits[sorted(splits)[0]]), f"{sorted(splits)[0]}-*")
        raise BuildError(f"{path}: holds the files of several splits ({names}); give one split, e.g. "
                         f"the glob {example}")


# --------------------------------------------------------------------------- Arrow IPC files

def _open(path: str):
    import pyarrow as pa
    try:
        return pa.memory_map(path, "r")
    except (OSError, pa.ArrowException) as e:
        raise BuildError(f"{path}: cannot read: {e}") from None


def arrow_ranges(path: str, unit_bytes: int) -> list[list[int]]:
    """[start byte, end byte, first row] of each unit of an Arrow IPC stream file: whole
    batches, a new unit once one reaches `unit_bytes`. → [[0, -1, 0]] (one unit) for the IPC
    file format, a stream with dictionaries, or a file pyarrow cannot open (read, and
    counted, by `iter_arrow`)."""
    import pyarrow as pa
    with _open(path) as mm:
        try:
            reader = pa.ipc.open_stream(mm)
        except pa.ArrowException:
            return [[0, -1, 0]]
        if any(pa.types.is_dictionary(f.type) for f in reader.schema):
            return [[0, -1, 0]]
        ranges, start, first, rows = [], mm.tell(), 0, 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowException, OSError):
                break  # the unit holding the damage reports it when read
            rows += batch.num_rows
            if mm.tell() - start >= unit_bytes:
                ranges.append([start, mm.tell(), first])
                start, first = mm.tell(), rows
        end = mm.size()
        if start < end or not ranges:
            ranges.append([start, end, first])
    return ranges


def iter_arrow(path: str, start: int, end: int, first: int) -> Iterator[tuple[int, object]]:
    """Rows of an Arrow IPC file, or of the batches in [start, end) of a stream file."""
    import pyarrow as pa
    i = first
    try:
        with _open(path) as mm:
            if end < 0:
                batches = _whole_file(mm)
            else:
                schema = pa.ipc.open_stream(mm).schema
                mm.seek(start)
                messages = pa.ipc.MessageReader.open_stream(pa.BufferReader(mm.read_buffer(end - start)))
                batches = (pa.ipc.read_record_batch(m, schema) for m in messages)
            for batch in batches:
                for off in range(0, batch.num_rows, _BATCH_ROWS):
                    for row in batch.slice(off, _BATCH_ROWS).to_pylist():
                        yield i, row
                        i += 1
    except (pa.ArrowException, OSError, EOFError) as e:
        yield i, RecordError("corrupt_source", f"truncated or corrupt Arrow file after {i - first} rows "
                             f"of this unit: {type(e).__name__}: {e}", source=path, record=i)


def _whole_file(mm):
    import pyarrow as pa
    try:
        reader = pa.ipc.open_file(mm)
        return (reader.get_batch(k) for k in range(reader.num_record_batches))
    except pa.ArrowException:
        mm.seek(0)
        return iter(pa.ipc.open_stream(mm))
