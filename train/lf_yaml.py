"""LLaMA-Factory's config file as a view of TrainConfig: `python -m train CONFIG.yaml [key=value ...]`.

Read as LLaMA-Factory reads it (`hparams/parser.py`): the YAML mapping, then the `key=value`
overrides (OmegaConf dotlist style: YAML-typed values, `a.b=v` for a nested key). Each LF key
maps onto TrainConfig fields (`KEYS` below, the README's table); a key LF defines with a default
that differs from ours takes LF's default when the file does not say (`LF_DEFAULTS`), so a
file means what it means under `llamafactory-cli train`. Our own field names are accepted as keys
too (the three views are one set of fields). A key we do not support, or a value whose LF
meaning we cannot give, is a one-line error naming the key: nothing is silently ignored.

Returns the settings the file gave (field name -> value) and the notes; train/args.check_settings
validates them as it does flags.
"""
from __future__ import annotations

import os
from pathlib import Path

from .config import FLASH_ATTN, SCHEDULERS, settings


class LFConfigError(Exception):
    """A config file that cannot be used as written (exit status 2)."""


# LF @ff6d4d1 / transformers TrainingArguments defaults that differ from ours (hy3-convert-and-lf-yaml.md §2.3).
LF_DEFAULTS = {
    "stage": "sft", "finetuning_type": "lora", "lora_rank": 8, "lora_dropout": 0.0, "lora_target": "all",
    "dataset_dir": "data", "cutoff_len": 2048, "logging_steps": 500, "save_steps": 500, "report_to": "none",
    "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 5e-5,
    "num_train_epochs": 3.0, "lr_scheduler_type": "linear", "adam_beta2": 0.999, "weight_decay": 0.0,
    "flash_attn": "auto", "ddp_timeout": 1800,
}
# Keys with the same name and meaning as a TrainConfig field.
SAME = ("model_name_or_path", "trust_remote_code", "deepspeed", "output_dir", "logging_steps", "save_steps",
        "overwrite_output_dir", "per_device_train_batch_size", "per_device_eval_batch_size",
        "gradient_accumulation_steps", "learning_rate", "num_train_epochs", "bf16", "fp16",
        "gradient_checkpointing", "gradient_checkpointing_kwargs", "ddp_timeout", "flash_attn", "seed",
        "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "save_total_limit",
        "save_strategy", "logging_strategy", "eval_strategy", "eval_steps", "preprocessing_num_workers",
        "max_samples", "mix_strategy", "interleave_probs", "template", "lora_dropout")
# Keys accepted with no effect here (one note each).
NOTED = {
    "overwrite_cache": "the build cache is keyed by the data, tokenizer and template: a changed input is "
                       "always rebuilt",
    "plot_loss": "OUTPUT_DIR/training_curves.png is drawn at the end of every run",
    "do_train": None,
    "ddp_find_unused_parameters": "DeepSpeed reduces every gradient itself",
    "logging_first_step": "step 1 is always logged",
}
MIX_STRATEGIES = ("concat", "interleave_under", "interleave_over")


