"""The learning-rate schedule: warmup, cosine decay ending at max_steps (as HF's), absolute
min_lr floor, never rising; linear / constant / constant_with_warmup kinds."""
import math

import pytest
import torch

from train.schedule import build_scheduler, check_schedule, lr_at, warmup_steps_for


def lrs(max_steps, lr, min_lr, warmup, kind="cosine"):
    return [lr_at(s, learning_rate=lr, min_lr=min_lr, max_steps=max_steps, warmup=warmup, kind=kind)
            for s in range(max_steps)]


@pytest.mark.parametrize("max_steps,warmup", [(100, 10), (50, 0), (7, 1), (1, 0), (20, 20)])
def test_warmup_then_cosine_to_the_floor(max_steps, warmup):
    lr, floor = 1e-3, 1e-4
    got = lrs(max_steps, lr, floor, warmup)
    assert all(floor - 1e-15 <= x <= lr + 1e-15 for x in got)  # never below min_lr, never above peak
    assert all(b > a for a, b in zip(got[:warmup], got[1:warmup]))  # warmup rises
    if warmup:
        assert got[warmup - 1] == pytest.approx(lr)  # peak reached on the last warmup step
    decay = got[warmup:]
    assert all(b <= a for a, b in zip(decay, decay[1:]))  # decay never rises
    if len(decay) > 1:
        assert decay[0] == pytest.approx(lr)
        # HF: the decay reaches min_lr at step max_steps, so the last step is just above it
        last = floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * (len(decay) - 1) / len(decay)))
        assert decay[-1] == pytest.approx(last) and decay[-1] > floor
        mid = warmup + (max_steps - warmup) / 2
        if mid == int(mid):
            assert got[int(mid)] == pytest.approx((lr + floor) / 2)  # cosine midpoint
    # beyond the schedule: stays at the floor
    assert lr_at(max_steps + 5, learning_rate=lr, min_lr=floor, max_steps=max_steps,
                 warmup=warmup) == pytest.approx(floor)


def test_min_lr_is_absolute_and_hy3_mistake_is_refused():
    # Hy3 train.sh: lr 1e-5, min_lr 1e-6 → a floor of 1e-6, not 1e-11.
    got = lrs(30, 1e-5, 1e-6, 3)
    assert 1e-6 < min(got) == pytest.approx(1e-6, rel=0.05)
    # The "ratio" reading (min_lr 0.01 with lr 1e-5) would make the decay rise: refused.
    with pytest.raises(ValueError, match="absolute"):
        check_schedule(1e-5, 0.01, 30, 3)
    with pytest.raises(ValueError, match="warmup"):
        check_schedule(1e-3, 0, 10, 11)


def test_warmup_ratio_rounds_up_and_steps_override():
    assert warmup_steps_for(1000, 0.01) == 10
    assert warmup_steps_for(10, 0.05) == 1  # ceil: a ratio > 0 always warms up
    assert warmup_steps_for(10, 0.0) == 0
    assert warmup_steps_for(10, 0.5, warmup_steps=3) == 3


def test_scheduler_follows_lr_at_through_optimizer_steps():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=123.0)
    sched = build_scheduler(opt, learning_rate=2e-3, min_lr=2e-4, max_steps=25, warmup=5)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = lrs(25, 2e-3, 2e-4, 5)
    assert seen == pytest.approx(want, rel=1e-12)
    # state round trip (what DeepSpeed checkpoints hold)
    opt2 = torch.optim.AdamW([p], lr=1.0)
    sched2 = build_scheduler(opt2, learning_rate=2e-3, min_lr=2e-4, max_steps=25, warmup=5)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.last_epoch == sched.last_epoch


def test_zero_min_lr_is_plain_cosine_with_linear_warmup():
    got = lrs(11, 1.0, 0.0, 0)
    want = [0.5 * (1 + math.cos(math.pi * s / 11)) for s in range(11)]
    assert got == pytest.approx(want) and got[-1] > 0  # --min_lr 0: the last step is not at lr 0
    assert lrs(4, 1.0, 0.0, 4) == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_scheduler_kinds_match_hf_formulas():
    # HF get_*_schedule_with_warmup with warmup 0: linear (1 - s/N), constant 1; ours add the floor
    n = 10
    assert lrs(n, 1.0, 0.0, 0, "linear") == pytest.approx([1 - s / n for s in range(n)])
    assert lrs(n, 1.0, 0.1, 0, "linear") == pytest.approx([0.1 + 0.9 * (1 - s / n) for s in range(n)])
    assert lrs(n, 1.0, 0.0, 3, "constant") == [1.0] * n  # HF constant: no warmup
    assert lrs(n, 1.0, 0.0, 4, "constant_with_warmup") == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)
    assert lrs(n, 1.0, 0.1, 2, "cosine_with_min_lr") == lrs(n, 1.0, 0.1, 2, "cosine")
