"""Issue 17: the seed scripts' flag sets run unchanged (Chinese-LLaMA-Alpaca run_pt.sh with its
DeepSpeed JSON, Hunyuan train.sh), per-dataset losses add up to the step loss, a manifest passed
to --mixture trains, an empty validation split and a finished --output_dir are refused, and
`python -m train --help` imports neither torch nor numba."""
import json
import shutil
import subprocess
import sys

import pytest

from test_train_helpers import ROOT, SAMPLE, TOKENIZER, build_sample_lock, read_log, run_train, tiny_config, \
    tiny_model_dir

# Chinese-LLaMA-Alpaca scripts/training/ds_zero2_no_offload.json, as shipped (min_loss_scale 1e-10)
CLA_DS = {"fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 100, "initial_scale_power": 16,
                   "hysteresis": 1, "min_loss_scale": 1e-10},
          "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 1e8,
                                "overlap_comm": True, "reduce_scatter": True, "reduce_bucket_size": 1e8,
                                "contiguous_gradients": True},
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
          "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed_flags")
    return build_sample_lock(root / "data"), tiny_config(root), root


@pytest.fixture(scope="module")
def base_model(setup):
    return tiny_model_dir(setup[2])


@pytest.mark.slow
def test_cla_run_pt_flag_set(setup, base_model):
    _, _, root = setup
    data = root / "cla_txt"
    data.mkdir()
    shutil.copy(SAMPLE / "pretrain_en.txt", data / "pretrain_en.txt")
    (root / "cla_ds.json").write_text(json.dumps(CLA_DS))
    out = root / "cla_out"
    p = run_train([
        "--deepspeed", str(root / "cla_ds.json"), "--model_name_or_path", str(base_model),
        "--tokenizer_name_or_path", str(TOKENIZER), "--dataset_dir", str(data),
        "--data_cache_dir", str(root / "cla_cache"), "--validation_split_percentage", "0.05",
        "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--do_train",
        "--seed", "1234", "--fp16", "--max_steps", "3", "--lr_scheduler_type", "cosine",
        "--learning_rate", "2e-4", "--warmup_ratio", "0.05", "--weight_decay", "0.01",
        "--logging_strategy", "steps", "--logging_steps", "10", "--save_strategy", "steps",
        "--save_total_limit", "3", "--save_steps", "500", "--gradient_accumulation_steps", "1",
        "--preprocessing_num_workers", "1", "--block_size", "64", "--output_dir", str(out),
        "--overwrite_output_dir", "--ddp_timeout", "30000", "--logging_first_step", "True",
        "--lora_rank", "8", "--lora_alpha", "32", "--trainable", "q_proj,v_proj,k_proj,o_proj",
        "--modules_to_save", "embed_tokens,lm_head", "--lora_dropout", "0.05", "--torch_dtype", "float16",
        "--gradient_checkpointing", "--ddp_find_unused_parameters", "False"])
    err = p.stderr
    assert "implies --use_lora" in err and "0.05 < 1 is read as a fraction: 5% held out" in err
    assert "samples held out (pretrain_en" in err and "min_loss_scale" in err and "fp16 is not supported" in err
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "train_args.json").read_text())["packing"] == "concat"
    steps, evals = read_log(out)
    assert sorted(steps) == [1, 2, 3] and steps[3]["tokens"] == 3 * 64 and evals[-1]["eval_tokens"] > 0


CLA_RUN_PT = ["--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1", "--do_train",
              "--seed", "1234", "--fp16", "--max_steps", "3", "--lr_scheduler_type", "cosine",
              "--learning_rate", "2e-4", "--warmup_ratio", "0.05", "--weight_decay", "0.01",
              "--logging_strategy", "steps", "--logging_steps", "10", "--save_strategy", "steps",
              "--save_total_limit", "3", "--save_steps", "500", "--gradient_accumulation_steps", "1",
              "--preprocessing_num_workers", "1", "--block_size", "64", "--overwrite_output_dir",
              "--ddp_timeout", "30000", "--logging_first_step", "True", "--lora_rank", "8", "--lora_alpha", "32",
              "--trainable", "q_proj,v_proj,k_proj,o_proj", "--modules_to_save", "embed_tokens,lm_head",
              "--lora_dropout", "0.05", "--torch_dtype", "float16", "--gradient_checkpointing",
              "--ddp_find_unused_parameters", "False"]