def _flat_overrides(pairs: list[str]) -> dict:
    import yaml
    out: dict = {}
    for pair in pairs:
        if "=" not in pair or pair.startswith("-"):
            raise LFConfigError(f"{pair!r}: after the config file give key=value overrides (LLaMA-Factory's "
                                "form), not flags")
        key, value = pair.split("=", 1)
        try:
            val = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            val = value
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LFConfigError(f"override {pair!r}: {p} is not a mapping")
        node[parts[-1]] = val
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str, overrides: list[str]) -> dict:
    import yaml
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise LFConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LFConfigError(f"{path}:{where} not valid YAML: {getattr(e, 'problem', e)}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise LFConfigError(f"{path}: expected a mapping of keys, got {type(doc).__name__}")
    return _merge(doc, _flat_overrides(overrides))


def _num(key: str, v, kind=float):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        if isinstance(v, str):
            try:
                return kind(v)
            except ValueError:
                pass
        raise LFConfigError(f"{key}: expected a number, got {v!r}")
    if kind is int and float(v) != int(v):
        raise LFConfigError(f"{key}: expected an integer, got {v!r} (a ratio < 1 is not supported here)")
    return kind(v)


def _bool(key: str, v) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise LFConfigError(f"{key}: expected true or false, got {v!r}")


def _comma(v) -> str:
    return ",".join(str(x).strip() for x in v) if isinstance(v, (list, tuple)) else str(v)


def to_settings(doc: dict, path: str) -> tuple[dict, list[str]]:
    """LF keys (with LF's defaults) -> TrainConfig field values the file gave, and notes."""
    fields = {f.name: f for f in settings() if f.metadata.get("cli") or not f.metadata.get("derived")}
    doc = {**{k: v for k, v in LF_DEFAULTS.items()}, **doc}
    given = set(doc) - set(LF_DEFAULTS) | {k for k in LF_DEFAULTS if k in doc and doc[k] != LF_DEFAULTS[k]}
    out: dict = {}
    notes: list[str] = []
    at = lambda k: f"{path}: {k}"  # noqa: E731

    lora = doc.pop("finetuning_type")
    if lora not in ("lora", "full"):
        raise LFConfigError(f"{at('finetuning_type')}: {lora!r} is not supported (lora, full)")
    out["use_lora"] = lora == "lora"
    lora_keys = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "additional_target")
    if lora == "lora":
        out["lora_rank"] = _num("lora_rank", doc.pop("lora_rank"), int)
        alpha = doc.pop("lora_alpha", None)
        out["lora_alpha"] = float(2 * out["lora_rank"] if alpha is None else _num("lora_alpha", alpha))
        out["lora_target_modules"] = _comma(doc.pop("lora_target"))
        if doc.get("additional_target") is not None:
            out["modules_to_save"] = _comma(doc.pop("additional_target"))
    else:
        for k in lora_keys:
            v = doc.pop(k, None)
            if k in given and v is not None:
                notes.append(f"{at(k)} ignored: finetuning_type is full (as in LLaMA-Factory)")

    stage = doc.pop("stage")
    if stage not in ("sft", "pt"):
        raise LFConfigError(f"{at('stage')}: {stage!r} is not supported (sft, pt)")
    packing, neat = doc.pop("packing", None), doc.pop("neat_packing", False)
    if neat and _bool("neat_packing", neat):
        out["packing"] = "packed"  # LF's block-diagonal packing = ours
    elif packing is None:
        out["packing"] = "concat" if stage == "pt" else "padded"  # LF: packing = (stage == pt)
    elif _bool("packing", packing):
        out["packing"] = "concat" if stage == "pt" else "packed"
        if stage == "sft":
            notes.append(f"{at('packing')}: packed rows attend per document here (LF's plain packing lets "
                         "documents see each other; neat_packing does not)")
    else:
        out["packing"] = "padded"
    out["_stage"] = stage

    if "do_train" in doc and not _bool("do_train", doc.pop("do_train")):
        raise LFConfigError(f"{at('do_train')}: false: python -m train only trains")
    out["dataset_info_dir"] = str(doc.pop("dataset_dir"))
    if doc.get("dataset") is not None:
        out["dataset"] = _comma(doc.pop("dataset"))
    doc.pop("dataset", None)
    out["max_seq_length"] = _num("cutoff_len", doc.pop("cutoff_len"), int)

    val = doc.pop("val_size", None)
    if val not in (None, 0, 0.0):
        val = _num("val_size", val)
        if not 0 < val < 1:
            raise LFConfigError(f"{at('val_size')}: {val:g} (a sample count) is not supported: give a fraction "
                                "in (0, 1)")
        out["validation_split_percentage"] = val  # a value < 1 is read as a fraction, as LF means it
    for k in ("eval_dataset",):
        if doc.get(k) is not None:
            raise LFConfigError(f"{at(k)}: not supported: hold out a share of each dataset with val_size")
        doc.pop(k, None)

    report = doc.pop("report_to")
    report = [report] if isinstance(report, str) else list(report or ["none"])
    bad = [r for r in report if r not in ("none", "tensorboard", "all")]
    if bad:
        raise LFConfigError(f"{at('report_to')}: {bad[0]!r} is not supported (none, tensorboard, all)")
    out["report_to"] = "tensorboard" if {"tensorboard", "all"} & set(report) else "none"

    if "save_only_model" in doc and _bool("save_only_model", doc.pop("save_only_model")):
        raise LFConfigError(f"{at('save_only_model')}: true is not supported: checkpoints hold the optimizer, "
                            "scheduler and data position so that a run can resume")
    doc.pop("save_only_model", None)

    sched = doc.pop("lr_scheduler_type")
    if sched not in SCHEDULERS:
        raise LFConfigError(f"{at('lr_scheduler_type')}: {sched!r} is not supported ({', '.join(SCHEDULERS)})")
    out["lr_scheduler_type"] = sched
    kwargs = doc.pop("lr_scheduler_kwargs", None) or {}
    if isinstance(kwargs, str):
        import json
        try:
            kwargs = json.loads(kwargs)
        except ValueError:
            raise LFConfigError(f"{at('lr_scheduler_kwargs')}: not a mapping or JSON object") from None
    if not isinstance(kwargs, dict):
        raise LFConfigError(f"{at('lr_scheduler_kwargs')}: expected a mapping")
    extra = sorted(set(kwargs) - {"min_lr", "min_lr_rate"})
    if extra:
        raise LFConfigError(f"{at('lr_scheduler_kwargs.' + extra[0])}: not supported (min_lr, min_lr_rate)")
    lr = _num("learning_rate", doc["learning_rate"])
    if sched == "cosine_with_min_lr":
        if len(kwargs) != 1:  # transformers' own rule
            raise LFConfigError(f"{at('lr_scheduler_kwargs')}: cosine_with_min_lr needs exactly one of min_lr "
                                "or min_lr_rate")
        out["min_lr"] = (_num("min_lr", kwargs["min_lr"]) if "min_lr" in kwargs
                         else _num("min_lr_rate", kwargs["min_lr_rate"]) * lr)
    elif kwargs:
        raise LFConfigError(f"{at('lr_scheduler_kwargs')}: min_lr / min_lr_rate need lr_scheduler_type "
                            "cosine_with_min_lr")

    ratio, steps = doc.pop("warmup_ratio", None), doc.pop("warmup_steps", None)
    if ratio and steps:
        raise LFConfigError(f"{at('warmup_ratio')}: give warmup_ratio or warmup_steps, not both")
    if steps is not None:
        steps = _num("warmup_steps", steps)
        if 0 < steps < 1:  # transformers 5: a warmup_steps below 1 is a ratio
            out["warmup_ratio"] = steps
        else:
            out["warmup_steps"] = int(steps)
    elif ratio is not None:
        out["warmup_ratio"] = _num("warmup_ratio", ratio)

    ms = doc.pop("max_steps", None)
    if ms is not None and _num("max_steps", ms, int) > 0:  # tf: -1 = from the epochs
        out["max_steps"] = int(ms)
        doc.pop("num_train_epochs", None)
    if "dataloader_num_workers" in doc:
        out["num_workers"] = _num("dataloader_num_workers", doc.pop("dataloader_num_workers"), int)

    resume = doc.pop("resume_from_checkpoint", None)
    if resume is not None:
        out["resume_from_checkpoint"] = str(resume)

    if doc.get("flash_attn") not in FLASH_ATTN:
        raise LFConfigError(f"{at('flash_attn')}: {doc.get('flash_attn')!r} is not supported "
                            f"({', '.join(FLASH_ATTN)})")
    for k, why in NOTED.items():
        if k in doc:
            doc.pop(k)
            if why and k in given:
                notes.append(f"{at(k)} accepted: {why}")
    for k in list(doc):
        name = k if k in SAME or k in fields else None
        if name is None or fields[name].metadata.get("derived"):
            raise LFConfigError(f"{at(k)}: not a supported key (README: LLaMA-Factory YAML keys)")
        v = doc.pop(k)
        if v is None:
            continue
        if name in ("max_samples",) and v is not None:
            v = _num(k, v, int)
        elif name == "interleave_probs":
            v = _comma(v)
        elif name == "gradient_checkpointing_kwargs":
            pass
        else:
            conv = fields[name].metadata.get("type")
            kind = fields[name].metadata.get("kind")
            if kind in ("flag", "hf_bool"):
                v = _bool(k, v)
            elif conv in (int, float):
                v = _num(k, v, conv)
            elif isinstance(v, (dict, list)):
                raise LFConfigError(f"{at(k)}: expected a single value")
            else:
                v = str(v)
        out[name] = v
    if out.get("mix_strategy", "concat") not in MIX_STRATEGIES:
        raise LFConfigError(f"{at('mix_strategy')}: {out['mix_strategy']!r} is not supported "
                            f"({', '.join(MIX_STRATEGIES)})")
    if out.get("interleave_probs") and out.get("mix_strategy", "concat") == "concat":
        raise LFConfigError(f"{at('interleave_probs')}: only valid for interleaved mixing (mix_strategy "
                            "interleave_under|interleave_over), as in LLaMA-Factory")
    _auto_resume(out, notes, path)
    out.pop("_stage")
    return out, notes


def _auto_resume(out: dict, notes: list, path: str) -> None:
    """LF: resume_from_checkpoint null, an output_dir holding checkpoints and no
    overwrite_output_dir -> resume from the last checkpoint."""
    od = out.get("output_dir")
    if out.get("resume_from_checkpoint") or out.get("overwrite_output_dir") or not od:
        return
    if os.path.isfile(os.path.join(od, "latest")):
        out["resume_from_checkpoint"] = "latest"
        notes.append(f"{path}: output_dir {od} holds checkpoints: resuming from the latest (LLaMA-Factory's rule; "
                     "overwrite_output_dir: true starts afresh)")


def read_lf_config(path: str, overrides: list[str]) -> tuple[dict, list[str]]:
    """`CONFIG.yaml key=value ...` -> (TrainConfig field values, notes)."""
    return to_settings(load(path, overrides), path)
