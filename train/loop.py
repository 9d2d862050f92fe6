"""The training loop and evaluation, with per-dataset loss / trained tokens / samples.

One optimizer step = `gradient_accumulation_steps` micro-batches per rank. The loss is the
token mean over the *global* step (every rank, every micro-batch): each micro-batch's summed
cross-entropy is scaled by gas * world / (predicted tokens of the step, all ranks), which
DeepSpeed's 1/gas and rank averaging turn into exactly that mean, whatever the packing.
Per task: every predicted token is attributed to the dataset of the sample it belongs to
(`label_datasets`), and the dataset to its task (`Tasks`, FM9G's tensorboard_all_tasks: datasets
may share one); the step loss is the sum of the per-task loss sums over the step's predicted
tokens, so the per-task means weighted by their tokens give it back exactly. Training and
evaluation both report through `StepTotals`, which cannot be built without the task map.

The loop ends at max_steps, at the end of the data or at --stop_after_steps; what is written at
the end (checkpoint, final model, then the final evaluation) is train/trainer.py's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stages.constants import IGNORE

from .model import loss_sum, shift_labels

log = logging.getLogger("train")


def label_datasets(batch: dict) -> torch.Tensor | None:
    """Dataset index of every label position [B, L] (-1: padding), or None where the batch
    does not say (concat batches without `segments`)."""
    labels = batch["labels"]
    B, L = labels.shape
    smp = batch.get("samples")
    if "segments" in batch:  # (dataset, flat start, flat end) per piece
        seg = batch["segments"]
        out = torch.full((B * L,), -1, dtype=torch.long)
        lens = (seg[:, 2] - seg[:, 1]).clamp(min=0)
        idx = torch.repeat_interleave(torch.arange(len(seg)), lens)
        pos = torch.arange(int(lens.sum())) - torch.repeat_interleave(torch.cumsum(lens, 0) - lens, lens)
        out[seg[idx, 1] + pos] = seg[idx, 0]
        return out.view(B, L)
    if smp is None:
        return None
    if "attention_mask" in batch:  # padded: sample k is row k
        out = torch.full((B, L), -1, dtype=torch.long)
        out[:len(smp)] = smp[:, 0:1]
        return out.masked_fill(batch["attention_mask"] == 0, -1)
    pos = batch.get("position_ids")
    if pos is None:
        return None
    # packed: a piece starts where position_ids restart; a row's last segment may be its padding
    flat_pos = pos.reshape(-1)
    starts = (flat_pos == 0).nonzero().flatten()
    seg_id = torch.cumsum((flat_pos == 0).long(), 0) - 1
    ends = torch.cat([starts[1:], torch.tensor([B * L])])
    ids, lab = batch["input_ids"].reshape(-1), labels.reshape(-1)
    n_pad = len(starts) - len(smp)
    if n_pad < 0:
        return None
    pad_candidate = torch.zeros(len(starts), dtype=torch.bool)
    if n_pad:
        row_end = (ends % L == 0) & ((ends - starts) > 0)
        for k in row_end.nonzero().flatten().tolist():
            s, e = int(starts[k]), int(ends[k])
            looks_pad = bool((lab[s:e] == IGNORE).all()) and bool((ids[s:e] == ids[s]).all())
            # a whole padding row only comes at the end of a finite stream: the batch's last rows
            if looks_pad and (s % L != 0 or k >= len(starts) - n_pad):
                pad_candidate[k] = True
        if int(pad_candidate.sum()) != n_pad:
            return None  # ambiguous (an untrained piece that looks like padding): no split this step
    seg_ds = torch.full((len(starts),), -1, dtype=torch.long)
    seg_ds[~pad_candidate] = smp[:, 0]
    return seg_ds[seg_id].view(B, L)


@dataclass(frozen=True)
class Tasks:
    """The reported groups: `names` (tasks, first-seen order) and `of[d]`, the task index of the
    lock's dataset d."""
    names: list[str]
    of: torch.Tensor

    @classmethod
    def of_datasets(cls, task_names: list[str]) -> Tasks:
        """From each lock dataset's task name, in lock order."""
        names = list(dict.fromkeys(task_names))
        return cls(names, torch.tensor([names.index(t) for t in task_names], dtype=torch.long))


