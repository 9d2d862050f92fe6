"""Build small shard dirs (meta.json + shard-NNNNN.h5) and mixture locks for the stream tests,
with the real writers (`stages.shard.write_shard`, `stages.built_dataset.write_meta`). No
pytest imports: the subprocess resume test imports this module too."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from stages.built_dataset import SCHEMA_VERSION, describe_shard, write_meta
from stages.shard import ShardArrays, file_sha256, read_shard, token_dtype, write_shard

VOCAB = 1000
EOS = 2
PAD = 0


def make_dataset(root, name: str, lengths, *, vocab: int = VOCAB, spans: str = "sft",
                 n_shards: int = 1, seed: int = 0, overflow: str = "segment",
                 max_length: int = 4096, end_with_eos: bool = False, dtype=None,
                 arrays: bool = True) -> Path:
    """A built dir with len(lengths) samples. spans: 'sft' (1-3 random trained spans per
    sample), 'messy' (like sft, plus spans that overlap, repeat, are empty or are out of
    order), 'none' (no loss_spans dataset: all tokens trained). arrays: record the shards'
    byte offsets in meta.json (as the build does); False: shard entries without them."""
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in lengths]
    key = hashlib.sha256(f"{name}/{seed}/{lengths}/{spans}".encode()).hexdigest()
    out = Path(root) / f"{name}-{key[:16]}"
    out.mkdir(parents=True, exist_ok=True)
    dt = np.dtype(dtype) if dtype is not None else token_dtype(vocab)
    bounds = np.linspace(0, len(lengths), n_shards + 1).astype(int)
    shards = []
    for s in range(n_shards):
        part = lengths[bounds[s]:bounds[s + 1]]
        toks, sps, lso = [], [], [0]
        for n in part:
            t = rng.integers(3, vocab, size=n)
            if end_with_eos and n:
                t[-1] = EOS
            toks.append(t)
            if spans in ("sft", "messy"):
                k = min(n + 1, 2 * int(rng.integers(1, 4)))
                cuts = (np.sort(rng.choice(np.arange(n + 1), size=k, replace=False)) if n
                        else np.zeros(0, int))
                pairs = cuts[: len(cuts) // 2 * 2].reshape(-1, 2)
                pairs = pairs[pairs[:, 1] > pairs[:, 0]]
                if spans == "messy" and n > 1:
                    extra = np.sort(rng.integers(0, n + 1, size=(2, 2)), axis=1)
                    pairs = np.concatenate([pairs, extra, pairs[:1]])[::-1]
                sps.append(pairs)
                lso.append(lso[-1] + len(pairs))
        offsets = np.zeros(len(part) + 1, np.int64)
        np.cumsum(part, out=offsets[1:])
        arr = ShardArrays(
            tokens=(np.concatenate(toks) if toks else np.zeros(0)).astype(dt),
            offsets=offsets,
            source_record=np.arange(bounds[s], bounds[s + 1], dtype=np.int64),
            loss_spans=(np.concatenate(sps).astype(np.int32).reshape(-1, 2) if spans != "none"
                        else None),
            loss_span_offsets=np.asarray(lso, np.int64) if spans != "none" else None)
        fname = f"shard-{s:05d}.h5"
        write_shard(out / fname, arr, source=f"{name}.jsonl")
        shards.append(describe_shard(out / fname) if arrays else
                      {"file": fname, "n_samples": len(part), "n_tokens": int(sum(part)),
                       "sha256": file_sha256(out / fname)})
    meta = {"schema_version": SCHEMA_VERSION, "dataset_name": name, "key": key,
            "nlines": len(lengths), "records_read": len(lengths), "skipped": {},
            "n_samples": len(lengths), "n_tokens": int(sum(lengths)),
            "avg_token_per_line": float(np.mean(lengths)), "length_unit": "tokens",
            "tokenizer": {"path": None, "vocab_size": vocab, "sha256": "fixture-tokenizer",
                          "bos_id": None, "eos_id": EOS, "pad_id": PAD},
            "dtype": str(dt),
            "build": {"format": "messages", "max_length": max_length, "overflow": overflow},
            "shards": shards}
    write_meta(out, meta)
    return out


def make_lock(path, entries: list[dict], *, seed: int = 1234, max_length: int = 4096,
              vocab: int = VOCAB, eos_id: int | None = EOS, pad_id: int | None = PAD) -> Path:
    """entries: {"dir", "abs_weight", "allow_repeat"(True), "name"(dir name)}."""
    metas = [json.loads((Path(e["dir"]) / "meta.json").read_text()) for e in entries]
    tw = sum(e["abs_weight"] for e in entries)
    probs = [e["abs_weight"] / m["avg_token_per_line"] for e, m in zip(entries, metas)]
    ps = sum(probs)
    tok = {"path": None, "vocab_size": vocab, "sha256": "fixture-tokenizer",
           "bos_id": None, "eos_id": eos_id, "pad_id": pad_id}  # as Tokenizer.info() gives
    ds = []
    for e, m, p in zip(entries, metas, probs):
        name = e.get("name") or Path(e["dir"]).name.rsplit("-", 1)[0]
        ds.append({"dataset_name": name, "task_name": name, "abs_weight": e["abs_weight"],
                   "token_share": e["abs_weight"] / tw, "sample_probability": p / ps,
                   "path": str(Path(e["dir"]).resolve()), "key": m["key"],
                   "allow_repeat": e.get("allow_repeat", True), "nlines": m["nlines"],
                   "ave_tokens_per_line": m["avg_token_per_line"],
                   "total_tokens": m["n_tokens"] / 1e9})
    lock = {"schema_version": 1, "manifest_sha256": "0" * 64, "seed": seed,
            "max_length": max_length, "tokenizer": tok, "datasets": ds}
    path = Path(path)
    path.write_text(json.dumps(lock, indent=1))
    return path


def read_sample(dataset_dir, i: int):
    """(tokens int64, spans (m,2) or None) of sample i of a built dir, straight from the shards."""
    meta = json.loads((Path(dataset_dir) / "meta.json").read_text())
    for s in meta["shards"]:
        if i < s["n_samples"]:
            sh = read_shard(Path(dataset_dir) / s["file"], mmap=False)
            return sh.sample(i).astype(np.int64), sh.spans(i)
        i -= s["n_samples"]
    raise IndexError(i)


def standard_mixture(root, *, seed: int = 1234, sizes=(300, 200, 120), repeat=(True, True, False),
                     weights=(0.5, 0.3, 0.2), max_len: int = 120, n_shards=(2, 1, 1)) -> Path:
    """Three datasets of mixed lengths (one pretraining-style without spans, one non-repeating)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    dirs = []
    for k, (n, sh) in enumerate(zip(sizes, n_shards)):
        lens = rng.integers(1, max_len + 1, size=n)
        dirs.append(make_dataset(root, f"ds{k}", lens, spans="none" if k == 1 else "sft",
                                 n_shards=sh, seed=seed + k, max_length=max_len))
    return make_lock(root / "mixture.lock.json",
                     [{"dir": d, "abs_weight": w, "allow_repeat": r}
                      for d, w, r in zip(dirs, weights, repeat)], seed=seed, max_length=max_len)
