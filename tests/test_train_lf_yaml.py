"""Issue 25: the Hy3 seed's LLaMA-Factory YAML files run unchanged (`python -m train CONFIG.yaml
key=value ...`), with LLaMA-Factory's defaults and meanings; an unsupported key is one line; no
flag of any command line is abbreviated."""
import json
import subprocess
import sys

import pytest

from test_train_helpers import ROOT, SAMPLE, TOKENIZER, read_log, run_train, tiny_model_dir

from train.args import parse_args
from train.ds_config import CONFIG_DIR

# luohuixi/Hy3@76a6687:finetune/llama_factory_support/hy_v3_lora_sft.yaml, as shipped except the
# four paths (the seed's are relative to its own folder).
SEED_LORA = """\
### model
model_name_or_path: {model}
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
deepspeed: {ds}
### LoRA parameters
lora_rank: 64
lora_alpha: 128
lora_dropout: 0.05
lora_target: q_proj,k_proj,v_proj,o_proj
### dataset
dataset_dir: {data}
dataset: hy_v3_demo
template: hy_v3
cutoff_len: 4096  # Use shorter context for LoRA to save memory; increase if needed
max_samples: 1000
overwrite_cache: true
### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]
### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 4
learning_rate: 2.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1  # min_lr / learning_rate = 2e-5 / 2e-4 = 0.1
warmup_ratio: 0.1
bf16: true
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: true
ddp_timeout: 180000000
flash_attn: fa2
resume_from_checkpoint: null
### eval
# eval_dataset: alpaca_en_demo
# val_size: 0.1
"""
# The seed's registry entry (sharegpt formatting, role/content tags).
DATASET_INFO = {"hy_v3_demo": {"file_name": str(SAMPLE / "messages_mixed.jsonl"), "formatting": "sharegpt",
                               "columns": {"messages": "messages"},
                               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                        "assistant_tag": "assistant", "system_tag": "system"}}}


def seed_yaml(tmp, out, model="M", ds=None, text=SEED_LORA):
    data = tmp / "lf_data"
    data.mkdir(exist_ok=True)
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO))
    path = tmp / "hy_v3_sft.yaml"
    path.write_text(text.format(model=model, ds=ds or CONFIG_DIR / "ds_zero2_no_offload.json", data=data, out=out))
    return path


def test_seed_yaml_maps_onto_the_fields(tmp_path):
    c = parse_args([str(seed_yaml(tmp_path, tmp_path / "o")), "max_steps=3",
                    "lr_scheduler_kwargs.min_lr_rate=0.05"])
    assert (c.use_lora, c.lora_rank, c.lora_alpha, c.lora_dropout) == (True, 64, 128.0, 0.05)
    assert c.lora_target_modules == "q_proj,k_proj,v_proj,o_proj" and c.dataset == "hy_v3_demo"
    assert (c.max_seq_length, c.max_samples, c.packing, c.template) == (4096, 1000, "padded", "hy_v3")
    assert (c.max_steps, c.learning_rate, c.gradient_accumulation_steps) == (3, 2e-4, 4)
    assert c.min_lr == pytest.approx(0.05 * 2e-4) and c.lr_scheduler_type == "cosine_with_min_lr"
    assert c.use_flash_attn and c.bf16 and c.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert (c.report_to, c.ddp_timeout, c.warmup_ratio, c.logging_steps) == ("none", 180000000, 0.1, 10)


def test_lf_defaults_where_the_file_is_silent(tmp_path):
    """LLaMA-Factory / transformers defaults, not ours: lora r 8, alpha 2r, target all, lr 5e-5,
    batch 8, linear schedule, 3 epochs, cutoff 2048, logging every 500, Adam beta2 0.999."""
    p = tmp_path / "min.yaml"
    p.write_text(f"model_name_or_path: M\ndataset: x\noutput_dir: {tmp_path / 'o'}\n")
    c = parse_args([str(p)])
    assert (c.use_lora, c.lora_rank, c.lora_alpha, c.lora_target_modules) == (True, 8, 16.0, "all")
    assert (c.learning_rate, c.per_device_train_batch_size, c.lr_scheduler_type) == (5e-5, 8, "linear")
    assert (c.num_train_epochs, c.max_steps, c.max_seq_length, c.logging_steps) == (3.0, None, 2048, 500)
    assert (c.adam_beta2, c.report_to, c.dataset_info_dir, c.packing) == (0.999, "none", "data", "padded")
    p.write_text(f"model_name_or_path: M\ndataset: x\noutput_dir: o\nstage: pt\nfinetuning_type: full\n")
    c = parse_args([str(p)])
    assert (c.use_lora, c.packing) == (False, "concat")


