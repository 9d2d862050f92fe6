"""Resume on another world size: DeepSpeed's universal checkpoint.

A ZeRO checkpoint keeps the fp32 master weights and Adam moments split into one
`zero_pp_rank_R_mp_rank_00_optim_states.pt` per data-parallel rank, so it only loads on the
world size that saved it. `ds_to_universal` rewrites it as one file per parameter
(`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`), which DeepSpeed loads on any world size when the
config has {"checkpoint": {"load_universal": true}}.

    convert_to_universal(OUT/checkpoint-N) -> OUT/checkpoint-N-universal   (tokenmill files copied)
    saved_world_size(ckpt) / needs_universal(ckpt, world_size) / resume_world_size_note(...)

Our checkpoints carry no Megatron `universal_checkpoint_info` client state; the conversion of a
ZeRO-1/2 checkpoint refuses without it, so we pass `--inject_missing_state` (the version stamp
only: no tensor/pipeline parallelism here). ZeRO-3 needs nothing. The data stream's state is
one file per rank; every rank reads all of them and re-plans its windows (train/stream_state.py).
No torch import at module level: the world-size check runs before any model is built.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
UNIVERSAL_SUFFIX = "-universal"
MARKER = "universal_checkpoint.json"  # what we converted from: source, world size, ZeRO stage
# tokenmill's own files beside DeepSpeed's (train/checkpoint.py): copied so the converted dir is
# a complete checkpoint for --resume_from_checkpoint.
TOKENMILL_FILES = ("trainer_state.json", "stream_state_rank*.json", "rng_state_rank*.pt", "config.json",
                   "generation_config.json", "tokenizer*", "*.jinja", "*.tiktoken", "*.model",
                   "special_tokens_map.json", "tokenization_*.py")


class UniversalError(Exception):
    """A one-line reason a checkpoint cannot be resumed on this world size (names the alternative)."""


def is_universal(ckpt: str | Path) -> bool:
    return (Path(ckpt) / "zero").is_dir() and any((Path(ckpt) / "zero").glob("*/fp32.pt"))


def saved_world_size(ckpt: str | Path) -> int:
    """Data-parallel ranks that saved this ZeRO checkpoint: the number of distinct dp ranks of its
    *_optim_states.pt files (DeepSpeed writes one per rank); a universal dir: its marker's record."""
    ckpt = Path(ckpt)
    if is_universal(ckpt):
        marker = ckpt / MARKER
        return int(json.loads(marker.read_text())["world_size"]) if marker.is_file() else 0
    ranks = {int(m.group(1)) for p in ckpt.iterdir() if (m := OPTIM_RE.match(p.name))} if ckpt.is_dir() else set()
    if not ranks:
        raise UniversalError(f"{ckpt}: no *_optim_states.pt files: not a DeepSpeed ZeRO checkpoint")
    if ranks != set(range(len(ranks))):
        raise UniversalError(f"{ckpt}: optimizer states of ranks {sorted(ranks)} only: the checkpoint is "
                             "incomplete (a rank's files are missing)")
    return len(ranks)


