"""`python -m train` end to end on CPU, one process: loss falls, trained-token accounting,
exact resume, evaluation, LoRA → merge → reload. Tiny Llama from a config (hidden 64, 2 layers,
4 heads, vocab 6000) on a lock built from sample_data with the pipeline."""
import json

import pytest
import torch
from safetensors.torch import load_file

from train.stream_state import STATE_VERSION

from test_train_helpers import (TOKENIZER, build_sample_lock, labelled_positions, read_log, run_train,
                                tiny_config, tiny_model_dir)

SEQ, BS = 128, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_run")
    return build_sample_lock(root / "data"), tiny_config(root), root


def common(lock, cfg, out, steps, *extra):
    return ["--mixture", str(lock), "--model_config", str(cfg), "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_train_batch_size", str(BS), "--max_seq_length", str(SEQ),
            "--learning_rate", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "3", "--logging_steps", "5",
            *extra]


@pytest.fixture(scope="module")
def full_run(setup):
    """20 uninterrupted steps (checkpoint every 10): the reference for the resume test."""
    lock, cfg, root = setup
    out = root / "full"
    run_train(common(lock, cfg, out, 20, "--save_steps", "10", "--save_total_limit", "1"))
    return out


def test_loss_falls_and_trained_tokens_are_the_labelled_positions(setup, full_run):
    lock, _, _ = setup
    steps, _ = read_log(full_run)
    assert sorted(steps) == list(range(1, 21))
    losses = [steps[s]["loss"] for s in range(1, 21)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses
    assert all(torch.isfinite(torch.tensor([steps[s]["grad_norm"] for s in steps])))
    # every label position that is not -100 in the 20 × BS rows drawn carries loss, no others
    assert steps[20]["trained_tokens"] == labelled_positions(lock, SEQ, BS, steps=20)
    assert steps[20]["trained_tokens"] == sum(steps[s]["trained_tokens_step"] for s in steps)
    assert steps[20]["tokens"] == 20 * BS * SEQ
    # lr as logged per step: warmup then cosine down to min_lr
    lrs = [steps[s]["lr"] for s in range(1, 21)]
    # the decay ends at max_steps (HF): the last step runs just above min_lr
    import math
    last = 3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + math.cos(math.pi * 16 / 17))  # HF: progress (19-3)/(20-3)
    assert lrs[2] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(last)
    assert all(b <= a + 1e-15 for a, b in zip(lrs[2:], lrs[3:]))


