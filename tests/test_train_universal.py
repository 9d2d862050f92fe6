"""Resume on another world size through DeepSpeed's universal checkpoint (train/universal.py).

The real thing on CPU: 2 ranks (torchrun, gloo) train a tiny model 3 steps with ZeRO, save
`checkpoint-3`, take step 4 and save `checkpoint-4`. The 2-rank checkpoint-3 is converted and
loaded on 1 rank with {"checkpoint": {"load_universal": true}} (through train.universal.load_universal,
which keeps the param groups' own weight decay: the trainer's decay / no-decay groups):
- its parameters equal the fp32 weights zero_to_fp32 consolidates from the 2-rank checkpoint-3;
- one more step on 1 rank over the same global batch (both ranks' rows) equals the 2-rank step 4
  (zero_to_fp32 of checkpoint-4): the Adam moments, step count and lr schedule came through.
End to end through `python -m train`, a 2-rank run resumes on 1 rank (ZeRO-3) and on 4 ranks
(ZeRO-3 and ZeRO-2), each new rank's stream continuing from every old rank's saved position,
and the universal checkpoint resumed on the old 2 ranks gives the uninterrupted run's losses.
This file is also the worker script (`python tests/test_train_universal.py save|load ...`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROWS, SEQ, LR = 2, 32, 3e-3  # rows per rank per step


def _model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    sys.path.insert(0, str(HERE))
    from test_train_helpers import TINY
    cfg = dict(TINY)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def _global_batch(step: int):
    """The global step's rows (both ranks'), a pure function of the step."""
    import torch
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(5, 6000, (2 * ROWS, SEQ), generator=g)


def _engine(stage: int, world: int, universal: bool, n_groups: int):
    import deepspeed
    import torch
    model = _model()
    # the trainer's groups: weight decay on matrices only
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.01},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    if n_groups == 1:
        groups = [{"params": list(model.parameters()), "weight_decay": 0.01}]
    opt = torch.optim.AdamW(groups, lr=LR, weight_decay=0.01)
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / 4))  # warmup 4
    cfg = {"train_micro_batch_size_per_gpu": 2 * ROWS // world, "gradient_accumulation_steps": 1,
           "train_batch_size": 2 * ROWS, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": stage}}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      lr_scheduler=sched, config=cfg)
    return engine


def _step(engine, step: int, rank: int, world: int) -> None:
    rows = _global_batch(step)
    per = rows.shape[0] // world
    ids = rows[rank * per:(rank + 1) * per]
    loss = engine(input_ids=ids, labels=ids).loss  # every row has SEQ tokens: rank means average exactly
    engine.backward(loss)
    engine.step()


def _gathered(engine, stage: int) -> dict:
    import deepspeed
    out = {}
    for name, p in engine.module.named_parameters():
        if stage == 3:
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = p.data.detach().float().clone()
        else:
            out[name] = p.data.detach().float().clone()
    return out


def worker(argv: list[str]) -> None:
    import torch
    import torch.distributed as dist
    import deepspeed
    mode, out, stage, n_groups = argv[0], Path(argv[1]), int(argv[2]), int(argv[3])
    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "save":  # 2 ranks: steps 1-3, checkpoint-3, step 4, checkpoint-4
        engine = _engine(stage, world, universal=False, n_groups=n_groups)
        for step in range(1, 5):
            _step(engine, step, rank, world)
            if step >= 3:
                engine.save_checkpoint(str(out), tag=f"checkpoint-{step}", save_latest=False)
    else:  # 1 rank: load the universal checkpoint-3, record, then step 4
        engine = _engine(stage, world, universal=True, n_groups=n_groups)
        from train.universal import load_universal
        path, _ = load_universal(engine, out)
        assert path is not None, "load_checkpoint returned None"
        decay = [g["weight_decay"] for g in engine.optimizer.param_groups]
        assert decay == ([0.01, 0.0] if n_groups == 2 else [0.01]), decay  # DeepSpeed's ZeRO-3 universal load alone gives [0.01, 0.01]
        loaded = _gathered(engine, stage)
        lr_loaded = engine.get_lr()[0]
        _step(engine, 4, rank, world)
        torch.save({"loaded": loaded, "after_step4": _gathered(engine, stage), "lr": lr_loaded,
                    "global_steps": engine.global_steps}, out.parent / f"resumed-{out.name}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT), **extra)
    return env


def _run(cmd, env) -> None:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"


def _save_two_ranks(out: Path, stage: int, n_groups: int) -> None:
    sys.path.insert(0, str(HERE))
    from test_train_helpers import free_port
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          str(free_port()), str(Path(__file__)), "save", str(out), str(stage), str(n_groups)], _env())


def _load_one_rank(universal: Path, stage: int, n_groups: int) -> dict:
    import torch
    sys.path.insert(0, str(HERE))
    from test_train_helpers import free_port
    _run([sys.executable, str(Path(__file__)), "load", str(universal), str(stage), str(n_groups)],
         _env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())))
    return torch.load(universal.parent / f"resumed-{universal.name}.pt", weights_only=False)


if __name__ == "__main__":
    worker(sys.argv[1:])
    sys.exit(0)

# ---------------------------------------------------------------------------- tests
import pytest  # noqa: E402

from train.universal import (MARKER, UniversalError, convert_to_universal, missing_state_file,  # noqa: E402
                             needs_universal, refusal, saved_world_size)


def _fp32(ckpt: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


@pytest.mark.slow
@pytest.mark.parametrize("stage,n_groups", [(3, 1), (3, 2), (2, 2)])  # 2 groups: the trainer's decay split
def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path, stage, n_groups):
    import torch
    out = tmp_path / f"zero{stage}"
    _save_two_ranks(out, stage, n_groups)
    ck3 = out / "checkpoint-3"
    assert saved_world_size(ck3) == 2
    assert needs_universal(ck3, 1) and not needs_universal(ck3, 2)
    (ck3 / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 2}))
    (ck3 / "stream_state_rank00000.json").write_text("{}")
    uni = convert_to_universal(ck3)
    assert uni == out / "checkpoint-3-universal"
    # every parameter's state is where train.universal.load_universal checks for it (names as DeepSpeed's)
    assert missing_state_file(uni, [n for n, _ in _model().named_parameters()]) is None
    assert json.loads((uni / MARKER).read_text()) == {"source": "checkpoint-3", "world_size": 2,
                                                        "zero_stage": stage}
    assert (uni / "trainer_state.json").is_file() and (uni / "stream_state_rank00000.json").is_file()
    assert not needs_universal(uni, 1) and convert_to_universal(ck3) == uni  # reused
    got = _load_one_rank(uni, stage, n_groups)
    ref3, ref4 = _fp32(ck3), _fp32(out / "checkpoint-4")
    assert set(got["loaded"]) == set(ref3)
    assert got["global_steps"] == 4
    assert got["lr"] == pytest.approx(LR * 1.0)  # warmup: step 4 of the schedule, not step 1 (0.25*LR)
    for name, ref in ref3.items():
        torch.testing.assert_close(got["loaded"][name], ref.float(), rtol=0, atol=0, msg=name)
    moved = 0
    for name, ref in ref4.items():
        torch.testing.assert_close(got["after_step4"][name], ref.float(), rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(ref.float(), ref3[name].float()))
    assert moved == len(ref4)  # step 4 changed every parameter: the comparison is not vacuous


def test_world_size_read_from_deepspeed_files(tmp_path):
    ck = tmp_path / "checkpoint-8"
    ck.mkdir()
    with pytest.raises(UniversalError, match="not a DeepSpeed ZeRO checkpoint"):
        saved_world_size(ck)
    for r in (0, 1, 2, 3):
        (ck / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_world_size(ck) == 4 and needs_universal(ck, 1) and not needs_universal(ck, 4)
    (ck / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(UniversalError, match=r"ranks \[0, 1, 3\] only"):
        saved_world_size(ck)


def test_failed_conversion_is_one_line_naming_the_alternatives(tmp_path):
    ck = tmp_path / "checkpoint-2"
    ck.mkdir()
    for r in (0, 1):  # files DeepSpeed cannot read: the converter fails
        (ck / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"not a torch file")
    with pytest.raises(UniversalError) as e:
        convert_to_universal(ck)
    msg = str(e.value)
    assert "\n" not in msg and "saved by 2 ranks" in msg
    assert "resume with 2 ranks" in msg and "zero_to_fp32.py" in msg and "--model_name_or_path" in msg
    assert not (tmp_path / "checkpoint-2-universal").exists()
    assert not list(tmp_path.glob(".checkpoint-2-universal*"))
    assert "ZeRO-2" in refusal(ck, 2, 2)


def _stream_steps(lock, seq_len: int, rows: int, world: int, steps: int, states: list) -> list:
    """Per optimizer step (gas 1): trained tokens over the ranks and samples per task, as the
    stream gives them on `world` ranks resumed from every old rank's state - what the resumed
    run must train (tests/test_stream.py: this repeats and loses nothing)."""
    from collections import Counter
    from train.stream import MixtureStream
    out = [[0, Counter()] for _ in range(steps)]
    for r in range(world):
        ld = MixtureStream(lock, seq_len, rank=r, world_size=world, batch_size=rows).loader()
        ld.load_state_dict(states)
        for k, b in zip(range(steps), ld):
            out[k][0] += int((b["labels"] != -100).sum())
            for d, _ in b["samples"].tolist():
                out[k][1][ld.stream.datasets[d].task] += 1
    return out


def _check_resumed_elsewhere(two: Path, other: Path, lock, seq_len: int, rows: int, world: int) -> None:
    """The run resumed on `world` ranks trained, step by step, what the stream re-planned from
    every old rank's saved position gives, and kept the lr schedule."""
    from test_train_helpers import read_log
    ref, _ = read_log(two)
    got, _ = read_log(other)
    assert sorted(got) == [4, 5, 6]
    states = [json.loads(f.read_text()) for f in sorted((two / "checkpoint-3").glob("stream_state_rank*.json"))]
    assert [st["rank"] for st in states] == [0, 1]
    want = _stream_steps(lock, seq_len, rows, world, 3, states)
    for s in (4, 5, 6):
        tokens, per_task = want[s - 4]
        assert got[s]["trained_tokens_step"] == tokens, (s, got[s], want)
        if "datasets" in got[s]:
            assert {n: d["samples"] for n, d in got[s]["datasets"].items() if d["samples"]} == dict(per_task), s
        assert got[s]["lr"] == pytest.approx(ref[s]["lr"], rel=1e-9)
    assert got[6]["trained_tokens"] == ref[3]["trained_tokens"] + sum(w[0] for w in want)


