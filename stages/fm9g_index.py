"""FM9G index dirs as sources (seeds-anchors §1.1–1.2, §4 item 1).

An FM9G index dir holds ``data.jsonl`` (one JSON record per line), ``index`` (text, one
byte offset per line), ``index.h5`` (HDF5 dataset ``"index"``, the same numbers) and
``meta.json``. FM9G's reader wants n+1 offsets ``[0, e0, …, e_{n-1}]``, but FM9G's own
``convert_json2index.py`` writes only the n end offsets, so the reader never serves line 0.
We read both forms: the legacy one gets its leading 0 back (with a warning), so no record
is lost; and we write only the reader-correct form.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import orjson

DATA_FILE = "data.jsonl"
INDEX_TEXT = "index"
INDEX_H5 = "index.h5"
META_FILE = "meta.json"


class LegacyIndexWarning(UserWarning):
    """A legacy (end offsets only) FM9G index was read with its leading 0 restored: a notice,
    no record is lost. `pipeline` prints it as one `warning:` line (pipeline/cli.py)."""


def is_fm9g_index_dir(path: str | os.PathLike) -> bool:
    """True for a dir with data.jsonl, meta.json and an index (text or HDF5)."""
    p = Path(path)
    return (p.is_dir() and (p / DATA_FILE).is_file() and (p / META_FILE).is_file()
            and ((p / INDEX_TEXT).is_file() or (p / INDEX_H5).is_file()))


def index_language(path: str | os.PathLike) -> str | None:
    """The ``language`` an FM9G index dir's meta.json records (convert_json2index.py's
    ``--language``), or None: not an index dir, no such field, or an unreadable meta.json (the
    build reads data.jsonl and the index, never this file's other fields)."""
    if not is_fm9g_index_dir(path):
        return None
    try:
        meta = orjson.loads((Path(path) / META_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    language = meta.get("language") if isinstance(meta, dict) else None
    return language if isinstance(language, str) and language else None


def _load_raw_offsets(d: Path) -> np.ndarray:
    if (d / INDEX_TEXT).is_file():
        try:
            return np.array((d / INDEX_TEXT).read_bytes().split(), dtype=np.int64)
        except ValueError:
            raise ValueError(f"{d}: {INDEX_TEXT} must hold one integer per line") from None
    with h5py.File(d / INDEX_H5, "r") as f:
        if "index" not in f:
            raise ValueError(f"{d}: {INDEX_H5} has no dataset 'index'")
        return np.asarray(f["index"][...], dtype=np.int64).reshape(-1)


def read_fm9g_offsets(path: str | os.PathLike) -> np.ndarray:
    """n+1 int64 byte offsets into data.jsonl, starting at 0: record i is
    ``data[offsets[i]:offsets[i+1]]``. Prefers the text ``index``, else ``index.h5``."""
    d = Path(path)
    size = (d / DATA_FILE).stat().st_size
    offsets = _load_raw_offsets(d)
    if offsets.size == 0 or offsets[0] != 0:
        # Legacy convert_json2index form: n end offsets, no leading 0. (A reader-correct
        # index always starts at 0; a legacy one cannot, each line holding at least "\n".)
        if offsets.size and offsets[-1] == size:
            warnings.warn(f"{d}: legacy FM9G index (end offsets only, as written by "
                          "convert_json2index.py); reading it with a leading 0 so line 0 is kept",
                          LegacyIndexWarning, stacklevel=2)
        offsets = np.concatenate([np.zeros(1, np.int64), offsets])
    if offsets[-1] != size:
        raise ValueError(f"{d}: index ends at byte {offsets[-1]} but {DATA_FILE} has {size} bytes; "
                         "the index does not belong to this data.jsonl")
    if np.any(np.diff(offsets) < 0):
        bad = int(np.argmax(np.diff(offsets) < 0))
        raise ValueError(f"{d}: index offsets decrease at entry {bad + 1}")
    return offsets


def iter_fm9g_records(path: str | os.PathLike, start: int = 0,
                      stop: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(record_number, line bytes without the newline)`` for records
    ``start``…``stop-1``, reading data.jsonl sequentially (never whole)."""
    d = Path(path)
    offsets = read_fm9g_offsets(d)
    n = len(offsets) - 1
    stop = n if stop is None else min(stop, n)
    with open(d / DATA_FILE, "rb") as f:
        f.seek(int(offsets[start]) if start < n else 0)
        for i in range(start, stop):
            length = int(offsets[i + 1] - offsets[i])
            line = f.read(length)
            if len(line) != length:
                raise ValueError(f"{d}/{DATA_FILE}: record {i} is cut short (file changed?)")
            if line.endswith(b"\n"):
                line = line[:-1]
                if line.endswith(b"\r"):
                    line = line[:-1]
            elif i != n - 1:
                # Only the last line may lack its newline; otherwise the index is misaligned.
                raise ValueError(f"{d}: record {i} does not end at a line end; the index is wrong")
            yield i, line


def write_fm9g_index(jsonl_path: str | os.PathLike, out_dir: str | os.PathLike,
                     *, language: str | None = None) -> np.ndarray:
    """Make an FM9G index dir from a JSONL file, in the reader-correct form: ``data.jsonl``
    (a copy), ``index`` (n+1 lines from 0), ``index.h5`` and a minimal ``meta.json``
    (``language, nlines, nbytes``). Unlike FM9G it never deletes ``out_dir``.
    Returns the offsets."""
    src, out = Path(jsonl_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / DATA_FILE
    same_file = data.exists() and os.path.samefile(src, data)
    ends = []
    pos = 0
    with open(src, "rb") as fin:
        fout = None if same_file else open(data.with_name(DATA_FILE + ".tmp"), "wb")
        try:
            for line in fin:  # binary iteration splits on b"\n" only
                pos += len(line)
                ends.append(pos)
                if fout is not None:
                    fout.write(line)
        finally:
            if fout is not None:
                fout.close()
    if not same_file:
        os.replace(data.with_name(DATA_FILE + ".tmp"), data)
    offsets = np.array([0] + ends, dtype=np.int64)

    (out / INDEX_TEXT).write_bytes(b"".join(b"%d\n" % o for o in offsets.tolist()))
    with h5py.File(out / INDEX_H5, "w") as f:
        f.create_dataset("index", data=offsets, track_times=False)
    meta = {"language": language, "nlines": len(ends), "nbytes": pos}
    (out / META_FILE).write_bytes(orjson.dumps(meta))
    return offsets


__all__ = ["LegacyIndexWarning", "index_language", "is_fm9g_index_dir", "read_fm9g_offsets", "iter_fm9g_records", "write_fm9g_index"]
