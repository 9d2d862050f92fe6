"""Two processes on CPU (gloo): ZeRO-2 and ZeRO-3 under torchrun, ZeRO-2 under the deepspeed
launcher. The loss falls, and the trained-token count is the number of label positions that
are not -100 in the batches both ranks drew."""
import json

import pytest
import torch
from safetensors.torch import load_file

from test_train_helpers import build_sample_lock, labelled_positions, read_log, run_train, tiny_config

SEQ, BS, STEPS = 128, 2, 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_dist")
    return build_sample_lock(root / "data"), tiny_config(root), root


@pytest.mark.parametrize("zero,launcher", [("zero2", "torchrun"), ("zero3", "torchrun"),
                                           ("zero2", "deepspeed")])
def test_two_ranks(setup, zero, launcher):
    lock, cfg, root = setup
    out = root / f"{zero}-{launcher}"
    steps = STEPS if launcher == "torchrun" else 6
    run_train(["--deepspeed", zero, "--mixture", str(lock), "--model_config", str(cfg),
               "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", str(BS),
               "--max_seq_length", str(SEQ), "--learning_rate", "3e-3", "--min_lr", "3e-4",
               "--warmup_steps", "2", "--save_steps", str(steps // 2), "--logging_steps", "6"],
              nproc=2, launcher=launcher)
    log, _ = read_log(out)
    assert sorted(log) == list(range(1, steps + 1))
    assert log[steps]["trained_tokens"] == labelled_positions(lock, SEQ, BS, steps=steps, world_size=2)
    assert log[steps]["tokens"] == steps * 2 * BS * SEQ
    ck = out / f"checkpoint-{steps}"
    assert (ck / "stream_state_rank00000.json").is_file() and (ck / "stream_state_rank00001.json").is_file()
    assert json.loads((ck / "trainer_state.json").read_text())["world_size"] == 2
    weights = load_file(out / "model.safetensors")  # ZeRO-3: gathered, full shapes
    assert weights["model.embed_tokens.weight"].shape == (6000, 64)
    if launcher == "torchrun":
        losses = [log[s]["loss"] for s in sorted(log)]
        assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.3, losses
        assert all(torch.isfinite(torch.tensor(losses)))


def test_lora_adapter_is_gathered_under_zero3(setup):
    """ZeRO-3 splits every parameter over the ranks; the saved adapter must hold full tensors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from test_train_helpers import tiny_model_dir
    lock, _, root = setup
    base = tiny_model_dir(root)
    out = root / "lora-zero3"
    run_train(["--deepspeed", "zero3", "--mixture", str(lock), "--model_name_or_path", str(base),
               "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", str(BS),
               "--max_seq_length", str(SEQ), "--learning_rate", "1e-2", "--use_lora", "--lora_rank", "4",
               "--modules_to_save", "lm_head", "--gradient_checkpointing", "--save_steps", "100"],
              nproc=2, launcher="torchrun")
    adapter = load_file(out / "adapter_model.safetensors")
    shapes = {k: tuple(v.shape) for k, v in adapter.items()}
    assert all(0 not in s for s in shapes.values()), shapes
    assert shapes["base_model.model.lm_head.weight"] == (6000, 64)
    assert any(k.endswith("q_proj.lora_A.weight") and s == (4, 64) for k, s in shapes.items())
    assert all(float(v.abs().sum()) > 0 for v in adapter.values())
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)  # loads cleanly
