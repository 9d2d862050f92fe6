"""Command-line flags of `python -m train` -> a frozen TrainConfig (train/config.py).

The parser is generated from TrainConfig's fields (their `flags` hold the seed aliases); this
module adds only the seed scripts' input-only flags (model-shape and no-op flags, `--torch_dtype`,
`--block_size`) and `check_settings`, the one validation every view (flags, LLaMA-Factory YAML,
key=value) goes through. No flag is abbreviated (stages/strict_cli.py).

Flag names follow the Hunyuan / Hy3 training scripts (DESIGN §6) and, where those have none,
the HF Trainer / Chinese-LLaMA-Alpaca ones; the seed scripts' flag sets are accepted as they
are (README "Coming from a seed script"). Flags that also live in the DeepSpeed JSON (batch
size, accumulation, clipping, lr, weight decay, fp16/bf16) default to "unset" and are settled
against it in train/ds_config.py. This module imports neither torch nor numba: `--help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys

from stages.strict_cli import StrictParser

from .config import FLAG, HF_BOOL, JSON, SCHEDULERS, TrainConfig, defaults, settings  # noqa: F401

CONFIG_SUFFIXES = (".yaml", ".yml")  # `python -m train CONFIG.yaml [key=value ...]` (LLaMA-Factory's form)
TORCH_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": None, "auto": None}
LORA_FLAGS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "modules_to_save")
# Hy3 / Hunyuan-Large train.sh model-shape flags: they describe a model built from scratch,
# which here is a --model_config JSON. Accepted (so the script runs), never silently used.
MODEL_SHAPE_FLAGS = ("hidden_size", "intermediate_size", "num_layers", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "num_experts", "moe_topk",
                     "num_shared_expert", "moe_intermediate_size", "max_position_embeddings",
                     "vocab_size", "rope_theta", "use_mixed_mlp_moe", "use_qk_norm", "use_cla",
                     "cla_share_factor", "use_rotary_pos_emb", "tie_word_embeddings", "kv_channels",
                     "head_dim", "norm_type", "hidden_act", "moe_layer_num_skipped", "capacity_factor")
# Accepted for compatibility; they cannot mean anything here (one note each).
NO_OP_FLAGS = {
    "ddp_find_unused_parameters": "DeepSpeed reduces every gradient itself",
    "do_train": "training is what python -m train does",
    "logging_first_step": "step 1 is always logged",
    "lazy_preprocess": "data is read from built shards, never preprocessed at train time",
}


class UsageError(Exception):
    """Bad flags (exit status 2)."""


class TrainError(Exception):
    """Missing / inconsistent inputs: lock, model, tokenizer, checkpoint (exit status 1)."""


def parse_bool(s: str) -> bool:
    """HF-style boolean flag values (`--logging_first_step True`)."""
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


class _Help(argparse.HelpFormatter):
    """Shows a setting's default once, and only when there is one (the parser's own defaults are
    SUPPRESS, so that what the user gave is exactly what the namespace holds)."""


GROUPS = {"data": "data", "model": "model", "lora": "LoRA (any LoRA flag implies --use_lora)",
          "optim": "optimisation", "out": "evaluation, logging, checkpoints"}


def _json_value(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def _help(f) -> str:
    h = f.metadata["help"]
    if f.metadata.get("hidden"):
        return argparse.SUPPRESS
    if f.default not in (None, False) and "default" not in h:
        h = (h + " " if h else "") + f"(default: {f.default})"
    return h


def build_parser() -> argparse.ArgumentParser:
    """The flags, generated from TrainConfig's fields (train/config.py), plus the seed scripts'
    input-only flags (shape flags, no-op flags, --torch_dtype, --block_size). Defaults are
    SUPPRESS: the namespace holds only what was given; check_settings adds the field defaults."""
    p = StrictParser(
        prog="python -m train", formatter_class=_Help, argument_default=argparse.SUPPRESS,
        usage="python -m train --FLAG VALUE ...  |  python -m train CONFIG.yaml [key=value ...]",
        description="Train a causal LM on a tokenmill mixture lock with DeepSpeed, or plain PyTorch in "
                    "one process (--engine) (plain python, `deepspeed --module train`, or `torchrun -m train`). "
                    "A LLaMA-Factory YAML file (and key=value overrides) sets the same settings (README).")
    groups = {k: p.add_argument_group(v) for k, v in GROUPS.items()}
    for f in settings():
        m = f.metadata
        if not m["cli"]:
            continue
        names = m["flags"] or (f"--{f.name}",)
        kw: dict = dict(dest=f.name, help=_help(f))
        if m["kind"] == FLAG:
            kw["action"] = "store_true"
        elif m["kind"] == HF_BOOL:
            kw.update(nargs="?", const=True, type=parse_bool)
        elif m["kind"] == JSON:
            kw.update(type=_json_value)
        else:
            if m["type"]:
                kw["type"] = m["type"]
            if m["choices"]:
                kw["choices"] = m["choices"]
        groups[m["group"]].add_argument(*names, **kw)
    g = groups["model"]
    g.add_argument("--torch_dtype", choices=sorted(TORCH_DTYPES),
                   help="float16 = --fp16, bfloat16 = --bf16, float32/auto = neither")
    g.add_argument("--block_size", type=int, help="Chinese-LLaMA-Alpaca: concat packing at this length "
                   "(= --packing concat --max_seq_length N)")
    for name in MODEL_SHAPE_FLAGS:
        g.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name in NO_OP_FLAGS:
        if name == "do_train":
            g.add_argument("--do_train", action="store_true", help=argparse.SUPPRESS)
        else:
            g.add_argument(f"--{name}", nargs="?", const=True, type=parse_bool, help=argparse.SUPPRESS)
    return p


def _without_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts `--local_rank=N` before the user's arguments (the rank also
    comes from the environment): a config file after it is still the first argument."""
    if argv and argv[0].startswith("--local_rank="):
        return argv[1:]
    if len(argv) > 1 and argv[0] == "--local_rank":
        return argv[2:]
    return argv


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags, or a LLaMA-Factory YAML file with key=value overrides (train/lf_yaml.py): the same
    fields either way. Bad usage exits 2 with one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config_argv = _without_local_rank(argv)
    if config_argv and not config_argv[0].startswith("-") and config_argv[0].lower().endswith(CONFIG_SUFFIXES):
        argv = config_argv
        from .lf_yaml import LFConfigError, read_lf_config
        try:
            given, notes = read_lf_config(argv[0], argv[1:])
            return check_settings(given, notes)
        except (LFConfigError, UsageError) as e:
            parser.error(str(e))
    ns = parser.parse_args(argv)
    try:
        return to_config(ns, set(vars(ns)))
    except UsageError as e:
        parser.error(str(e))


