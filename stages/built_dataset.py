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
A shard from outside is untrusted input: nothing reaches compiled code unchecked
(`check_arrays` is the one structural check, used by `check("full")` and by the stream).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import numpy as np
import orjson

from .errors import BuildError
from .fsutil import atomic_write_bytes
from .shard import (READABLE_FORMATS, Provenance, file_sha256, provenance_faults,
                    shard_provenance, token_dtype)

SCHEMA_VERSION = 2  # 2: shard entries' `arrays` may hold source_file_offsets (format 2 shards)
READABLE_SCHEMAS = (1, 2)
# the numeric datasets of a shard (its `source_files` names are strings, read with h5py)
ARRAYS = ("tokens", "offsets", "source_record", "loss_spans", "loss_span_offsets",
          "source_file_offsets")
# exact dtypes of the index arrays (tokens: token_dtype(vocab_size))
INDEX_DTYPES = {"offsets": "int64", "source_record": "int64", "loss_spans": "int32",
                "loss_span_offsets": "int64", "source_file_offsets": "int64"}

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


def _dtype_name(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    return dt.name if dt.byteorder in "=<|" else dt.str  # ">i8": not the int64 a reader wants


def shard_layout(path: str | Path) -> dict:
    """{name: {offset, dtype, shape}} of a shard file's datasets (one h5py open); offset is
    the byte offset of the contiguous dataset in the file (None: empty or not contiguous)."""
    import h5py
    arrays = {}
    with h5py.File(path, "r") as f:
        for name in ARRAYS:
            if name in f:
                d = f[name]
                arrays[name] = {"offset": d.id.get_offset() if d.size else None,
                                "dtype": _dtype_name(d.dtype), "shape": list(d.shape)}
    return arrays


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
              lock_tokenizer: dict | None = None) -> None:
        """Raise DatasetError with every fault found (one per line) unless the dir is sound."""
        faults = self.faults(level, lock_entry, lock_tokenizer)
        if faults:
            raise DatasetError("\n".join(faults))

    def faults(self, level: str = "cheap", lock_entry: dict | None = None,
               lock_tokenizer: dict | None = None) -> list[str]:
        if level not in ("cheap", "full"):
            raise ValueError(f"check level must be cheap or full, got {level!r}")
        out = self._meta_faults(lock_entry, lock_tokenizer)
        for j, s in enumerate(self.shards):
            where = f"{self.dir}/{s['file']}"
            out += [f"{where}: {m}" for m in self._cheap_shard_faults(j)]
        if level == "full" and not any(": missing shard" in f for f in out):
            out += self._full_faults()
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

    def _full_faults(self) -> list[str]:
        out = []
        for j, s in enumerate(self.shards):
            p = self.shard_paths[j]
            where = f"{self.dir}/{s['file']}"
            if file_sha256(p) != s["sha256"]:
                out.append(f"{where}: sha256 differs from meta.json (corrupted or replaced)")
            try:
                out += [f"{where}: {m}" for m in self._shard_structure(j)]
            except OSError as err:
                out.append(f"{where}: unreadable HDF5 ({err})")
        out += self._records_faults()
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

    def _shard_structure(self, j: int) -> list[str]:
        import h5py
        s, p = self.shards[j], self.shard_paths[j]
        desc = {"arrays": shard_layout(p)}
        with h5py.File(p, "r") as h:
            version = int(h.attrs.get("format_version", -1))
            if version not in READABLE_FORMATS:
                return [f"format_version {h.attrs.get('format_version')} unsupported "
                        f"(want one of {list(READABLE_FORMATS)})"]
            need = ("tokens", "offsets", "source_record") + (
                ("source_files", "source_file_offsets") if version >= 2 else ())
            for name in need:
                if name not in h:
                    return [f"dataset '{name}' missing"]
            if version == 1 and "source" not in h.attrs:
                return ["attribute 'source' missing (format 1)"]
            out = expected_layout_faults(desc["arrays"], int(s["n_samples"]), int(s["n_tokens"]),
                                         self.vocab_size, p.stat().st_size)
            if h["tokens"].chunks is not None or h["tokens"].compression is not None:
                out.append("tokens is chunked or compressed (must be contiguous)")
            if s.get("arrays") is not None and s["arrays"] != desc["arrays"]:
                out.append("arrays in meta.json differ from the file's datasets")
            if version >= 2 and (h["source_files"].ndim != 1 or h["source_files"].dtype.kind != "S"):
                out.append(f"source_files must be 1-D byte strings, not {h['source_files'].dtype} "
                           f"{list(h['source_files'].shape)}")
            if out:
                return out
            arr = {k: h[k][...] for k in ARRAYS if k in h}
            if version >= 2:
                arr["source_files"] = h["source_files"][...]
        return check_arrays(arr, self.vocab_size, tokens=True, sorted_spans=True)


@functools.lru_cache(maxsize=64)
def _itemsize(name: str) -> int:
    return np.dtype(name).itemsize


@functools.lru_cache(maxsize=8)
def _token_dtype_name(vocab_size: int) -> str:
    return _dtype_name(token_dtype(vocab_size))


