"""Readers: source paths → work units → raw records with provenance.

A *work unit* is a file or a byte range of a large line-oriented file. Units depend only on
the data (never on the worker count), so the shards they become are identical however the
work is spread. Records are numbered within their file (0-based line / element / row), which
is the provenance stored in every shard.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import orjson

from .errors import BuildError, RecordError

LINE_SUFFIXES = (".jsonl", ".txt", ".text", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED = (".gz", ".zst")
KNOWN = LINE_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
# Plain line files are split into ~8 MiB units (one shard each): small enough to spread one
# large file over every core, large enough for sequential writes. Part of the dataset key.
UNIT_BYTES = int(os.environ.get("TOKENMILL_UNIT_BYTES", 8 << 20))


def base_suffix(path: str) -> str:
    p = path.lower()
    for c in COMPRESSED:
        if p.endswith(c):
            p = p[: -len(c)]
    return os.path.splitext(p)[1]


def expand_source(path: str) -> list[str]:
    """A file, a directory (recursive, known extensions) or a glob → sorted file list."""
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        from .fm9g_index import is_fm9g_index_dir
        if is_fm9g_index_dir(path):
            return [path]
        files = sorted(str(p) for p in Path(path).rglob("*")
                       if p.is_file() and base_suffix(str(p)) in KNOWN)
    elif os.path.isfile(path):
        return [path]
    else:
        raise BuildError(f"{path}: source not found")
    if not files:
        raise BuildError(f"{path}: matches no readable files (known: {', '.join(KNOWN)} [.gz|.zst])")
    return files


@dataclass(frozen=True)
class WorkUnit:
    index: int  # position in the dataset's unit list = shard number
    file: str
    start: int = 0  # byte range for plain line files; whole file otherwise
    end: int = -1
    first_record: int = 0  # record number of the first line in this range
    kind: str = "lines"  # lines | txt-paragraphs | json | parquet | fm9g


def _line_units(path: str, first_index: int, unit_bytes: int) -> list[WorkUnit]:
    size = os.path.getsize(path)
    units, start, line_no = [], 0, 0
    with open(path, "rb") as f:
        while start < size:
            end = min(start + unit_bytes, size)
            if end < size:  # extend to the end of the line
                f.seek(end)
                rest = f.readline()
                end += len(rest)
            f.seek(start)
            n_lines = _count_lines(f, end - start)
            units.append(WorkUnit(first_index + len(units), path, start, end, line_no, "lines"))
            line_no += n_lines
            start = end
    return units or [WorkUnit(first_index, path, 0, 0, 0, "lines")]


def _count_lines(f, nbytes: int) -> int:
    n, left, last = 0, nbytes, b"\n"
    while left > 0:
        block = f.read(min(left, 1 << 22))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
        last = block[-1:]
    return n + (last != b"\n")  # a final line without newline still counts


def plan_units(files: list[str], *, txt_paragraphs: bool = False,
               unit_bytes: int = UNIT_BYTES) -> list[WorkUnit]:
    units: list[WorkUnit] = []
    for path in files:
        if os.path.isdir(path):
            units.append(WorkUnit(len(units), path, kind="fm9g"))
            continue
        suffix, compressed = base_suffix(path), path.lower().endswith(COMPRESSED)
        if suffix in PARQUET_SUFFIXES:
            units.append(WorkUnit(len(units), path, kind="parquet"))
        elif suffix in JSON_SUFFIXES:
            units.append(WorkUnit(len(units), path, kind="json"))
        elif suffix in (".txt", ".text") and txt_paragraphs:
            units.append(WorkUnit(len(units), path, kind="txt-paragraphs"))
        elif compressed:
            units.append(WorkUnit(len(units), path, kind="lines"))
        else:
            units.extend(_line_units(path, len(units), unit_bytes))
    return units


def open_bytes(path: str) -> io.BufferedIOBase:
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.open(path, "rb")
    if low.endswith(".zst"):
        import zstandard
        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(raw)  # line iteration needs a buffered reader
    return open(path, "rb")


def decode_utf8(raw: bytes, source: str, record: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {e.start} of the record",
                          source=source, record=record) from None


def parse_json(raw: bytes, source: str, record: int):
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        if "utf-8" in str(e).lower() or "surrogate" in str(e).lower():
            decode_utf8(raw, source, record)  # raises the precise UTF-8 error
        raise RecordError("invalid_json", f"invalid JSON: {e}", source=source, record=record) from None


# A raw record is (record number, value-or-RecordError). Errors are yielded, not raised, so
# the caller applies the --on-error policy in one place.
RawRecord = tuple[int, object]


def _iter_lines(unit: WorkUnit) -> Iterator[tuple[int, bytes]]:
    with open_bytes(unit.file) as f:
        if unit.end >= 0 and not unit.file.lower().endswith(COMPRESSED):
            f.seek(unit.start)
            f = io.BytesIO(f.read(unit.end - unit.start))  # bounded: one unit
        for i, line in enumerate(f, start=unit.first_record):
            yield i, line.rstrip(b"\r\n") if line.endswith(b"\n") else line.rstrip(b"\r")


def iter_unit(unit: WorkUnit) -> Iterator[RawRecord]:
    """Raw records of one unit: dicts (JSON), str (text lines) or RecordError."""
    src = unit.file
    if unit.kind == "fm9g":
        from .fm9g_index import iter_fm9g_records
        for i, raw in iter_fm9g_records(src):
            yield _json_record(raw, src, i)
    elif unit.kind == "parquet":
        yield from _iter_parquet(src)
    elif unit.kind == "json":
        yield from _iter_json_file(src)
    elif unit.kind == "txt-paragraphs":
        yield from _iter_paragraphs(src)
    elif base_suffix(src) in (".txt", ".text"):
        for i, raw in _iter_lines(unit):
            if not raw.strip():  # blank lines separate documents; they are not records
                continue
            try:
                yield i, decode_utf8(raw, src, i)
            except RecordError as e:
                yield i, e
    else:
        for i, raw in _iter_lines(unit):
            if raw.strip():
                yield _json_record(raw, src, i)
            else:
                yield i, RecordError("empty_line", "empty line", source=src, record=i)


def _json_record(raw: bytes, src: str, i: int) -> RawRecord:
    try:
        return i, parse_json(raw, src, i)
    except RecordError as e:
        return i, e


def _iter_json_file(src: str) -> Iterator[RawRecord]:
    """A JSON list, a single JSON object, or JSON Lines saved as .json."""
    with open_bytes(src) as f:
        data = f.read()
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        stripped = data.lstrip()
        if stripped.startswith(b"{") and b"\n" in stripped.strip():  # JSON Lines in a .json
            for i, line in enumerate(data.splitlines()):
                if line.strip():
                    yield _json_record(line, src, i)
                else:
                    yield i, RecordError("empty_line", "empty line", source=src, record=i)
            return
        try:
            parse_json(data, src, 0)
        except RecordError as e:
            raise BuildError(f"{src}: not a JSON list, object or JSON Lines file: {e.detail}") from None
        return
    if isinstance(value, list):
        yield from enumerate(value)
    elif isinstance(value, dict):
        yield 0, value
    else:
        raise BuildError(f"{src}: top-level JSON must be a list or an object, got {type(value).__name__}")


def _iter_paragraphs(src: str) -> Iterator[RawRecord]:
    """Blank-line separated paragraphs; the record number is the paragraph's first line."""
    buf, first = [], 0
    with open_bytes(src) as f:
        for i, raw in enumerate(f):
            line = raw.rstrip(b"\r\n")
            if line.strip():
                if not buf:
                    first = i
                buf.append(line)
            elif buf:
                yield _paragraph(buf, src, first)
                buf = []
    if buf:
        yield _paragraph(buf, src, first)


def _paragraph(lines: list[bytes], src: str, first: int) -> RawRecord:
    try:
        return first, decode_utf8(b"\n".join(lines), src, first)
    except RecordError as e:
        return first, e


def _iter_parquet(src: str) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(src)
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield i, row
            i += 1
