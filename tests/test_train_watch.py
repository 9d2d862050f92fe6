"""A run you can watch (issue 25): step lines say step/total and an ETA, per-task counts read as
tokens and samples, a warning every step of every rank raises prints once, `python -m
train.kernels --help` helps, and a merged model dir holds the model, not the logs of the run
it came from."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from test_train_helpers import ROOT, tiny_model_dir


def _metrics(tmp_path, max_steps=10, start_step=0):
    from train.metrics import Metrics
    cfg = SimpleNamespace(logging_steps=1, logging_strategy="steps", report_to="none", output_dir=str(tmp_path),
                          max_steps=max_steps)
    return Metrics(cfg, 0, start_step)


def _step(m, step):
    m.step(step, {"loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "trained_tokens": 50 * step,
                  "datasets": {"sft": {"samples": 3, "trained_tokens": 1234, "loss": 2.25},
                               "pt": {"samples": 2, "trained_tokens": 66, "loss": 2.75}}})


def test_step_line_has_step_of_total_eta_and_samples(tmp_path, caplog, monkeypatch):
    import train.metrics as metrics
    clock = iter([1000.0, 1012.0, 1024.0])  # Metrics start, then after steps 5 and 6 (resumed at step 4)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    m = _metrics(tmp_path, max_steps=100, start_step=4)
    with caplog.at_level(logging.INFO, logger="train"):
        _step(m, 5)
        _step(m, 6)
    m.close()
    lines = [r.getMessage() for r in caplog.records]
    # 12 s for 1 step of this run, 95 left -> 1140 s; then 24 s for 2, 94 left -> 1128 s
    assert lines[0].startswith("step 5/100 ") and "eta 19m00s" in lines[0], lines[0]
    assert lines[1].startswith("step 6/100 ") and "eta 18m48s" in lines[1], lines[1]
    assert "sft 2.2500 (1,234 tokens, 3 samples)" in lines[1] and "pt 2.7500 (66 tokens, 2 samples)" in lines[1]
    assert metrics.format_seconds(3 * 3600 + 7 * 60 + 59) == "3h07m" and metrics.format_seconds(9.4) == "9s"


@pytest.mark.parametrize("rank,shown", [(0, 1), (1, 0)])
def test_a_warning_of_every_step_and_rank_prints_once(rank, shown):
    code = ("import warnings\nfrom train.process import setup_logging\n"
            f"setup_logging({rank})\n"
            "def forward():\n"
            "    with warnings.catch_warnings():\n"  # as torch does every step: resets the registries
            "        pass\n"
            "    warnings.warn('torch.cuda.amp.custom_fwd(args...) is deprecated', FutureWarning)\n"
            "for _ in range(5):\n    forward()\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stderr.count("custom_fwd") == shown, p.stderr


def test_kernels_help_helps_without_compiling():
    p = subprocess.run([sys.executable, "-m", "train.kernels", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("usage: python -m train.kernels"), p.stderr[-2000:]
    assert "numba" in p.stdout and "cache" in p.stdout and "kernels ready" not in p.stdout
    p = subprocess.run([sys.executable, "-m", "train.kernels", "--cache"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "unrecognized arguments: --cache" in p.stderr


def test_merged_model_dir_holds_the_model_not_the_runs_logs(tmp_path):
    """The base is a finished full fine-tune's OUTPUT_DIR (its logs beside the model); a LoRA trained
    on it is merged: the merged dir has the model, config and tokenizer, none of the run's records."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from train.checkpoint import RUN_RECORDS
    from train.merge_lora import merge
    base = tiny_model_dir(tmp_path)
    for name in ("train_log.jsonl", "train_args.json", "ds_config.json", "mixture.lock.json", "latest"):
        (base / name).write_text("{}\n")
    (base / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (base / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    torch.manual_seed(1)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    out = merge(str(base), str(adapter), str(tmp_path / "merged"))
    names = {p.name for p in out.iterdir()}
    assert not names & set(RUN_RECORDS), names
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lora(ids).logits, rtol=1e-4, atol=1e-5)
