"""`pipeline verify`: structure and checksums of built dirs; every fault is named."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import orjson

from stages.shard import file_sha256, token_dtype


def built_dirs(path: str) -> list[Path]:
    """A built dataset dir, or every dir a lock names."""
    p = Path(path)
    if p.is_dir():
        return [p]
    if p.is_file():
        lock = orjson.loads(p.read_bytes())
        if "datasets" in lock:
            return [Path(d["path"]) for d in lock["datasets"]]
    raise FileNotFoundError(f"{path}: not a built dataset dir or a lock file")


def verify_dir(d: Path) -> list[str]:
    faults: list[str] = []
    meta_path = d / "meta.json"
    if not meta_path.is_file():
        return [f"{d}: no meta.json (an unfinished build?)"]
    meta = orjson.loads(meta_path.read_bytes())
    vocab = meta["tokenizer"]["vocab_size"]
    want_dtype = token_dtype(vocab)
    n_samples = n_tokens = 0
    for sh in meta["shards"]:
        f = d / sh["file"]
        where = f"{d.name}/{sh['file']}"
        if not f.is_file():
            faults.append(f"{where}: missing")
            continue
        if file_sha256(f) != sh["sha256"]:
            faults.append(f"{where}: sha256 differs from meta.json (corrupted or replaced)")
        try:
            faults += [f"{where}: {m}" for m in _check_shard(f, sh, want_dtype, vocab)]
        except OSError as e:
            faults.append(f"{where}: unreadable HDF5 ({e})")
        n_samples += sh["n_samples"]
        n_tokens += sh["n_tokens"]
    if n_samples != meta["n_samples"]:
        faults.append(f"{d.name}/meta.json: n_samples {meta['n_samples']} != {n_samples} in shards")
    if n_tokens != meta["n_tokens"]:
        faults.append(f"{d.name}/meta.json: n_tokens {meta['n_tokens']} != {n_tokens} in shards")
    return faults


def _check_shard(f: Path, sh: dict, want_dtype, vocab: int) -> list[str]:
    out = []
    with h5py.File(f, "r") as h:
        for name in ("tokens", "offsets", "source_record"):
            if name not in h:
                return [f"dataset '{name}' missing"]
        tokens, offsets = h["tokens"], h["offsets"][...]
        if tokens.dtype != want_dtype:
            out.append(f"tokens dtype {tokens.dtype} but vocab {vocab} needs {want_dtype}")
        if tokens.chunks is not None or tokens.compression is not None:
            out.append("tokens is chunked or compressed (must be contiguous)")
        n = len(offsets) - 1
        if n != sh["n_samples"] or len(tokens) != sh["n_tokens"]:
            out.append(f"holds {n} samples / {len(tokens)} tokens, meta.json says "
                       f"{sh['n_samples']} / {sh['n_tokens']}")
        if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
            out.append("offsets are not 0 … len(tokens), non-decreasing")
        if len(h["source_record"]) != n:
            out.append("source_record length != number of samples")
        if len(tokens) and int(np.max(tokens[...])) >= vocab:
            out.append(f"token id {int(np.max(tokens[...]))} >= vocab size {vocab}")
        if "loss_spans" in h:
            spans, lso = h["loss_spans"][...], h["loss_span_offsets"][...]
            if len(lso) != n + 1 or lso[0] != 0 or lso[-1] != len(spans) or np.any(np.diff(lso) < 0):
                out.append("loss_span_offsets inconsistent with loss_spans")
            else:
                lengths = np.diff(offsets)
                owner = np.repeat(np.arange(n), np.diff(lso))
                bad = (spans[:, 0] < 0) | (spans[:, 1] <= spans[:, 0]) | (spans[:, 1] > lengths[owner])
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    out.append(f"loss span {spans[i].tolist()} of sample {owner[i]} lies outside "
                               f"the sample (length {lengths[owner[i]]})")
    return out