@pytest.mark.slow
def test_cla_run_pt_flag_set_over_five_datasets_in_two_tasks(setup, base_model):
    """Issue 25: run_pt.sh's flags with a held-out split over sample_data/mixture.json (5 datasets,
    tasks pretrain and sft) once crashed at the final evaluation and saved nothing. It trains,
    saves the adapter and the last step's checkpoint, then evaluates every held-out sample per task."""
    _, _, root = setup
    (root / "cla_ds5.json").write_text(json.dumps(CLA_DS))
    out = root / "cla_mix_out"
    p = run_train(["--deepspeed", str(root / "cla_ds5.json"), "--model_name_or_path", str(base_model),
                   "--tokenizer_name_or_path", str(TOKENIZER), "--mixture", str(SAMPLE / "mixture.json"),
                   "--data_cache_dir", str(root / "cla_cache5"), "--validation_split_percentage", "0.05",
                   "--output_dir", str(out), *CLA_RUN_PT])
    err = p.stderr
    assert "5 datasets" in err
    assert (out / "adapter_model.safetensors").is_file() and (out / "latest").read_text() == "checkpoint-3"
    assert err.index("saved the final LoRA adapter") < err.index("eval_loss")  # saved before evaluating
    steps, evals = read_log(out)
    assert sorted(steps) == [1, 2, 3] and len(evals) == 1 and evals[0]["step"] == 3
    per = evals[0]["datasets"]
    manifest = json.loads((SAMPLE / "mixture.json").read_text())
    assert set(per) == {d["task_name"] for d in manifest["datasets"]} == {"pretrain", "sft"}
    assert sum(d["eval_trained_tokens"] for d in per.values()) == evals[0]["eval_tokens"] > 0
    assert all(d["eval_samples"] > 0 and d["eval_loss"] > 0 for d in per.values())


@pytest.mark.slow
def test_hunyuan_train_sh_flag_set(setup, base_model):
    _, _, root = setup
    out = root / "hy_out"
    p = run_train([
        "--do_train", "--model_name_or_path", str(base_model), "--tokenizer_name_or_path", str(TOKENIZER),
        "--train_data_file", str(SAMPLE / "messages_mixed.jsonl"), "--deepspeed", "zero2",
        "--output_dir", str(out), "--overwrite_output_dir", "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "--lr_scheduler_type",
        "cosine_with_min_lr", "--logging_steps", "1", "--max_steps", "3", "--save_steps", "2",
        "--learning_rate", "1e-5", "--min_lr", "1e-6", "--warmup_ratio", "0.01", "--save_total_limit", "1",
        "--bf16", "--hidden_size", "64", "--num_layers", "2", "--num_experts", "1", "--moe_topk", "1",
        "--model_max_length", "256", "--use_lora", "--lora_rank", "8", "--lora_alpha", "8",
        "--lora_dropout", "0", "--report_to", "none"])
    assert "--hidden_size and other model-shape flags are not used" in p.stderr and "--model_config" in p.stderr
    steps, _ = read_log(out)
    lrs = [steps[s]["lr"] for s in (1, 2, 3)]
    # warmup ceil(0.01 * 3) = 1 step, then cosine that would reach min_lr at step max_steps (HF)
    assert lrs[0] == lrs[1] == pytest.approx(1e-5) and 1e-6 < lrs[2] < lrs[1]
    # save_steps 2, max_steps 3: the last step is checkpointed too (as HF Trainer does); limit 1 keeps it
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (out / "checkpoint-3" / "rng_state_rank00000.pt").is_file()
    import torch
    torch.load(out / "checkpoint-3" / "rng_state_rank00000.pt", weights_only=True)  # no pickled objects


