"""Contract hashes: sha256 of every shard and meta.json of two builds and of 300 stream batches
per mode, so a refactor can show that it changed no byte (issue 23).

    python benchmarks/contract_hashes.py [--work /tmp/contract] [--batches 300] [--no-real]

* the sample build (`python -m pipeline build sample_data/mixture.json`),
* a real build over ../shared (c4 + alpaca_zh + medical through the Qwen2.5 tokenizer; skipped
  with a note when ../shared is absent),
* per stream mode (packed, padded, concat) and validation split (0 and 5 %): the sha256 of
  `--batches` batches (every tensor's dtype, shape and bytes, every other value's repr, in key
  order) and of the state_dict after them; with a split, also of the whole eval_batches().

Each line is `name sha256`; diff two runs' output. Paths are printed relative to the build's
output dir, so two runs into different dirs compare.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def file_hashes(out: Path) -> list[tuple[str, str]]:
    rows = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and (p.suffix == ".h5" or p.name == "meta.json"):
            rel = p.relative_to(out)
            # built dirs are content-addressed (<name>-<key>): the path itself is part of the contract
            rows.append((str(rel), hashlib.sha256(p.read_bytes()).hexdigest()))
    return rows


def build(manifest: Path, out: Path) -> Path:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([sys.executable, "-m", "pipeline", "build", str(manifest), "--out", str(out),
                    "--workers", "2"], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    locks = sorted(out.rglob("*.lock.json"))
    if not locks:
        raise SystemExit(f"no lock under {out}")
    return locks[0]


def real_manifest(folder: Path) -> Path | None:
    qwen = SHARED / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
    c = SHARED / "corpora"
    src = [("c4", c / "llamafactory-pretrain-en" / "c4_demo.jsonl", "pretrain", "text", None),
           ("alpaca_zh", c / "llamafactory-alpaca-en-zh" / "alpaca_zh_demo.json", "sft", "alpaca",
            "truncate"),
           ("medical", c / "medicalgpt-sharegpt-zh" / "medical_sft_1K_format.jsonl", "sft",
            "sharegpt", "truncate")]
    if not (qwen / "tokenizer.json").exists() or not all(p.exists() for _, p, *_ in src):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    ds = []
    for name, path, task, fmt, over in src:
        e = {"dataset_name": name, "task_name": task, "abs_weight": 1.0, "path": str(path),
             "format": fmt, "language": "mixed", "allow_repeat": True}
        if over:
            e["overflow"] = over
        ds.append(e)
    m = {"tokenizer": str(qwen), "template": "tokenizer", "max_length": 4096, "seed": 1234,
         "datasets": ds}
    p = folder / "mixture.json"
    p.write_text(json.dumps(m, indent=1))
    return p


def batch_hash(h, batch: dict) -> None:
    import torch
    for k in sorted(batch):
        v = batch[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.contiguous().numpy().tobytes())
        else:
            h.update(repr(v).encode())


def stream_hashes(lock: Path, tag: str, n_batches: int, modes=("packed", "padded", "concat"),
                  vals=(0.0, 5.0)) -> list[tuple[str, str]]:
    from train.stream import MixtureStream
    rows = []
    for mode in modes:
        for val in vals:
            s = MixtureStream(lock, 128, mode=mode, batch_size=4, validation_percentage=val,
                              pack_window=64)
            loader = s.loader(0)
            h, n = hashlib.sha256(), 0
            for b in loader:
                batch_hash(h, b)
                n += 1
                if n == n_batches:
                    break
            name = f"{tag}/stream/{mode}/val{val:g}"
            rows.append((f"{name}/batches[{n}]", h.hexdigest()))
            st = json.dumps(loader.state_dict(), sort_keys=True)
            rows.append((f"{name}/state_dict", hashlib.sha256(st.encode()).hexdigest()))
            if val:
                h, n = hashlib.sha256(), 0
                for b in s.eval_batches():
                    batch_hash(h, b)
                    n += 1
                rows.append((f"{name}/eval_batches[{n}]", h.hexdigest()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/contract_hashes")
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--no-real", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    rows = []
    out = work / "sample"
    lock = build(ROOT / "sample_data" / "mixture.json", out)
    rows += [(f"sample/{r}", h) for r, h in file_hashes(out)]
    rows += stream_hashes(lock, "sample", a.batches)
    if not a.no_real:
        m = real_manifest(work / "real-manifest")
        if m is None:
            print(f"# {SHARED} absent: real build skipped")
        else:
            out = work / "real"
            lock = build(m, out)
            rows += [(f"real/{r}", h) for r, h in file_hashes(out)]
            rows += stream_hashes(lock, "real", a.batches, modes=("packed",), vals=(0.0, 5.0))
    for r, h in rows:
        print(r, h)


if __name__ == "__main__":
    main()
