"""Merge a LoRA adapter into its base model offline (Hunyuan's merge_lora_weight.py flags).

    python -m train.merge_lora --base_model_path BASE --adapter_model_path ADAPTER \
        --output_path OUT --save_dtype bf16

Differences from the reference tool: the result is safetensors; the base model's embeddings
are grown first when the adapter was trained with a larger tokenizer (its `modules_to_save`
then carry the new rows); the adapter dir's tokenizer (saved by `python -m train`) wins over
the base model's.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from stages.strict_cli import StrictParser  # no abbreviations; an unknown flag names the closest

from .args import TrainError

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _run_records() -> tuple[str, ...]:
    """What a run writes beside its final model (its logs): not copied from a base that is a run's dir."""
    from .checkpoint import RUN_RECORDS
    return RUN_RECORDS


def parse_args(argv=None):
    p = StrictParser(prog="python -m train.merge_lora", description=__doc__.split("\n")[0])
    p.add_argument("--base_model_path", required=True, help="HF dir of the base model")
    p.add_argument("--adapter_model_path", required=True, help="dir with adapter_config.json")
    p.add_argument("--output_path", required=True, help="dir for the merged model")
    p.add_argument("--save_dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--trust_remote_code", action="store_true")
    return p.parse_args(argv)


def merge(base_model_path: str, adapter_model_path: str, output_path: str, save_dtype: str = "fp32",
          trust_remote_code: bool = False) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model import save_pretrained_fused
    from .tokenizer import load_tokenizer

    base, adapter, out = Path(base_model_path), Path(adapter_model_path), Path(output_path)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"--base_model_path {base}: not a Hugging Face model dir (no config.json)")
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter_model_path {adapter}: no adapter_config.json")
    try:
        auto_map = json.loads((base / "config.json").read_text("utf-8")).get("auto_map")
    except ValueError as e:
        raise TrainError(f"--base_model_path {base}: config.json is not JSON ({e})") from None
    if auto_map and not trust_remote_code:
        raise TrainError(f"--base_model_path {base}: the model needs its own code (config.json auto_map); "
                         "if you trust it, pass --trust_remote_code")
    dtype = getattr(torch, DTYPES[save_dtype])
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, device_map={"": "cpu"},
                                                 trust_remote_code=trust_remote_code)
    tok_dir = adapter if _has_tokenizer(adapter) else base if _has_tokenizer(base) else None
    tokenizer = None
    if tok_dir is not None:  # the trainer's loader: SentencePiece, tiktoken or HF, as it was trained
        tokenizer = load_tokenizer(str(tok_dir), trust_remote_code)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            # Same growth as in training; the adapter's modules_to_save then overwrite the rows.
            model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(adapter))
    merged = model.merge_and_unload()
    merged.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained_fused(merged, out)
    # Non-weight files of the base (custom code, generation config, …), then the tokenizer.
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WEIGHT_INDEXES \
                and f.name != "config.json" and f.name not in _run_records() and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def _has_tokenizer(d: Path) -> bool:
    return any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")) \
        or any(d.glob("*.tiktoken"))


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    try:
        out = merge(args.base_model_path, args.adapter_model_path, args.output_path, args.save_dtype,
                    args.trust_remote_code)
    except (FileNotFoundError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # transformers / peft: one line, never a traceback
        text = " ".join(str(e).split()) or type(e).__name__
        if "trust_remote_code" in text and not args.trust_remote_code:
            print(f"error: {args.base_model_path} needs its own model code: if you trust it, pass "
                  f"--trust_remote_code", file=sys.stderr)
        else:
            print(f"error: cannot merge {args.adapter_model_path} into {args.base_model_path}: "
                  f"{type(e).__name__}: {text[:500]}", file=sys.stderr)
        return 1
    cfg = json.loads((out / "config.json").read_text())
    print(f"merged {args.adapter_model_path} into {args.base_model_path} → {out} "
          f"({cfg.get('model_type')}, {args.save_dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