@pytest.mark.slow
def test_manifest_as_mixture_and_per_dataset_losses(setup):
    lock, cfg, root = setup
    out = root / "manifest_run"
    args = ["--mixture", str(lock.parent.parent / "manifest.json"), "--model_config", str(cfg),
            "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2",
            "--max_seq_length", "128", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--validation_split_percentage", "10", "--eval_steps", "4", "--save_strategy", "no"]
    p = run_train(args)
    assert "built " in p.stderr and "2 datasets" in p.stderr and "| " in p.stderr
    steps, evals = read_log(out)
    for s, rec in steps.items():
        per = rec["datasets"]
        assert set(per) == {"sft", "pt"}
        tokens = sum(d["trained_tokens"] for d in per.values())
        assert tokens == rec["trained_tokens_step"]
        weighted = sum(d["loss"] * d["trained_tokens"] for d in per.values() if d["trained_tokens"])
        assert weighted / tokens == pytest.approx(rec["loss"], rel=1e-12, abs=0)
        assert sum(d["samples"] for d in per.values()) > 0
    ev = evals[-1]
    assert sum(d["eval_trained_tokens"] for d in ev["datasets"].values()) == ev["eval_tokens"]
    # the same OUTPUT_DIR again: refused, nothing overwritten
    p = run_train(args, check=False)
    assert p.returncode == 1 and "already holds a run" in p.stderr and "--overwrite_output_dir" in p.stderr


def test_empty_validation_split_is_an_error_naming_the_counts(setup, tmp_path):
    lock, cfg, _ = setup
    p = run_train(["--mixture", str(lock), "--model_config", str(cfg), "--output_dir", str(tmp_path / "o"),
                   "--max_steps", "2", "--validation_split_percentage", "0.00001"], check=False)
    assert p.returncode == 1, p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("error: --validation_split_percentage 1e-05") and "holds out no sample" in err
    assert "sft 0 of" in err and "pt 0 of" in err


def test_non_json_mixture_is_one_line(setup, tmp_path):
    _, cfg, _ = setup
    for name, text, why in (("mix.txt", "datasets: [a]\n", "not JSON"),  # neither a lock nor a JSON manifest
                            ("mix.yaml", "datasets: [a\n", "mix.yaml")):  # a YAML manifest that does not parse
        bad = tmp_path / name
        bad.write_text(text)
        p = run_train(["--mixture", str(bad), "--model_config", str(cfg), "--output_dir", str(tmp_path / "o"),
                       "--max_steps", "2"], check=False)
        assert p.returncode == 1 and p.stderr.strip().startswith("error: --mixture") and why in p.stderr, p.stderr
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_help_imports_neither_torch_nor_numba():
    code = ("import sys, runpy; sys.argv = ['train', '--help']\n"
            "try:\n    runpy.run_module('train', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numba', 'transformers', 'deepspeed') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout.strip().splitlines()[-1] == "[]", p.stdout[-500:] + p.stderr[-2000:]
    assert "(default: None)" not in p.stdout and "(default: the lock" not in p.stdout


def test_verify_data_full_refuses_an_edited_shard(setup, tmp_path):
    """Issue 16: --verify_data full hashes every shard before step 0; an edited one is one line."""
    lock, cfg, _ = setup
    doc = json.loads(lock.read_text())
    entry = doc["datasets"][0]
    copy = tmp_path / "ds"
    shutil.copytree(entry["path"], copy)
    shard = sorted(copy.glob("*.h5"))[0]
    data = bytearray(shard.read_bytes())
    meta = json.loads((copy / "meta.json").read_text())
    at = next(s for s in meta["shards"] if s["file"] == shard.name)["arrays"]["tokens"]["offset"]
    data[at + 1] ^= 0x01  # a byte of token data: sizes and meta.json stay valid, the sha256 does not
    shard.write_bytes(bytes(data))
    entry["path"] = str(copy)
    edited = tmp_path / "mixture.lock.json"
    edited.write_text(json.dumps(doc))
    argv = ["--mixture", str(edited), "--model_config", str(cfg), "--output_dir", str(tmp_path / "o"),
            "--max_steps", "1", "--verify_data", "full"]
    p = run_train(argv, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and last.startswith("error: ") and shard.name in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
