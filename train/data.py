"""Training data: the lock (given, or built from --train_data_file), the tokenizer check,
and the MixtureStreams for the train and validation splits."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch.distributed as dist

from .args import TrainError

log = logging.getLogger("train")

DEFAULT_BUILD_MAX_LENGTH = 2048  # --train_data_file without --max_seq_length (Hunyuan's default)


def build_lock_from_file(path: str, tokenizer: str, max_length: int, out_dir: str | Path,
                         cache: str | None = None, chat_template: bool = True) -> Path:
    """Build (or reuse from the cache) one source file into shards through the pipeline and
    return the path of its lock: the `--train_data_file` path of the reference scripts."""
    try:
        from pipeline import build
    except ImportError as e:
        raise TrainError(f"--train_data_file needs the pipeline package: {e}") from e
    if not hasattr(build, "build_mixture"):
        raise TrainError("--train_data_file: this version's pipeline has no build_mixture(); build a lock "
                         "with `python -m pipeline build MANIFEST` and pass --mixture LOCK")
    src = Path(path).resolve()
    if not src.is_file():
        raise TrainError(f"--train_data_file {path}: no such file")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = src.name.split(".")[0] or "train"
    manifest = {
        "tokenizer": str(Path(tokenizer).resolve()),
        "template": "tokenizer" if chat_template else "none",
        "max_length": int(max_length),
        "datasets": [{"dataset_name": name, "task_name": name, "abs_weight": 1.0, "path": str(src),
                      "format": "auto", "allow_repeat": True}],
    }
    manifest_path = out / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    try:
        lock_path, _, warnings = build.build_mixture(str(manifest_path), out=str(out), cache=cache)
    except Exception as e:  # BuildError / ManifestError carry file and record
        raise TrainError(f"--train_data_file {path}: build failed: {e}") from e
    for w in warnings:
        log.warning("%s", w)
    return Path(lock_path)


def resolve_lock(args, tokenizer_dir: str, tokenizer, *, rank: int) -> Path:
    """The lock to train on. With --train_data_file, rank 0 builds and the others wait."""
    if args.mixture:
        lock_path = Path(args.mixture)
        if not lock_path.is_file():
            raise TrainError(f"--mixture {args.mixture}: no such lock file (build one with "
                             "`python -m pipeline build MANIFEST`)")
    else:
        out = Path(args.output_dir) / "data"
        lock_path = out / "mixture.lock.json"
        if rank == 0:
            build_lock_from_file(args.train_data_file, tokenizer_dir,
                                 args.max_seq_length or DEFAULT_BUILD_MAX_LENGTH, out,
                                 cache=args.data_cache_dir,
                                 chat_template=bool(getattr(tokenizer, "chat_template", None)))
        if dist.is_initialized():
            dist.barrier()
    from mixtures.lock import LockError, read_lock
    try:
        read_lock(lock_path)
    except LockError as e:
        raise TrainError(str(e)) from None
    return lock_path


def check_tokenizer(lock: dict, tokenizer_dir: str, tokenizer, allow_mismatch: bool) -> None:
    """The token ids in the shards mean something only with the tokenizer that made them."""
    from stages.tokenizer import tokenizer_sha256
    want = lock.get("tokenizer") or {}
    have = tokenizer_sha256(tokenizer_dir)
    if want.get("sha256") == have:
        return
    problem = (f"the lock was built with tokenizer {want.get('path')} (sha256 {want.get('sha256')}, "
               f"vocab {want.get('vocab_size')}), but training uses {tokenizer_dir} (sha256 {have}, "
               f"vocab {len(tokenizer)})")
    if _same_vocab(want.get("path"), tokenizer):
        log.warning("%s; their vocabularies are identical, continuing", problem)
        return
    if allow_mismatch:
        log.warning("%s; continuing because of --allow_tokenizer_mismatch", problem)
        return
    raise TrainError(problem + ". Pass --tokenizer_name_or_path with the lock's tokenizer, rebuild the "
                     "lock with the model's tokenizer, or --allow_tokenizer_mismatch if you know better")


def _same_vocab(lock_tokenizer_dir: str | None, tokenizer) -> bool:
    if not lock_tokenizer_dir or not Path(lock_tokenizer_dir).exists():
        return False
    from transformers import AutoTokenizer
    try:
        other = AutoTokenizer.from_pretrained(lock_tokenizer_dir)
    except Exception:
        return False
    return other.get_vocab() == tokenizer.get_vocab()


def make_streams(args, lock_path: Path, seq_len: int, *, rank: int, world_size: int):
    """(train stream, stream for eval_batches() or None). The second only differs in its batch
    size (--per_device_eval_batch_size); eval_batches() walks its held-out split."""
    from train.stream import MixtureStream, StreamError
    common = dict(seed=args.data_seed, rank=rank, world_size=world_size, mode=args.packing,
                  validation_percentage=args.validation_split_percentage,
                  allow_lock_change=args.allow_lock_change)
    try:
        train = MixtureStream(lock_path, seq_len, batch_size=args.per_device_train_batch_size,
                              split="train", **common)
        valid = None
        if args.validation_split_percentage > 0:
            valid = MixtureStream(lock_path, seq_len, split="train",
                                  batch_size=args.per_device_eval_batch_size or args.per_device_train_batch_size,
                                  **common)
    except StreamError as e:
        raise TrainError(str(e)) from None
    return train, valid
