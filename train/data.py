"""Training data: the lock (read and validated once), the tokenizer check, the held-out split,
and the MixtureStreams for the train and validation splits. Never builds anything: a lock
that must be built first comes from the `build` callable train/__main__.py passes in."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from .args import TrainError

log = logging.getLogger("train")


def read_lock_once(lock_path: Path) -> dict:
    """The lock, validated by its schema (mixtures.lock); a bad lock is one TrainError line."""
    from mixtures.lock import LockError, read_lock
    try:
        return read_lock(lock_path)
    except LockError as e:
        raise TrainError(str(e)) from None


def resolve_lock(cfg, tokenizer_dir: str, tokenizer, *, rank: int, build=None) -> tuple[Path, dict]:
    """(lock path, lock). With `build` (data still to build), rank 0 builds, the others wait."""
    import torch.distributed as dist
    if build is None:
        lock_path = Path(cfg.mixture)
    else:
        lock_path = Path(cfg.output_dir) / "data" / "mixture.lock.json"
        if rank == 0:
            lock_path = build(cfg, tokenizer_dir, tokenizer)
        if dist.is_initialized():
            dist.barrier()
    return lock_path, read_lock_once(lock_path)


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
    from .tokenizer import load_tokenizer  # the pipeline's loader: .model / .tiktoken / HF alike
    try:
        other = load_tokenizer(lock_tokenizer_dir)
    except TrainError:
        return False
    return len(other) == len(tokenizer) and other.get_vocab() == tokenizer.get_vocab()


def heldout_counts(stream) -> dict[str, tuple[int, int]]:
    """{task: (held-out samples, samples)} of an open train stream."""
    return {ds.task: (ds.n - ds.n_train, ds.n) for ds in stream.datasets}


def check_validation_split(cfg, stream, wants_eval: bool) -> None:
    """An eval that would average over nothing is an error before training, not 'loss 0.0000'."""
    counts = heldout_counts(stream)
    held = sum(h for h, _ in counts.values())
    detail = ", ".join(f"{t} {h} of {n}" for t, (h, n) in counts.items())
    if cfg.validation_percentage > 0:
        if held == 0:
            raise TrainError(f"--validation_split_percentage {cfg.validation_split_percentage:g} "
                             f"({cfg.validation_percentage:g}%) holds out no sample ({detail}): raise it, "
                             "or drop it to train without evaluation")
        log.info("validation split %g%%: %d samples held out (%s)", cfg.validation_percentage, held, detail)
    elif wants_eval:
        raise TrainError("--do_eval/--eval_steps need a validation split: pass --validation_split_percentage")


def steps_for_epochs(cfg, lock: dict, stream, seq_len: int, world_size: int) -> int:
    """--num_train_epochs -> optimizer steps: epochs x the train split's tokens (samples when
    padded) / what one step takes (rows x seq_len, all ranks)."""
    rows = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size
    if cfg.packing == "padded":
        units = sum(ds.n_train for ds in stream.datasets)
        per_step, what = rows, "samples"
    else:
        units = 0
        for entry, ds in zip(lock["datasets"], stream.datasets):
            tokens = entry.get("n_tokens") or ds.built.meta.get("n_tokens") or 0
            units += int(tokens) * ds.n_train // max(ds.n, 1)
        per_step, what = rows * seq_len, "tokens"
    steps = max(1, math.ceil(cfg.num_train_epochs * units / per_step))
    log.info("--num_train_epochs %g: %s %s in the train split / %s per step = %d steps",
             cfg.num_train_epochs, f"{units:,}", what, f"{per_step:,}", steps)
    return steps


def make_streams(cfg, lock_path: Path, seq_len: int, *, rank: int, world_size: int):
    """(train stream, stream for eval_batches() or None). The second only differs in its batch
    size (--per_device_eval_batch_size); eval_batches() walks its held-out split."""
    from train.stream import MixtureStream, StreamError
    common = dict(seed=cfg.data_seed, rank=rank, world_size=world_size, mode=cfg.packing,
                  validation_percentage=cfg.validation_percentage,
                  allow_lock_change=cfg.allow_lock_change)
    try:
        train = MixtureStream(lock_path, seq_len, batch_size=cfg.per_device_train_batch_size,
                              split="train", verify=cfg.verify_data, **common)
        valid = None
        if cfg.validation_percentage > 0:
            valid = MixtureStream(lock_path, seq_len, split="train", verify="none",
                                  batch_size=cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size,
                                  **common)
    except StreamError as e:
        raise TrainError(str(e)) from None
    return train, valid
