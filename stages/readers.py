"""Readers: source paths → work units → raw records with provenance.

A *work unit* is a file, a byte range of a large line-oriented file, or a run of whole record
batches of an Arrow IPC file (HF datasets on disk: stages/hf_datasets.py). Units depend only on
the data (never on the worker count), so the shards they become are identical however the
work is spread. Records are numbered within their file (0-based line / element / row), which
is the provenance stored in every shard.
"""
from __future__ import annotations

import glob
import gzip
import io
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import orjson

from .errors import BuildError, RecordError

LINE_SUFFIXES = (".jsonl", ".txt", ".text", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)  # Arrow IPC, as HF datasets writes it (stages/hf_datasets.py)
COMPRESSED = (".gz", ".zst")
KNOWN = LINE_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
# Plain line files are split into ~8 MiB units (one shard each): small enough to spread one
# large file over every core, large enough for sequential writes. Part of the dataset key.
UNIT_BYTES = int(os.environ.get("TOKENMILL_UNIT_BYTES", 8 << 20))
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark at the start of a file is not data
# A truncated or corrupt container is one counted fault (or the build's stop under --on-error
# fail), never a quietly shorter file.
CORRUPT = "corrupt_source"
_TRUST_AFTER_S = 2.0  # a file modified this recently may change again within one mtime tick


def base_suffix(path: str) -> str:
    p = path.lower()
    for c in COMPRESSED:
        if p.endswith(c):
            p = p[: -len(c)]
    return os.path.splitext(p)[1]


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def expand_source(path: str) -> list[str]:
    """A file, a directory (recursive, known extensions, hidden files and dirs such as
    .DS_Store, ._x or .ipynb_checkpoints/ skipped) or a glob → sorted file list. A file named
    explicitly is read whatever its name."""
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        from .fm9g_index import is_fm9g_index_dir
        if is_fm9g_index_dir(path):
            return [path]
        from .hf_datasets import hf_dataset_files
        hf = hf_dataset_files(path)  # save_to_disk dir / hub snapshot: its data files only
        if hf is not None:
            return hf
        root = Path(path)
        files = sorted(str(p) for p in root.rglob("*")
                       if not _hidden(p.relative_to(root)) and p.is_file() and base_suffix(str(p)) in KNOWN)
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
    kind: str = "lines"  # lines | txt-paragraphs | json | parquet | arrow | fm9g


def file_stamp(st: os.stat_result) -> list[int]:
    """What a memo entry is valid for: ctime moves on every write and cannot be set back
    (unlike mtime, which `touch -d`, `cp -p` or rsync restore), so an edit is never missed."""
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def memoised_digest(memo: dict | None, path: str) -> str | None:
    """The content digest recorded for `path` in a fingerprint memo (pipeline/cache.py:
    `{realpath: [*file_stamp, digest]}`), if the file's stamp still matches."""
    if memo is None:
        return None
    st = os.stat(path)
    hit = memo.get(os.path.realpath(path))
    if hit and hit[:-1] == file_stamp(st) and time.time() - st.st_ctime > _TRUST_AFTER_S:
        return hit[-1]
    return None


def _line_units(path: str, first_index: int, unit_bytes: int, memo: dict | None) -> list[WorkUnit]:
    # The byte ranges depend only on the bytes and the unit size: memoised under the file's
    # content digest, so planning a reused TB source is a stat, not a read of every byte.
    digest = memoised_digest(memo, path)
    key = f"units:{digest}:{unit_bytes}" if digest else None
    ranges = memo.get(key) if key else None
    if not ranges or ranges[-1][1] != os.path.getsize(path):
        ranges = _scan_line_ranges(path, unit_bytes)
        if key:
            memo[key] = ranges
    return [WorkUnit(first_index + k, path, start, end, first, "lines")
            for k, (start, end, first) in enumerate(ranges)]


def _scan_line_ranges(path: str, unit_bytes: int) -> list[list[int]]:
    """[start, end, first record] of each unit: ~unit_bytes, extended to a line end."""
    size = os.path.getsize(path)
    ranges, start, line_no = [], 0, 0
    with _open_plain(path) as f:
        while start < size:
            end = min(start + unit_bytes, size)
            if end < size:  # extend to the end of the line
                f.seek(end)
                rest = f.readline()
                end += len(rest)
            f.seek(start)
            n_lines = _count_lines(f, end - start)
            ranges.append([start, end, line_no])
            line_no += n_lines
            start = end
    return ranges or [[0, 0, 0]]


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
               unit_bytes: int = UNIT_BYTES, memo: dict | None = None) -> list[WorkUnit]:
    """Work units of a dataset's files. `memo`: the fingerprint memo the files were just
    fingerprinted with (pipeline/cache.FingerprintMemo.data); line files' unit plans are read
    from it and recorded in it."""
    units: list[WorkUnit] = []
    for path in files:
        if os.path.isdir(path):
            units.append(WorkUnit(len(units), path, kind="fm9g"))
            continue
        suffix, compressed = base_suffix(path), path.lower().endswith(COMPRESSED)
        if suffix in PARQUET_SUFFIXES:
            units.append(WorkUnit(len(units), path, kind="parquet"))
        elif suffix in ARROW_SUFFIXES and compressed:
            raise BuildError(f"{path}: a compressed Arrow file: decompress it first (Arrow is read "
                             "memory-mapped, batch by batch)")
        elif suffix in ARROW_SUFFIXES:
            from .hf_datasets import arrow_ranges  # whole record batches, ~unit_bytes a unit
            units.extend(WorkUnit(len(units) + k, path, start, end, first, "arrow")
                         for k, (start, end, first) in enumerate(arrow_ranges(path, unit_bytes)))
        elif suffix in JSON_SUFFIXES:
            units.append(WorkUnit(len(units), path, kind="json"))
        elif suffix in (".txt", ".text") and txt_paragraphs:
            units.append(WorkUnit(len(units), path, kind="txt-paragraphs"))
        elif compressed:
            units.append(WorkUnit(len(units), path, kind="lines"))
        else:
            units.extend(_line_units(path, len(units), unit_bytes, memo))
    return units


