"""Console line (+ a tqdm bar on a TTY only), TensorBoard and OUTPUT_DIR/train_log.jsonl, rank 0
only; per-task loss / trained tokens / samples in all three (FM9G's tensorboard_all_tasks).

A console step line reads `step 30/1000  loss …  eta 12m05s  | sft 2.3456 (12,345 tokens, 40 samples)`:
the ETA is this run's mean time per step so far times the steps left."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("train")


class Metrics:
    def __init__(self, cfg, rank: int, start_step: int):
        self.enabled = rank == 0
        self.every = cfg.logging_steps
        self.quiet = cfg.logging_strategy == "no"
        self.bar = self.tb = self.jsonl = None
        self.last_eval: int | None = None  # step of the last evaluation reported
        self.max_steps, self.start_step, self.t0 = cfg.max_steps, start_step, time.perf_counter()
        if not self.enabled:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(cfg.output_dir) / "runs"))
        self.jsonl = open(Path(cfg.output_dir) / "train_log.jsonl", "a")

    def step(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **m})
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens"):
                if m.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", m[k], step)
            for name, d in m.get("datasets", {}).items():
                for k, v in d.items():
                    if v is not None:
                        self.tb.add_scalar(f"train/{k}/{name}", v, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}", refresh=False)
        if not self.quiet and (step % self.every == 0 or step == 1):
            gn = "-" if m["grad_norm"] is None else f"{m['grad_norm']:.3f}"
            per = "  ".join(f"{n} {d['loss']:.4f} ({d['trained_tokens']:,} tokens, {d['samples']:,} samples)"
                            for n, d in m.get("datasets", {}).items() if d.get("loss") is not None)
            self._print(f"step {step}/{self.max_steps}  loss {m['loss']:.4f}  lr {m['lr']:.3e}  grad_norm {gn}  "
                        f"tokens/s {m['tokens_per_s']:.0f}  trained_tokens {m['trained_tokens']:,}  "
                        f"eta {self.eta(step)}" + (f"  | {per}" if per else ""))

    def eta(self, step: int) -> str:
        """Time left at this run's mean seconds per step (evaluations and saves included)."""
        done = step - self.start_step
        if done <= 0 or not self.max_steps:
            return "-"
        return format_seconds((time.perf_counter() - self.t0) / done * max(self.max_steps - step, 0))

    def eval(self, step: int, m: dict) -> None:
        self.last_eval = step
        if not self.enabled:
            return
        self._write({"step": step, **m})
        per = "  ".join(f"{n} {d['eval_loss']:.4f} ({d['eval_trained_tokens']:,} tokens, "
                        f"{d['eval_samples']:,} samples)"
                        for n, d in m.get("datasets", {}).items() if d.get("eval_loss") is not None)
        if self.tb is not None:
            self.tb.add_scalar("eval/loss", m["eval_loss"], step)
            for n, d in m.get("datasets", {}).items():
                if d.get("eval_loss") is not None:
                    self.tb.add_scalar(f"eval/loss/{n}", d["eval_loss"], step)
        self._print(f"step {step}/{self.max_steps}  eval_loss {m['eval_loss']:.4f}  ({m['eval_tokens']:,} tokens)"
                    + (f"  | {per}" if per else ""))

    def _write(self, rec: dict) -> None:
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            log.info(line)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.jsonl.close()


def format_seconds(s: float) -> str:
    """12s, 3m05s, 2h07m."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
