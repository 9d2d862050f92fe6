"""The built-dataset dir of DESIGN §4: its one owner.

A built dir is ``meta.json`` + ``shard-NNNNN.h5`` files. This module writes meta.json
(atomically, byte-deterministic), opens a dir with its meta.json validated by a schema, lists
shards and sample lengths, locates a sample, describes a shard (the byte offsets of its
contiguous datasets, so readers can memory-map without h5py) and checks a dir at two levels:

* ``cheap``: meta.json and the lock entry agree, every shard file exists with a plausible size,
  counts add up, array dtypes/shapes recorded in meta.json are the exact ones (no h5py open).
* ``full``: also the sha256 of every shard and the structure of every array, read from the file.

`provenance(i)` is the one answer to "which source file and record is sample i" (both shard
formats: a shard may span many source files).

Every refusal is a `DatasetError` whose message starts with the dir or shard it is about.
A shard from outside is untrusted input: nothing reaches compiled code unchecked. The shard
format itself - its layout, readers and structural checks - is stages/shard's; this module
applies them to a dir (`check("full")`: every shard read in blocks, several at a time).
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import numpy as np
import orjson

from .errors import BuildError
from .fsutil import atomic_write_bytes
from .shard import (ARRAYS, BLOCK, INDEX_DTYPES, Provenance, check_arrays,  # noqa: F401 (re-exported)
                    expected_layout_faults, file_sha256, shard_file_faults, shard_layout,
                    shard_provenance, token_dtype)

SCHEMA_VERSION = 2  # 2: shard entries' `arrays` may hold source_file_offsets (format 2 shards)
READABLE_SCHEMAS = (1, 2)
_ARRAY = {"type": "object", "required": ["offset", "dtype", "shape"],
          "properties": {"offset": {"type": ["integer", "null"], "minimum": 0},
                         "dtype": {"type": "string"},
                         "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}
META_SCHEMA = {
    "type": "object",
    "required": ["schema_version", "key", "n_samples", "n_tokens", "tokenizer", "shards"],
    "properties": {
        "schema_version": {"enum": list(READABLE_SCHEMAS)},
        "key": {"type": "string", "minLength": 1},
        "dataset_name": {"type": "string"},
        "n_samples": {"type": "integer", "minimum": 0},
        "n_tokens": {"type": "integer", "minimum": 0},
        "nlines": {"type": "integer", "minimum": 0},
        "records_read": {"type": "integer", "minimum": 0},
        "skipped": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
        "tokenizer": {"type": "object", "required": ["vocab_size"],
                      "properties": {"vocab_size": {"type": "integer", "minimum": 1},
                                     "bos_id": {"type": ["integer", "null"]},
                                     "eos_id": {"type": ["integer", "null"]},
                                     "pad_id": {"type": ["integer", "null"]}}},
        "build": {"type": "object"},
        "shards": {"type": "array", "items": {
            "type": "object", "required": ["file", "n_samples", "n_tokens", "sha256"],
            "properties": {
                # a plain file name inside the dir: a crafted meta.json must not point elsewhere
                "file": {"type": "string", "pattern": r"^[^/\\.][^/\\]*\.h5$"},
                "n_samples": {"type": "integer", "minimum": 0},
                "n_tokens": {"type": "integer", "minimum": 0},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "arrays": {"type": "object", "required": ["tokens", "offsets"],
                           "properties": {a: _ARRAY for a in ARRAYS},
                           "additionalProperties": False}}}},
    },
}
# jsonschema costs ~0.3 ms per shard entry: the top level is validated by it, each shard entry
# by `_shard_faults`, which applies META_SCHEMA's shard item rules by hand (10^4 shards: ~20 ms).
_SHARD_ITEM = META_SCHEMA["properties"]["shards"]["items"]
_TOP = dict(META_SCHEMA, properties=dict(META_SCHEMA["properties"],
                                         shards={"type": "array", "items": {"type": "object"}}))
_VALIDATOR = jsonschema.Draft202012Validator(_TOP)
_ITEM_VALIDATOR = jsonschema.Draft202012Validator(_SHARD_ITEM)
_FILE_RE = re.compile(_SHARD_ITEM["properties"]["file"]["pattern"])
_SHA_RE = re.compile(_SHARD_ITEM["properties"]["sha256"]["pattern"])


def _is_count(v) -> bool:
    return type(v) is int and v >= 0


def _array_ok(a) -> bool:
    return (type(a) is dict and set(a) == {"offset", "dtype", "shape"} and type(a["dtype"]) is str
            and (a["offset"] is None or _is_count(a["offset"])) and type(a["shape"]) is list
            and all(_is_count(x) for x in a["shape"]))


def _shard_ok(s) -> bool:
    """The fast path of _SHARD_ITEM (what a writer of this module produces)."""
    if type(s) is not dict or not {"file", "n_samples", "n_tokens", "sha256"} <= set(s):
        return False
    if not (type(s["file"]) is str and _FILE_RE.search(s["file"]) and type(s["sha256"]) is str
            and _SHA_RE.search(s["sha256"]) and _is_count(s["n_samples"])
            and _is_count(s["n_tokens"])):
        return False
    a = s.get("arrays", {})
    return "arrays" not in s or (type(a) is dict and {"tokens", "offsets"} <= set(a)
                                 and set(a) <= set(ARRAYS) and all(map(_array_ok, a.values())))


class DatasetError(BuildError):
    """A built dir (or one of its shards) that is refused; the message names it and the fault."""


@dataclass(frozen=True)
class BuiltMeta:
    """A built dir's meta.json, read and validated once (`read_meta`), with the fields the
    pipeline's commands read typed; every other field is in `raw` (the dict as read)."""
    dir: Path
    raw: dict
    key: str
    dataset_name: str
    nlines: int  # source records (FM9G nlines)
    n_samples: int  # what the shards hold (segment: more than nlines)
    n_tokens: int

    @classmethod
    def read(cls, directory: str | Path) -> "BuiltMeta":
        raw = read_meta(directory)
        return cls(Path(directory), raw, raw["key"], raw.get("dataset_name") or Path(directory).name,
                   int(raw.get("nlines", raw["n_samples"])), int(raw["n_samples"]), int(raw["n_tokens"]))


