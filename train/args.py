"""Command-line flags of `python -m train` and the DeepSpeed config they resolve.

Flag names follow the Hunyuan / Hy3 training scripts (DESIGN §6) and, where those have none,
the HF Trainer / Chinese-LLaMA-Alpaca ones. Flags that also live in the DeepSpeed JSON
(batch size, accumulation, clipping, lr, weight decay, fp16/bf16) default to "unset": an
`auto` in the JSON takes the flag (or its default); a concrete JSON value is kept unless the
flag was given with a different value, which is an error rather than a silent pick.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SHIPPED_CONFIGS = {
    "zero2": "ds_zero2_no_offload.json",
    "zero3": "ds_zero3_no_offload.json",
    "zero3_offload": "ds_zero3_offload.json",
}

# Flags whose default is applied only after the DeepSpeed config had its say.
LATE_DEFAULTS = {
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_grad_norm": 1.0,
    "learning_rate": 1e-5,
    "weight_decay": 0.0,
}


class UsageError(Exception):
    """Bad flags (exit status 2)."""


class TrainError(Exception):
    """Missing / inconsistent inputs: lock, model, tokenizer, checkpoint (exit status 1)."""


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a causal LM on a tokenmill mixture lock with DeepSpeed "
                    "(plain python, `deepspeed --module train`, or `torchrun -m train`).",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = (lambda v: argparse.SUPPRESS) if suppress_defaults else (lambda v: v)
    flag = dict(action="store_true", default=d(False))

    g = p.add_argument_group("data")
    g.add_argument("--mixture", help="mixture.lock.json written by `python -m pipeline build`")
    g.add_argument("--train_data_file", help="a .jsonl/.json/.txt file; built into shards (or reused "
                   "from the cache) through the pipeline first, then trained like a one-dataset lock")
    g.add_argument("--max_seq_length", type=int, help="sequence length (default: the lock's max_length)")
    g.add_argument("--packing", choices=["packed", "padded", "concat"], default=d("packed"),
                   help="packed: whole documents per row, attention per document; padded: one "
                        "sample per row; concat: documents joined with EOS and cut (pretraining)")
    g.add_argument("--validation_split_percentage", type=float, default=d(0.0),
                   help="PERCENT of each dataset held out for evaluation (1.0 = 1%%), chosen by sample, "
                        "stable across runs and world sizes. Chinese-LLaMA-Alpaca took a fraction here: "
                        "its 0.001 (0.1%%) is 0.1 in tokenmill")
    g.add_argument("--data_seed", type=int, help="seed of the sample order (default: the lock's seed)")
    g.add_argument("--num_workers", type=int, default=d(0), help="DataLoader workers per rank")
    g.add_argument("--allow_lock_change", **flag, help="resume even though the lock changed")
    g.add_argument("--allow_tokenizer_mismatch", **flag,
                   help="train although the lock was built with another tokenizer (dangerous)")
    g.add_argument("--data_cache_dir", help="cache of built datasets for --train_data_file "
                   "(default: $TOKENMILL_CACHE or OUTPUT_DIR/data/cache)")

    g = p.add_argument_group("model")
    g.add_argument("--model_name_or_path", help="local Hugging Face model dir to start from")
    g.add_argument("--model_config", help="config.json (or a dir holding one) to initialise a "
                   "model from scratch for pretraining")
    g.add_argument("--tokenizer_name_or_path", help="tokenizer dir (default: the model dir, else "
                   "the lock's tokenizer)")
    g.add_argument("--trust_remote_code", **flag, help="allow custom modeling code in the model dir")
    g.add_argument("--use_flash_attn", **flag, help="flash-attention 2 varlen kernels on GPU "
                   "(falls back to sdpa with per-document masks where unavailable)")
    g.add_argument("--gradient_checkpointing", **flag)
    g.add_argument("--train_attention_params_only", **flag,
                   help="train only parameters whose name contains 'self_attn'")
    g.add_argument("--make_moe_param_leaf_module", **flag,
                   help="ZeRO-3: make MoE blocks leaf modules (gathered whole, not per expert)")
    g.add_argument("--moe_leaf_module_classes", help="comma list of class names to use as MoE "
                   "leaf modules (default: detected, names ending in MoE/Moe/MoeBlock)")

    g = p.add_argument_group("LoRA")
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
    g.add_argument("--per_device_train_batch_size", type=int)
    g.add_argument("--per_device_eval_batch_size", type=int)
    g.add_argument("--gradient_accumulation_steps", type=int)
    g.add_argument("--max_steps", type=int, required=not suppress_defaults, help="optimizer steps")
    g.add_argument("--learning_rate", type=float, help=f"peak lr (default {LATE_DEFAULTS['learning_rate']})")
    g.add_argument("--min_lr", type=float, default=d(0.0),
                   help="ABSOLUTE floor of the cosine decay (not a ratio of --learning_rate)")
    g.add_argument("--warmup_ratio", type=float, default=d(0.0))
    g.add_argument("--warmup_steps", type=int, help="overrides --warmup_ratio")
    g.add_argument("--weight_decay", type=float)
    g.add_argument("--adam_beta1", type=float, default=d(0.9))
    g.add_argument("--adam_beta2", type=float, default=d(0.95))
    g.add_argument("--adam_epsilon", type=float, default=d(1e-8))
    g.add_argument("--max_grad_norm", type=float, help="gradient clipping (0 = off; default 1.0)")
    g.add_argument("--bf16", **flag)
    g.add_argument("--fp16", **flag)
    g.add_argument("--seed", type=int, default=d(42), help="model init, dropout")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--output_dir", required=not suppress_defaults)
    g.add_argument("--eval_steps", type=int, help="evaluate every N steps (and always at the end)")
    g.add_argument("--max_eval_batches", type=int, help="cap on validation batches per rank")
    g.add_argument("--logging_steps", type=int, default=d(1))
    g.add_argument("--report_to", choices=["tensorboard", "none"], default=d("tensorboard"))
    g.add_argument("--save_steps", type=int, default=d(500))
    g.add_argument("--save_total_limit", type=int, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", help="OUTPUT_DIR/checkpoint-N, or 'latest' "
                   "(the newest complete checkpoint in --output_dir)")
    g.add_argument("--stop_after_steps", type=int, help="end this run (with a checkpoint) after "
                   "N steps of it, without ending the schedule: for time-limited jobs")
    g.add_argument("--local_rank", type=int, default=d(-1), help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    explicit = build_parser(suppress_defaults=True).parse_known_args(argv)[0]
    args.explicit = set(vars(explicit))
    try:
        check_args(args)
    except UsageError as e:
        build_parser().error(str(e))
    return args


def check_args(args: argparse.Namespace) -> None:
    if not (args.mixture or args.train_data_file):
        raise UsageError("give the data: --mixture LOCK or --train_data_file FILE")
    if args.mixture and args.train_data_file:
        raise UsageError("give either --mixture or --train_data_file, not both")
    if args.model_name_or_path and args.model_config:
        raise UsageError("give either --model_name_or_path (fine-tune) or --model_config (from scratch)")
    if not (args.model_name_or_path or args.model_config or args.resume_from_checkpoint):
        raise UsageError("give the model: --model_name_or_path DIR or --model_config JSON")
    if args.bf16 and args.fp16:
        raise UsageError("--bf16 and --fp16 exclude each other")
    if args.max_steps <= 0:
        raise UsageError("--max_steps must be > 0")
    if not 0 <= args.validation_split_percentage < 100:
        raise UsageError("--validation_split_percentage is a percent in [0, 100)")
    for name in ("save_steps", "logging_steps", "eval_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "save_total_limit", "stop_after_steps"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError(f"--{name} must be > 0")


def load_ds_config(spec: str) -> dict:
    path = Path(CONFIG_DIR / SHIPPED_CONFIGS[spec]) if spec in SHIPPED_CONFIGS else Path(spec)
    if not path.is_file():
        raise TrainError(f"--deepspeed {spec}: no such file (or use one of {', '.join(SHIPPED_CONFIGS)})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def resolve_ds_config(args: argparse.Namespace, raw: dict, *, world_size: int, hidden_size: int) -> dict:
    """Fill `auto` values from the flags, adopt concrete JSON values for flags left unset, and
    refuse a JSON that contradicts a flag given explicitly. Mutates args (late defaults)."""
    cfg = copy.deepcopy(raw)
    problems = []

    def settle(flag: str, value, where: str):
        """One number that lives both in the JSON and in a flag."""
        if value == "auto" or value is None:
            if getattr(args, flag) is None:
                setattr(args, flag, LATE_DEFAULTS[flag])
            return getattr(args, flag)
        if flag in args.explicit and getattr(args, flag) != value:
            problems.append(f"{where} = {value} but --{flag} {getattr(args, flag)}")
        setattr(args, flag, type(LATE_DEFAULTS[flag])(value))
        return value

    cfg["train_micro_batch_size_per_gpu"] = settle(
        "per_device_train_batch_size", cfg.get("train_micro_batch_size_per_gpu"), "train_micro_batch_size_per_gpu")
    cfg["gradient_accumulation_steps"] = settle(
        "gradient_accumulation_steps", cfg.get("gradient_accumulation_steps"), "gradient_accumulation_steps")
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size
    if cfg.get("train_batch_size", "auto") not in ("auto", None) and cfg["train_batch_size"] != global_batch:
        problems.append(f"train_batch_size = {cfg['train_batch_size']} but micro batch × accumulation × "
                        f"world size = {global_batch}")
    cfg["train_batch_size"] = global_batch
    cfg["gradient_clipping"] = settle("max_grad_norm", cfg.get("gradient_clipping"), "gradient_clipping")

    # Mixed precision: the flags decide; a JSON block that says otherwise is a contradiction.
    for name in ("fp16", "bf16"):
        block = cfg.get(name)
        want = getattr(args, name)
        if block is None:
            if want:
                cfg[name] = {"enabled": True}
            continue
        enabled = block.get("enabled", "auto")
        if enabled == "auto":
            block["enabled"] = want
        elif enabled and not want:
            other = "bf16" if name == "fp16" else "fp16"
            if getattr(args, other):
                problems.append(f"{name}.enabled = true but --{other} was given")
            else:  # the JSON asks for it and no flag says otherwise
                setattr(args, name, True)
        elif not enabled and want:
            problems.append(f"{name}.enabled = false but --{name} was given")
    if args.fp16 and args.bf16:
        problems.append("both fp16 and bf16 end up enabled")

    if "scheduler" in cfg:
        problems.append('a "scheduler" block: the schedule comes from --learning_rate/--min_lr/'
                        "--warmup_ratio; remove the block")
    zero = cfg.setdefault("zero_optimization", {})
    zero.setdefault("stage", 0)
    offload = any(zero.get(k, {}).get("device", "none") not in ("none", None)
                  for k in ("offload_optimizer", "offload_param"))
    if offload and "optimizer" not in cfg:
        # ZeRO offload refuses a client torch optimizer: ask DeepSpeed for its CPU AdamW.
        cfg["optimizer"] = {"type": "AdamW", "params": {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}}
    if "optimizer" in cfg:
        params = cfg["optimizer"].setdefault("params", {})
        params["lr"] = settle("learning_rate", params.get("lr", "auto"), "optimizer.params.lr")
        params["weight_decay"] = settle("weight_decay", params.get("weight_decay", "auto"),
                                        "optimizer.params.weight_decay")
        if params.get("betas", "auto") == "auto":
            params["betas"] = [args.adam_beta1, args.adam_beta2]
        if params.get("eps", "auto") == "auto":
            params["eps"] = args.adam_epsilon
    for flag, default in LATE_DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)

    # Bucket sizes: the HF Trainer's rules of thumb from the hidden size.
    autos = {"reduce_bucket_size": hidden_size * hidden_size,
             "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
             "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in autos.items():
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = _find_auto(cfg)
    if leftover:
        problems.append(f"'auto' values tokenmill cannot resolve: {', '.join(leftover)}")
    if problems:
        raise TrainError(f"DeepSpeed config {args.deepspeed} contradicts the flags:\n  " + "\n  ".join(problems))
    cfg.setdefault("steps_per_print", 10**9)  # our own logger reports; keep DeepSpeed quiet
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def _find_auto(obj, path=""):
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if obj == "auto" else []
