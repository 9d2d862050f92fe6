"""The plain-PyTorch engine (train/torch_engine.py) for one-process runs: the same losses, grad
norms and lr as DeepSpeed's single-rank ZeRO-2 run (fp32 CPU), exact resume, refusal of the
other engine's checkpoint in one line, the engine rule, and the curves PNG at the end of a run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from test_train_helpers import build_sample_lock, read_log, run_train, tiny_config

SEQ, BS = 128, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_engine")
    return build_sample_lock(root / "data"), tiny_config(root), root


def args(lock, cfg, out, steps, *extra):
    # accumulation 2, clipping that bites (norms are ~1-4), weight decay on the 2-D group only,
    # warmup then cosine: every part of step() that DeepSpeed does
    return ["--mixture", str(lock), "--model_config", str(cfg), "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_train_batch_size", str(BS), "--max_seq_length", str(SEQ),
            "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5", "--weight_decay", "0.1",
            "--learning_rate", "3e-3", "--min_lr", "3e-4", "--warmup_steps", "2", "--report_to", "none",
            *extra]


@pytest.fixture(scope="module")
def runs(setup):
    """6 steps with each engine, a checkpoint at step 3 (the DeepSpeed one is reused below)."""
    lock, cfg, root = setup
    out = {}
    for engine in ("deepspeed", "torch"):
        out[engine] = root / f"run_{engine}"
        p = run_train(args(lock, cfg, out[engine], 6, "--engine", engine, "--save_steps", "3"))
        assert f"engine: {engine}" in p.stderr
    return out


def test_torch_engine_matches_deepspeed_single_rank(runs):
    ds, pt = read_log(runs["deepspeed"])[0], read_log(runs["torch"])[0]
    assert sorted(ds) == sorted(pt) == list(range(1, 7))
    assert any(ds[s]["grad_norm"] > 0.5 for s in ds)  # clipping was in play
    for s in ds:
        for k in ("loss", "grad_norm", "lr"):
            assert pt[s][k] == pytest.approx(ds[s][k], rel=1e-6, abs=1e-7), (s, k, pt[s][k], ds[s][k])
        assert pt[s]["trained_tokens"] == ds[s]["trained_tokens"]
    a, b = load_file(runs["deepspeed"] / "model.safetensors"), load_file(runs["torch"] / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        # atol 1e-5 (0.3 % of one lr-3e-3 Adam step): Adam's m / (sqrt(v) + eps) turns ulp-level
        # differences of near-zero gradients (ZeRO's flat fp32 buffer vs per-tensor AdamW) into
        # update differences of a few 1e-6; the losses and grad norms above are equal to 1e-6
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    flags = json.loads((runs["torch"] / "train_args.json").read_text())
    assert flags["resolved_engine"] == "torch"
    assert (runs["torch"] / "checkpoint-3" / "torch_engine_state.pt").is_file()
    assert not list((runs["torch"] / "checkpoint-3").glob("*optim_states.pt"))


def test_auto_is_torch_in_one_process_and_the_curves_are_drawn(setup, runs):
    lock, cfg, root = setup
    out = root / "auto"
    p = run_train(args(lock, cfg, out, 2, "--save_strategy", "no"))
    assert "engine: torch" in p.stderr and "training curves:" in p.stderr
    png = out / "training_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (runs["deepspeed"] / "training_curves.png").is_file()  # the DeepSpeed path draws it too
    ref = read_log(runs["torch"])[0]
    assert read_log(out)[0][1]["loss"] == ref[1]["loss"]  # auto = torch: the same first step


def test_torch_engine_resume_is_exact(setup, runs):
    lock, cfg, root = setup
    out = root / "resumed"
    run_train(args(lock, cfg, out, 6, "--engine", "torch", "--save_steps", "3", "--stop_after_steps", "3"))
    assert sorted(read_log(out)[0]) == [1, 2, 3]
    run_train(args(lock, cfg, out, 6, "--save_steps", "3", "--resume_from_checkpoint", "latest"))  # auto
    resumed, ref = read_log(out)[0], read_log(runs["torch"])[0]
    for s in range(1, 7):  # fp32 on CPU: bit-identical
        for k in ("loss", "lr", "grad_norm", "trained_tokens"):
            assert resumed[s][k] == ref[s][k], (s, k, resumed[s][k], ref[s][k])
    final, final_ref = load_file(out / "model.safetensors"), load_file(runs["torch"] / "model.safetensors")
    assert all(torch.equal(final[k], final_ref[k]) for k in final_ref)


@pytest.mark.parametrize("saved,flag", [("torch", "deepspeed"), ("deepspeed", "torch")])
def test_the_other_engines_checkpoint_is_refused_in_one_line(setup, runs, saved, flag):
    lock, cfg, root = setup
    ckpt = runs[saved] / "checkpoint-3"
    p = run_train(args(lock, cfg, root / f"other_{saved}", 6, "--engine", flag, "--resume_from_checkpoint",
                       str(ckpt)), check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and str(ckpt) in err[0] and "--engine auto or " + saved in err[0], p.stderr[-2000:]


def test_engine_rule():
    from train.args import TrainError
    from train.ds_config import choose_engine, deepspeed_needed
    zero2 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "gradient_clipping": 1.0}
    assert deepspeed_needed(zero2, 1) is None
    assert choose_engine("auto", zero2, 1)[0] == "torch"
    assert choose_engine("auto", zero2, 2)[0] == "deepspeed"
    assert choose_engine("deepspeed", zero2, 1)[0] == "deepspeed"
    assert choose_engine("auto", zero2, 1, resume_engine="deepspeed")[0] == "deepspeed"
    for cfg in ({"zero_optimization": {"stage": 3}},
                {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
                {"zero_optimization": {"stage": 1}, "fp16": {"enabled": True}},
                {"zero_optimization": {"stage": 0}, "optimizer": {"type": "AdamW"}}):
        assert choose_engine("auto", cfg, 1)[0] == "deepspeed", cfg
        with pytest.raises(TrainError, match="--engine torch: this run needs DeepSpeed"):
            choose_engine("torch", cfg, 1)
    with pytest.raises(TrainError, match="2 ranks"):
        choose_engine("torch", zero2, 2)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_step_semantics_against_plain_torch():
    """gas 2, clipping, two param groups, bf16 off: the engine's update equals AdamW on the mean
    of the two micro-batch gradients clipped to max_norm / (norm + 1e-6), and the lr moves once."""
    from train.torch_engine import TorchEngine
    x, y = torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), torch.randn(4, 3)

    def groups(m):
        return [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]

    def opt(g):
        return torch.optim.AdamW(g, lr=0.1, betas=(0.9, 0.95), eps=1e-8)

    def sched(o):
        return torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1))

    eng = TorchEngine(_tiny_model(), opt, sched, gradient_accumulation_steps=2, gradient_clipping=0.05,
                      device=torch.device("cpu"))
    eng.init(groups(eng.module))
    ref = _tiny_model()
    ref_opt = opt(groups(ref))
    ref_sched = sched(ref_opt)
    for _ in range(3):
        assert eng.get_lr() == [g["lr"] for g in ref_opt.param_groups]
        for k in range(2):
            eng.backward(((eng(x[2 * k:2 * k + 2]) - y[2 * k:2 * k + 2]) ** 2).sum())
            eng.step()
        loss = sum(((ref(x[2 * k:2 * k + 2]) - y[2 * k:2 * k + 2]) ** 2).sum() for k in range(2)) / 2
        loss.backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in ref.parameters()))
        for p in ref.parameters():
            p.grad.mul_(min(1.0, 0.05 / (float(norm) + 1e-6)))
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
        assert eng.get_global_grad_norm() == pytest.approx(float(norm), rel=1e-6)
        for a, b in zip(eng.module.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert eng.global_steps == 3 and eng.micro_steps == 6


def test_bf16_keeps_fp32_masters_and_round_trips(tmp_path):
    from train.torch_engine import TorchEngine

    def build():
        e = TorchEngine(_tiny_model(), lambda g: torch.optim.AdamW(g, lr=1e-3),
                        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
                        gradient_accumulation_steps=1, gradient_clipping=1.0, bf16=True, device=torch.device("cpu"))
        return e.init([{"params": list(e.module.parameters()), "weight_decay": 0.0}])

    x = torch.randn(4, 4)
    eng = build()
    assert all(p.dtype == torch.bfloat16 for p in eng.module.parameters())
    assert all(p.dtype == torch.float32 for g in eng.optimizer.param_groups for p in g["params"])
    for _ in range(2):
        eng.backward(eng(x.bfloat16()).float().pow(2).sum())
        eng.step()
    eng.save_checkpoint(str(tmp_path), tag="checkpoint-2", client_state={"step": 2})
    other = build()
    path, client = other.load_checkpoint(str(tmp_path), tag="checkpoint-2")
    assert path and client == {"step": 2}
    for a, b in zip(eng.optimizer.param_groups[0]["params"], other.optimizer.param_groups[0]["params"]):
        assert torch.equal(a, b)
    assert other.load_checkpoint(str(tmp_path), tag="checkpoint-9") == (None, None)


def test_a_torch_engine_checkpoint_on_two_ranks_is_refused_in_one_line(setup, runs):
    """Another world size needs DeepSpeed, which cannot read the torch engine's states: every rank
    stops before any model is built, with one line naming how to resume."""
    lock, cfg, root = setup
    ckpt = runs["torch"] / "checkpoint-3"
    p = run_train(args(lock, cfg, root / "two_ranks", 6, "--resume_from_checkpoint", str(ckpt)), nproc=2,
                  launcher="torchrun", check=False)
    assert p.returncode != 0
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("[rank 0] error:")]
    assert len(err) == 1, p.stderr[-3000:]
    assert str(ckpt) in err[0] and "2 ranks" in err[0] and "--engine auto or torch, in one process" in err[0]


def test_bf16_matches_deepspeed_with_one_micro_batch(setup):
    """bf16 parameters, fp32 buffers and masters on both sides: with one micro-batch per step the
    engines agree to float rounding (with accumulation they sum in fp32 vs bf16; see torch_engine)."""
    lock, cfg, root = setup
    logs = {}
    for engine in ("deepspeed", "torch"):
        out = root / f"bf16_{engine}"
        run_train(args(lock, cfg, out, 3, "--engine", engine, "--bf16", "--gradient_accumulation_steps", "1",
                       "--save_strategy", "no"))
        logs[engine] = read_log(out)[0]
    for s in (1, 2, 3):
        for k in ("loss", "grad_norm"):
            assert logs["torch"][s][k] == pytest.approx(logs["deepspeed"][s][k], rel=1e-5), (s, k)
