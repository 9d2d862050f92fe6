"""Ours (`python -m train`, packed) vs HF Trainer on the same SFT samples, rounds rotated A B C A B C …

    python benchmarks/train_bench.py [--rounds 3 --steps 10 --batch 1 --seq 2048] [--loss-memory 8192]

Equal layouts: by default one packed row of `--seq` tokens per step, which is exactly what HF's
flattening collator makes of the same documents (one row, position_ids restarting per sample);
with `--batch B > 1` ours gets B rows while HF flattening still gets one row of B·seq (on CPU
a dense block-diagonal mask costs O(row²): not like for like). Vocabulary: the real Qwen2.5
tokenizer from ../shared (151 k ids, its own chat template) when present, else sample_data's.

The SFT source (default: LLaMA-Factory's alpaca_en_demo from ../shared, else sample_data's
alpaca_zh) is built with the pipeline into a lock. Our packed stream's first `steps` batches are
split back into their documents (cu_seqlens), so every variant trains exactly the same samples,
grouped the same way per step:
  ours     python -m train --mixture LOCK --packing packed (a subprocess; per-step time from
           train_log.jsonl: positions / tokens_per_s)
  hf_pad   HF Trainer + DataCollatorForSeq2Seq (padded to the longest sample of the step)
  hf_flat  HF Trainer + DataCollatorWithFlattening (one row, position_ids restart per sample)
Model: a tiny Qwen2 from sample_data/tiny_model.json (vocab = the tokenizer's), fp32, CPU.
Loss tokens/s = shifted labels != -100 of steps 2..N / their seconds (step 1 pays warm-up).
Prints per-round figures, ratios ours/hf as median [min–max] over rounds, and the first-step
losses side by side (equal up to float rounding: the same samples, the same model).

`--loss-memory N`: peak RSS growth of one forward + backward of the loss on a row of N tokens
(40 % trained), full-vocabulary logits (HF's way) vs train/head_loss.py, each in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_SFT = ROOT.parent / "shared" / "corpora" / "llamafactory-alpaca-en-zh" / "alpaca_en_demo.json"
LOCAL_SFT = ROOT / "sample_data" / "alpaca_zh.json"
MODEL_CONFIG = ROOT / "sample_data" / "tiny_model.json"
QWEN_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
TOKENIZER = QWEN_TOKENIZER if (QWEN_TOKENIZER / "tokenizer.json").is_file() else ROOT / "sample_data" / "tokenizer"
VARIANTS = ("ours", "hf_pad", "hf_flat")


def build_lock(work: Path, source: Path, tokenizer: Path, max_length: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from pipeline.build import build_mixture
    manifest = {"tokenizer": str(tokenizer), "template": "tokenizer", "max_length": max_length, "seed": 7,
                "datasets": [{"dataset_name": "sft", "task_name": "sft", "abs_weight": 1.0,
                              "path": str(source), "allow_repeat": True}]}
    (work / "manifest.json").write_text(json.dumps(manifest))
    lock, _, _ = build_mixture(str(work / "manifest.json"), out=str(work / "build"), workers=1)
    return Path(lock)


def step_samples(lock: Path, seq: int, batch: int, steps: int) -> list[list[dict]]:
    """[[{"input_ids", "labels"} per document] per step] from the packed stream the trainer reads."""
    from train.stream import MixtureStream
    out = []
    for k, b in enumerate(MixtureStream(lock, seq, batch_size=batch).loader()):
        if k == steps:
            break
        ids, labels = b["input_ids"].reshape(-1), b["labels"].reshape(-1)
        cu = b["cu_seqlens"].tolist()
        docs = []
        for lo, hi in zip(cu[:-1], cu[1:]):
            lab = labels[lo:hi]
            if hi - lo > 1 and bool((lab[1:] != -100).any()):  # padding segments carry no labels
                docs.append({"input_ids": ids[lo:hi].tolist(), "labels": lab.tolist()})
        out.append(docs)
    return out


def loss_tokens(docs: list[dict]) -> int:
    return sum(sum(1 for x in d["labels"][1:] if x != -100) for d in docs)


# ------------------------------------------------------------------ ours
def run_ours(lock: Path, work: Path, args, code: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ours-", dir=work))
    cmd = [sys.executable, "-m", "train", "--mixture", str(lock), "--model_config", str(args.model_config),
           "--tokenizer_name_or_path", str(args.tokenizer), "--output_dir", str(out),
           "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch),
           "--max_seq_length", str(args.seq), "--packing", "packed", "--learning_rate", str(args.lr),
           "--warmup_steps", "0", "--save_steps", "1000000", "--logging_steps", "1", "--report_to", "none",
           *args.ours_args.split()]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(code))
    p = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"error: ours failed ({p.returncode}):\n{p.stderr[-3000:]}")
    steps = {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval_loss" not in rec:
            steps[rec["step"]] = rec
    recs = [steps[s] for s in sorted(steps)]
    secs = [args.batch * args.seq / r["tokens_per_s"] for r in recs]  # positions / (positions/s)
    return {"seconds": secs, "losses": [r["loss"] for r in recs]}


# ------------------------------------------------------------------ HF
def hf_worker(samples_file: Path, result_file: Path, collator_name: str, args) -> None:
    import torch
    from torch.utils.data import DataLoader
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq,
                              DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments)
    torch.set_num_threads(args.threads)
    groups = json.loads(samples_file.read_text())
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = json.loads(Path(args.model_config).read_text())
    cfg["vocab_size"] = len(tok)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                             attn_implementation="sdpa")
    flat = [d for g in groups for d in g]
    batches, k = [], 0
    for g in groups:
        batches.append(list(range(k, k + len(g))))
        k += len(g)
    if collator_name == "hf_pad":
        collator = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100, return_tensors="pt")
    else:
        collator = DataCollatorWithFlattening(return_position_ids=True)

    class Fixed(Trainer):  # exactly our step groups, in our order
        def get_train_dataloader(self):
            return DataLoader(flat, batch_sampler=batches, collate_fn=collator)

    times, losses, t0 = [], [], [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            t0[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - t0[0])

        def on_log(self, _a, _s, _c, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(output_dir=str(result_file.parent / f"hf-{collator_name}"), use_cpu=True,
                              max_steps=len(groups), per_device_train_batch_size=1, learning_rate=args.lr,
                              lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                              report_to=[], disable_tqdm=True, dataloader_num_workers=0, seed=args.seed)
    Fixed(model=model, args=targs, train_dataset=flat, data_collator=collator,
          callbacks=[Clock()]).train()
    result_file.write_text(json.dumps({"seconds": times, "losses": losses}))


def run_hf(variant: str, samples_file: Path, work: Path, args) -> dict:
    res = work / f"{variant}-{time.time_ns()}.json"
    cmd = [sys.executable, str(Path(__file__)), "--hf-worker", variant, "--samples", str(samples_file),
           "--result", str(res), "--tokenizer", str(args.tokenizer), "--model-config", str(args.model_config),
           "--lr", str(args.lr), "--threads", str(args.threads), "--seed", str(args.seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"error: {variant} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(res.read_text())


# ------------------------------------------------------------------ loss-step memory
def loss_step_memory(variant: str, n_tokens: int, args) -> dict:
    """Peak RSS growth of one loss forward + backward (fresh process, model already built)."""
    import resource

    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from train import head_loss
    from train.model import loss_sum, model_inputs, shift_labels
    torch.set_num_threads(args.threads)
    cfg = json.loads(Path(args.model_config).read_text())
    cfg["vocab_size"] = len(AutoTokenizer.from_pretrained(args.tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                             attn_implementation="sdpa")
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens))
    labels = ids.clone()
    doc = 512
    for a in range(0, n_tokens, doc):  # each 512-token document: its first 60 % is prompt
        labels[0, a:a + int(doc * 0.6)] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": (torch.arange(n_tokens) % doc)[None]}
    if variant == "ours":
        head_loss.trained_position_head(model)  # probe before measuring
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if variant == "ours":
        per_token, target = loss_sum(model, batch, per_token=True)
    else:
        target = shift_labels(batch)
        logits = model(**model_inputs(batch, False)).logits
        per_token = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1),
                                    ignore_index=-100, reduction="none")
    per_token.sum().backward()
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_growth_mb": (peak - before) / 1024, "seconds": secs, "loss": float(per_token.sum())}


def report_loss_memory(args) -> None:
    res = {}
    for variant in ("full_logits", "ours"):
        cmd = [sys.executable, str(Path(__file__)), "--mem-worker", variant, "--loss-memory", str(args.loss_memory),
               "--tokenizer", str(args.tokenizer), "--model-config", str(args.model_config),
               "--threads", str(args.threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", PYTHONPATH=str(args.code))
        p = subprocess.run(cmd, cwd=args.code, env=env, capture_output=True, text=True, timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"error: loss-memory {variant} failed:\n{p.stderr[-3000:]}")
        res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
        r = res[variant]
        print(f"loss step, {args.loss_memory} tokens: {variant:12s} peak RSS growth {r['peak_growth_mb']:8.1f} MB  "
              f"{r['seconds']:.2f} s  loss sum {r['loss']:.4f}", flush=True)
    a, b = res["full_logits"], res["ours"]
    print(f"  ours / full_logits: memory {b['peak_growth_mb'] / max(a['peak_growth_mb'], 1e-9):.2f}x, "
          f"time {b['seconds'] / a['seconds']:.2f}x", flush=True)


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}–{max(xs):.2f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=1, help="our packed rows per step (1 = HF flattening's layout)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=1, help="OMP threads of every run")
    p.add_argument("--source", type=Path, default=SHARED_SFT if SHARED_SFT.is_file() else LOCAL_SFT)
    p.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    p.add_argument("--model-config", dest="model_config", type=Path, default=MODEL_CONFIG)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ours-args", dest="ours_args", default="", help="extra flags for python -m train")
    p.add_argument("--code", type=Path, default=ROOT, help="checkout whose `python -m train` is 'ours'")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--hf-worker", dest="hf_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--samples", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--loss-memory", dest="loss_memory", type=int, default=0,
                   help="also measure the loss step's peak memory on a row of N tokens")
    p.add_argument("--mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        hf_worker(args.samples, args.result, args.hf_worker, args)
        return 0
    if args.mem_worker:
        print(json.dumps(loss_step_memory(args.mem_worker, args.loss_memory, args)))
        return 0
    if args.loss_memory:
        report_loss_memory(args)
        if args.rounds == 0:
            return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="train_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    # every variant gets the same model config, sized to the tokenizer (no resize at start)
    from transformers import AutoTokenizer
    model_cfg = json.loads(Path(args.model_config).read_text())
    model_cfg["vocab_size"] = len(AutoTokenizer.from_pretrained(args.tokenizer))
    args.model_config = work / "model_config.json"
    args.model_config.write_text(json.dumps(model_cfg))
    lock = build_lock(work, args.source, args.tokenizer, args.seq)
    groups = step_samples(lock, args.seq, args.batch, args.steps)
    samples_file = work / "samples.json"
    samples_file.write_text(json.dumps(groups))
    per_step = [loss_tokens(g) for g in groups]
    print(f"source {args.source.name}: {sum(map(len, groups))} samples in {len(groups)} steps "
          f"({args.batch} packed rows x {args.seq}), {sum(per_step):,} loss tokens; "
          f"vocab {model_cfg['vocab_size']:,} ({Path(args.tokenizer).name}); "
          f"{args.rounds} rounds, OMP threads {args.threads}", flush=True)
    variants = args.variants.split(",")
    measured = sum(per_step[1:])
    tps = {v: [] for v in variants}
    first = {}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate the starting variant
        for v in order:
            res = run_ours(lock, work, args, args.code) if v == "ours" else run_hf(v, samples_file, work, args)
            secs = sum(res["seconds"][1:len(groups)])
            tps[v].append(measured / secs)
            first.setdefault(v, res["losses"][0])
            print(f"round {r + 1} {v:8s} loss tokens/s {tps[v][-1]:9.0f}  ({secs:.2f} s for steps 2..{len(groups)})",
                  flush=True)
    print("\nloss tokens/s, median [min–max] over rounds")
    for v in variants:
        print(f"  {v:8s} {statistics.median(tps[v]):9.0f} [{min(tps[v]):.0f}–{max(tps[v]):.0f}]")
    if "ours" in variants:
        for v in variants:
            if v != "ours":
                ratios = [a / b for a, b in zip(tps["ours"], tps[v])]
                print(f"  ours / {v:8s} {_fmt(ratios)}")
    print("first-step loss: " + "  ".join(f"{v} {first[v]:.6f}" for v in variants))
    return 0


if __name__ == "__main__":
    sys.exit(main())