def write_meta(directory: str | Path, meta: dict, *, sort_keys: bool | None = None) -> Path:
    """Write meta.json atomically: indent 2, trailing newline, byte-deterministic. Keys are
    written in the order given when `sort_keys=False`; the default (None) sorts them, which
    is what builds have always written."""
    opt = orjson.OPT_INDENT_2 | (orjson.OPT_SORT_KEYS if sort_keys in (None, True) else 0)
    path = Path(directory) / "meta.json"
    atomic_write_bytes(path, orjson.dumps(meta, option=opt) + b"\n")
    return path


def describe_shard(path: str | Path) -> dict:
    """The meta.json entry of a shard file: {file, n_samples, n_tokens, sha256, arrays:
    shard_layout(path)}."""
    path = Path(path)
    arrays = shard_layout(path)
    n = arrays["offsets"]["shape"][0] - 1 if "offsets" in arrays else 0
    nt = arrays["tokens"]["shape"][0] if "tokens" in arrays else 0
    return {"file": path.name, "n_samples": n, "n_tokens": nt, "sha256": file_sha256(path),
            "arrays": arrays}


def read_meta(directory: str | Path) -> dict:
    """meta.json of a dir, validated; DatasetError naming the dir and the field otherwise."""
    d = Path(directory)
    p = d / "meta.json"
    try:
        meta = orjson.loads(p.read_bytes())
    except FileNotFoundError:
        raise DatasetError(f"{d}: no meta.json (not a built dataset dir, or an unfinished build)") from None
    except OSError as e:
        raise DatasetError(f"{p}: cannot read: {e.strerror or e}") from None
    except orjson.JSONDecodeError as e:
        raise DatasetError(f"{p}: not valid JSON ({e})") from None
    err = next(iter(sorted(_VALIDATOR.iter_errors(meta), key=lambda e: list(e.absolute_path))), None)
    prefix = []
    if err is None:
        for k, sh in enumerate(meta["shards"]):
            if not _shard_ok(sh):  # the schema's own message for the first bad entry
                err = next(iter(sorted(_ITEM_VALIDATOR.iter_errors(sh),
                                       key=lambda e: list(e.absolute_path))), None)
                prefix = ["shards", k]
                break
    if err is not None:
        where = "/".join(str(x) for x in prefix + list(err.absolute_path)) or "(top level)"
        msg = err.message if len(err.message) < 200 else err.message[:200] + "…"
        raise DatasetError(f"{p}: field '{where}': {msg}")
    return meta