def zero_stage_of(ckpt: str | Path) -> int | None:
    """The ZeRO stage DeepSpeed saved in the checkpoint's model-states file (None if unreadable)."""
    ckpt = Path(ckpt)
    if (ckpt / MARKER).is_file():
        return json.loads((ckpt / MARKER).read_text()).get("zero_stage")
    files = sorted(ckpt.glob("*mp_rank_00_model_states.pt"))
    if not files:
        return None
    import torch
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return int(((state.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))


def needs_universal(ckpt: str | Path, world_size: int) -> bool:
    """True when a ZeRO checkpoint was saved on another data-parallel world size than `world_size`
    (a universal checkpoint loads on any, so it never needs converting again)."""
    return not is_universal(ckpt) and saved_world_size(ckpt) != int(world_size)


def universal_dir_for(ckpt: str | Path) -> Path:
    ckpt = Path(ckpt)
    return ckpt.with_name(ckpt.name + UNIVERSAL_SUFFIX)


def convert_to_universal(ckpt_tag_dir: str | Path, out: str | Path | None = None, *,
                         workers: int = 1, timeout: float = 3600) -> Path:
    """Convert OUT/checkpoint-N into OUT/checkpoint-N-universal (or `out`) and return it.
    Reuses a finished conversion (marker present). Runs DeepSpeed's converter as a subprocess
    (it starts worker pools and prints progress bars); raises UniversalError with the refusal
    and the alternatives when it fails."""
    src = Path(ckpt_tag_dir)
    dst = Path(out) if out else universal_dir_for(src)
    world = saved_world_size(src)
    stage = zero_stage_of(src)
    if (dst / MARKER).is_file() and is_universal(dst):
        return dst
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers), "--inject_missing_state"]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), TQDM_DISABLE="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0 or not is_universal(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        reason = next((ln.strip() for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else "")
        raise UniversalError(refusal(src, world, stage, reason))
    for pattern in TOKENMILL_FILES:
        for f in src.glob(pattern):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    (tmp / MARKER).write_text(json.dumps({"source": src.name, "world_size": world, "zero_stage": stage},
                                         indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


def to_universal(ckpt: str | Path, *, rank: int) -> Path:
    """The trainer's call, on every rank once the process group exists: rank 0 converts (or reuses
    a finished conversion), the others wait at a barrier; every rank gets the universal dir.
    A failed conversion raises UniversalError on every rank (the message is the same)."""
    import torch.distributed as dist
    dst, err = universal_dir_for(ckpt), None
    if rank == 0:
        try:
            dst = convert_to_universal(ckpt)
        except UniversalError as e:
            err = str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [err]
        dist.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise UniversalError(err)
    return dst


def refusal(ckpt: Path, world: int, stage: int | None, reason: str = "") -> str:
    why = f" ({reason})" if reason else ""
    return (f"{ckpt}: saved by {world} ranks (ZeRO-{stage if stage is not None else '?'}) and DeepSpeed "
            f"could not convert it to a universal checkpoint{why}. Either resume with {world} ranks, or "
            f"consolidate the weights (python {ckpt.parent}/zero_to_fp32.py {ckpt.parent} WEIGHTS_DIR "
            f"--tag {ckpt.name} --safe_serialization) and start a fresh run with --model_name_or_path "
            f"on them (optimizer state and lr schedule start over).")


def resume_world_size_note(ckpt: str | Path, world_size: int) -> str | None:
    """None when `ckpt` loads as saved; else one line saying what resuming on `world_size` does."""
    if not needs_universal(ckpt, world_size):
        return None
    return (f"{ckpt} was saved by {saved_world_size(ckpt)} ranks, this run has {world_size}: converting it "
            f"to a universal checkpoint ({universal_dir_for(ckpt)}) and loading that; the data stream "
            f"continues from the saved global position")


def load_universal(engine, load_dir: str | Path):
    """`engine.load_checkpoint` of a universal dir, undoing two faults of DeepSpeed 0.19.8's ZeRO-3
    universal load when the optimizer has several param groups (the trainer's decay / no-decay):
    - it copies group 0's hyperparameters (weight_decay included) onto every group: restored;
    - it gives every group's state the SAME `step` tensor, which torch's Adam increments in place
      once per group, so group k trains with bias correction t+k (measured: the no-decay group's
      first step after resume 0.939x the uninterrupted run's, t=5 instead of 4): each state
      gets its own copy.
    The lr is left as loaded (one lr for all groups here; the scheduler owns it)."""
    load_dir = Path(load_dir)
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    missing = missing_state_file(load_dir, names)
    if missing is not None:  # DeepSpeed would leave that parameter at its initial value, silently
        raise UniversalError(f"{missing}: missing, so {missing.parent.name} would resume at its initial "
                             f"value: the universal checkpoint {load_dir} is incomplete; delete it to convert "
                             f"its source again, or resume from another checkpoint")
    groups = engine.optimizer.param_groups
    keep = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    path, client = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    for g, k in zip(engine.optimizer.param_groups, keep):
        g.update(k)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    for st in getattr(inner, "state", {}).values():
        if isinstance(st, dict) and hasattr(st.get("step"), "clone"):
            st["step"] = st["step"].clone()
    return path, client


def missing_state_file(load_dir: str | Path, names: list[str]) -> Path | None:
    """The first of zero/<name>/{fp32.pt and every optimizer-state file the dir holds for any
    parameter} that is missing for one of `names` (the trainable parameters); None if complete."""
    zero = Path(load_dir) / "zero"
    kinds = {"fp32.pt"} | {f.name for f in zero.glob("*/*.pt")}
    for name in names:
        for kind in sorted(kinds):
            if not (zero / name / kind).is_file():
                return zero / name / kind
    return None


def load_universal_config(ds_config: dict) -> dict:
    """`ds_config` with {"checkpoint": {"load_universal": true}} set (a copy)."""
    cfg = dict(ds_config)
    cfg["checkpoint"] = {**(cfg.get("checkpoint") or {}), "load_universal": True}
    return cfg


def main(argv: list[str] | None = None) -> int:
    """`python -m train.universal CHECKPOINT_DIR [-o OUT]`: convert ahead of a resume."""
    from stages.strict_cli import StrictParser  # no abbreviations, unknown flag names the closest
    p = StrictParser(prog="python -m train.universal",
                                description="Convert a ZeRO checkpoint to DeepSpeed's universal format "
                                            "(loads on any world size).")
    p.add_argument("checkpoint", help="OUTPUT_DIR/checkpoint-N")
    p.add_argument("-o", "--out", default=None, help="default: CHECKPOINT-universal beside it")
    a = p.parse_args(argv)
    try:
        print(convert_to_universal(a.checkpoint, a.out))
    except UniversalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
