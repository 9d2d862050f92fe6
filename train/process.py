"""The process a training run lives in: the process group (DeepSpeed's, or none for the one-process
torch engine), logging and warnings (rank 0 speaks; each warning once), seeds, and the data
stream's compiled kernels, loaded up front and announced when they still have to be compiled."""
from __future__ import annotations

import datetime
import logging
import os
import random
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("train")


def setup_distributed(timeout_s: int) -> tuple[int, int, int]:
    """Rank, world size, local rank. A plain `python -m train` is a world of one: give
    DeepSpeed the env a launcher would (else it looks for MPI)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import importlib

    import deepspeed
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        # One process reduces nothing: skip JIT-compiling the shm comm op (~30-100 s on first use).
        # (by sys.modules: the package attribute `deepspeed.comm.torch` is torch itself)
        importlib.import_module("deepspeed.comm.torch")
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    elif int(os.environ.get("WORLD_SIZE", 1)) > 1:  # said once: nothing else is printed while it builds
        log.info("DeepSpeed: loading its shm op for CPU collectives (compiled on first use into "
                 "~/.cache/torch_extensions, ~40 s; loaded from there afterwards)")
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))  # nccl / gloo
    return dist.get_rank(), dist.get_world_size(), local_rank


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_logging(rank: int) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)  # ranks agree; one voice
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():  # no progress bars in logs (transformers' "Writing model shards", ...)
        os.environ.setdefault("TQDM_DISABLE", "1")
        from transformers.utils import logging as hf_logging  # tqdm read the variable at import
        hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns that it guessed
    # warnings: one line each, once, without the source line
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {cat.__name__}: " + \
        " ".join(str(msg).split()) + "\n"
    # torch's DeprecationWarnings and ZeRO-3's FutureWarnings (raised by every collective of every
    # step on every rank): from rank 0 only, and each message once. (The "once" filter is not
    # enough: any catch_warnings() clears the registries it keeps, and torch enters one per step.)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("always" if rank == 0 else "ignore", category=category)
    shown, show = set(), warnings.showwarning

    def show_once(message, category, *args, **kwargs):
        key = (category, str(message))
        if key not in shown:
            shown.add(key)
            show(message, category, *args, **kwargs)
    warnings.showwarning = show_once


def warm_kernels() -> None:
    """Load the data stream's numba kernels now (train/kernels.py), saying so when they are not in
    numba's cache yet: the compile is a silent ~15-30 s, on every rank at once."""
    from .kernels import kernels, warm_up
    try:  # numba's per-function cache index (a private attribute: unknown -> say it anyway)
        cold = not all(Path(k._cache._cache_file._index_path).is_file() for k in kernels().values())
    except AttributeError:
        cold = True
    if cold:
        log.info("compiling the data stream's numba kernels into their cache (once per machine and "
                 "version, ~15-30 s; `python -m train.kernels` does it ahead of a run)")
    warm_up()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
