"""Shared helpers of the trainer tests (no tests here): a lock built from sample_data with the
real pipeline, a tiny model config, and launchers for `python -m train` as a subprocess."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
TOKENIZER = SAMPLE / "tokenizer"

# hidden 64, 2 layers, 4 heads; the vocabulary is the sample tokenizer's (6000).
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 6000,
        "max_position_embeddings": 1024, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}


def build_sample_lock(root: Path, max_length: int = 4096) -> Path:
    """SFT chats + plain pretraining text from sample_data, built through the pipeline."""
    from pipeline.build import build_mixture
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "tokenizer": str(TOKENIZER), "template": "tokenizer", "max_length": max_length, "seed": 7,
        "datasets": [
            {"dataset_name": "chats", "task_name": "sft", "abs_weight": 0.5,
             "path": str(SAMPLE / "messages_mixed.jsonl")},
            {"dataset_name": "pretrain_en", "task_name": "pt", "abs_weight": 0.5,
             "path": str(SAMPLE / "pretrain_en.txt")},
        ]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    lock, _, _ = build_mixture(str(root / "manifest.json"), out=str(root / "build"), workers=1)
    return Path(lock)


def tiny_config(root: Path, **overrides) -> Path:
    path = root / "tiny_config.json"
    path.write_text(json.dumps({**TINY, **overrides}))
    return path


def tiny_model_dir(root: Path, seed: int = 0) -> Path:
    """A saved random tiny model (a base for LoRA), with the sample tokenizer beside it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    cfg = dict(TINY)
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out = root / "base_model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(args: list[str], nproc: int = 1, launcher: str = "python") -> list[str]:
    if launcher == "python":
        return [sys.executable, "-m", "train", *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", "train", *args]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(nproc),
                "--master_port", str(free_port()), "--module", "train", *args]
    raise ValueError(launcher)


def run_train(args: list[str], nproc: int = 1, launcher: str = "python", timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # an in-process test's process group may still hold that port
    p = subprocess.run(train_cmd(args, nproc, launcher), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}")
    return p


def read_log(out: Path) -> tuple[dict[int, dict], list[dict]]:
    """({step: train record} (the last record per step wins), [eval records])."""
    steps, evals = {}, []
    for line in (out / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "eval_loss" in rec:
            evals.append(rec)
        else:
            steps[rec["step"]] = rec
    return steps, evals


def labelled_positions(lock: Path, seq_len: int, batch_size: int, steps: int, world_size: int = 1,
                       gas: int = 1, validation_percentage: float = 0.0) -> int:
    """Σ (labels != -100) over the batches every rank draws in `steps` optimizer steps."""
    from train.stream import MixtureStream
    total = 0
    for rank in range(world_size):
        stream = MixtureStream(lock, seq_len, rank=rank, world_size=world_size, batch_size=batch_size,
                               validation_percentage=validation_percentage)
        for k, batch in enumerate(stream.loader()):
            if k == steps * gas:
                break
            total += int((batch["labels"] != -100).sum())
    return total
