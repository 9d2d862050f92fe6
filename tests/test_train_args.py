"""Flags, DeepSpeed config resolution, and the clear errors of `python -m train` (all raised
before any process group or model exists, so these run in-process)."""
import json
import shutil

import pytest

from test_train_helpers import TOKENIZER, build_sample_lock, tiny_config

from train.__main__ import main
from train.args import TrainError, parse_args
from train.ds_config import CONFIG_DIR, load_ds_config, resolve_ds_config

BASE = ["--mixture", "L", "--model_config", "C", "--output_dir", "O", "--max_steps", "10"]


def resolved(extra, config="zero2", world_size=2, hidden=64):
    args = parse_args(BASE + ["--deepspeed", config] + extra)
    return resolve_ds_config(args, load_ds_config(args.deepspeed), world_size=world_size, hidden_size=hidden)


def test_shipped_configs_resolve_every_auto():
    for name in ("zero2", "zero3", "zero3_offload"):
        args, cfg = resolved(["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "4",
                              "--max_grad_norm", "0.5", "--bf16", "--learning_rate", "2e-4"], name)
        assert "auto" not in json.dumps(cfg)
        assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 4
        assert cfg["train_batch_size"] == 3 * 4 * 2 and cfg["gradient_clipping"] == 0.5
        assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    # the Hunyuan zero2 config had no bf16 block; ours does
    assert "bf16" in json.loads((CONFIG_DIR / "ds_zero2_no_offload.json").read_text())
    # ZeRO-3 configs gather 16-bit weights on save (Hunyuan's offload config did not)
    for f in ("ds_zero3_no_offload.json", "ds_zero3_offload.json"):
        z = json.loads((CONFIG_DIR / f).read_text())["zero_optimization"]
        assert z["stage3_gather_16bit_weights_on_model_save"] is True
    args, cfg = resolved(["--learning_rate", "2e-4", "--weight_decay", "0.1"], "zero3_offload", hidden=64)
    assert cfg["optimizer"]["params"] == {"lr": 2e-4, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8}
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64


def test_defaults_apply_when_neither_flag_nor_config_says():
    args, cfg = resolved([])
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_grad_norm) == (1, 1, 1.0)
    assert cfg["fp16"]["enabled"] is False and cfg["bf16"]["enabled"] is False


def write(tmp_path, cfg):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(cfg))
    return str(p)


