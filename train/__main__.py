"""`python -m train` (also under `deepspeed --module train` and `torchrun -m train`).

The one place where the trainer calls the pipeline: `--train_data_file FILE|DIR`,
`--dataset_dir DIR` and a manifest passed to `--mixture` are built (or reused from the cache)
here, into OUTPUT_DIR/data, by rank 0 once the ranks can talk; everything else in train/ only
reads the resulting lock and the built dirs it names.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("train")

DEFAULT_BUILD_MAX_LENGTH = 2048  # --train_data_file without --max_seq_length (Hunyuan's default)
DATASET_DIR_SUFFIXES = (".txt", ".json", ".jsonl")


def data_source(cfg) -> str | None:
    """What needs building: 'file', 'dir', 'registry' (LLaMA-Factory `dataset`), 'manifest', or
    None for a lock given as --mixture."""
    from train.args import TrainError
    if getattr(cfg, "dataset", None):
        return "registry"
    if cfg.train_data_file:
        return "file"
    if cfg.dataset_dir:
        return "dir"
    path = Path(cfg.mixture)
    if not path.is_file():
        raise TrainError(f"--mixture {cfg.mixture}: no such lock file (build one with "
                         "`python -m pipeline build MANIFEST`)")
    if path.suffix.lower() in (".yaml", ".yml"):
        return "manifest"  # a YAML manifest (locks are always JSON)
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainError(f"--mixture {cfg.mixture}: not JSON ({e}): pass the mixture.lock.json written by "
                         "`python -m pipeline build MANIFEST`, or the manifest itself") from None
    if isinstance(doc, dict) and "manifest_sha256" in doc:
        return None
    return "manifest"


def _manifest_for(cfg, tokenizer_dir: str, chat_template: str | None, out: Path) -> Path:
    """A one-dataset-per-file manifest for --train_data_file / --dataset_dir."""
    if cfg.train_data_file:
        src = Path(cfg.train_data_file).resolve()
        files = [src]
    else:
        src = Path(cfg.dataset_dir).resolve()
        files = sorted(f for f in src.iterdir() if f.is_file() and f.suffix in DATASET_DIR_SUFFIXES
                       and not f.name.startswith("."))
        if not files:
            from train.args import TrainError
            raise TrainError(f"--dataset_dir {cfg.dataset_dir}: no *.txt, *.json or *.jsonl file in it")
    datasets, seen = [], set()
    for f in files:
        name = f.name.split(".")[0] or "train"
        while name in seen:
            name += "_"
        seen.add(name)
        datasets.append({"dataset_name": name, "task_name": name, "abs_weight": 1.0, "path": str(f),
                         "format": "auto", "allow_repeat": True})
    template = template_for_build(cfg.template, chat_template)
    manifest = {"tokenizer": str(Path(tokenizer_dir).resolve()),
                "template": template or ("tokenizer" if chat_template else "none"),
                "max_length": int(cfg.max_seq_length or DEFAULT_BUILD_MAX_LENGTH), "datasets": datasets}
    if cfg.dataset_dir and cfg.dataset_dir_shares == "tokens":
        manifest["weights"] = "tokens"  # share = the file's tokens, as concatenating the files gives
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def build_data(cfg, tokenizer_dir: str, tokenizer) -> Path:
    """Build (or reuse) the data through the pipeline; returns the lock path. Says what was built."""
    from train.args import TrainError
    from train.data import read_lock_once
    try:
        from pipeline.build import build_mixture
    except ImportError as e:
        raise TrainError(f"building the training data needs the pipeline package: {e}") from e
    kind = data_source(cfg)
    out = Path(cfg.output_dir) / "data"
    flag = {"file": "--train_data_file", "dir": "--dataset_dir", "manifest": "--mixture",
            "registry": "dataset"}[kind]
    given = cfg.train_data_file or cfg.dataset_dir or cfg.mixture or cfg.dataset
    if kind == "file" and Path(given).is_dir():  # a dir source: the pipeline reads it as one dataset
        pass
    elif kind == "file" and not Path(given).is_file():
        raise TrainError(f"--train_data_file {given}: no such file or directory")
    chat = getattr(tokenizer, "chat_template", None)
    if kind == "manifest":
        manifest = Path(cfg.mixture)
        # the pipeline's --tokenizer / --template / --max-length, as `pipeline build` takes them
        settings = dict(max_length=cfg.max_seq_length, template=cfg.template,  # LF names: stages/lf_names
                        tokenizer=cfg.tokenizer_name_or_path and str(Path(cfg.tokenizer_name_or_path).resolve()))
    elif kind == "registry":
        from train.lf_data import registry_manifest
        manifest = registry_manifest(cfg, tokenizer_dir, template_for_build(cfg.template, chat, lf=True) or
                                     ("tokenizer" if chat else "none"), out)  # LF: None = tokenizer's, else empty
        settings = {}
    else:
        manifest = _manifest_for(cfg, tokenizer_dir, chat, out)
        settings = {}

    def build(path):
        try:
            return build_mixture(str(path), out=str(out), cache=cfg.data_cache_dir,
                                 workers=cfg.preprocessing_num_workers, **settings)
        except Exception as e:  # BuildError / ManifestError / LockError carry file and record
            raise TrainError(f"{flag} {given}: build failed: {e}") from e
    lock_path, _, warnings = build(manifest)
    if kind == "registry":  # LLaMA-Factory's mixing needs the built sizes: weights set, then the lock again
        from train.lf_data import reweighted_manifest
        again = reweighted_manifest(cfg, manifest, read_lock_once(Path(lock_path)))
        if again is not None:
            lock_path, _, warnings = build(again)
    for w in warnings:
        log.warning("%s", w)
    lock = read_lock_once(Path(lock_path))  # the lock's own reader (mixtures/lock.py), validated
    parts = [f"{d['dataset_name']} {d['nlines']:,} samples / {d['n_tokens']:,} tokens, "
             f"token share {d['token_share']:.2%}"
             if isinstance(d.get("nlines"), int) and isinstance(d.get("n_tokens"), int) else d["dataset_name"]
             for d in lock["datasets"]]
    log.info("built %s into %s: %d datasets (%s)", given, lock_path, len(parts), "; ".join(parts))
    return Path(lock_path)


def template_for_build(name: str | None, chat_template: str | None, lf: bool = False) -> str | None:
    """A LLaMA-Factory template name given to train (LF YAML `template`, --template) resolved
    for the tokenizer in hand (stages/lf_names.py); our own names and .jinja paths pass as they are."""
    if name is None:
        return None
    from stages.lf_names import LFTemplateError, resolve_lf_name
    from train.args import TrainError
    try:
        resolved, note = resolve_lf_name(name, chat_template, lf=lf)
    except LFTemplateError as e:
        raise TrainError(str(e)) from None
    if note:
        log.warning("%s", note)
    return resolved


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local dirs only; never reach for the Hub
    from train.args import TrainError, UsageError, parse_args
    cfg = parse_args(argv)  # bad usage exits 2 here
    try:
        from train.trainer import finish, run
        run(cfg, build=build_data if data_source(cfg) else None)
    except (TrainError, UsageError) as e:
        rank = os.environ.get("RANK", "0")
        prefix = f"[rank {rank}] " if os.environ.get("WORLD_SIZE", "1") != "1" else ""
        print(f"{prefix}error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
