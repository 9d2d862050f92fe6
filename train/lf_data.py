"""LLaMA-Factory's data settings (`dataset_dir`, `dataset`, `max_samples`, `mix_strategy`,
`interleave_probs`, `cutoff_len`, `stage`) as a tokenmill manifest built by the pipeline.

Each name in `dataset` is an entry of DATASET_INFO_DIR/dataset_info.json, read by the pipeline's
registry source (mixtures/registry.py: formatting, columns, tags as LLaMA-Factory reads them).
`max_samples` keeps the first N records of each file, as LF's `dataset.select(range(N))`: those
records are written to OUTPUT_DIR/data/lf_max_samples/ and a copy of the registry points at them.
Over-long sft records are truncated (LF's cutoff_len), pretraining text is cut into pieces.

Mixing needs the built sizes, so the lock is written twice (the second build reuses every
built dataset): `concat` (LF's default) trains each record once per epoch, i.e. token shares
proportional to each dataset's tokens; `interleave_*` draws samples with `interleave_probs`
(uniform when not given), i.e. token shares proportional to probability x mean sample length.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def _error(msg: str):
    from train.args import TrainError
    return TrainError(msg)


def _first_records(src: str, n: int, dst: Path) -> bool:
    """Write the first n records of a .jsonl / .json file to dst (.jsonl); False when it has no more than n."""
    if src.endswith(".jsonl"):
        lines = []
        with open(src, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    lines.append(line if line.endswith("\n") else line + "\n")
                if len(lines) > n:
                    break
        if len(lines) <= n:
            return False
        dst.write_text("".join(lines[:n]), encoding="utf-8")
        return True
    if src.endswith(".json"):
        try:
            doc = json.loads(Path(src).read_text(encoding="utf-8"))
        except ValueError as e:
            raise _error(f"max_samples: {src}: not valid JSON: {e}") from None
        if not isinstance(doc, list):
            raise _error(f"max_samples: {src}: expected a JSON list of records")
        if len(doc) <= n:
            return False
        dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in doc[:n]), encoding="utf-8")
        return True
    raise _error(f"max_samples: {src}: only .json / .jsonl files can be cut to their first records")


def registry_manifest(cfg, tokenizer_dir: str, template: str, out: Path) -> Path:
    """The manifest for the LF route, written to OUTPUT_DIR/data/lf_manifest.json."""
    from mixtures.registry import RegistryError, read_registry, registry_entry
    registry = os.path.abspath(os.path.join(cfg.dataset_info_dir, "dataset_info.json"))
    names = [n.strip() for n in cfg.dataset.split(",") if n.strip()]
    if not names:
        raise _error("dataset: no dataset name given")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.max_samples is not None:
        try:
            doc = read_registry(registry)
            cut_dir = out / "lf_max_samples"
            cut_dir.mkdir(exist_ok=True)
            for name in names:
                entry = registry_entry(registry, name)
                cut = cut_dir / f"{name}.jsonl"
                if os.path.isfile(entry.path) and _first_records(entry.path, cfg.max_samples, cut):
                    doc[name] = {**doc[name], "file_name": str(cut.resolve())}
        except RegistryError as e:
            raise _error(f"dataset: {e}") from None
        registry = str((cut_dir / "dataset_info.json").resolve())
        Path(registry).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    sft = cfg.packing != "concat"
    datasets = [{"dataset_name": name, "task_name": name, "abs_weight": 1.0, "dataset_info": registry,
                 "dataset": name, "dataset_dir": os.path.abspath(cfg.dataset_info_dir),
                 "allow_repeat": True, "overflow": "truncate" if sft else "segment"} for name in names]
    if cfg.max_samples is not None:
        for d in datasets:
            d.pop("dataset_dir")  # the cut copy names its files by absolute path
    manifest = {"tokenizer": str(Path(tokenizer_dir).resolve()), "template": template,
                "max_length": int(cfg.max_seq_length), "datasets": datasets}
    path = out / "lf_manifest.json"
    path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def mixing_weights(cfg, lock: dict) -> list[float]:
    """abs_weight (a token share) per dataset for LF's mix_strategy, from the built sizes."""
    ds = lock["datasets"]
    if cfg.mix_strategy == "concat":
        return [float(d["n_tokens"]) for d in ds]
    probs = ([float(p) for p in cfg.interleave_probs.split(",")] if cfg.interleave_probs
             else [1.0] * len(ds))
    if len(probs) != len(ds):
        raise _error(f"interleave_probs: {len(probs)} values for {len(ds)} datasets")
    if any(p < 0 for p in probs) or not sum(probs) > 0:
        raise _error("interleave_probs: probabilities must be >= 0 and not all 0")
    return [p * float(d["n_tokens"]) / max(1, int(d["nlines"])) for p, d in zip(probs, ds)]


def reweighted_manifest(cfg, manifest: Path, lock: dict) -> Path | None:
    """The manifest again with LF's mixing weights, or None when one dataset (nothing to mix)."""
    doc = json.loads(manifest.read_text(encoding="utf-8"))
    if len(doc["datasets"]) == 1 and not cfg.interleave_probs:
        return None
    weights = mixing_weights(cfg, lock)
    if not any(w > 0 for w in weights):
        raise _error("dataset: every dataset built empty")
    top = max(weights)
    for d, w in zip(doc["datasets"], weights):
        d["abs_weight"] = w / top
    manifest.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
