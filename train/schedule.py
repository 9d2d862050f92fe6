"""Learning-rate schedule: linear warmup, then cosine decay to an absolute floor.

`min_lr` is an absolute learning rate (as the Hunyuan README says), not a ratio. Hy3 turned
it into `min_lr_rate = min_lr / learning_rate`, so `--min_lr 0.01 --learning_rate 1e-5`
"decayed" upwards; here that combination is refused, and the schedule never rises after
warmup and never goes below `min_lr`.
"""
from __future__ import annotations

import math

import torch


def warmup_steps_for(max_steps: int, warmup_ratio: float, warmup_steps: int | None = None) -> int:
    """Explicit `warmup_steps` wins; else ceil(ratio * max_steps) (HF Trainer's rule)."""
    if warmup_steps is not None:
        return max(0, int(warmup_steps))
    return int(math.ceil(max(0.0, warmup_ratio) * max_steps))


def check_schedule(learning_rate: float, min_lr: float, max_steps: int, warmup: int) -> None:
    if learning_rate < 0 or min_lr < 0:
        raise ValueError(f"--learning_rate ({learning_rate}) and --min_lr ({min_lr}) must be >= 0")
    if min_lr > learning_rate:
        raise ValueError(
            f"--min_lr {min_lr} is above --learning_rate {learning_rate}; --min_lr is an absolute "
            f"learning rate (e.g. {learning_rate / 10:g}), not a ratio")
    if warmup > max_steps:
        raise ValueError(f"warmup ({warmup} steps) is longer than --max_steps ({max_steps})")


def lr_at(step: int, *, learning_rate: float, min_lr: float, max_steps: int, warmup: int) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup: linear from min_lr to the peak, reaching the peak on step `warmup - 1`.
    Decay: cosine from the peak on step `warmup` to exactly `min_lr` on the last step
    (`max_steps - 1`); after that it stays at `min_lr`.
    """
    if step < warmup:
        return min_lr + (learning_rate - min_lr) * (step + 1) / warmup
    decay_steps = max(1, max_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return min_lr + (learning_rate - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, learning_rate: float, min_lr: float,
                    max_steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose factor is lr_at(step) / learning_rate (every group's base lr is the
    peak). DeepSpeed steps it once per optimizer step and saves/loads it in checkpoints."""
    check_schedule(learning_rate, min_lr, max_steps, warmup)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
        group["initial_lr"] = learning_rate

    def factor(step: int) -> float:
        if learning_rate == 0:
            return 0.0
        return lr_at(step, learning_rate=learning_rate, min_lr=min_lr, max_steps=max_steps,
                     warmup=warmup) / learning_rate

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