def to_config(ns: argparse.Namespace, explicit: set[str]) -> TrainConfig:
    """The parsed flags (only those given: the parser's defaults are SUPPRESS) -> TrainConfig."""
    return check_settings({k: v for k, v in vars(ns).items() if k in explicit})


def check_settings(given: dict, notes: list[str] | tuple = ()) -> TrainConfig:
    """Check the settings the user gave (by field name, plus the seed input-only names) and map
    the seed-script aliases to their meaning here; the rest take TrainConfig's defaults."""
    explicit = set(given)
    v = {**defaults(), **given}
    notes = list(notes)
    if not v["output_dir"]:
        raise UsageError("give --output_dir DIR (output_dir: in a config file)")
    sources = [f for f in ("mixture", "train_data_file", "dataset_dir", "dataset") if v[f]]
    if not sources:
        raise UsageError("give the data: --mixture LOCK or --train_data_file FILE (or --dataset_dir DIR; "
                         "dataset: NAMES in a config file)")
    if len(sources) > 1:
        raise UsageError(f"give one of --mixture, --train_data_file, --dataset_dir, dataset, not {' and '.join(sources)}")
    if v["model_name_or_path"] and v["model_config"]:
        raise UsageError("give either --model_name_or_path (fine-tune) or --model_config (from scratch)")
    if not (v["model_name_or_path"] or v["model_config"] or v["resume_from_checkpoint"]):
        raise UsageError("give the model: --model_name_or_path DIR or --model_config JSON")
    if v.get("torch_dtype"):
        want = TORCH_DTYPES[v["torch_dtype"]]
        if want:
            v[want] = True
    if v["bf16"] and v["fp16"]:
        raise UsageError("--bf16 and --fp16 exclude each other (also via --torch_dtype)")
    if v["max_steps"] is None and v["num_train_epochs"] is None:
        raise UsageError("give the length: --max_steps N or --num_train_epochs E")
    if v["max_steps"] is not None and v["max_steps"] <= 0:
        raise UsageError("--max_steps must be > 0")
    if v["num_train_epochs"] is not None and v["num_train_epochs"] <= 0:
        raise UsageError("--num_train_epochs must be > 0")
    if v["max_steps"] is not None and v["num_train_epochs"] is not None:
        notes.append(f"--max_steps {v['max_steps']} given: --num_train_epochs is not used (as in HF Trainer)")
    pct = v["validation_split_percentage"]
    if not 0 <= pct < 100:
        raise UsageError("--validation_split_percentage must be in [0, 100)")
    if 0 < pct < 1:  # Chinese-LLaMA-Alpaca's fraction (train_test_split test_size)
        notes.append(f"--validation_split_percentage {pct:g} < 1 is read as a fraction: {pct * 100:g}% held out")
        pct *= 100
    v["validation_percentage"] = pct
    if v.get("block_size") is not None:
        if v["block_size"] < 2:
            raise UsageError("--block_size must be >= 2")
        if "packing" in explicit and v["packing"] != "concat":
            raise UsageError(f"--block_size means --packing concat; it contradicts --packing {v['packing']}")
        if v["max_seq_length"] not in (None, v["block_size"]):
            raise UsageError("--block_size and --max_seq_length give two lengths")
        v["packing"], v["max_seq_length"] = "concat", v["block_size"]
    lora_given = [f for f in LORA_FLAGS if f in explicit]
    if lora_given and not v["use_lora"]:
        v["use_lora"] = True
        notes.append(f"--{lora_given[0].replace('lora_target_modules', 'trainable')} implies --use_lora: "
                     "training a LoRA adapter (only the adapter and modules_to_save are saved)")
    shape = [f for f in MODEL_SHAPE_FLAGS if v.get(f) is not None]
    if shape:
        notes.append(f"--{shape[0]} and other model-shape flags are not used: put them in a config.json and "
                     "pass --model_config (they only matter without --model_name_or_path)")
    for name, why in NO_OP_FLAGS.items():
        if name in explicit:
            notes.append(f"--{name} accepted, no effect: {why}")
    if v["eval_strategy"] == "no" or (v["do_eval"] and pct == 0):
        if v["do_eval"] and pct == 0:
            notes.append("--do_eval without --validation_split_percentage: nothing is held out to evaluate")
    if v["save_strategy"] == "epoch" or v["logging_strategy"] == "epoch" or v["eval_strategy"] == "epoch":
        notes.append("'epoch' strategies act per --save_steps/--logging_steps/--eval_steps: the stream has no "
                     "epoch boundary across datasets")
    if v["report_to"] == "all":
        v["report_to"] = "tensorboard"
    for name in ("save_steps", "logging_steps", "eval_steps", "per_device_train_batch_size",
                 "per_device_eval_batch_size", "gradient_accumulation_steps", "save_total_limit",
                 "stop_after_steps", "preprocessing_num_workers", "ddp_timeout"):
        if v.get(name) is not None and v[name] <= 0:
            raise UsageError(f"--{name} must be > 0")
    for name in MODEL_SHAPE_FLAGS + tuple(NO_OP_FLAGS) + ("torch_dtype", "block_size"):
        v.pop(name, None)
    if v["flash_attn"] == "fa2":
        v["use_flash_attn"] = True
    elif v["flash_attn"] in ("disabled", "sdpa") and v["use_flash_attn"]:
        raise UsageError(f"--use_flash_attn contradicts flash_attn {v['flash_attn']}")
    kwargs = v["gradient_checkpointing_kwargs"]
    if kwargs is not None and (not isinstance(kwargs, dict) or set(kwargs) - {"use_reentrant"}):
        raise UsageError(f"gradient_checkpointing_kwargs {json.dumps(kwargs)}: only {{\"use_reentrant\": "
                         "true|false}} is supported")
    v["explicit"] = frozenset(explicit)
    v["notes"] = tuple(notes)
    return TrainConfig(**v)
