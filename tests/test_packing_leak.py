"""Packed rows never leak silently: before step 0 the trainer compares a document packed after
another with the document alone (train/model.py check_packing). A state-carrying model (Mamba)
is refused for packed rows, naming --packing padded, and trains padded; a Qwen2-style model packs.
Models without an sdpa kernel get their own default attention."""
import json

import pytest
import torch

from test_train_helpers import build_sample_lock, read_log, run_train

from train.args import TrainError
from train.model import check_packing

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

MAMBA = dict(model_type="mamba", vocab_size=6000, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2,
             conv_kernel=4)
QWEN2 = dict(model_type="qwen2", vocab_size=6000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def tiny(spec, **kw):
    spec = dict(spec)
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec)
    cfg.use_cache = False
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, **kw)


def test_mamba_is_refused_for_packed_rows_and_accepted_padded():
    model = tiny(MAMBA)
    with pytest.raises(TrainError, match=r"mamba model \(its layers carry state.*--packing padded"):
        check_packing(model, "packed")
    assert check_packing(model, "padded") is None and check_packing(model, "concat") is None


def test_qwen2_still_packs_and_a_leaking_attention_is_caught():
    model = tiny(QWEN2, attn_implementation="sdpa")
    model.train()
    assert check_packing(model, "packed") < 1e-4
    assert model.training  # mode restored
    assert check_packing(tiny(QWEN2, attn_implementation="sdpa", dtype=torch.bfloat16), "packed") < 5e-2
    # The same model fed one causal mask over the whole row (documents see each other): caught.
    leaky = tiny(QWEN2, attn_implementation="sdpa")
    forward = leaky.forward
    leaky.forward = lambda **kw: forward(**{**kw, "attention_mask": torch.ones_like(kw["input_ids"])})
    with pytest.raises(TrainError, match="leak between documents in this qwen2 model: .*--packing padded"):
        check_packing(leaky, "packed")


@pytest.fixture(scope="module")
def lock(tmp_path_factory):
    return build_sample_lock(tmp_path_factory.mktemp("leak"), max_length=256)


@pytest.mark.slow
def test_trainer_refuses_packed_mamba_then_trains_it_padded(lock, tmp_path):
    cfg = tmp_path / "mamba.json"
    cfg.write_text(json.dumps(MAMBA))
    args = ["--mixture", str(lock), "--model_config", str(cfg), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--max_seq_length", "128", "--learning_rate", "1e-3"]
    p = run_train(args + ["--output_dir", str(tmp_path / "packed")], check=False)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "--packing padded" in p.stderr and "Traceback" not in p.stderr
    p = run_train(args + ["--output_dir", str(tmp_path / "padded"), "--packing", "padded"])
    assert "does not support sdpa attention: using the model's default" in p.stderr
    steps, _ = read_log(tmp_path / "padded")
    assert sorted(steps) == [1, 2] and all(s["loss"] == s["loss"] for s in steps.values())