def _check_universal_on_same_world(two: Path, common: list, rows: int) -> None:
    """The converted checkpoint-3-universal resumed on the 2 ranks that saved it: the same rows
    as the uninterrupted run (each rank's own stream position), so its losses must match it -
    weights and optimizer state (moments, step, per-group weight decay) came through
    train.universal.load_universal (DeepSpeed's own universal load gives every param group
    group 0's settings: step 6 off by 3e-4)."""
    from test_train_helpers import read_log, run_train
    again = two.parent / "again"
    run_train([*common, "--output_dir", str(again), "--per_device_train_batch_size", str(rows),
               "--save_steps", "100", "--resume_from_checkpoint", str(two / "checkpoint-3-universal")],
              nproc=2, launcher="torchrun")
    ref, _ = read_log(two)
    got, _ = read_log(again)
    table = [(s, ref[s]["loss"], got[s]["loss"]) for s in (4, 5, 6)]
    for s in (4, 5, 6):
        assert got[s]["trained_tokens_step"] == ref[s]["trained_tokens_step"], s
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6), table


@pytest.mark.slow
def test_train_resumes_two_rank_zero3_on_one_rank(tmp_path):
    """`python -m train` end to end: a 2-rank ZeRO-3 run (2 rows per rank) saved at step 3 resumes on
    1 rank with 4 rows per step through the universal checkpoint; its data stream continues from
    both ranks' saved positions (nothing repeated or lost), and the universal checkpoint carries
    the optimizer state (checked where the rows are the same: the same 2 ranks)."""
    sys.path.insert(0, str(HERE))
    from test_train_helpers import build_sample_lock, run_train, tiny_config
    lock, cfg = build_sample_lock(tmp_path / "data"), tiny_config(tmp_path)
    common = ["--deepspeed", "zero3", "--mixture", str(lock), "--model_config", str(cfg), "--max_steps", "6",
              "--max_seq_length", "128", "--learning_rate", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "2",
              "--logging_steps", "1", "--report_to", "none"]
    two, one = tmp_path / "two", tmp_path / "one"
    run_train([*common, "--output_dir", str(two), "--per_device_train_batch_size", "2", "--save_steps", "3"],
              nproc=2, launcher="torchrun")
    p = run_train([*common, "--output_dir", str(one), "--per_device_train_batch_size", "4", "--save_steps", "100",
                   "--resume_from_checkpoint", str(two / "checkpoint-3")])
    assert (two / "checkpoint-3-universal" / MARKER).is_file(), p.stderr[-2000:]
    _check_resumed_elsewhere(two, one, lock, 128, 4, 1)
    _check_universal_on_same_world(two, common, 2)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero3", "zero2"])
