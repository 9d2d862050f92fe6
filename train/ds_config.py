"""The DeepSpeed JSON reconciled with the flags.

`auto` in the JSON takes the flag (or its default); a concrete JSON value is adopted for a flag
left unset, and refused when the flag was given with a different value (a contradiction is an
error, never a silent pick). Values from the seed repos' JSONs that this DeepSpeed version
rejects are normalised with a note (e.g. `"min_loss_scale": 1e-10`, an int field here).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .args import TrainError
from .config import TrainConfig

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


def load_ds_config(spec: str) -> dict:
    path = Path(CONFIG_DIR / SHIPPED_CONFIGS[spec]) if spec in SHIPPED_CONFIGS else Path(spec)
    if not path.is_file():
        raise TrainError(f"--deepspeed {spec}: no such file (or use one of {', '.join(SHIPPED_CONFIGS)})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def normalise_seed_values(cfg: dict) -> list[str]:
    """Fix, in place, values the seed repos' JSONs carry that DeepSpeed's schema rejects."""
    notes = []
    fp16 = cfg.get("fp16")
    if isinstance(fp16, dict):
        m = fp16.get("min_loss_scale")
        if isinstance(m, float) and not m.is_integer():
            fp16["min_loss_scale"] = max(1, int(m))
            notes.append(f"DeepSpeed config fp16.min_loss_scale {m:g}: this DeepSpeed takes an integer "
                         f"floor; using {fp16['min_loss_scale']}")
    return notes


def resolve_ds_config(args: TrainConfig, raw: dict, *, world_size: int,
                      hidden_size: int) -> tuple[TrainConfig, dict]:
    """-> (the config with the shared numbers settled, the DeepSpeed config to pass on)."""
    cfg = copy.deepcopy(raw)
    notes = normalise_seed_values(cfg)
    problems = []
    settled: dict = {}

    def get(flag):
        return settled.get(flag, getattr(args, flag))

    def settle(flag: str, value, where: str):
        """One number that lives both in the JSON and in a flag."""
        if value == "auto" or value is None:
            if get(flag) is None:
                settled[flag] = LATE_DEFAULTS[flag]
            return get(flag)
        if flag in args.explicit and get(flag) != value:
            problems.append(f"{where} = {value} but --{flag} {get(flag)}")
        settled[flag] = type(LATE_DEFAULTS[flag])(value)
        return value

    cfg["train_micro_batch_size_per_gpu"] = settle(
        "per_device_train_batch_size", cfg.get("train_micro_batch_size_per_gpu"), "train_micro_batch_size_per_gpu")
    cfg["gradient_accumulation_steps"] = settle(
        "gradient_accumulation_steps", cfg.get("gradient_accumulation_steps"), "gradient_accumulation_steps")
    global_batch = get("per_device_train_batch_size") * get("gradient_accumulation_steps") * world_size
    if cfg.get("train_batch_size", "auto") not in ("auto", None) and cfg["train_batch_size"] != global_batch:
        problems.append(f"train_batch_size = {cfg['train_batch_size']} but micro batch × accumulation × "
                        f"world size = {global_batch}")
    cfg["train_batch_size"] = global_batch
    cfg["gradient_clipping"] = settle("max_grad_norm", cfg.get("gradient_clipping"), "gradient_clipping")

    # Mixed precision: the flags decide; a JSON block that says otherwise is a contradiction.
    for name in ("fp16", "bf16"):
        block = cfg.get(name)
        want = get(name)
        if block is None:
            if want:
                cfg[name] = {"enabled": True}
            continue
        enabled = block.get("enabled", "auto")
        if enabled == "auto":
            block["enabled"] = bool(want)
        elif enabled and not want:
            other = "bf16" if name == "fp16" else "fp16"
            if get(other):
                problems.append(f"{name}.enabled = true but --{other} was given")
            else:  # the JSON asks for it and no flag says otherwise
                settled[name] = True
        elif not enabled and want:
            problems.append(f"{name}.enabled = false but --{name} was given")
    if get("fp16") and get("bf16"):
        problems.append("both fp16 and bf16 end up enabled")

    if "scheduler" in cfg:
        problems.append('a "scheduler" block: the schedule comes from --lr_scheduler_type/--learning_rate/'
                        "--min_lr/--warmup_ratio; remove the block")
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
        if get(flag) is None:
            settled[flag] = default

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
    return args.replace(**settled, notes=tuple(args.notes) + tuple(notes)), cfg


def check_with_deepspeed(cfg: dict, spec: str) -> None:
    """Validate the resolved config with DeepSpeed's own schema: one line, never a pydantic dump."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
        DeepSpeedConfig(copy.deepcopy(cfg))
    except Exception as e:  # pydantic ValidationError or DeepSpeedConfigError
        errs = getattr(e, "errors", None)
        if callable(errs):
            first = errs()[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            msg = f"{getattr(e, 'title', '')}.{where}: {first.get('msg')} (got {first.get('input')!r})"
        else:
            msg = str(e).splitlines()[0]
        raise TrainError(f"DeepSpeed config {spec}: {msg}") from None


def _find_auto(obj, path=""):
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _find_auto(v, f"{path}.{k}" if path else k)]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if obj == "auto" else []


