"""The shard format's definitions (DESIGN §4): names, exact dtypes and byte layout of a shard's
datasets, and the layout a meta.json entry records. Imported by every other part of
stages.shard (the writer, the readers and the checks); nothing here opens a file for writing.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: one source file per shard, in the `source` attribute
# the numeric datasets of a shard (its `source_files` names are strings, read with h5py)
ARRAYS = ("tokens", "offsets", "source_record", "loss_spans", "loss_span_offsets",
          "source_file_offsets")
# exact dtypes of the index arrays (tokens: token_dtype(vocab_size)); train/kernels.py's
# gather_samples reads offsets / loss_span_offsets as 8-byte and loss_spans as 4-byte pairs
# through the maps, which is safe only because expected_layout_faults enforces these
INDEX_DTYPES = {"offsets": "int64", "source_record": "int64", "loss_spans": "int32",
                "loss_span_offsets": "int64", "source_file_offsets": "int64"}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab ≤ 65536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


@dataclass
class ShardArrays:
    tokens: np.ndarray  # 1-D, token_dtype(vocab)
    offsets: np.ndarray  # int64, n+1, offsets[0] == 0
    source_record: np.ndarray  # int64, n
    loss_spans: np.ndarray | None = None  # int32 (m, 2), [start, end) relative to sample start
    loss_span_offsets: np.ndarray | None = None  # int64, n+1
    source_files: list[str] | None = None  # k source files, in sample order (None: the writer's `source`)
    source_file_offsets: np.ndarray | None = None  # int64, k+1: file j has samples [sfo[j], sfo[j+1])

    @property
    def n_samples(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def spans(self, i: int) -> np.ndarray | None:
        if self.loss_spans is None:
            return None
        return self.loss_spans[self.loss_span_offsets[i] : self.loss_span_offsets[i + 1]]


@dataclass(frozen=True)
class Provenance:
    """Where a stored sample came from."""
    file: str  # the source file, as the build named it
    record: int  # 0-based record number in it (line / list element / parquet row)
    piece: int  # which stored sample of that record (0; more only when overflow: segment split it)


def _files_array(files: list[str]) -> np.ndarray:
    """The `source_files` dataset: UTF-8 paths as fixed-width byte strings (contiguous and
    byte-deterministic, unlike HDF5 variable-length strings in the global heap)."""
    raw = [f.encode("utf-8", "surrogateescape") for f in files]
    return np.array(raw, dtype=f"S{max([len(r) for r in raw] + [1])}")


def decode_files(raw) -> list[str]:
    return [bytes(x).decode("utf-8", "surrogateescape") for x in raw]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()



def dtype_name(dt: np.dtype) -> str:
    dt = np.dtype(dt)
    return dt.name if dt.byteorder in "=<|" else dt.str  # ">i8": not the int64 a reader wants


def shard_layout(path: str | Path) -> dict:
    """{name: {offset, dtype, shape}} of a shard file's datasets (one h5py open); offset is
    the byte offset of the contiguous dataset in the file (None: empty or not contiguous)."""
    import h5py  # (imported here: the constants above need no h5py)
    arrays = {}
    with h5py.File(path, "r") as f:
        for name in ARRAYS:
            if name in f:
                d = f[name]
                arrays[name] = {"offset": d.id.get_offset() if d.size else None,
                                "dtype": dtype_name(d.dtype), "shape": list(d.shape)}
    return arrays


@functools.lru_cache(maxsize=64)
def _itemsize(name: str) -> int:
    return np.dtype(name).itemsize


@functools.lru_cache(maxsize=8)
def _token_dtype_name(vocab_size: int) -> str:
    return dtype_name(token_dtype(vocab_size))


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


