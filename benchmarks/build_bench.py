"""Build throughput against its limits, side by side in one run on the same cores and tokenizer.

    python benchmarks/build_bench.py --mb 200 --workers 2 [--small-mb 20] [--tokenizer DIR] [--skip-datasets]

1. Generates a JSONL corpus of ~MB megabytes of real text (the en/zh pretraining corpora in
   ../shared/corpora, else sample_data/), documents drawn with realistic lengths.
2. Measures, each in a fresh subprocess (peak RSS = the largest single process of that run:
   the driver or any one worker):
   - `pipeline build` (text format, --workers N), timed from the `build_mixture` call, so
     tokenizer loading, the encoder check and writing shards + meta.json are all inside;
     "work" is the same run without that fixed start-up (first unit start to last unit end);
   - raw `tokenizers` encode_batch over the same texts, N threads (HF's limit);
   - raw tiktoken (the same BPE as the pipeline's tiktoken engine, `encode_ordinary_batch`,
     N threads) over the same texts;
   - raw fastokens (when installed: the pipeline's fastest engine, `encode_batch_flat`, N
     threads) over the same texts (the build's limit);
   - HF `datasets` load_dataset("json") + map(tokenize, batched, num_proc=N);
   - with --small-mb, `pipeline build` on a small corpus too: peak RSS must not grow with size.
   The raw runs read and parse the JSONL inside their timing, like the pipeline does.
3. Compares every built sample with HF `tokenizers` (special-token-safe) over the whole
   corpus: the engine's ids must equal HF's on every document.
Prints tokens/s, peak RSS and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def source_texts() -> list[str]:
    texts = []
    c = SHARED / "corpora"
    if c.is_dir():
        for p in [c / "llamafactory-pretrain-en/wiki_demo.txt", c / "medicalgpt-pretrain-zh-en/fever.txt",
                  c / "medicalgpt-pretrain-zh-en/en_article_tail500.txt"]:
            texts += [l for l in p.read_text(encoding="utf-8").splitlines() if l.strip()]
        for line in (c / "llamafactory-pretrain-en/c4_demo.jsonl").read_text(encoding="utf-8").splitlines():
            texts.append(json.loads(line)["text"])
        for rec in json.loads((c / "llamafactory-alpaca-en-zh/alpaca_zh_demo.json").read_text(encoding="utf-8")):
            texts.append(rec["instruction"] + "\n" + rec["output"])
    else:
        texts += [l for l in (ROOT / "sample_data/pretrain_en.txt").read_text().splitlines() if l.strip()]
        texts += [json.loads(l)["text"] for l in (ROOT / "sample_data/pretrain_zh.jsonl").read_text().splitlines()]
    return texts


def make_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """Documents of 1–8 source paragraphs (log-uniform-ish lengths), mixed en/zh."""
    rng = random.Random(seed)
    texts = source_texts()
    target, size, n = int(mb * 1e6), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            k = min(int(2 ** rng.uniform(0, 3)), 8)
            doc = "\n".join(rng.choice(texts) for _ in range(k))
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())
            n += 1
    return n


def run(code: str, env=None) -> tuple[dict, float]:
    """Run python code in a fresh process; it prints one JSON line. → (result, peak RSS GiB of
    its largest process: itself or any worker it waited for)."""
    code += ("\nimport resource as _r, json as _j\nprint(_j.dumps(max(_r.getrusage(_r.RUSAGE_SELF).ru_maxrss,"
             " _r.getrusage(_r.RUSAGE_CHILDREN).ru_maxrss)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-2]), json.loads(lines[-1]) / 2**20


def raw_run(corpus: Path, setup: str, env=None) -> tuple[dict, float]:
    """A raw encoder over the corpus: `setup` defines count(texts) → tokens; reading and JSON
    parsing are timed too, as in the pipeline."""
    return run(setup + f"""
import json, time, orjson
n, t = 0, time.perf_counter()
batch = []
with open({str(corpus)!r}, 'rb') as f:
    for line in f:
        batch.append(orjson.loads(line)["text"])
        if len(batch) == 1000:
            n += count(batch); batch = []
