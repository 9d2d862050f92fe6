"""The training run: `Trainer(cfg, build)` decides everything it can before any process group
exists (`prepare`: bad inputs fail fast, identically, on every rank), then builds the components;
`Trainer.train()` runs train/loop.py and the end of the run; `run(cfg, build)` does both. `build` (from train/__main__.py) makes the lock when the data still has to
be built; this module never imports the pipeline."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .args import TrainError, UsageError
from .checkpoint import Checkpointer, RNGState
from .data import check_tokenizer, check_validation_split, make_streams, read_lock_once, resolve_lock, \
    steps_for_epochs
from .ds_config import choose_engine, load_ds_config, resolve_ds_config
from .loop import Tasks, evaluate, train
from .metrics import Metrics
from .model import build_model, check_packing, load_config, load_tokenizer
from .schedule import build_scheduler, check_schedule, warmup_steps_for
from .process import seed_everything, setup_distributed, setup_logging, warm_kernels
from .torch_engine import is_torch_checkpoint

log = logging.getLogger("train")


class TrainState:
    """Step and token counters, and the world size that made them: the "trainer" stateful part of a
    checkpoint (trainer_state.json)."""

    def __init__(self, world_size: int = 1):
        self.step = self.trained_tokens = self.tokens = 0
        self.world_size = world_size
        self.extra: dict = {}

    def state_dict(self) -> dict:
        return {"step": self.step, "trained_tokens": self.trained_tokens, "tokens": self.tokens, **self.extra,
                "world_size": self.world_size}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.trained_tokens, self.tokens = d["step"], d.get("trained_tokens", 0), d.get("tokens", 0)
        self.saved = d


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def init_engine(model, ds_config: dict, cfg, warmup: int, engine: str = "deepspeed"):
    """DeepSpeed's engine, or train/torch_engine.py's (the same AdamW, param groups, schedule,
    clipping and accumulation) when `engine` is "torch"."""
    def make_optimizer(groups):
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)

    def scheduler(opt):
        return build_scheduler(opt, learning_rate=cfg.learning_rate, min_lr=cfg.min_lr,
                               max_steps=cfg.max_steps, warmup=warmup, kind=cfg.lr_scheduler_type)
    if engine == "torch":
        from .torch_engine import TorchEngine
        eng = TorchEngine(model, make_optimizer, scheduler, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                          gradient_clipping=cfg.max_grad_norm, bf16=bool(cfg.bf16))
        return eng.init(param_groups(eng.module, cfg.weight_decay))
    import deepspeed
    groups = param_groups(model, cfg.weight_decay)
    optimizer = None
    if "optimizer" not in ds_config:  # a torch optimizer needs no JIT-compiled op
        optimizer = make_optimizer(groups)
    else:
        log.info("DeepSpeed: building its %s optimizer op (compiled on first use into ~/.cache/torch_extensions, "
                 "a minute or more; loaded from there afterwards)", ds_config["optimizer"].get("type", ""))
    try:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                          lr_scheduler=scheduler, config=ds_config)
    except Exception as e:
        if type(e).__name__ != "ValidationError":
            raise
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise TrainError(f"DeepSpeed config {cfg.deepspeed}: {e.title}.{where}: {first.get('msg')} "
                         f"(got {first.get('input')!r})") from None
    return engine


@dataclass
class Plan:
    """Everything decided before any process group exists."""
    cfg: object
    out: Path
    resume: Path | None
    tok_dir: str
    tokenizer: object
    config: object
    ds_config: dict
    zero_stage: int
    lock_path: Path | None  # None: built once ranks can talk
    universal: bool = False
    engine: str = "deepspeed"  # or "torch" (train/torch_engine.py); see ds_config.choose_engine
    engine_why: str = ""


FINAL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")


def check_output_dir(cfg, out: Path) -> None:
    """A finished or checkpointed run in OUTPUT_DIR is not silently overwritten."""
    done = [f for f in ("train_log.jsonl", "latest", "model.safetensors", "adapter_model.safetensors")
            if (out / f).exists()]
    if not done or cfg.resume_from_checkpoint:
        return
    if not cfg.overwrite_output_dir:
        raise TrainError(f"--output_dir {out} already holds a run ({', '.join(done)}): pass "
                         "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to start "
                         "afresh, or another --output_dir")
    for p in out.iterdir():
        if p.name == "data":  # built data (and its cache) is reusable
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    log.info("--overwrite_output_dir: removed the previous run in %s", out)


def prepare(cfg, world_size: int, build) -> Plan:
    out = Path(cfg.output_dir)
    for flag in ("model_name_or_path", "model_config", "tokenizer_name_or_path", "train_data_file",
                 "dataset_dir"):
        if getattr(cfg, flag) and not Path(getattr(cfg, flag)).exists():
            raise TrainError(f"--{flag} {getattr(cfg, flag)}: no such file or directory")
    if int(os.environ.get("RANK", 0)) == 0:
        check_output_dir(cfg, out)
    resume = None
    probe = Checkpointer(out, rank=0, world_size=world_size, save_total_limit=None, tokenizer=None,
                         tokenizer_dir=None)
    if cfg.resume_from_checkpoint:
        resume = probe.resolve(cfg.resume_from_checkpoint)
        if resume is None:
            log.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting from scratch", out)
    if resume is None and not (cfg.model_name_or_path or cfg.model_config):
        raise TrainError("give the model: --model_name_or_path DIR or --model_config JSON")

    lock_path, lock = None, None
    if build is None:
        lock_path = Path(cfg.mixture)
        lock = read_lock_once(lock_path)
    # Tokenizer: explicit, else the model dir's (or checkpoint's), else the lock's.
    tok_dir = cfg.tokenizer_name_or_path or _model_tokenizer_dir(cfg, resume)
    if tok_dir is None and lock is not None:
        tok_dir = (lock.get("tokenizer") or {}).get("path")
    if tok_dir is None and cfg.mixture and lock is None:  # a manifest to build: its own tokenizer
        tok_dir = _manifest_tokenizer(Path(cfg.mixture))
    if tok_dir is None:
        raise TrainError("no tokenizer: pass --tokenizer_name_or_path")
    tokenizer = load_tokenizer(tok_dir, cfg.trust_remote_code)
    if lock is not None:
        check_tokenizer(lock, tok_dir, tokenizer, cfg.allow_tokenizer_mismatch)

    config = load_config(cfg, fallback_dir=str(resume) if resume else None, vocab_size=len(tokenizer))
    acc = _accelerator(cfg, world_size)
    if cfg.fp16 and not acc.is_fp16_supported():
        log.warning("fp16 is not supported on this %s device: training in %s (the seed scripts' --fp16 is "
                    "for GPUs)", acc.device_name(), "bf16" if cfg.bf16 else "fp32")
        cfg = cfg.replace(fp16=False)
    cfg, ds_config = resolve_ds_config(cfg, load_ds_config(cfg.deepspeed), world_size=world_size,
                                       hidden_size=int(getattr(config, "hidden_size", 1024)))
    for name, ok in (("fp16", acc.is_fp16_supported()), ("bf16", acc.is_bf16_supported())):
        if getattr(cfg, name) and not ok:
            raise TrainError(f"{name} (from --{name} or the DeepSpeed config) is not supported on this "
                             f"{acc.device_name()} device; use {'--bf16 or ' if name == 'fp16' else ''}fp32")
    zero_stage = int(ds_config["zero_optimization"].get("stage", 0))
    resume_engine = None if resume is None else "torch" if is_torch_checkpoint(resume) else "deepspeed"
    engine, engine_why = choose_engine(cfg.engine, ds_config, world_size, resume_engine)
    if resume_engine is not None and engine != resume_engine:
        how = ("--engine auto or torch, in one process with a ZeRO-0/1/2 config" if resume_engine == "torch"
               else "--engine auto or deepspeed")
        raise TrainError(f"{resume} was saved by the {_ENGINE_NAMES[resume_engine]} engine and this run would use "
                         f"{_ENGINE_NAMES[engine]} ({engine_why}); each reads only its own checkpoints: resume "
                         f"with {how}")
    universal = False
    if resume is not None and engine == "torch":
        probe.check_resumable(resume, zero_stage)
    elif resume is not None:
        from .universal import UniversalError, is_universal, load_universal_config, needs_universal, \
            resume_world_size_note
        try:
            universal = zero_stage > 0 and (is_universal(resume) or needs_universal(resume, world_size))
        except UniversalError:  # e.g. saved without ZeRO (no optimizer partitions): loads as saved
            universal = False
        probe.check_resumable(resume, zero_stage, allow_universal=universal)
        if universal:  # DeepSpeed's universal checkpoint loads on any world size
            note = resume_world_size_note(resume, world_size)
            if note:
                log.info("note: %s", note)
            ds_config = load_universal_config(ds_config)
    for note in cfg.notes:
        log.info("note: %s", note)
    return Plan(cfg, out, resume, tok_dir, tokenizer, config, ds_config, zero_stage, lock_path, universal,
                engine, engine_why)


_ENGINE_NAMES = {"torch": "plain-PyTorch (--engine torch)", "deepspeed": "DeepSpeed (--engine deepspeed)"}


class _TorchAccelerator:
    """DeepSpeed 0.19.8's cpu/cuda accelerator answers on dtype support, without importing
    DeepSpeed (~1-2 s): a one-process run may never need it (--engine auto)."""

    def device_name(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def is_fp16_supported(self) -> bool:
        if torch.cuda.is_available():
            return torch.cuda.get_device_capability()[0] >= 7
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except Exception:
            return False

    def is_bf16_supported(self) -> bool:
        return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True


def _accelerator(cfg, world_size: int):
    if world_size == 1 and cfg.engine != "deepspeed" and os.environ.get("DS_ACCELERATOR", "cpu") in ("cpu", "cuda"):
        return _TorchAccelerator()
    from deepspeed.accelerator import get_accelerator
    return get_accelerator()


class Trainer:
    """One training run (torchtitan's Trainer): `__init__` decides everything it can before any
    process group exists (`prepare`), then sets up the process, the data, the model and engine,
    and resumes; `train()` runs train/loop.py and the end of the run (last checkpoint, final model,
    then the final evaluation); `state_dict()` is every stateful part's state, as a checkpoint
    holds it beside the engine's own files. `close()` releases what __init__ set up."""

    def __init__(self, cfg, build=None):
        setup_logging(int(os.environ.get("RANK", 0)))
        self.plan = plan = prepare(cfg, int(os.environ.get("WORLD_SIZE", 1)), build)
        self.cfg = cfg = plan.cfg
        self._hf_ds = None
        self.finished = self._finished_already()
        if self.finished:
            return
        if plan.engine == "torch":  # one process: no process group, no DeepSpeed import
            self.rank, self.world_size = 0, 1
        else:
            self.rank, self.world_size, _ = setup_distributed(cfg.ddp_timeout)
        seed_everything(cfg.seed)
        plan.out.mkdir(parents=True, exist_ok=True)
        self._setup_data(build)
        try:
            self._setup_model()
        except BaseException:
            self.close()
            raise

    def _finished_already(self) -> bool:
        """A resumed run already at --max_steps with its final model written: nothing to do."""
        plan, cfg = self.plan, self.cfg
        if plan.resume is None or cfg.max_steps is None:
            return False
        saved = int(json.loads((plan.resume / "trainer_state.json").read_text())["step"])
        final = next((f for f in FINAL_MODEL_FILES if (plan.out / f).is_file()), None)
        if saved >= cfg.max_steps and final:
            log.info("%s is at step %d and --max_steps is %d: nothing left to train, the final model is %s "
                     "(raise --max_steps to train further)", plan.resume, saved, cfg.max_steps, plan.out / final)
            return True
        return False

    def _setup_data(self, build) -> None:
        """The lock (built first when needed), the train and eval streams, max_steps and warmup."""
        plan, cfg, rank, world_size = self.plan, self.cfg, self.rank, self.world_size
        lock_path = plan.lock_path
        if lock_path is None:  # rank 0 builds through the pipeline (train/__main__.py), the others wait
            lock_path, lock = resolve_lock(cfg, plan.tok_dir, plan.tokenizer, rank=rank, build=build)
            check_tokenizer(lock, plan.tok_dir, plan.tokenizer, cfg.allow_tokenizer_mismatch)
        else:
            lock = read_lock_once(lock_path)
        seq_len = cfg.max_seq_length or int(lock["max_length"])
        if cfg.max_seq_length and cfg.max_seq_length < int(lock["max_length"]):
            log.warning("--max_seq_length %d < the lock's max_length %d: longer samples go through their "
                        "overflow policy", cfg.max_seq_length, lock["max_length"])
        warm_kernels()
        train_stream, eval_stream = make_streams(cfg, lock_path, seq_len, rank=rank, world_size=world_size)
        check_validation_split(cfg, train_stream, wants_eval=bool(cfg.do_eval or cfg.eval_steps))
        if cfg.eval_strategy == "no":
            eval_stream = None
        if cfg.max_steps is None:
            cfg = cfg.replace(max_steps=steps_for_epochs(cfg, lock, train_stream, seq_len, world_size))
        warmup = warmup_steps_for(cfg.max_steps, cfg.warmup_ratio, cfg.warmup_steps)
        try:
            check_schedule(cfg.learning_rate, cfg.min_lr, cfg.max_steps, warmup)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.cfg = cfg
        self.lock_path, self.seq_len, self.warmup = lock_path, seq_len, warmup
        self.train_stream, self.eval_stream = train_stream, eval_stream
        # per-dataset metrics are per task (FM9G's tensorboard_all_tasks): datasets may share one
        self.tasks = Tasks.of_datasets([ds.task for ds in train_stream.datasets])

    def _setup_model(self) -> None:
        """Model, engine, checkpointer, the stateful parts; resumed when asked."""
        plan, cfg, rank, world_size = self.plan, self.cfg, self.rank, self.world_size
        out, zero_stage = plan.out, plan.zero_stage
        dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32
        if zero_stage == 3:  # transformers then builds/loads the model partitioned (zero.Init)
            from transformers.integrations import HfDeepSpeedConfig
            self._hf_ds = HfDeepSpeedConfig(plan.ds_config)  # kept alive: transformers holds a weakref
        # From scratch: initialise in fp32 (DeepSpeed casts); pretrained: load in the train dtype.
        model = build_model(cfg, plan.config, plan.tokenizer, zero_stage=zero_stage,
                            dtype=dtype if cfg.model_name_or_path else torch.float32)
        self.use_varlen = getattr(plan.config, "_attn_implementation", None) == "flash_attention_2"
        self.engine = engine = init_engine(model, plan.ds_config, cfg, self.warmup, plan.engine)
        check_packing(engine.module, cfg.packing, self.use_varlen)  # packed rows must not leak (train/model.py)
        self.checkpointer = Checkpointer(out, rank=rank, world_size=world_size,
                                         save_total_limit=cfg.save_total_limit, tokenizer=plan.tokenizer,
                                         tokenizer_dir=plan.tok_dir, model_dir=cfg.model_name_or_path)
        if rank == 0:
            _write_run_files(out, cfg, plan.ds_config, self.lock_path, self.warmup, self.seq_len, plan.engine)
        self.loader = self.train_stream.loader(num_workers=cfg.num_workers)
        self.state = state = TrainState(world_size)
        # the stateful parts beside the engine's own states; train/checkpoint.py PARTS says how each is kept
        self.parts = {"trainer": state, "stream": self.loader, "rng": RNGState()}
        if plan.resume is not None:
            load_dir = None
            if plan.universal:
                from .universal import UniversalError, is_universal, to_universal
                try:
                    load_dir = plan.resume if is_universal(plan.resume) else to_universal(plan.resume, rank=rank)
                except UniversalError as e:
                    raise TrainError(str(e)) from None
            self.checkpointer.load(engine, plan.resume, self.parts, zero_stage=zero_stage, load_dir=load_dir)
            if state.saved.get("max_steps") not in (None, cfg.max_steps):
                log.warning("--max_steps changed from %s to %d: the lr schedule changes shape",
                            state.saved["max_steps"], cfg.max_steps)
        state.extra = {"max_steps": cfg.max_steps, "seq_len": self.seq_len, "engine": plan.engine}

    def state_dict(self) -> dict:
        """{part: its state_dict()}, what a checkpoint holds beside the engine's files."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def train(self) -> str:
        """The loop, then (unless stopped early) the last step's checkpoint and the final model, and
        only then the final evaluation: no fault after the last step loses the run. Returns why the
        loop stopped ("done", "exhausted", "stopped")."""
        if self.finished:
            return "done"
        from .stream import StreamError  # (imported by make_streams)
        cfg, plan, state, engine = self.cfg, self.plan, self.state, self.engine
        checkpointer, eval_stream, tasks, use_varlen = self.checkpointer, self.eval_stream, self.tasks, self.use_varlen
        log.info("training %d steps: %d ranks × %d micro-batches × %d rows × %d tokens, %s, %s",
                 cfg.max_steps, self.world_size, cfg.gradient_accumulation_steps,
                 cfg.per_device_train_batch_size, self.seq_len,
                 f"DeepSpeed ZeRO-{plan.zero_stage}" if plan.engine == "deepspeed" else "plain-PyTorch engine",
                 "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32")
        log.info("engine: %s (%s)", plan.engine, plan.engine_why)
        metrics = Metrics(cfg, self.rank, state.step)
        try:
            why = train(engine, self.loader, eval_stream, checkpointer, metrics, cfg, state, self.parts,
                        world_size=self.world_size, use_varlen=use_varlen, tasks=tasks)
            if why != "stopped":
                # (HF Trainer also checkpoints the last step under --save_strategy steps)
                if cfg.save_strategy != "no" and state.step > 0 and checkpointer.last_saved != state.step:
                    checkpointer.save(engine, state.step, self.parts)
                checkpointer.save_final(engine, plan.out, is_lora=cfg.use_lora, zero_stage=plan.zero_stage)
                if eval_stream is not None and metrics.last_eval != state.step:
                    metrics.eval(state.step, evaluate(engine, eval_stream, cfg.max_eval_batches, use_varlen, tasks))
        except StreamError as e:  # damage found reading a batch (bad offsets, token id >= vocab)
            raise TrainError(stream_fault(e)) from None
        finally:
            metrics.close()
        if self.rank == 0:
            from .plot import plot_at_end
            plot_at_end(plan.out)
        return why

    def close(self) -> None:
        if self._hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
            self._hf_ds = None


def run(cfg, build=None) -> str:
    """`python -m train`: Trainer(cfg, build).train(); returns why the loop stopped."""
    trainer = Trainer(cfg, build)
    try:
        return trainer.train()
    finally:
        trainer.close()


def stream_fault(e: Exception) -> str:
    """The one line of a StreamError, also when a DataLoader worker raised it (torch re-raises it
    with the worker's whole traceback in the message: its last line is the error)."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = [ln for ln in msg.splitlines() if ln.strip()][-1]
        msg = last.split("StreamError: ", 1)[-1]
    return " ".join(msg.split())


def _manifest_tokenizer(manifest: Path) -> str | None:
    """The `tokenizer` a manifest names, read through the manifest's own parser (JSON or YAML)."""
    from mixtures.manifest_io import ManifestError, parse_manifest
    try:
        doc = parse_manifest(manifest, manifest.read_bytes())
    except OSError as e:
        raise TrainError(f"--mixture {manifest}: cannot read: {e.strerror or e}") from None
    except ManifestError as e:
        raise TrainError(f"--mixture {str(e).splitlines()[0]}") from None
    tok = doc.get("tokenizer") if isinstance(doc, dict) else None
    if not isinstance(tok, str):
        return None
    return str(Path(tok) if Path(tok).is_absolute() else manifest.parent / tok)


def _model_tokenizer_dir(cfg, resume: Path | None) -> str | None:
    for d in (cfg.model_name_or_path, str(resume) if resume else None):
        if d and any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return d
    return None


def _write_run_files(out: Path, cfg, ds_config: dict, lock_path: Path, warmup: int, seq_len: int,
                     engine: str = "deepspeed") -> None:
    """What this run was: resolved flags, resolved DeepSpeed config, and the lock itself."""
    flags = {k: v for k, v in sorted(cfg.as_dict().items()) if k not in ("explicit", "local_rank", "notes")}
    flags.update(resolved_warmup_steps=warmup, resolved_seq_len=seq_len, resolved_engine=engine)
    (out / "train_args.json").write_text(json.dumps(flags, indent=2, default=str) + "\n")
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    if lock_path.resolve() != (out / "mixture.lock.json").resolve():
        shutil.copyfile(lock_path, out / "mixture.lock.json")


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