@pytest.mark.parametrize("text,match", [
    ("moe_num_experts: 192\n", "moe_num_experts: not a supported key"),
    ("report_to: wandb\n", "report_to: 'wandb' is not supported"),
    ("lr_scheduler_type: cosine_with_min_lr\n", "exactly one of min_lr or min_lr_rate"),
    ("finetuning_type: freeze\n", "finetuning_type: 'freeze' is not supported"),
    ("save_only_model: true\n", "save_only_model: true is not supported"),
    ("val_size: 100\n", "val_size: 100 (a sample count)"),
    ("mix_strategy: concat\ninterleave_probs: 0.5,0.5\n", "only valid for interleaved mixing"),
])
def test_unsupported_keys_are_one_line_exit_2(tmp_path, capsys, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(f"model_name_or_path: M\ndataset: x\noutput_dir: o\n{text}")
    with pytest.raises(SystemExit) as e:
        parse_args([str(p)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and match in err[-1] and str(p) in err[-1]


def test_overrides_are_key_value_not_flags(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("model_name_or_path: M\ndataset: x\noutput_dir: o\n")
    with pytest.raises(SystemExit):
        parse_args([str(p), "--max_steps", "3"])
    assert "key=value overrides" in capsys.readouterr().err
    assert parse_args([str(p), "output_dir=elsewhere", "engine=torch"]).engine == "torch"  # our own names too
    # `deepspeed --module train CONFIG.yaml` puts --local_rank=N first
    assert parse_args(["--local_rank=1", str(p), "max_steps=3"]).max_steps == 3


@pytest.mark.parametrize("argv,want", [
    (["-m", "train", "--mixture", "L", "--model_config", "C", "--output_dir", "O", "--max_steps", "2",
      "--dataset", "demo"], "--dataset_dir"),
    (["-m", "train", "--mixture", "L", "--model_config", "C", "--output_dir", "O", "--max_steps", "2",
      "--lr", "1e-3"], "--lr_scheduler_type"),
    (["-m", "pipeline", "build", "sample_data/mixture.json", "--work", "1"], "--workers"),
    (["-m", "train.merge_lora", "--base_model", "B"], "--base_model_path"),
])
def test_abbreviated_flags_are_usage_errors(argv, want):
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and f"unknown flag {argv[-2]}" in last and want in last, p.stderr[-1500:]


@pytest.mark.slow
def test_seed_lora_yaml_trains_three_steps(tmp_path):
    model = tiny_model_dir(tmp_path)
    out = tmp_path / "saves"
    cfg = seed_yaml(tmp_path, out, model=model)
    p = run_train([str(cfg), "max_steps=3", "cutoff_len=512", "max_samples=20"])
    assert "template 'hy_v3'" in p.stderr and "tokenizer's template" in p.stderr  # chatml tokenizer: a note
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 64 and adapter["lora_alpha"] == 128 and adapter["lora_dropout"] == 0.05
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    steps, _ = read_log(out)
    assert sorted(steps) == [1, 2, 3]
    floor = 0.1 * 2e-4
    assert all(steps[s]["lr"] >= floor * (1 - 1e-9) for s in steps) and steps[1]["lr"] == pytest.approx(2e-4)
    # max_samples: the first 20 records of the file, as LF's dataset.select(range(20))
    cut = (out / "data" / "lf_max_samples" / "hy_v3_demo.jsonl").read_text().splitlines()
    src = [ln for ln in (SAMPLE / "messages_mixed.jsonl").read_text().splitlines() if ln.strip()]
    assert cut == src[:20]
    assert json.loads((out / "train_args.json").read_text())["packing"] == "padded"


@pytest.mark.slow
def test_seed_full_yaml_zero3_two_ranks(tmp_path):
    model = tiny_model_dir(tmp_path)
    out = tmp_path / "full"
    text = (SEED_LORA.replace("finetuning_type: lora", "finetuning_type: full")
            .replace("lora_rank: 64\nlora_alpha: 128\nlora_dropout: 0.05\nlora_target: q_proj,k_proj,v_proj,o_proj\n",
                     "").replace("learning_rate: 2.0e-4", "learning_rate: 1.0e-5")
            .replace("gradient_accumulation_steps: 4", "gradient_accumulation_steps: 1"))
    cfg = seed_yaml(tmp_path, out, model=model, ds=CONFIG_DIR / "ds_zero3_no_offload.json", text=text)
    run_train([str(cfg), "max_steps=2", "cutoff_len=256", "max_samples=16", "bf16=false"], nproc=2,
              launcher="torchrun")
    steps, _ = read_log(out)
    assert sorted(steps) == [1, 2]
    assert (out / "model.safetensors").is_file() or list(out.glob("model*.safetensors"))
    assert not (out / "adapter_config.json").exists()


@pytest.mark.slow
def test_lora_target_all_eager_attention_and_reentrant_checkpointing(tmp_path):
    """lora_target: all = every Linear but the output layer (LF's find_all_linear_modules);
    flash_attn: disabled = eager; use_reentrant: true still trains the adapter."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from test_train_helpers import TINY
    from train.model import build_model
    p = tmp_path / "c.yaml"
    p.write_text("model_name_or_path: M\ndataset: x\noutput_dir: o\nflash_attn: disabled\n"
                 "gradient_checkpointing: true\ngradient_checkpointing_kwargs:\n  use_reentrant: true\n")
    c = parse_args([str(p)]).replace(model_name_or_path=None, model_config="C")
    tiny = dict(TINY)
    config = AutoConfig.for_model(tiny.pop("model_type"), **tiny)
    model = build_model(c, config, AutoTokenizer.from_pretrained(TOKENIZER), dtype=torch.float32, zero_stage=0)
    base = model.get_base_model()
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_config(config)
    linear = {n.rsplit(".", 1)[-1] for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
    assert set(model.peft_config["default"].target_modules) == linear == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert base.config._attn_implementation == "eager"
    model.train()
    ids = torch.randint(0, 6000, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
