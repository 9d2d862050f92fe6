"""Checkpoints and the final model.

Layout (DeepSpeed's own, so `zero_to_fp32.py` and `ds_to_universal` work on it):

    OUTPUT_DIR/latest                       name of the newest *complete* checkpoint
    OUTPUT_DIR/checkpoint-N/                DeepSpeed model/optimizer/scheduler states
        trainer_state.json                  the "trainer" part: step, token counts, world size
        stream_state_rank00000.json …       the "stream" part (loader position), one file per rank
        rng_state_rank00000.pt …            the "rng" part: torch/numpy/python RNGs as tensors and
                                            plain types, read back with torch.load(weights_only=True)
        config.json, tokenizer files        enough to rebuild the model and read its output

`latest` is written by us after a barrier, once every rank has written everything (DeepSpeed
writes its own before the extra files exist). The final model is a HF dir with safetensors,
config, tokenizer and chat template, or the LoRA adapter; under ZeRO-3 parameters are
gathered one at a time (GatheredParameters), so saving never needs the whole model twice.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .args import TrainError

log = logging.getLogger("train")

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
# what a run writes into OUTPUT_DIR beside the final model: records of the run, not of the model
# (a tool copying "the model's other files" out of such a dir skips them: train/merge_lora.py)
RUN_RECORDS = ("train_log.jsonl", "train_args.json", "ds_config.json", "mixture.lock.json",
               "training_curves.png", "latest", "adapter_config.json", "adapter_model.safetensors")
TOKENIZER_EXTRA = ("*.tiktoken", "tokenization_*.py", "*.model", "*.jinja", "special_tokens_map.json",
                   "generation_config.json")


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class RNGState:
    """The python, numpy and torch RNGs as a stateful part: tensors and plain types only, so a
    checkpoint loads with torch.load(weights_only=True) (no pickled objects to trust)."""

    def state_dict(self) -> dict:
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                            "gauss": gauss},
                 "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        py, nps = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss"]))
        np.random.set_state((nps["name"], nps["keys"].numpy().astype(np.uint32), nps["pos"],
                             nps["has_gauss"], nps["cached_gaussian"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


@dataclass(frozen=True)
class Part:
    """How one stateful part (state_dict / load_state_dict) is kept in a checkpoint. Every part
    goes through the same save and load; what differs is data here, not code keyed on a name."""
    stem: str
    per_rank: bool  # one file per rank (else one, written by rank 0)
    fmt: str  # "json" or "pt" (torch.save; read back with weights_only=True)
    reads_all_ranks: bool = False  # on another world size: gets the list of every rank's states
    optional: bool = False  # a missing file leaves the part as it is (new ranks: RNGs seeded afresh)

    def file(self, ckpt: Path, rank: int) -> Path:
        return ckpt / (f"{self.stem}_rank{rank:05d}.{self.fmt}" if self.per_rank else f"{self.stem}.{self.fmt}")

    def write(self, path: Path, state) -> None:
        if self.fmt == "json":
            _write_json(path, state)
            return
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def read(self, path: Path):
        return json.loads(path.read_text()) if self.fmt == "json" else torch.load(path, weights_only=True)


# the stateful parts beside the engine's own states (the model, optimizer and lr schedule)
PARTS = {"trainer": Part("trainer_state", per_rank=False, fmt="json"),
         "stream": Part("stream_state", per_rank=True, fmt="json", reads_all_ranks=True),
         "rng": Part("rng_state", per_rank=True, fmt="pt", optional=True)}


class Checkpointer:
    def __init__(self, output_dir: str | Path, *, rank: int, world_size: int, save_total_limit: int | None,
                 tokenizer, tokenizer_dir: str | None, model_dir: str | None = None):
        self.out = Path(output_dir)
        self.rank, self.world_size = rank, world_size
        self.limit = save_total_limit
        self.tokenizer, self.tokenizer_dir, self.model_dir = tokenizer, tokenizer_dir, model_dir
        self.last_saved: int | None = None  # step of the last checkpoint this run wrote

    # ------------------------------------------------------------ save
    def save(self, engine, step: int, parts: dict) -> Path:
        """The engine's states, then each stateful part's state_dict() (see PARTS)."""
        tag = f"checkpoint-{step}"
        ckpt = self.out / tag
        engine.save_checkpoint(str(self.out), tag=tag, client_state={"step": step}, save_latest=False)
        for name, part in parts.items():
            spec = PARTS[name]
            if spec.per_rank or self.rank == 0:
                spec.write(spec.file(ckpt, self.rank), part.state_dict())
        if self.rank == 0:
            base_config(engine.module).save_pretrained(ckpt)
            self.save_tokenizer(ckpt)
        _barrier()  # every rank's files are on disk before `latest` names this checkpoint
        if self.rank == 0:
            tmp = self.out / ".latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.out / "latest")
            self.rotate(keep=tag)
        _barrier()
        self.last_saved = step
        return ckpt

    def rotate(self, keep: str) -> None:
        if not self.limit:
            return
        ckpts = sorted((int(m.group(1)), p) for p in self.out.iterdir()
                       if (m := CKPT_RE.match(p.name)) and p.is_dir())
        for _, p in ckpts[:-self.limit]:
            if p.name != keep:
                log.info("save_total_limit %d: removing %s", self.limit, p)
                shutil.rmtree(p, ignore_errors=True)

    def save_tokenizer(self, out: Path) -> None:
        """tokenizer.save_pretrained writes tokenizer.json/config and chat_template.jinja; files it
        does not know (hy.tiktoken, tokenization_hy.py, …) are copied from the source dir."""
        self.tokenizer.save_pretrained(str(out))
        src = Path(self.tokenizer_dir) if self.tokenizer_dir else None
        if src and src.is_dir():
            for pattern in TOKENIZER_EXTRA:
                for f in src.glob(pattern):
                    if not (out / f.name).exists():
                        shutil.copy2(f, out / f.name)

    # ------------------------------------------------------------ resume
    def resolve(self, spec: str) -> Path | None:
        """'latest' → the checkpoint named by OUTPUT_DIR/latest (None if there is none yet);
        a dir holding `latest` → its newest; else the checkpoint dir itself."""
        if spec == "latest":
            latest = self.out / "latest"
            if not latest.is_file():
                return None
            return self.out / latest.read_text().strip()
        p = Path(spec)
        if (p / "latest").is_file() and not (p / "trainer_state.json").is_file():
            p = p / (p / "latest").read_text().strip()
        if not (p / "trainer_state.json").is_file():
            raise TrainError(f"--resume_from_checkpoint {spec}: not a complete tokenmill checkpoint "
                             f"({p}/trainer_state.json missing)")
        return p

    def check_resumable(self, ckpt: Path, zero_stage: int, allow_universal: bool = False) -> dict:
        """Fail before any model is built when DeepSpeed could not load the checkpoint. Another
        world size goes through DeepSpeed's universal checkpoint (train/universal.py), whose
        failed conversion is its own one-line refusal; without it, a ZeRO checkpoint is refused."""
        f = ckpt / "trainer_state.json"
        try:
            state = json.loads(f.read_text())
            int(state["step"]), int(state["world_size"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise TrainError(f"{f}: cannot resume from it ({type(e).__name__}: {e})") from None
        if state["world_size"] != self.world_size and zero_stage > 0 and not allow_universal:
            raise TrainError(
                f"{ckpt} was saved by {state['world_size']} ranks, this run has {self.world_size}: ZeRO "
                f"keeps optimizer states per rank, so resume with {state['world_size']} ranks, or save with ZeRO-3 "
                f"(converted to a universal checkpoint on resume). (The data stream would continue at any "
                f"world size; to restart from the weights only, run "
                f"{ckpt.parent}/zero_to_fp32.py and pass the result as --model_name_or_path.)")
        return state

    def load(self, engine, ckpt: Path, parts: dict, *, zero_stage: int, load_dir: Path | None = None) -> dict:
        """DeepSpeed's states (from `load_dir`, a universal conversion, when given), then every
        part's load_state_dict. On the same world size each rank's stream continues from its own file;
        on another, every rank reads all of them and re-plans (train/stream_state)."""
        state = self.check_resumable(ckpt, zero_stage, allow_universal=load_dir is not None)
        if load_dir is not None:  # universal: per-group optimizer state un-shared (train/universal.py)
            from .universal import UniversalError, load_universal
            try:
                path, _ = load_universal(engine, load_dir)
            except UniversalError as e:
                raise TrainError(str(e)) from None
        else:
            path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise TrainError(f"{ckpt}: DeepSpeed could not load this checkpoint")
        same_world = state["world_size"] == self.world_size
        for name, part in parts.items():
            spec = PARTS[name]
            own = spec.file(ckpt, self.rank)
            if spec.reads_all_ranks and not (same_world and own.is_file()):
                # another world size: every rank's state, to re-plan from (train/stream_state.py)
                files = sorted(ckpt.glob(f"{spec.stem}_rank*.{spec.fmt}"))
            else:
                files = [own if own.is_file() or not spec.per_rank else spec.file(ckpt, 0)]
                files = [f for f in files if f.is_file()]
            if not files:
                if spec.optional:
                    continue
                raise TrainError(f"{ckpt}: {own.name if not spec.reads_all_ranks else spec.stem + '_rank*.' + spec.fmt}"
                                 " missing")
            _load_part(part, files, (lambda fs, sp=spec: [sp.read(f) for f in fs]) if spec.reads_all_ranks
                       else (lambda fs, sp=spec: sp.read(fs[0])))
        if ckpt.parent.resolve() == self.out.resolve():  # not written again by a run with nothing to do
            self.last_saved = state["step"]
        log.info("resumed from %s at step %d", ckpt, state["step"])
        return state

    # ------------------------------------------------------------ final model
    def save_final(self, engine, out: Path, *, is_lora: bool, zero_stage: int) -> None:
        """HF dir (or adapter) in `out`, written by rank 0 after gathering on all ranks."""
        module = engine.module
        state = gathered_state_dict(module, trainable_only=is_lora, zero3=zero_stage == 3, rank=self.rank)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            from .model import save_pretrained_fused  # fused MoE experts stay fused
            save_pretrained_fused(module, out, state)
            self.save_tokenizer(out)
            if not is_lora:
                from .model import copy_model_code
                copy_model_code(self.model_dir, out)
            log.info("saved the final %s to %s", "LoRA adapter" if is_lora else "model", out)
        _barrier()


def _load_part(part, files: list[Path], read) -> None:
    """part.load_state_dict(read(files)); a damaged file, or a state that does not fit this run
    (another lock, another version), is one line naming the file(s), not a traceback."""
    try:
        part.load_state_dict(read(files))
    except Exception as e:  # JSON, unpickling and shape faults, StreamError: all the file's
        where = str(files[0]) + (f" (and {len(files) - 1} more)" if len(files) > 1 else "")
        msg = " ".join(str(e).split()).replace("pass allow_lock_change=True", "pass --allow_lock_change")
        raise TrainError(f"{where}: cannot resume from it ({type(e).__name__}: {msg[:400]})") from None


def base_config(module):
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return base.config


def gathered_state_dict(module, *, trainable_only: bool, zero3: bool, rank: int) -> dict | None:
    """Full tensors on CPU on rank 0 (None elsewhere). ZeRO-3 keeps each parameter split over
    ranks: gather one at a time, a collective every rank must join in the same order."""
    if not zero3:
        if rank != 0:
            return None
        sd = module.state_dict()
        if trainable_only:
            keep = {n for n, p in module.named_parameters() if p.requires_grad}
            sd = {k: v for k, v in sd.items() if k in keep}
        return {k: v.detach().cpu().clone() for k, v in sd.items()}
    import deepspeed
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if trainable_only and not p.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank == 0:
                out[name] = p.data.detach().cpu().clone()
    if rank == 0 and not trainable_only:
        persistent = set(module.state_dict().keys())
        for name, b in module.named_buffers():
            if name in persistent:
                out.setdefault(name, b.detach().cpu().clone())
    return out if rank == 0 else None
