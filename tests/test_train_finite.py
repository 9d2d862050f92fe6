"""A finite mixture (only non-repeating datasets) on 2 ranks: each rank packs its own windows, so
the ranks run out on different steps; the trainer goes on while either has data (the other runs
steps with nothing trained, keeping ZeRO-3's collectives in step) and stops when both are done,
having trained every sample exactly once."""
import json

import pytest

from test_train_helpers import TOKENIZER, read_log, run_train, tiny_config

pytestmark = pytest.mark.slow


def test_finite_mixture_trains_every_sample_once_on_two_ranks(tmp_path):
    from pipeline.build import build_mixture
    from stages.built_dataset import open_built
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(tmp_path / "docs.jsonl", "w") as f:  # 2500 short documents: 3 windows of 1024
        for i in range(2500):
            f.write(json.dumps({"text": " ".join(words[(i + k) % len(words)] for k in range(2 + i % 9))}) + "\n")
    (tmp_path / "mix.json").write_text(json.dumps({
        "tokenizer": str(TOKENIZER), "template": "tokenizer", "max_length": 128, "seed": 3,
        "datasets": [{"dataset_name": "docs", "task_name": "pt", "abs_weight": 1.0,
                      "path": str(tmp_path / "docs.jsonl"), "allow_repeat": False}]}))
    lock, _, _ = build_mixture(str(tmp_path / "mix.json"), out=str(tmp_path / "build"), workers=1)
    entry = json.loads(open(lock).read())["datasets"][0]
    built = open_built(entry["path"])
    assert built.meta["n_samples"] == 2500
    out = tmp_path / "run"
    p = run_train(["--deepspeed", "zero3", "--mixture", str(lock), "--model_config", str(tiny_config(tmp_path)),
                   "--output_dir", str(out), "--max_steps", "1000", "--per_device_train_batch_size", "16",
                   "--max_seq_length", "128", "--learning_rate", "1e-3", "--save_steps", "1000",
                   "--logging_steps", "1", "--report_to", "none"], nproc=2, launcher="torchrun")
    assert "ran out" in p.stderr + p.stdout
    log, _ = read_log(out)
    last = max(log)
    assert last < 1000
    # every token of every sample trained once, except each document's first (nothing predicts it)
    assert log[last]["trained_tokens"] == built.meta["n_tokens"] - built.meta["n_samples"]
    assert sum(log[s]["datasets"]["pt"]["samples"] for s in log) == 2500
    # tokens count the real batches only (a rank that ran out adds nothing), as the stream gives them
    from train.stream import MixtureStream
    batches = sum(1 for r in range(2) for _ in MixtureStream(lock, 128, rank=r, world_size=2, batch_size=16).loader())
    assert log[last]["tokens"] == batches * 16 * 128
