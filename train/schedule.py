"""Learning-rate schedules (--lr_scheduler_type): linear warmup, then cosine (cosine and
cosine_with_min_lr are the same here: the floor is --min_lr, 0 by default), linear, constant
(no warmup, as HF's) or constant_with_warmup. The decay ends at `max_steps`, as HF's does: the
last step (max_steps - 1) runs just above min_lr, never at lr 0 with --min_lr 0.

`min_lr` is an absolute learning rate (as the Hunyuan README says), not a ratio. Hy3 turned
it into `min_lr_rate = min_lr / learning_rate`, so `--min_lr 0.01 --learning_rate 1e-5`
"decayed" upwards; here that combination is refused, and the schedule never rises after
warmup and never goes below `min_lr`. A LLaMA-Factory config's `lr_scheduler_kwargs.min_lr_rate`
(transformers' ratio) becomes `min_lr = min_lr_rate × learning_rate` in train/lf_yaml.py.
"""
from __future__ import annotations

import math


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


def lr_at(step: int, *, learning_rate: float, min_lr: float, max_steps: int, warmup: int,
          kind: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup: linear from min_lr to the peak, reaching the peak on step `warmup - 1`.
    Decay: from the peak on step `warmup` towards `min_lr`, which it would reach at step
    `max_steps` (HF's progress = (step - warmup) / (max_steps - warmup)); after that min_lr.
    """
    if kind == "constant":
        return learning_rate
    if step < warmup:
        return min_lr + (learning_rate - min_lr) * (step + 1) / warmup
    if kind == "constant_with_warmup":
        return learning_rate
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if kind == "linear":
        return min_lr + (learning_rate - min_lr) * (1.0 - progress)
    return min_lr + (learning_rate - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, *, learning_rate: float, min_lr: float, max_steps: int, warmup: int,
                    kind: str = "cosine"):
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
                     warmup=warmup, kind=kind) / learning_rate

    import torch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
