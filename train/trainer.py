"""The training run: `run(args)` builds the components, `train(...)` is the loop.

One optimizer step = `gradient_accumulation_steps` micro-batches per rank. The loss is the
token mean over the *global* step (every rank, every micro-batch): each micro-batch's summed
cross-entropy is scaled by gas * world / (predicted tokens of the step, all ranks), which
DeepSpeed's 1/gas and rank averaging turn into exactly that mean, whatever the packing.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .args import TrainError, UsageError, load_ds_config, resolve_ds_config
from .checkpoint import Checkpointer
from .data import check_tokenizer, make_streams, resolve_lock
from .model import IGNORE, build_model, load_config, load_tokenizer, loss_sum, shift_labels
from .schedule import build_scheduler, check_schedule, warmup_steps_for

log = logging.getLogger("train")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    trained_tokens: int = 0  # predicted (loss-carrying) tokens, all ranks
    tokens: int = 0  # input positions processed, all ranks (padding included)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"step": self.step, "trained_tokens": self.trained_tokens, "tokens": self.tokens, **self.extra}


# ==================================================================== the loop
def train(engine, loader, eval_stream, checkpointer, metrics, args, state: TrainState, *,
          world_size: int, use_varlen: bool) -> str:
    """Run optimizer steps until --max_steps, the end of the data, or --stop_after_steps.
    Returns why it stopped: "done", "exhausted" or "stopped"."""
    device = engine.device
    gas = args.gradient_accumulation_steps
    batches = iter(loader)
    first_step = state.step
    warned = False
    while state.step < args.max_steps:
        t0 = time.perf_counter()
        micro = _take(batches, gas)
        if len(micro) < gas:  # finite mixture ran out (all ranks see it on the same step)
            log.warning("the data ran out after %d steps", state.step)
            return "exhausted"
        # Predicted tokens of the whole step, all ranks, before any backward: the loss divisor.
        local = torch.tensor([sum(int((shift_labels(b) != IGNORE).sum()) for b in micro),
                              sum(b["input_ids"].numel() for b in micro)], dtype=torch.float64)
        n_pred, n_tok = _all_reduce(local, device).tolist()
        if not warned and int(local[0]) != sum(int(b.get("n_trained", local[0])) for b in micro):
            log.warning("batches' n_trained differs from the predicted tokens: the stream labels "
                        "document-first tokens; they carry no loss here")
            warned = True

        lr = engine.get_lr()[0]  # the lr this step uses (DeepSpeed advances it in step())
        scale = gas * world_size / max(n_pred, 1.0)
        loss_total = torch.zeros((), dtype=torch.float64)
        for batch in micro:
            loss, _ = loss_sum(engine, _to(batch, device), use_varlen)
            engine.backward(loss * scale)
            engine.step()  # optimizer + scheduler step only at the accumulation boundary
            loss_total += loss.detach().double().cpu()
        loss_sum_all = _all_reduce(loss_total.reshape(1), device).item()

        state.step += 1
        state.trained_tokens += int(n_pred)
        state.tokens += int(n_tok)
        seconds = time.perf_counter() - t0
        metrics.step(state.step, {
            "loss": loss_sum_all / max(n_pred, 1.0), "lr": lr, "grad_norm": _grad_norm(engine),
            "tokens_per_s": n_tok / seconds, "trained_tokens_step": int(n_pred),
            "trained_tokens": state.trained_tokens, "tokens": state.tokens})

        last = state.step == args.max_steps
        if eval_stream is not None and ((args.eval_steps and state.step % args.eval_steps == 0) or last):
            metrics.eval(state.step, evaluate(engine, eval_stream, args.max_eval_batches, use_varlen))
        stop = args.stop_after_steps and state.step - first_step >= args.stop_after_steps and not last
        if state.step % args.save_steps == 0 or stop:
            checkpointer.save(engine, state.step, loader, state.as_dict())
        if stop:
            log.info("stopping after %d steps of this run (--stop_after_steps); resume with "
                     "--resume_from_checkpoint latest", args.stop_after_steps)
            return "stopped"
    return "done"


@torch.no_grad()
def evaluate(engine, eval_stream, max_batches: int | None, use_varlen: bool) -> dict:
    """Token-mean loss over the held-out split. Ranks step in lockstep (ZeRO-3 forwards are
    collectives): a rank whose share ran out runs a dummy forward until all are done."""
    engine.eval()
    device = engine.device
    total = torch.zeros(2, dtype=torch.float64)  # loss sum, predicted tokens
    it = iter(eval_stream.eval_batches())
    k = 0
    while True:
        batch = next(it, None) if max_batches is None or k < max_batches else None
        if _all_reduce(torch.tensor([float(batch is not None)]), device, op=dist.ReduceOp.MAX).item() == 0:
            break
        batch = batch if batch is not None else _dummy_batch()
        loss, n = loss_sum(engine, _to(batch, device), use_varlen)
        total += torch.tensor([loss.item(), n], dtype=torch.float64)
        k += 1
    loss_all, n_all = _all_reduce(total, device).tolist()
    engine.train()
    return {"eval_loss": loss_all / max(n_all, 1.0), "eval_tokens": int(n_all)}


def _take(it, n: int) -> list:
    out = []
    for _ in range(n):
        b = next(it, None)
        if b is None:
            break
        out.append(b)
    return out


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _dummy_batch() -> dict:
    return {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.full((1, 2), IGNORE),
            "position_ids": torch.arange(2).unsqueeze(0)}


def _all_reduce(t: torch.Tensor, device, op=None) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    # nccl needs device tensors; float64 keeps token counts exact.
    x = t.to(device, copy=True)
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x.cpu()


def _grad_norm(engine) -> float | None:
    g = engine.get_global_grad_norm()
    return None if g is None else float(g)


# ==================================================================== logging
class Metrics:
    """Console (progress bar + a line every --logging_steps), TensorBoard and a JSON-lines
    log (OUTPUT_DIR/train_log.jsonl), on rank 0 only."""

    def __init__(self, args, rank: int, start_step: int):
        self.enabled = rank == 0
        self.every = args.logging_steps
        self.bar = self.tb = self.jsonl = None
        if not self.enabled:
            return
        from tqdm import tqdm
        self.bar = tqdm(total=args.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not sys.stderr.isatty())
        if args.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(args.output_dir) / "runs"))
        self.jsonl = open(Path(args.output_dir) / "train_log.jsonl", "a")

    def step(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **m})
        for k in ("loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens"):
            if self.tb is not None and m.get(k) is not None:
                self.tb.add_scalar(f"train/{k}", m[k], step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", refresh=False)
        if step % self.every == 0 or step == 1:
            gn = "-" if m["grad_norm"] is None else f"{m['grad_norm']:.3f}"
            self._print(f"step {step}  loss {m['loss']:.4f}  lr {m['lr']:.3e}  grad_norm {gn}  "
                        f"tokens/s {m['tokens_per_s']:.0f}  trained_tokens {m['trained_tokens']:,}")

    def eval(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **m})
        if self.tb is not None:
            self.tb.add_scalar("eval/loss", m["eval_loss"], step)
        self._print(f"step {step}  eval_loss {m['eval_loss']:.4f}  ({m['eval_tokens']:,} tokens)")

    def _write(self, rec: dict) -> None:
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()

    def _print(self, line: str) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            log.info(line)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


# ==================================================================== assembly
def setup_distributed() -> tuple[int, int, int]:
    """Rank, world size, local rank. A plain `python -m train` is a world of one: give
    DeepSpeed the env a launcher would (else it looks for MPI)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed()  # nccl on GPU, gloo on CPU
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def init_engine(model, ds_config: dict, args, warmup: int):
    import deepspeed
    groups = param_groups(model, args.weight_decay)
    optimizer = None
    if "optimizer" not in ds_config:  # a torch optimizer needs no JIT-compiled op
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon, weight_decay=args.weight_decay)

    def scheduler(opt):
        return build_scheduler(opt, learning_rate=args.learning_rate, min_lr=args.min_lr,
                               max_steps=args.max_steps, warmup=warmup)

    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                      lr_scheduler=scheduler, config=ds_config)
    return engine