def test_concrete_config_values_are_adopted_unless_a_flag_contradicts(tmp_path):
    cfg = write(tmp_path, {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.3,
                           "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    args, out = resolved([], cfg, world_size=1)
    assert args.per_device_train_batch_size == 4 and args.max_grad_norm == 0.3 and args.bf16
    with pytest.raises(TrainError, match=r"train_micro_batch_size_per_gpu = 4 but --per_device_train_batch_size 2"):
        resolved(["--per_device_train_batch_size", "2"], cfg)
    with pytest.raises(TrainError, match=r"bf16.enabled = true but --fp16"):
        resolved(["--fp16"], cfg)


@pytest.mark.parametrize("cfg,flags,match", [
    ({"fp16": {"enabled": False}}, ["--fp16"], r"fp16.enabled = false but --fp16"),
    ({"train_batch_size": 7}, ["--per_device_train_batch_size", "2"], r"train_batch_size = 7"),
    ({"scheduler": {"type": "WarmupLR"}}, [], r"scheduler"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, ["--learning_rate", "0.2"], r"optimizer.params.lr"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": "auto"}}, [], r"cannot resolve"),
])
def test_contradicting_configs_are_refused(tmp_path, cfg, flags, match):
    with pytest.raises(TrainError, match=match):
        resolved(flags, write(tmp_path, cfg))


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--output_dir", "o", "--max_steps", "5", "--model_config", "c"])
    assert e.value.code == 2
    assert "--mixture LOCK or --train_data_file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(BASE + ["--bf16", "--fp16"])
    assert "exclude each other" in capsys.readouterr().err
    help_text = " ".join(__import__("train.args", fromlist=["x"]).build_parser().format_help().split())
    assert "PERCENT" in help_text and "FRACTION" in help_text


# ---------------------------------------------------------------- clear errors of a real launch
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    return build_sample_lock(root / "data"), tiny_config(root), root


def launch(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_lock_and_model_dirs(setup, capsys, tmp_path):
    lock, cfg, root = setup
    common = ["--output_dir", str(tmp_path / "o"), "--max_steps", "3"]
    code, err = launch(["--mixture", str(root / "nope.lock.json"), "--model_config", str(cfg)] + common, capsys)
    assert code == 1 and "nope.lock.json: no such lock file" in err and "pipeline build" in err
    code, err = launch(["--mixture", str(lock), "--model_name_or_path", str(root / "no_model")] + common, capsys)
    assert code == 1 and "--model_name_or_path" in err and "no such file or directory" in err
    (root / "empty_model").mkdir(exist_ok=True)
    code, err = launch(["--mixture", str(lock), "--model_name_or_path", str(root / "empty_model"),
                        "--tokenizer_name_or_path", str(TOKENIZER)] + common, capsys)
    assert code == 1 and "not a Hugging Face model dir" in err


def test_lock_built_with_another_tokenizer(setup, capsys, tmp_path):
    from transformers import AutoTokenizer
    lock, cfg, root = setup
    other = tmp_path / "other_tok"
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.add_tokens(["<|extra_new_token|>"])
    tok.save_pretrained(other)
    argv = ["--mixture", str(lock), "--model_config", str(cfg), "--tokenizer_name_or_path", str(other),
            "--output_dir", str(tmp_path / "o"), "--max_steps", "3"]
    code, err = launch(argv, capsys)
    assert code == 1 and "the lock was built with tokenizer" in err and str(other) in err
    assert "--allow_tokenizer_mismatch" in err


def test_config_contradiction_and_hy3_min_lr(setup, capsys, tmp_path):
    lock, cfg, root = setup
    ds = shutil.copy(CONFIG_DIR / "ds_zero2_no_offload.json", tmp_path / "ds.json")
    conf = json.loads(open(ds).read())
    conf["fp16"]["enabled"] = True
    (tmp_path / "ds.json").write_text(json.dumps(conf))
    argv = ["--mixture", str(lock), "--model_config", str(cfg), "--output_dir", str(tmp_path / "o"),
            "--max_steps", "3"]
    code, err = launch(argv + ["--deepspeed", str(tmp_path / "ds.json"), "--bf16"], capsys)
    assert code == 1 and "contradicts the flags" in err and "fp16.enabled = true but --bf16" in err
    code, err = launch(argv + ["--learning_rate", "1e-5", "--min_lr", "0.01"], capsys)
    assert code == 2 and "absolute" in err


def test_resume_errors(setup, capsys, tmp_path):
    lock, cfg, root = setup
    out = tmp_path / "o"
    argv = ["--mixture", str(lock), "--model_config", str(cfg), "--output_dir", str(out), "--max_steps", "3"]
    code, err = launch(argv + ["--resume_from_checkpoint", str(out / "checkpoint-7")], capsys)
    assert code == 1 and "not a complete tokenmill checkpoint" in err
    ck = out / "checkpoint-2"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 2}))
    (out / "latest").write_text("checkpoint-2")
    code, err = launch(argv + ["--resume_from_checkpoint", "latest"], capsys)
    assert code == 1 and "saved by 2 ranks, this run has 1" in err


def test_fp16_on_cpu_falls_back_to_fp32_with_a_note(setup, capsys, tmp_path):
    """Issue 17: the seed scripts pass --fp16 (GPU); on CPU that is fp32 and one warning, not an error."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("fp16 works on GPU")
    from train.trainer import prepare
    lock, cfg, root = setup
    plan = prepare(parse_args(["--mixture", str(lock), "--model_config", str(cfg), "--output_dir",
                               str(tmp_path), "--max_steps", "3", "--fp16"]), 1, None)
    assert plan.cfg.fp16 is False and plan.ds_config["fp16"]["enabled"] is False
    assert "fp16 is not supported" in capsys.readouterr().err


def test_seed_flag_meanings():
    """CLA's flags map to ours: block_size = concat at N, fraction validation split, LoRA implied,
    torch_dtype = the DeepSpeed dtype; the frozen config refuses assignment."""
    c = parse_args(["--dataset_dir", "D", "--model_name_or_path", "M", "--output_dir", "O", "--max_steps", "2",
                    "--block_size", "512", "--validation_split_percentage", "0.001", "--lora_rank", "8",
                    "--torch_dtype", "bfloat16", "--logging_first_step", "True",
                    "--ddp_find_unused_parameters", "False", "--do_train"])
    assert (c.packing, c.max_seq_length, c.use_lora, c.bf16) == ("concat", 512, True, True)
    assert c.validation_percentage == pytest.approx(0.1)
    assert any("implies --use_lora" in n for n in c.notes)
    assert any("ddp_find_unused_parameters" in n for n in c.notes)
    with pytest.raises(AttributeError, match="frozen"):
        c.max_steps = 3
    assert parse_args(BASE + ["--validation_split_percentage", "5"]).validation_percentage == 5
    # HF: --max_steps wins over --num_train_epochs; epochs alone are accepted
    assert parse_args(BASE[:-2] + ["--num_train_epochs", "1"]).max_steps is None


def test_seed_deepspeed_json_min_loss_scale_is_normalised(tmp_path):
    args, cfg = resolved([], write(tmp_path, {"fp16": {"enabled": "auto", "min_loss_scale": 1e-10},
                                              "zero_optimization": {"stage": 2}}))
    assert cfg["fp16"]["min_loss_scale"] == 1 and any("min_loss_scale" in n for n in args.notes)
    import deepspeed.runtime.precision_config as pc  # DeepSpeed's own schema accepts the result
    pc.DeepSpeedFP16Config(**cfg["fp16"])