n += count(batch) if batch else 0
print(json.dumps({{"tokens": n, "seconds": time.perf_counter() - t}}))
""", env)


def build_run(work: Path, corpus: Path, args) -> tuple[dict, float]:
    (work / "mix.json").write_text(json.dumps({
        "tokenizer": args.tokenizer, "template": "none", "max_length": 1 << 20, "seed": 0,
        "datasets": [{"dataset_name": "bench", "task_name": "pt", "abs_weight": 1.0,
                      "path": str(corpus), "format": "text"}]}))
    return run(f"""
import json, time
import pipeline.executors as ex
from pipeline.build import build_mixture
span = []
run_local = ex.run_local
def timed(*a, **k):  # the work units alone
    t = time.perf_counter(); r = run_local(*a, **k); span.append(time.perf_counter() - t); return r
import pipeline.build as b; b.run_local = timed
t = time.perf_counter()
_, plans, _ = build_mixture({str(work / 'mix.json')!r}, out={str(work / 'out')!r}, workers={args.workers}, force=True)
dt = time.perf_counter() - t
m = plans[0].meta
from stages.tokenizer import load_tokenizer
tk = load_tokenizer({args.tokenizer!r})
added = (tk.bos_id is not None) + (tk.eos_id is not None)  # template none: BOS + text + EOS
print(json.dumps({{"tokens": m["n_tokens"] - added * m["n_samples"], "seconds": dt, "work_seconds": span[0],
                   "encoder": plans[0].encoder_note}}))
""")


def compare_all(work: Path, corpus: Path, args) -> dict:
    """Every built sample against HF `tokenizers` (special-token-safe) on its document."""
    r, _ = run(f"""
import json, glob, orjson, numpy as np
from tokenizers import Tokenizer
from stages.shard import read_shard
from stages.tokenizer import load_tokenizer
tk = load_tokenizer({args.tokenizer!r})
head, tail = int(tk.bos_id is not None), int(tk.eos_id is not None)  # template none: BOS + text + EOS
d = sorted(glob.glob({str(work / 'out/cache/bench-*')!r}))[0]
meta = json.load(open(d + "/meta.json"))
tok = Tokenizer.from_file({str(Path(args.tokenizer) / 'tokenizer.json')!r})
tok.encode_special_tokens = True
def built():
    for sh in meta["shards"]:
        a = read_shard(d + "/" + sh["file"])
        for i in range(len(a.offsets) - 1):
            x = np.asarray(a.sample(i))
            yield x[head:len(x) - tail]
samples, docs, tokens, differ = built(), 0, 0, 0
def check(batch):
    global docs, tokens, differ
    for e in tok.encode_batch_fast(batch, add_special_tokens=False):
        ours = next(samples)
        docs += 1; tokens += len(e.ids)
        differ += not np.array_equal(ours, np.asarray(e.ids))
batch = []
with open({str(corpus)!r}, 'rb') as f:
    for line in f:
        batch.append(orjson.loads(line)["text"])
        if len(batch) == 1000:
            check(batch); batch = []
check(batch)
assert next(samples, None) is None, "more built samples than documents"
print(json.dumps({{"documents": docs, "tokens": tokens, "differ": differ}}))
""", env={"RAYON_NUM_THREADS": str(args.workers), "TOKENIZERS_PARALLELISM": "true"})
    return r


def fastokens_version() -> str | None:
    sys.path.insert(0, str(ROOT))
    from stages.fastokens_bpe import available
    return available()


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers/qwen2.5-family-internvl2_5-1b"))
    ap.add_argument("--skip-datasets", action="store_true")
    ap.add_argument("--small-mb", type=float, default=0, help="also build a corpus this small (peak RSS)")
    ap.add_argument("--keep", help="keep the corpus and build here")
    args = ap.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="tokenmill-build-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    t0 = time.perf_counter()
    n_docs = make_corpus(corpus, args.mb)
    print(f"corpus: {corpus.stat().st_size / 1e6:.0f} MB, {n_docs:,} documents "
          f"(generated in {time.perf_counter() - t0:.0f}s); tokenizer {args.tokenizer}; {args.workers} cores")
    results = {}

    results["pipeline build"] = build_run(work, corpus, args)
    if args.small_mb:
        small = work / "small"
        small.mkdir(exist_ok=True)
        make_corpus(small / "corpus.jsonl", args.small_mb)
        results[f"pipeline build, {args.small_mb:g} MB corpus"] = build_run(small, small / "corpus.jsonl", args)

    results["raw tokenizers encode_batch"] = raw_run(corpus, f"""