@dataclass
class Plan:
    """Everything decided before any process group exists (so bad inputs fail fast, and
    identically, on every rank)."""
    out: Path
    resume: Path | None
    tok_dir: str
    tokenizer: object
    config: object
    ds_config: dict
    zero_stage: int
    warmup: int
    lock_path: Path | None  # None: built from --train_data_file once ranks can talk


def prepare(args, world_size: int) -> Plan:
    out = Path(args.output_dir)
    if args.mixture and not Path(args.mixture).is_file():
        raise TrainError(f"--mixture {args.mixture}: no such lock file (build one with "
                         "`python -m pipeline build MANIFEST`)")
    for flag in ("model_name_or_path", "model_config", "tokenizer_name_or_path", "train_data_file"):
        if getattr(args, flag) and not Path(getattr(args, flag)).exists():
            raise TrainError(f"--{flag} {getattr(args, flag)}: no such file or directory")

    resume = None
    if args.resume_from_checkpoint:
        probe = Checkpointer(out, rank=0, world_size=world_size, save_total_limit=None,
                             tokenizer=None, tokenizer_dir=None)
        resume = probe.resolve(args.resume_from_checkpoint)
        if resume is None:
            log.warning("--resume_from_checkpoint latest: no checkpoint in %s yet; starting from scratch", out)
    if resume is None and not (args.model_name_or_path or args.model_config):
        raise TrainError("give the model: --model_name_or_path DIR or --model_config JSON")

    # Tokenizer: explicit, else the model dir's (or checkpoint's), else the lock's.
    tok_dir = args.tokenizer_name_or_path or _model_tokenizer_dir(args, resume)
    if tok_dir is None and args.mixture:
        tok_dir = (json.loads(Path(args.mixture).read_text()).get("tokenizer") or {}).get("path")
    if tok_dir is None:
        raise TrainError("no tokenizer: pass --tokenizer_name_or_path")
    tokenizer = load_tokenizer(tok_dir, args.trust_remote_code)
    lock_path = None
    if args.mixture:
        lock_path = resolve_lock(args, tok_dir, tokenizer, rank=0)
        check_tokenizer(json.loads(lock_path.read_text()), tok_dir, tokenizer, args.allow_tokenizer_mismatch)

    config = load_config(args, fallback_dir=str(resume) if resume else None, vocab_size=len(tokenizer))
    ds_config = resolve_ds_config(args, load_ds_config(args.deepspeed), world_size=world_size,
                                  hidden_size=int(getattr(config, "hidden_size", 1024)))
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    for name, ok in (("fp16", acc.is_fp16_supported()), ("bf16", acc.is_bf16_supported())):
        if getattr(args, name) and not ok:
            raise TrainError(f"{name} (from --{name} or the DeepSpeed config) is not supported on this "
                             f"{acc.device_name()} device; use {'--bf16 or ' if name == 'fp16' else ''}fp32")
    warmup = warmup_steps_for(args.max_steps, args.warmup_ratio, args.warmup_steps)
    try:
        check_schedule(args.learning_rate, args.min_lr, args.max_steps, warmup)
    except ValueError as e:
        raise UsageError(str(e)) from None
    zero_stage = int(ds_config["zero_optimization"].get("stage", 0))
    if resume is not None:
        Checkpointer(out, rank=0, world_size=world_size, save_total_limit=None, tokenizer=None,
                     tokenizer_dir=None).check_resumable(resume, zero_stage)
    return Plan(out, resume, tok_dir, tokenizer, config, ds_config, zero_stage, warmup, lock_path)


