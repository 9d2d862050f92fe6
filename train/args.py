"""Command-line flags of `python -m train` -> a frozen TrainConfig (train/config.py).

Flag names follow the Hunyuan / Hy3 training scripts (DESIGN §6) and, where those have none,
the HF Trainer / Chinese-LLaMA-Alpaca ones; the seed scripts' flag sets are accepted as they
are (README "Coming from a seed script"). Flags that also live in the DeepSpeed JSON (batch
size, accumulation, clipping, lr, weight decay, fp16/bf16) default to "unset" and are settled
against it in train/ds_config.py. This module imports neither torch nor numba: `--help` is instant.
"""
from __future__ import annotations

import argparse

from .config import TrainConfig

SCHEDULERS = ("cosine", "cosine_with_min_lr", "linear", "constant", "constant_with_warmup")
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
    """Shows a flag's default once, and only when there is one."""

    def _get_help_string(self, action):
        h = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in h \
                and "default" not in h and action.option_strings:
            h += " (default: %(default)s)"
        return h


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a causal LM on a tokenmill mixture lock with DeepSpeed, or plain PyTorch in "
                    "one process (--engine) (plain python, `deepspeed --module train`, or `torchrun -m train`).",
        argument_default=argparse.SUPPRESS if suppress_defaults else None, formatter_class=_Help)
    d = (lambda v: argparse.SUPPRESS) if suppress_defaults else (lambda v: v)
    flag = dict(action="store_true", default=d(False))
    hf_bool = dict(nargs="?", const=True, type=parse_bool, default=d(False))

    g = p.add_argument_group("data")
    g.add_argument("--mixture", help="mixture.lock.json written by `python -m pipeline build` (a manifest "
                   "is built first, into OUTPUT_DIR/data)")
    g.add_argument("--train_data_file", help="a .jsonl/.json/.txt file or a dir of them; built into "
                   "shards (or reused from the cache) through the pipeline, then trained as a lock")
    g.add_argument("--dataset_dir", help="Chinese-LLaMA-Alpaca: a dir whose *.txt / *.json / *.jsonl files "
                   "become one dataset each, built through the pipeline; shares per --dataset_dir_shares")
    g.add_argument("--dataset_dir_shares", choices=["tokens", "equal"], default=d("tokens"),
                   help="--dataset_dir: each file's token share is its built tokens (tokens: as the seed's "
                        "concatenation of the files) or the same for every file (equal) (default: tokens)")
    g.add_argument("--max_seq_length", "--model_max_length", dest="max_seq_length", type=int,
                   help="sequence length; default: the lock's max_length")
    g.add_argument("--block_size", type=int, help="Chinese-LLaMA-Alpaca: concat packing at this length "
                   "(= --packing concat --max_seq_length N)")
    g.add_argument("--packing", choices=["packed", "padded", "concat"], default=d("packed"),
                   help="packed: whole documents per row, attention per document; padded: one "
                        "sample per row; concat: documents joined with EOS and cut (pretraining)")
    g.add_argument("--validation_split_percentage", type=float, default=d(0.0),
                   help="held-out share of each dataset, chosen by sample, stable across runs and world "
                        "sizes. A value >= 1 is a PERCENT (5 = 5%%, HF run_clm); a value < 1 is a FRACTION "
                        "as Chinese-LLaMA-Alpaca passes it (0.001 = 0.1%%). The held-out count is printed")
    g.add_argument("--data_seed", type=int, help="seed of the sample order; default: the lock's seed")
    g.add_argument("--num_workers", type=int, default=d(0), help="DataLoader workers per rank")
    g.add_argument("--preprocessing_num_workers", type=int, help="build workers for --train_data_file / "
                   "--dataset_dir / a manifest")
    g.add_argument("--allow_lock_change", **flag, help="resume even though the lock changed")
    g.add_argument("--allow_tokenizer_mismatch", **flag,
                   help="train although the lock was built with another tokenizer (dangerous)")
    g.add_argument("--data_cache_dir", help="cache of built datasets for --train_data_file / --dataset_dir; "
                   "default: $TOKENMILL_CACHE or OUTPUT_DIR/data/cache")
    g.add_argument("--verify_data", choices=["cheap", "full"], default=d("cheap"),
                   help="check the built data before step 0: cheap = meta.json, lock and sizes; "
                        "full = also the sha256 and structure of every shard (as `pipeline verify`)")

    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", help="local Hugging Face model dir to start from")
    g.add_argument("--model_config", help="config.json (or a dir holding one) to initialise a "
                   "model from scratch for pretraining")
    g.add_argument("--tokenizer_name_or_path", help="tokenizer dir; default: the model dir, else the lock's")
    g.add_argument("--trust_remote_code", **flag, help="allow custom modeling code in the model dir")
    g.add_argument("--torch_dtype", choices=sorted(TORCH_DTYPES),
                   help="float16 = --fp16, bfloat16 = --bf16, float32/auto = neither")
    g.add_argument("--use_flash_attn", **flag, help="flash-attention 2 varlen kernels on GPU "
                   "(falls back to sdpa with per-document masks where unavailable)")
    g.add_argument("--gradient_checkpointing", **flag)
    g.add_argument("--train_attention_params_only", **flag,
                   help="train only parameters whose name contains 'self_attn'")
    g.add_argument("--make_moe_param_leaf_module", **flag,
                   help="ZeRO-3: make MoE blocks leaf modules (gathered whole, not per expert)")
    g.add_argument("--moe_leaf_module_classes", help="comma list of class names to use as MoE "
                   "leaf modules; default: detected, names ending in MoE/Moe/MoeBlock")
    for name in MODEL_SHAPE_FLAGS:
        g.add_argument(f"--{name}", default=d(None), help=argparse.SUPPRESS)

    g = p.add_argument_group("LoRA (any LoRA flag implies --use_lora)")
    g.add_argument("--use_lora", **flag)
    g.add_argument("--lora_rank", type=int, default=d(64))
    g.add_argument("--lora_alpha", type=float, default=d(8.0))
    g.add_argument("--lora_dropout", type=float, default=d(0.0))
    g.add_argument("--lora_target_modules", "--trainable", dest="lora_target_modules",
                   default=d("q_proj,k_proj,v_proj,o_proj"), help="comma list of module names")
    g.add_argument("--modules_to_save", help="comma list of modules trained and saved in full "
                   "(e.g. embed_tokens,lm_head)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--deepspeed", default=d("zero2"),
                   help="DeepSpeed JSON, or a shipped one: zero2, zero3, zero3_offload")
    g.add_argument("--engine", choices=["auto", "deepspeed", "torch"], default=d("auto"),
                   help="what runs backward/step. auto: plain PyTorch (AdamW, the same schedule, clipping "
                        "and accumulation as DeepSpeed; no DeepSpeed import) when the run is one process and "
                        "the DeepSpeed config is ZeRO-0/1/2 without offload and without fp16 (ZeRO "
                        "partitions nothing in one process); DeepSpeed for several ranks, ZeRO-3, offload "
                        "or fp16 (they save memory or need its loss scaling). A resumed run keeps its "
                        "checkpoint's engine; each engine reads only its own checkpoints")
    g.add_argument("--per_device_train_batch_size", type=int, help="default 1")
    g.add_argument("--per_device_eval_batch_size", type=int, help="default: the train batch size")
    g.add_argument("--gradient_accumulation_steps", type=int, help="default 1")
    g.add_argument("--max_steps", type=int, help="optimizer steps (or give --num_train_epochs)")
    g.add_argument("--num_train_epochs", type=float, help="without --max_steps: steps = epochs x the lock's "
                   "train tokens (samples when padded) / tokens per step, printed")
    g.add_argument("--learning_rate", type=float, help="peak lr; default 1e-05")
    g.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default=d("cosine"),
                   help="after linear warmup: cosine / cosine_with_min_lr (both decay to --min_lr at "
                        "max_steps), linear (to --min_lr), constant (no warmup), constant_with_warmup")
    g.add_argument("--min_lr", type=float, default=d(0.0),
                   help="ABSOLUTE floor of the decay (not a ratio of --learning_rate)")
    g.add_argument("--warmup_ratio", type=float, default=d(0.0))
    g.add_argument("--warmup_steps", type=int, help="overrides --warmup_ratio")
    g.add_argument("--weight_decay", type=float, help="default 0.0")
    g.add_argument("--adam_beta1", type=float, default=d(0.9))
    g.add_argument("--adam_beta2", type=float, default=d(0.95))
    g.add_argument("--adam_epsilon", type=float, default=d(1e-8))
    g.add_argument("--max_grad_norm", type=float, help="gradient clipping (0 = off); default 1.0")
    g.add_argument("--bf16", **hf_bool)
    g.add_argument("--fp16", **hf_bool, help="on a device without fp16 (CPU) this becomes fp32 with a note")
    g.add_argument("--seed", type=int, default=d(42), help="model init, dropout")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--output_dir", required=not suppress_defaults)
    g.add_argument("--overwrite_output_dir", **flag, help="start afresh in an OUTPUT_DIR that holds a "
                   "finished or checkpointed run (else refused)")
    g.add_argument("--do_eval", **flag, help="evaluate (needs --validation_split_percentage)")
    g.add_argument("--eval_steps", type=int, help="evaluate every N steps (and always at the end)")
    g.add_argument("--evaluation_strategy", "--eval_strategy", dest="eval_strategy",
                   choices=["no", "steps", "epoch"], help="'no' turns evaluation off; otherwise --eval_steps")
    g.add_argument("--max_eval_batches", type=int, help="cap on validation batches per rank")
    g.add_argument("--logging_steps", type=int, default=d(1))
    g.add_argument("--logging_strategy", choices=["steps", "epoch", "no"], default=d("steps"),
                   help="'no': no console step lines (train_log.jsonl keeps every step)")
    g.add_argument("--report_to", choices=["tensorboard", "none", "all"], default=d("tensorboard"))
    g.add_argument("--save_steps", type=int, default=d(500))
    g.add_argument("--save_strategy", choices=["steps", "no", "epoch"], default=d("steps"),
                   help="'no': no intermediate checkpoints (the final model is still saved)")
    g.add_argument("--save_total_limit", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", help="OUTPUT_DIR/checkpoint-N, or 'latest' "
                   "(the newest complete checkpoint in --output_dir)")
    g.add_argument("--stop_after_steps", type=int, help="end this run (with a checkpoint) after "
                   "N steps of it, without ending the schedule: for time-limited jobs")
    g.add_argument("--ddp_timeout", type=int, default=d(1800), help="seconds a collective may wait")
    g.add_argument("--ddp_find_unused_parameters", **hf_bool, help=argparse.SUPPRESS)
    g.add_argument("--do_train", **flag, help=argparse.SUPPRESS)
    g.add_argument("--logging_first_step", **hf_bool, help=argparse.SUPPRESS)
    g.add_argument("--lazy_preprocess", **hf_bool, help=argparse.SUPPRESS)
    g.add_argument("--local_rank", type=int, default=d(-1), help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    explicit = set(vars(build_parser(suppress_defaults=True).parse_known_args(argv)[0]))
    try:
        return to_config(ns, explicit)
    except UsageError as e:
        parser.error(str(e))


def to_config(ns: argparse.Namespace, explicit: set[str]) -> TrainConfig:
    """Check the flags and map the seed-script aliases to their meaning here."""
    v = dict(vars(ns))
    notes = []
    sources = [f for f in ("mixture", "train_data_file", "dataset_dir") if v[f]]
    if not sources:
        raise UsageError("give the data: --mixture LOCK or --train_data_file FILE (or --dataset_dir DIR)")
    if len(sources) > 1:
        raise UsageError(f"give one of --mixture, --train_data_file, --dataset_dir, not {' and '.join(sources)}")
    if v["model_name_or_path"] and v["model_config"]:
        raise UsageError("give either --model_name_or_path (fine-tune) or --model_config (from scratch)")
    if not (v["model_name_or_path"] or v["model_config"] or v["resume_from_checkpoint"]):
        raise UsageError("give the model: --model_name_or_path DIR or --model_config JSON")
    if v["torch_dtype"]:
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
    if v["block_size"] is not None:
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
    v["explicit"] = frozenset(explicit)
    v["notes"] = tuple(notes)
    return TrainConfig(v)