class StepTotals:
    """Sums over one step (or one evaluation): loss, predicted tokens, per task, float64."""

    def __init__(self, tasks: Tasks):
        self.names, self.task_of = tasks.names, tasks.of
        self.nd = nd = len(tasks.names)
        self.v = torch.zeros(2 + 3 * nd, dtype=torch.float64)
        self.split_ok = True

    def add(self, batch: dict, per_token: torch.Tensor, target: torch.Tensor) -> None:
        nd = self.nd
        self.v[1] += float((target != IGNORE).sum())
        smp = batch.get("samples")
        remap = self.task_of.__getitem__  # lock dataset index -> task index
        if smp is not None and len(smp):
            self.v[2 + 2 * nd:] += torch.bincount(remap(smp[:, 0]), minlength=nd)[:nd].double()
        dmap = label_datasets(batch)
        per_token = per_token.detach().double().cpu()
        if dmap is None:
            self.split_ok = False
            self.v[0] += per_token.sum()
            return
        tmap = torch.full_like(dmap, -1)
        tmap[:, :-1] = dmap[:, 1:]  # target t is label t + 1
        tmap = tmap.masked_fill(target.cpu() == IGNORE, -1).reshape(-1)
        keep = tmap >= 0
        tmap = torch.where(keep, remap(tmap.clamp(min=0)), tmap)
        if int(keep.sum()) != int((target != IGNORE).sum()):
            self.split_ok = False
            self.v[0] += per_token.sum()
            return
        flat = per_token.reshape(-1)
        ds_loss = torch.zeros(nd, dtype=torch.float64).index_add_(0, tmap[keep], flat[keep])
        self.v[2:2 + nd] += ds_loss
        self.v[2 + nd:2 + 2 * nd] += torch.bincount(tmap[keep], minlength=nd)[:nd].double()
        self.v[0] += ds_loss.sum()  # the step loss IS the sum of the per-dataset sums

    def reduce(self, device) -> None:
        flag = torch.tensor([0.0 if self.split_ok else 1.0], dtype=torch.float64)
        both = all_reduce(torch.cat([self.v, flag]), device)
        self.v, self.split_ok = both[:-1], both[-1].item() == 0

    def per_dataset(self, prefix: str = "") -> dict:
        """{task: {samples, trained_tokens, loss}} (the last two only where every token was
        attributed)."""
        nd = self.nd
        out = {}
        for k, name in enumerate(self.names):
            tok = int(self.v[2 + nd + k])
            smp = int(self.v[2 + 2 * nd + k])
            rec = {f"{prefix}samples": smp}
            if self.split_ok:
                rec[f"{prefix}trained_tokens"] = tok
                rec[f"{prefix}loss"] = float(self.v[2 + k] / tok) if tok else None
            out[name] = rec
        return out