# ---------------------------------------------------------------- which engine runs the steps
# Keys of a resolved DeepSpeed config the plain-torch engine (train/torch_engine.py) honours, or
# that mean nothing in one process (communication, logging). Any other key keeps DeepSpeed under
# --engine auto: it may ask for something only DeepSpeed does (e.g. "optimizer", "compile").
TORCH_ENGINE_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "gradient_clipping", "fp16", "bf16", "zero_optimization", "steps_per_print",
                     "wall_clock_breakdown", "zero_allow_untested_optimizer", "communication_data_type",
                     "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "checkpoint",
                     "zero_force_ds_cpu_optimizer", "tensorboard", "flops_profiler", "comms_logger"}


def deepspeed_needed(ds_config: dict, world_size: int) -> str | None:
    """Why this run needs DeepSpeed (a short phrase), or None when DeepSpeed would buy nothing:
    one process, ZeRO stage 0/1/2 (which only partition states across ranks), no offload (which
    saves memory), no fp16 (DeepSpeed's loss scaling) and nothing else only DeepSpeed does."""
    zero = ds_config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0))
    if world_size > 1:
        return f"{world_size} ranks"
    if stage >= 3:
        return "ZeRO-3 (partitioned parameters save memory)"
    offload = [k for k in ("offload_optimizer", "offload_param")
               if (zero.get(k) or {}).get("device", "none") not in ("none", None)]
    if offload:
        return f"ZeRO {offload[0]} (saves memory)"
    if (ds_config.get("fp16") or {}).get("enabled") is True:
        return "fp16 (DeepSpeed's loss scaling)"
    other = sorted(set(ds_config) - TORCH_ENGINE_KEYS)
    if other:
        return f"the DeepSpeed config's {', '.join(repr(k) for k in other)}"
    return None


def choose_engine(flag: str, ds_config: dict, world_size: int, resume_engine: str | None = None) -> tuple[str, str]:
    """("torch" | "deepspeed", why) for --engine auto|torch|deepspeed. Under auto a resumed run
    keeps the engine of its checkpoint (each engine reads only its own); an explicit --engine
    that cannot read the checkpoint is refused in train/trainer.py."""
    need = deepspeed_needed(ds_config, world_size)
    if flag == "deepspeed":
        return "deepspeed", "--engine deepspeed"
    if flag == "torch":
        if need:
            raise TrainError(f"--engine torch: this run needs DeepSpeed ({need}); use --engine auto or deepspeed")
        return "torch", "--engine torch"
    if resume_engine == "deepspeed":
        return "deepspeed", "resuming a DeepSpeed checkpoint"
    if resume_engine == "torch" and world_size == 1:
        return "torch", "resuming a torch-engine checkpoint"
    if need:
        return "deepspeed", need
    return "torch", "one process, ZeRO-0/1/2 without offload: DeepSpeed buys nothing (--engine deepspeed to use it)"