from tokenizers import Tokenizer
tok = Tokenizer.from_file({str(Path(args.tokenizer) / 'tokenizer.json')!r})
tok.encode_special_tokens = True
def count(batch):
    return sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=False))
""", env={"RAYON_NUM_THREADS": str(args.workers), "TOKENIZERS_PARALLELISM": "true"})
    results["raw tiktoken (fast path BPE)"] = raw_run(corpus, f"""
from stages.tokenizer import load_tokenizer
enc = load_tokenizer({args.tokenizer!r}).fast_bpe()._enc
def count(batch):
    return sum(map(len, enc.encode_ordinary_batch(batch, num_threads={args.workers})))
""")

    if fastokens_version():
        results["raw fastokens"] = raw_run(corpus, f"""
import fastokens, orjson
from stages.tokenizer import load_tokenizer
tk = load_tokenizer({args.tokenizer!r})
spec = dict(tk._spec(), added_tokens=[], post_processor=None)  # as the pipeline's engine: text only
ft = fastokens.Tokenizer.from_json_str(orjson.dumps(spec).decode())
def count(batch):
    return len(ft.encode_batch_flat(batch, add_special_tokens=False)[0]) // 4
""", env={"FASTOKENS_BPE_THREADS": str(args.workers), "RAYON_NUM_THREADS": str(args.workers)})

    if not args.skip_datasets:
        results["HF datasets map"] = run(f"""
import json, time
from datasets import load_dataset
from transformers import AutoTokenizer
t = time.perf_counter()
tok = AutoTokenizer.from_pretrained({args.tokenizer!r})
ds = load_dataset("json", data_files={str(corpus)!r}, split="train", cache_dir={str(work / 'hf_cache')!r})
ds = ds.map(lambda b: tok(b["text"]), batched=True, num_proc={args.workers}, remove_columns=["text"])
n = sum(len(x) for x in ds["input_ids"])
print(json.dumps({{"tokens": n, "seconds": time.perf_counter() - t}}))
""", env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})

    differ = compare_all(work, corpus, args)

    def rate(name, key="seconds"):
        r = results[name][0]
        return r["tokens"] / r[key]

    hf, tk = rate("raw tokenizers encode_batch"), rate("raw tiktoken (fast path BPE)")
    ft = rate("raw fastokens") if "raw fastokens" in results else float("nan")
    print(f"\n{'method':<36} {'tokens':>12} {'seconds':>8} {'M tok/s':>8} {'peak RSS GiB':>13} "
          f"{'vs HF raw':>9} {'vs tiktoken raw':>15} {'vs fastokens raw':>16}")
    for name, (r, rss) in results.items():
        rows = [(name, r["seconds"])] + ([(name + " (work only)", r["work_seconds"])] if "work_seconds" in r else [])
        for label, secs in rows:
            x = r["tokens"] / secs
            extra = f"  encoder: {r['encoder']}" if "encoder" in r and label == name else ""
            print(f"{label:<36} {r['tokens']:>12,} {secs:>8.1f} {x / 1e6:>8.2f} {rss:>13.2f} "
                  f"{x / hf:>9.2f} {x / tk:>15.2f} {x / ft:>16.2f}{extra}")
    b = rate("pipeline build")
    print(f"\npipeline build / raw HF tokenizers: {b / hf:.2f}x   / raw tiktoken: {b / tk:.2f}x"
          f"   / raw fastokens: {b / ft:.2f}x")
    if "HF datasets map" in results:
        print(f"pipeline build / HF datasets map: {b / rate('HF datasets map'):.2f}x")
    print(f"full comparison with HF tokenizers: {differ['documents']:,} documents, "
          f"{differ['tokens']:,} tokens, {differ['differ']} documents differ")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
