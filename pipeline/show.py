"""`pipeline show`: one sample decoded, trained spans marked (green on a terminal,
⟦brackets⟧ otherwise)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import orjson

from stages.render import marked_text
from stages.shard import read_shard

from .verify import built_dirs


def locate(d: Path, meta: dict, index: int):
    """Global sample index → (shard arrays, index within shard)."""
    if not 0 <= index < meta["n_samples"]:
        raise IndexError(f"{d.name}: index {index} out of range (0 … {meta['n_samples'] - 1})")
    for sh in meta["shards"]:
        if index < sh["n_samples"]:
            return read_shard(d / sh["file"]), index
        index -= sh["n_samples"]
    raise IndexError(index)


def show(path: str, index: int = 0, dataset: str | None = None, color: bool | None = None) -> int:
    dirs = built_dirs(path)
    metas = {d: orjson.loads((d / "meta.json").read_bytes()) for d in dirs}
    if dataset:
        dirs = [d for d in dirs if metas[d]["dataset_name"] == dataset]
        if not dirs:
            raise KeyError(f"no dataset named {dataset!r} in {path}")
    d = dirs[0]
    meta = metas[d]
    arrays, i = locate(d, meta, index)
    ids = np.asarray(arrays.sample(i), dtype=np.int64)
    spans = arrays.spans(i)
    from stages.tokenizer import load_tokenizer
    tok = load_tokenizer(meta["tokenizer"]["path"])
    color = sys.stdout.isatty() if color is None else color
    n_trained = len(ids) if spans is None else int((spans[:, 1] - spans[:, 0]).sum())
    print(f"{meta['dataset_name']} sample {index}: {len(ids)} tokens, {n_trained} trained "
          f"({len(spans) if spans is not None else 1} span(s)), source record "
          f"{int(arrays.source_record[i])} of {meta['sources'][0]['path'] if len(meta['sources']) == 1 else 'its file'}")
    print("trained text is " + ("green" if color else "inside ⟦ ⟧") + ":\n")
    print(marked_text(tok, ids, spans, color=color))
    return 0