def _open_plain(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise BuildError(f"{path}: cannot read: {e.strerror or e}") from None


def open_bytes(path: str) -> io.BufferedIOBase:
    """The decompressed bytes of a source. A truncated or corrupt .gz/.zst raises from read()
    (EOFError, OSError, zlib.error, ZstdError: see `_STREAM_ERRORS`) instead of ending early."""
    low = path.lower()
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=_open_plain(path), mode="rb")
    if low.endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(_open_plain(path)), 1 << 20)
    return _open_plain(path)


class _ZstdFrames(io.RawIOBase):
    """Frame by frame zstd decompression that raises at the end of the input when a frame is
    unfinished: zstandard's own stream_reader returns a short read for a truncated file."""

    def __init__(self, raw):
        import zstandard
        self._raw, self._zstd = raw, zstandard.ZstdDecompressor()
        self._obj, self._fed = self._zstd.decompressobj(), False  # _fed: the frame has begun
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._pos >= len(self._out):
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._fed:
                    raise EOFError("the zstd stream ends inside a frame (truncated file)")
                return 0
            self._out, self._pos = self._feed(chunk), 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            out.append(self._obj.decompress(chunk))
            self._fed = True
            if not self._obj.eof:
                break
            chunk = self._obj.unused_data  # the next frame starts in this chunk
            self._obj, self._fed = self._zstd.decompressobj(), False
        return b"".join(out)

    def close(self):
        self._raw.close()
        super().close()


def _stream_errors() -> tuple:
    import zstandard
    return (EOFError, OSError, zlib.error, zstandard.ZstdError)


def _corrupt(src: str, done: str, record: int, e: BaseException) -> RecordError:
    """The fault of a container that stops being readable after `done` ("1200 lines")."""
    low = src.lower()
    kind = "gzip stream" if low.endswith(".gz") else "zstd stream" if low.endswith(".zst") else "file"
    return RecordError(CORRUPT, f"truncated or corrupt {kind} after {done}: {type(e).__name__}: {e}",
                       source=src, record=record)


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


def _iter_lines(unit: WorkUnit) -> Iterator[tuple[int, bytes | RecordError]]:
    compressed = unit.file.lower().endswith(COMPRESSED)
    i = unit.first_record
    with open_bytes(unit.file) as f:
        if unit.end >= 0 and not compressed:
            f.seek(unit.start)
            f = io.BytesIO(f.read(unit.end - unit.start))  # bounded: one unit
        lines = iter(f)
        try:
            for line in lines:
                if i == 0 and (compressed or unit.start == 0) and line.startswith(BOM):
                    line = line[len(BOM):]
                yield i, line.rstrip(b"\r\n") if line.endswith(b"\n") else line.rstrip(b"\r")
                i += 1
        except _stream_errors() as e:
            yield i, _corrupt(unit.file, f"{i - unit.first_record} lines", i, e)


def iter_unit(unit: WorkUnit) -> Iterator[RawRecord]:
    """Raw records of one unit: dicts (JSON), str (text lines) or RecordError."""
    src = unit.file
    if unit.kind == "fm9g":
        from .fm9g_index import iter_fm9g_records
        for i, raw in iter_fm9g_records(src):
            yield _json_record(raw, src, i)
    elif unit.kind == "parquet":
        yield from _iter_parquet(src)
    elif unit.kind == "arrow":
        from .hf_datasets import iter_arrow
        yield from iter_arrow(src, unit.start, unit.end, unit.first_record)
    elif unit.kind == "json":
        yield from _iter_json_file(src)
    elif unit.kind == "txt-paragraphs":
        yield from _iter_paragraphs(src)
    elif base_suffix(src) in (".txt", ".text"):
        for i, raw in _iter_lines(unit):
            if isinstance(raw, RecordError):
                yield i, raw
            elif not raw.strip():  # blank lines separate documents; they are not records
                continue
            try:
                yield i, decode_utf8(raw, src, i)
            except RecordError as e:
                yield i, e
    else:
        for i, raw in _iter_lines(unit):
            if isinstance(raw, RecordError):
                yield i, raw
            elif raw.strip():
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
    try:
        with open_bytes(src) as f:
            data = f.read()
    except _stream_errors() as e:
        yield 0, _corrupt(src, "0 records", 0, e)
        return
    if data.startswith(BOM):
        data = data[len(BOM):]
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
    for i, raw in _iter_lines(WorkUnit(0, src, kind="txt-paragraphs")):
        if isinstance(raw, RecordError):  # the tail is unreadable: one fault, at the line it broke
            yield i, raw
            return
        if raw.strip():
            if not buf:
                first = i
            buf.append(raw)
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
    import pyarrow as pa
    import pyarrow.parquet as pq
    i = 0
    with _open_plain(src) as f:
        try:
            pf = pq.ParquetFile(f)
            for group in range(pf.num_row_groups):  # group by group: a damaged one stops at its row
                for batch in pf.iter_batches(batch_size=4096, row_groups=[group]):
                    for row in batch.to_pylist():
                        yield i, row
                        i += 1
        except (pa.ArrowException, OSError, EOFError) as e:  # no footer, bad page, short file
            yield i, RecordError(CORRUPT, f"truncated or corrupt parquet file after {i} rows: "
                                 f"{type(e).__name__}: {e}", source=src, record=i)