def test_train_resumes_two_rank_run_on_four_ranks(tmp_path, stage):
    """`python -m train` end to end, the other direction: a 2-rank run (4 rows per rank) saved at
    step 3 resumes on 4 ranks with 2 rows per rank (weights and optimizer state re-sharded 4 ways
    through the universal checkpoint); the 4 new ranks' streams continue from both old ranks'
    positions, and the universal checkpoint on the old 2 ranks reproduces the uninterrupted losses."""
    sys.path.insert(0, str(HERE))
    from test_train_helpers import build_sample_lock, run_train, tiny_config
    lock, cfg = build_sample_lock(tmp_path / "data"), tiny_config(tmp_path)
    common = ["--deepspeed", stage, "--mixture", str(lock), "--model_config", str(cfg), "--max_steps", "6",
              "--max_seq_length", "64", "--learning_rate", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "2",
              "--logging_steps", "1", "--report_to", "none"]
    two, four = tmp_path / "two", tmp_path / "four"
    run_train([*common, "--output_dir", str(two), "--per_device_train_batch_size", "4", "--save_steps", "3"],
              nproc=2, launcher="torchrun")
    p = run_train([*common, "--output_dir", str(four), "--per_device_train_batch_size", "2", "--save_steps", "100",
                   "--resume_from_checkpoint", str(two / "checkpoint-3")], nproc=4, launcher="torchrun")
    assert (two / "checkpoint-3-universal" / MARKER).is_file(), p.stderr[-2000:]
    _check_resumed_elsewhere(two, four, lock, 64, 2, 4)
    _check_universal_on_same_world(two, common, 4)
