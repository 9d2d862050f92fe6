"""Merge a LoRA adapter into its base model offline (Hunyuan's merge_lora_weight.py flags).

    python -m train.merge_lora --base_model_path BASE --adapter_model_path ADAPTER \
        --output_path OUT --save_dtype bf16

Differences from the reference tool: the result is safetensors; the base model's embeddings
are grown first when the adapter was trained with a larger tokenizer (its `modules_to_save`
then carry the new rows); the adapter dir's tokenizer (saved by `python -m train`) wins over
the base model's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from stages.constants import TOKENIZER_FILES

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _run_records() -> tuple[str, ...]:
    """What a run writes beside its final model (its logs): not copied from a base that is a run's dir."""
    from .checkpoint import RUN_RECORDS
    return RUN_RECORDS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.merge_lora", description=__doc__.split("\n")[0])
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter, out = Path(base_model_path), Path(adapter_model_path), Path(output_path)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(f"--base_model_path {base}: not a Hugging Face model dir (no config.json)")
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter_model_path {adapter}: no adapter_config.json")
    dtype = getattr(torch, DTYPES[save_dtype])
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, device_map={"": "cpu"},
                                                 trust_remote_code=trust_remote_code)
    tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = None
    if (tok_dir / "tokenizer_config.json").is_file() or (tok_dir / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), trust_remote_code=trust_remote_code)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            # Same growth as in training; the adapter's modules_to_save then overwrite the rows.
            model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(adapter))
    merged = model.merge_and_unload()
    merged.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    # Non-weight files of the base (custom code, generation config, …), then the tokenizer.
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in WEIGHT_INDEXES \
                and f.name != "config.json" and f.name not in _run_records() and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        for name in os.listdir(tok_dir):
            if (name.endswith(".tiktoken") or name.startswith("tokenization_")) and not (out / name).exists():
                shutil.copy2(tok_dir / name, out / name)
    return out


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    try:
        out = merge(args.base_model_path, args.adapter_model_path, args.output_path, args.save_dtype,
                    args.trust_remote_code)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = json.loads((out / "config.json").read_text())
    print(f"merged {args.adapter_model_path} into {args.base_model_path} → {out} "
          f"({cfg.get('model_type')}, {args.save_dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