def train(engine, loader, eval_stream, checkpointer, metrics, cfg, state, parts, *,
          world_size: int, use_varlen: bool, tasks: Tasks) -> str:
    """Optimizer steps until max_steps, the end of the data, or --stop_after_steps, with the
    --eval_steps evaluations and --save_steps checkpoints on the way; the last step's checkpoint
    and evaluation are the caller's (after the final model is saved). Returns why it stopped:
    "done", "exhausted" or "stopped"."""
    device = engine.device
    gas = cfg.gradient_accumulation_steps
    batches = iter(loader)
    first_step = state.step
    while state.step < cfg.max_steps:
        t0 = time.perf_counter()
        micro = _take(batches, gas)
        # One all-reduce: predicted tokens of the whole step (the loss divisor, before any
        # backward), tokens, and real micro-batches. A finite mixture ends per rank (each packs
        # its own windows): the step runs while any rank has data, a rank without running
        # batches with nothing trained (ZeRO steps are collectives).
        local = torch.tensor([sum(int((shift_labels(b) != IGNORE).sum()) for b in micro),
                              sum(b["input_ids"].numel() for b in micro), len(micro)], dtype=torch.float64)
        n_pred, n_tok, n_micro = all_reduce(local, device).tolist()
        if n_micro == 0:
            log.warning("the data ran out after %d steps", state.step)
            return "exhausted"
        micro += [_dummy_batch() for _ in range(gas - len(micro))]
        lr = engine.get_lr()[0]  # the lr this step uses (DeepSpeed advances it in step())
        scale = gas * world_size / max(n_pred, 1.0)
        totals = StepTotals(tasks)
        for batch in micro:
            per_token, target = loss_sum(engine, _to(batch, device), use_varlen, per_token=True)
            engine.backward(per_token.sum() * scale)
            engine.step()  # optimizer + scheduler step only at the accumulation boundary
            if not batch.get("dummy"):
                totals.add(batch, per_token, target)
        totals.reduce(device)

        state.step += 1
        state.trained_tokens += int(n_pred)
        state.tokens += int(n_tok)
        seconds = time.perf_counter() - t0
        metrics.step(state.step, {
            "loss": float(totals.v[0]) / max(n_pred, 1.0), "lr": lr, "grad_norm": _grad_norm(engine),
            "tokens_per_s": n_tok / seconds, "trained_tokens_step": int(n_pred),
            "trained_tokens": state.trained_tokens, "tokens": state.tokens,
            "datasets": totals.per_dataset()})

        if state.step == cfg.max_steps:
            break  # checkpoint, final model, final evaluation: the caller's, in that order
        if eval_stream is not None and cfg.eval_steps and state.step % cfg.eval_steps == 0:
            metrics.eval(state.step, evaluate(engine, eval_stream, cfg.max_eval_batches, use_varlen, tasks))
        stop = cfg.stop_after_steps and state.step - first_step >= cfg.stop_after_steps
        if (cfg.save_strategy != "no" and state.step % cfg.save_steps == 0) or stop:
            checkpointer.save(engine, state.step, parts)
        if stop:
            log.info("stopping after %d steps of this run (--stop_after_steps); resume with "
                     "--resume_from_checkpoint latest", cfg.stop_after_steps)
            return "stopped"
    return "done"


@torch.no_grad()
def evaluate(engine, eval_stream, max_batches: int | None, use_varlen: bool, tasks: Tasks) -> dict:
    """Token-mean loss over the held-out split, overall and per task. Ranks step in lockstep
    (ZeRO-3 forwards are collectives): a rank whose share ran out runs a dummy forward."""
    engine.eval()
    device = engine.device
    totals = StepTotals(tasks)
    it = iter(eval_stream.eval_batches())
    k = 0
    while True:
        batch = next(it, None) if max_batches is None or k < max_batches else None
        if all_reduce(torch.tensor([float(batch is not None)]), device, op=dist.ReduceOp.MAX).item() == 0:
            break
        real = batch is not None
        batch = batch if real else _dummy_batch()
        per_token, target = loss_sum(engine, _to(batch, device), use_varlen, per_token=True)
        if real:
            totals.add(batch, per_token, target)
        k += 1
    totals.reduce(device)
    engine.train()
    n_all = float(totals.v[1])
    return {"eval_loss": float(totals.v[0]) / max(n_all, 1.0), "eval_tokens": int(n_all),
            "datasets": totals.per_dataset(prefix="eval_")}


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
    """Nothing trained: a rank whose data ran out keeps the collectives of a step in lockstep."""
    return {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.full((1, 2), IGNORE),
            "position_ids": torch.arange(2).unsqueeze(0), "dummy": True}


def all_reduce(t: torch.Tensor, device, op=None) -> torch.Tensor:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    x = t.to(device, copy=True)  # nccl needs device tensors; float64 keeps token counts exact
    dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x.cpu()


def _grad_norm(engine) -> float | None:
    g = engine.get_global_grad_norm()
    return None if g is None else float(g)