def run(args) -> str:
    setup_logging(int(os.environ.get("RANK", 0)))
    plan = prepare(args, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    rank, world_size, _ = setup_distributed()
    seed_everything(args.seed)
    out, zero_stage = plan.out, plan.zero_stage
    out.mkdir(parents=True, exist_ok=True)

    lock_path = plan.lock_path
    if lock_path is None:  # --train_data_file: rank 0 builds, the others wait
        lock_path = resolve_lock(args, plan.tok_dir, plan.tokenizer, rank=rank)
        check_tokenizer(json.loads(lock_path.read_text()), plan.tok_dir, plan.tokenizer,
                        args.allow_tokenizer_mismatch)
    lock = json.loads(lock_path.read_text())
    seq_len = args.max_seq_length or int(lock["max_length"])
    if args.max_seq_length and args.max_seq_length < int(lock["max_length"]):
        log.warning("--max_seq_length %d < the lock's max_length %d: longer samples go through their "
                    "overflow policy", args.max_seq_length, lock["max_length"])
    train_stream, eval_stream = make_streams(args, lock_path, seq_len, rank=rank, world_size=world_size)

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    hf_ds = None
    if zero_stage == 3:  # transformers then builds/loads the model partitioned (zero.Init)
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds = HfDeepSpeedConfig(plan.ds_config)  # kept alive: transformers holds a weakref
    try:
        # From scratch: initialise in fp32 (DeepSpeed casts); pretrained: load in the train dtype.
        model = build_model(args, plan.config, plan.tokenizer, zero_stage=zero_stage,
                            dtype=dtype if args.model_name_or_path else torch.float32)
        use_varlen = getattr(plan.config, "_attn_implementation", None) == "flash_attention_2"
        engine = init_engine(model, plan.ds_config, args, plan.warmup)

        checkpointer = Checkpointer(out, rank=rank, world_size=world_size, save_total_limit=args.save_total_limit,
                                    tokenizer=plan.tokenizer, tokenizer_dir=plan.tok_dir,
                                    model_dir=args.model_name_or_path)
        if rank == 0:
            _write_run_files(out, args, plan.ds_config, lock_path, plan.warmup, seq_len)
        loader = train_stream.loader(num_workers=args.num_workers)
        state = TrainState()
        if plan.resume is not None:
            saved = checkpointer.load(engine, plan.resume, loader, zero_stage=zero_stage)
            state = TrainState(saved["step"], saved.get("trained_tokens", 0), saved.get("tokens", 0))
            if saved.get("max_steps") not in (None, args.max_steps):
                log.warning("--max_steps changed from %s to %d: the lr schedule changes shape",
                            saved["max_steps"], args.max_steps)
        state.extra = {"max_steps": args.max_steps, "seq_len": seq_len}

        log.info("training %d steps: %d ranks × %d micro-batches × %d rows × %d tokens, ZeRO-%d, %s",
                 args.max_steps, world_size, args.gradient_accumulation_steps,
                 args.per_device_train_batch_size, seq_len, zero_stage,
                 "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32")
        metrics = Metrics(args, rank, state.step)
        try:
            why = train(engine, loader, eval_stream, checkpointer, metrics, args, state,
                        world_size=world_size, use_varlen=use_varlen)
            if why == "exhausted" and eval_stream is not None:
                metrics.eval(state.step, evaluate(engine, eval_stream, args.max_eval_batches, use_varlen))
            if why != "stopped":
                checkpointer.save_final(engine, out, is_lora=args.use_lora, zero_stage=zero_stage)
        finally:
            metrics.close()
    finally:
        if hf_ds is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
    return why


def _model_tokenizer_dir(args, resume: Path | None) -> str | None:
    for d in (args.model_name_or_path, str(resume) if resume else None):
        if d and any((Path(d) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return d
    return None


def _write_run_files(out: Path, args, ds_config: dict, lock_path: Path, warmup: int, seq_len: int) -> None:
    """What this run was: resolved flags, resolved DeepSpeed config, and the lock itself."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in ("explicit", "local_rank")}
    flags.update(resolved_warmup_steps=warmup, resolved_seq_len=seq_len)
    (out / "train_args.json").write_text(json.dumps(flags, indent=2, default=str) + "\n")
    (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    if lock_path.resolve() != (out / "mixture.lock.json").resolve():
        shutil.copyfile(lock_path, out / "mixture.lock.json")


def finish() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