def expected_layout_faults(arrays: dict, n: int, n_tokens: int, vocab_size: int,
                           file_size: int, wider_tokens: bool = False) -> list[str]:
    """Dtypes, shapes and byte ranges of a shard's datasets (as describe_shard gives them)
    against what its meta.json entry and the vocabulary say. Tokens must have the dtype the
    build writes for the vocabulary (wider_tokens: uint32 is accepted too - a hand-made
    shard the stream can still read safely)."""
    out = []
    want = dict(INDEX_DTYPES, tokens=_token_dtype_name(vocab_size))
    if wider_tokens and arrays.get("tokens", {}).get("dtype") == "uint32":
        want["tokens"] = "uint32"
    shapes = {"tokens": [n_tokens], "offsets": [n + 1], "source_record": [n]}
    sfo = arrays.get("source_file_offsets")
    if sfo is not None and (len(sfo["shape"]) != 1 or sfo["shape"][0] < 1):
        out.append(f"source_file_offsets shape {list(sfo['shape'])} (want [files + 1])")
    for name in ("tokens", "offsets"):
        if name not in arrays:
            out.append(f"dataset '{name}' missing")
    if ("loss_spans" in arrays) != ("loss_span_offsets" in arrays):
        out.append("loss_spans and loss_span_offsets must come together")
    elif "loss_spans" in arrays:
        shapes["loss_span_offsets"] = [n + 1]
        sp = arrays["loss_spans"]["shape"]
        if len(sp) != 2 or sp[1] != 2:
            out.append(f"loss_spans shape {sp} (want [m, 2])")
    for name, a in arrays.items():
        if a["dtype"] != want[name]:
            out.append(f"tokens dtype {a['dtype']} does not match vocab_size {vocab_size} "
                       f"(want {want[name]})" if name == "tokens" else
                       f"{name} dtype {a['dtype']} (want {want[name]})")
        if name in shapes and list(a["shape"]) != shapes[name]:
            out.append(f"{name} shape {list(a['shape'])} but meta.json's n_samples/n_tokens "
                       f"{n}/{n_tokens} need {shapes[name]}")
        try:
            size = math.prod(a["shape"]) * _itemsize(a["dtype"])
        except TypeError:
            size = 0  # an unknown dtype name: already named above
        if a["offset"] is None and size:
            out.append(f"{name} is not contiguous (no byte offset)")
        elif size and a["offset"] + size > file_size:
            out.append(f"{name} bytes [{a['offset']}, {a['offset'] + size}) past the end of the "
                       f"{file_size}-byte file (truncated?)")
    return out


def check_arrays(arr: dict, vocab_size: int, *, tokens: bool = True,
                 sorted_spans: bool = False) -> list[str]:
    """Structure of one shard's arrays (numpy arrays or memory maps of exact dtypes):
    offsets 0 … len(tokens) non-decreasing, loss_span_offsets 0 … len(loss_spans)
    non-decreasing, every span inside its sample ([s, e), 0 <= s < e <= length; sorted and
    disjoint with sorted_spans), and (tokens=True) every token id < vocab_size."""
    out = []
    toks, offsets = arr["tokens"], np.asarray(arr["offsets"])
    n = len(offsets) - 1
    if n < 0 or offsets[0] != 0 or offsets[-1] != len(toks) or bool((np.diff(offsets) < 0).any()):
        return [f"offsets are not a non-decreasing index from 0 to the {len(toks)} tokens"]
    if "source_record" in arr and len(arr["source_record"]) != n:
        out.append(f"source_record has {len(arr['source_record'])} entries for {n} samples")
    elif "source_record" in arr and n and int(np.min(arr["source_record"])) < 0:
        out.append(f"source_record has a negative record number {int(np.min(arr['source_record']))}")
    if "source_file_offsets" in arr:
        out += provenance_faults(np.asarray(arr["source_file_offsets"]), arr.get("source_files"), n)
    if tokens and len(toks):
        top = max(int(toks[j:j + (1 << 24)].max()) for j in range(0, len(toks), 1 << 24))
        if top >= vocab_size:
            out.append(f"token id {top} >= vocab size {vocab_size}")
    if "loss_spans" in arr:
        spans, lso = np.asarray(arr["loss_spans"]).reshape(-1, 2), np.asarray(arr["loss_span_offsets"])
        if len(lso) != n + 1 or lso[0] != 0 or lso[-1] != len(spans) or bool((np.diff(lso) < 0).any()):
            return out + [f"loss_span_offsets are not a non-decreasing index from 0 to the "
                          f"{len(spans)} loss spans"]
        lengths = np.diff(offsets)
        owner = np.repeat(np.arange(n), np.diff(lso))
        s0, s1 = spans[:, 0].astype(np.int64), spans[:, 1].astype(np.int64)
        bad = (s0 < 0) | (s1 < s0) | (s1 > lengths[owner])
        if sorted_spans:
            bad |= s1 == s0
            same = owner[1:] == owner[:-1]
            bad[1:] |= same & (s0[1:] < s1[:-1])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            out.append(f"loss span {spans[i].tolist()} of sample {int(owner[i])} lies outside the "
                       f"sample (length {int(lengths[owner[i]])})"
                       + (" or is empty or out of order" if sorted_spans else ""))
    return out