def test_outputs_of_a_run(full_run):
    out = full_run
    # final HF dir: safetensors + config + tokenizer + chat template, loadable as is
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for f in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja",
              "train_args.json", "ds_config.json", "mixture.lock.json"):
        assert (out / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and len(tok) == model.config.vocab_size
    assert (out / "runs").is_dir() and any((out / "runs").iterdir())  # TensorBoard events
    # save_total_limit 1: only the newest checkpoint is kept; latest names it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20"]
    assert (out / "latest").read_text() == "checkpoint-20"
    ck = out / "checkpoint-20"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["world_size"] == 1
    assert json.loads((ck / "stream_state_rank00000.json").read_text())["version"] == STATE_VERSION
    assert "auto" not in (out / "ds_config.json").read_text()


def test_resume_gives_the_same_losses_exactly(setup, full_run):
    lock, cfg, root = setup
    out = root / "interrupted"
    run_train(common(lock, cfg, out, 20, "--save_steps", "10", "--stop_after_steps", "10"))
    first, _ = read_log(out)
    assert sorted(first) == list(range(1, 11)) and not (out / "model.safetensors").exists()
    run_train(common(lock, cfg, out, 20, "--save_steps", "10", "--resume_from_checkpoint", "latest"))
    resumed, _ = read_log(out)
    ref, _ = read_log(full_run)
    for s in range(1, 21):  # fp32 on CPU: bit-identical, not approximately equal
        for k in ("loss", "lr", "grad_norm", "trained_tokens"):
            assert resumed[s][k] == ref[s][k], (s, k, resumed[s][k], ref[s][k])
    final = load_file(out / "model.safetensors")
    final_ref = load_file(full_run / "model.safetensors")
    assert all(torch.equal(final[k], final_ref[k]) for k in final_ref)


def test_resuming_a_finished_run_says_so_and_exits(setup, full_run):
    """Issue 25: a run already at --max_steps, resumed, trains nothing, writes nothing and says so
    (before any model is built)."""
    lock, cfg, _ = setup
    files = {p.name: p.read_bytes() for p in full_run.iterdir() if p.is_file()}
    p = run_train(common(lock, cfg, full_run, 20, "--save_steps", "10", "--save_total_limit", "1",
                         "--resume_from_checkpoint", "latest"))
    assert "checkpoint-20 is at step 20 and --max_steps is 20: nothing left to train" in p.stderr, p.stderr
    assert "engine:" not in p.stderr and "training 20 steps" not in p.stderr
    assert {p.name: p.read_bytes() for p in full_run.iterdir() if p.is_file()} == files


def test_validation_split_and_gradient_accumulation(setup):
    lock, cfg, root = setup
    out = root / "eval"
    run_train(common(lock, cfg, out, 4, "--save_steps", "100", "--validation_split_percentage", "5",
                     "--eval_steps", "2", "--gradient_accumulation_steps", "2", "--packing", "packed"))
    steps, evals = read_log(out)
    assert [e["step"] for e in evals] == [2, 4]
    assert evals[0]["eval_tokens"] == evals[1]["eval_tokens"] > 0  # same held-out slice each time
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"] + 0.5
    # 2 micro-batches per step, the held-out samples never in training
    assert steps[4]["trained_tokens"] == labelled_positions(lock, SEQ, BS, steps=4, gas=2,
                                                            validation_percentage=5)


def test_lora_train_merge_reload(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.merge_lora import main as merge_main
    lock, _, root = setup
    base = tiny_model_dir(root)
    out = root / "lora"
    run_train(["--mixture", str(lock), "--model_name_or_path", str(base), "--output_dir", str(out),
               "--max_steps", "8", "--per_device_train_batch_size", str(BS), "--max_seq_length", str(SEQ),
               "--learning_rate", "1e-2", "--use_lora", "--lora_rank", "4", "--lora_alpha", "16",
               "--modules_to_save", "lm_head", "--save_steps", "100"])
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in k or "lm_head" in k for k in adapter)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()

    merged_dir = root / "merged"
    assert merge_main(["--base_model_path", str(base), "--adapter_model_path", str(out),
                       "--output_path", str(merged_dir), "--save_dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    ids = torch.randint(3, 6000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
    # only the LoRA targets (merged in) and modules_to_save differ from the base
    before = load_file(base / "model.safetensors")
    after = load_file(merged_dir / "model.safetensors")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "lm_head.weight" in changed
    assert changed - {"lm_head.weight"} == {k for k in before if any(
        f"self_attn.{p}.weight" in k for p in ("q_proj", "k_proj", "v_proj", "o_proj"))}
    assert (merged_dir / "tokenizer.json").is_file()


def test_train_data_file_builds_through_the_pipeline(setup):
    _, cfg, root = setup
    out = root / "from_file"
    run_train(["--train_data_file", str(TOKENIZER.parent / "pretrain_en.txt"), "--model_config", str(cfg),
               "--tokenizer_name_or_path", str(TOKENIZER), "--output_dir", str(out), "--max_steps", "2",
               "--max_seq_length", "4096", "--packing", "concat", "--save_steps", "100"])
    assert (out / "data" / "mixture.lock.json").is_file() and (out / "model.safetensors").is_file()
    steps, _ = read_log(out)
    assert steps[2]["tokens"] == 2 * 4096