def open_built(directory: str | Path) -> "BuiltDataset":
    d = Path(directory)
    return BuiltDataset(d, read_meta(d))


@dataclass
class BuiltDataset:
    dir: Path
    meta: dict
    first: np.ndarray = field(init=False)  # global sample id of each shard's sample 0 (+ total)
    shard_paths: list = field(init=False)

    def __post_init__(self):
        self.dir = Path(self.dir)
        self.shard_paths = [self.dir / s["file"] for s in self.shards]
        counts = [int(s["n_samples"]) for s in self.shards]
        self.first = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=self.first[1:])

    @property
    def shards(self) -> list[dict]:
        return self.meta["shards"]

    @property
    def n_samples(self) -> int:
        return int(self.first[-1])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def token_dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def special_id(self, which: str) -> int | None:
        """bos / eos / pad id recorded at build time (Tokenizer.info()), or None."""
        v = self.meta["tokenizer"].get(f"{which}_id")
        return v if isinstance(v, int) else None

    def locate(self, sample: int) -> tuple[int, int]:
        """(shard number, index inside it) of sample number `sample` of the dir."""
        if not 0 <= sample < self.n_samples:
            raise IndexError(f"{self.dir}: sample {sample} out of range 0..{self.n_samples - 1}")
        j = int(np.searchsorted(self.first, sample, side="right")) - 1
        return j, int(sample - self.first[j])

    def shard_arrays(self, j: int, mmap: bool = True):
        from .shard import read_shard
        return read_shard(self.shard_paths[j], mmap=mmap)

    def provenance(self, sample: int) -> Provenance:
        """Source file, record and piece of sample number `sample` of the dir (any shard
        format); reads O(files of its shard) values, not the shard's arrays."""
        j, i = self.locate(sample)
        try:
            return shard_provenance(self.shard_paths[j], i)
        except ValueError as e:
            raise DatasetError(str(e)) from None

    def sample_lengths(self) -> np.ndarray:
        """Token count of every sample, in order (reads each shard's offsets)."""
        parts = [np.diff(np.asarray(self.shard_arrays(j).offsets, np.int64))
                 for j in range(len(self.shards))]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    # ------------------------------------------------------------------ checks
    def check(self, level: str = "cheap", lock_entry: dict | None = None,
              lock_tokenizer: dict | None = None, **kw) -> None:
        """Raise DatasetError with every fault found (one per line) unless the dir is sound."""
        faults = self.faults(level, lock_entry, lock_tokenizer, **kw)
        if faults:
            raise DatasetError("\n".join(faults))

    def faults(self, level: str = "cheap", lock_entry: dict | None = None,
               lock_tokenizer: dict | None = None, *, jobs: int | None = None,
               block: int = BLOCK) -> list[str]:
        """Every fault, one line each. `full` reads each shard in blocks of `block` entries
        (memory O(block) per shard, whatever its size), `jobs` shards at a time (default: up
        to 4, at most the CPUs); the faults come in shard order either way."""
        if level not in ("cheap", "full"):
            raise ValueError(f"check level must be cheap or full, got {level!r}")
        out = self._meta_faults(lock_entry, lock_tokenizer)
        for j, s in enumerate(self.shards):
            where = f"{self.dir}/{s['file']}"
            out += [f"{where}: {m}" for m in self._cheap_shard_faults(j)]
        if level == "full" and not any(": missing shard" in f for f in out):
            out += self._full_faults(jobs, block)
        return out

    def _meta_faults(self, e: dict | None, ltok: dict | None) -> list[str]:
        m, where, out = self.meta, f"{self.dir}/meta.json", []
        if sum(int(s["n_tokens"]) for s in self.shards) != m["n_tokens"]:
            out.append(f"{where}: n_tokens {m['n_tokens']} != "
                       f"{sum(int(s['n_tokens']) for s in self.shards)} in its shards")
        if self.n_samples != m["n_samples"]:
            out.append(f"{where}: n_samples {m['n_samples']} != {self.n_samples} in its shards")
        if len({s["file"] for s in self.shards}) != len(self.shards):
            out.append(f"{where}: a shard file is listed twice")
        if e is not None:
            if e.get("key") is not None and e["key"] != m["key"]:
                out.append(f"{self.dir}: lock key {e['key']} != meta.json key {m['key']} "
                           "(the lock's path points at another dataset's dir)")
            n_lock = e.get("nlines")
            if n_lock is not None and int(n_lock) != self.n_samples:
                out.append(f"{self.dir}: lock nlines {n_lock} != {self.n_samples} samples in its shards")
        mtok = m["tokenizer"]
        for f in ("vocab_size", "sha256"):
            if ltok and ltok.get(f) is not None and mtok.get(f) is not None and ltok[f] != mtok[f]:
                out.append(f"{where}: tokenizer {f} {mtok[f]} != lock's {ltok[f]}")
        return out

    def _cheap_shard_faults(self, j: int) -> list[str]:
        s, p = self.shards[j], self.shard_paths[j]
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return ["missing shard file"]
        except OSError as err:
            return [f"unreadable ({err.strerror})"]
        arrays = s.get("arrays")
        if arrays is None:
            return [] if size > 0 else ["empty file"]
        return [f"{m} (meta.json)" for m in expected_layout_faults(
            arrays, int(s["n_samples"]), int(s["n_tokens"]), self.vocab_size, size)]

    def _full_faults(self, jobs: int | None, block: int) -> list[str]:
        if jobs is None:
            jobs = min(4, os.cpu_count() or 1)
        jobs = max(1, min(jobs, len(self.shards)))
        if jobs == 1:
            out = [f for j in range(len(self.shards)) for f in self._shard_full(j, block)]
        else:  # sha256 and numpy release the GIL on large blocks: threads suffice
            with ThreadPoolExecutor(jobs) as ex:
                out = [f for fs in ex.map(lambda j: self._shard_full(j, block),
                                          range(len(self.shards))) for f in fs]
        return out + self._records_faults()

    def _shard_full(self, j: int, block: int) -> list[str]:
        s, p = self.shards[j], self.shard_paths[j]
        where, out = f"{self.dir}/{s['file']}", []
        if file_sha256(p) != s["sha256"]:
            out.append(f"{where}: sha256 differs from meta.json (corrupted or replaced)")
        try:
            out += [f"{where}: {m}" for m in shard_file_faults(p, s, self.vocab_size, block=block)]
        except OSError as err:
            out.append(f"{where}: unreadable HDF5 ({err})")
        return out

    def _records_faults(self) -> list[str]:
        m = self.meta
        if "records_read" not in m or "nlines" not in m:
            return []
        skipped = sum((m.get("skipped") or {}).values())
        if m["records_read"] != m["nlines"] + skipped:
            return [f"{self.dir}/meta.json: records_read {m['records_read']} != nlines "
                    f"{m['nlines']} + skipped {skipped}"]
        return []
