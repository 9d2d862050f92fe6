"""Resume faults are one line naming the file, never silent (issue 25): a universal checkpoint
missing a parameter's fp32.pt, damaged torch-engine / RNG / stream / trainer state files, a
checkpoint from another lock, and damage the stream finds at the first batch of a run."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from stream_fixtures import standard_mixture  # noqa: E402

from train.args import TrainError  # noqa: E402
from train.checkpoint import Checkpointer, RNGState  # noqa: E402
from train.stream import MixtureStream  # noqa: E402
from train.torch_engine import STATE_FILE, TorchEngine  # noqa: E402
from train.trainer import TrainState  # noqa: E402
from train.universal import UniversalError, load_universal, missing_state_file  # noqa: E402

NO_SAVE = SimpleNamespace(save_pretrained=lambda *a, **k: None)


def _engine(seed: int = 0) -> TorchEngine:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model.config = NO_SAVE  # Checkpointer.save writes the model's config.json beside the states
    eng = TorchEngine(model, lambda g: torch.optim.AdamW(g, lr=1e-2),
                      lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0),
                      gradient_accumulation_steps=1, gradient_clipping=1.0, device=torch.device("cpu"))
    return eng.init([{"params": list(model.parameters()), "weight_decay": 0.0}])


def _parts(lock: Path) -> dict:
    return {"trainer": TrainState(), "stream": MixtureStream(lock, 64, batch_size=2).loader(),
            "rng": RNGState()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """OUT/checkpoint-2 written by Checkpointer.save after two steps over a fixture mixture, and
    another lock over other data."""
    root = tmp_path_factory.mktemp("faults")
    lock = standard_mixture(root / "mix")
    other = standard_mixture(root / "other", seed=99)
    eng, parts = _engine(), _parts(lock)
    it = iter(parts["stream"])
    for _ in range(2):
        next(it)
        eng.backward(eng(torch.randn(3, 4)).pow(2).sum())
        eng.step()
    parts["trainer"].step = 2
    ck = Checkpointer(root / "out", rank=0, world_size=1, save_total_limit=None, tokenizer=NO_SAVE,
                      tokenizer_dir=None)
    return ck.save(eng, 2, parts), lock, other


def _load(ckpt: Path, lock: Path):
    ck = Checkpointer(ckpt.parent, rank=0, world_size=1, save_total_limit=None, tokenizer=NO_SAVE,
                      tokenizer_dir=None)
    eng, parts = _engine(seed=1), _parts(lock)
    ck.load(eng, ckpt, parts, zero_stage=0)
    return eng, parts


def _damaged(saved, tmp_path, name: str, data: bytes) -> Path:
    ckpt = tmp_path / "out" / "checkpoint-2"
    shutil.copytree(saved[0], ckpt)
    (ckpt / name).write_bytes(data)
    return ckpt


def _one_line(e, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_a_checkpoint_resumes_as_saved(saved):
    ckpt, lock, _ = saved
    eng, parts = _load(ckpt, lock)
    want = torch.load(ckpt / STATE_FILE, weights_only=True)["module"]
    for k, v in eng.module.state_dict().items():
        assert torch.equal(v, want[k])
    assert parts["trainer"].step == 2 and parts["stream"].state_dict() == json.loads(
        (ckpt / "stream_state_rank00000.json").read_text())


@pytest.mark.parametrize("name,data", [
    (STATE_FILE, None),  # truncated
    ("rng_state_rank00000.pt", b"not a torch file"),
    ("stream_state_rank00000.json", b'{"version": '),
    ("trainer_state.json", b"{}"),
])
def test_a_damaged_state_file_is_one_line_naming_it(saved, tmp_path, name, data):
    if data is None:
        data = (saved[0] / name).read_bytes()[:200]
    ckpt = _damaged(saved, tmp_path, name, data)
    with pytest.raises(TrainError) as e:
        _load(ckpt, saved[1])
    _one_line(e, ckpt / name)


def test_a_checkpoint_of_another_lock_is_one_line(saved):
    ckpt, _, other = saved
    with pytest.raises(TrainError) as e:
        _load(ckpt, other)
    msg = _one_line(e, ckpt / "stream_state_rank00000.json")
    assert "lock" in msg and "--allow_lock_change" in msg


def _universal_dir(root: Path, names: list[str], kinds=("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt")) -> Path:
    for n in names:
        (root / "zero" / n).mkdir(parents=True)
        for k in kinds:
            torch.save(torch.zeros(1), root / "zero" / n / k)
    return root


def test_a_universal_checkpoint_missing_a_parameter_is_refused_naming_the_file(tmp_path):
    eng = _engine()
    names = [n for n, _ in eng.module.named_parameters()]
    uni = _universal_dir(tmp_path / "checkpoint-3-universal", names)
    assert missing_state_file(uni, names) is None
    for kind in ("fp32.pt", "exp_avg_sq.pt"):
        gone = uni / "zero" / names[2] / kind
        gone.unlink()
        assert missing_state_file(uni, names) == gone

        def never(*a, **k):
            raise AssertionError("DeepSpeed's load must not run: it would skip the parameter silently")
        eng.load_checkpoint = never
        with pytest.raises(UniversalError) as e:
            load_universal(eng, uni)
        assert _one_line(e, gone).count(names[2]) >= 1
        torch.save(torch.zeros(1), gone)
    eng.module[0].weight.requires_grad_(False)  # frozen: not in the optimizer, not required
    shutil.rmtree(uni / "zero" / names[0])
    assert missing_state_file(uni, [n for n, p in eng.module.named_parameters() if p.requires_grad]) is None


@pytest.mark.slow
def test_damage_found_at_the_first_batch_is_one_error_line(tmp_path):
    """A token id >= the vocabulary in a shard whose sizes and meta.json are valid (--verify_data
    cheap does not hash): the stream finds it reading the first batch; the run stops with one line."""
    from test_train_helpers import build_sample_lock, run_train, tiny_config
    lock = build_sample_lock(tmp_path / "data")
    doc = json.loads(lock.read_text())
    entry = doc["datasets"][1]  # pretrain_en
    copy = tmp_path / "ds"
    shutil.copytree(entry["path"], copy)
    meta = json.loads((copy / "meta.json").read_text())
    shard = meta["shards"][0]
    tokens = shard["arrays"]["tokens"]
    data = bytearray((copy / shard["file"]).read_bytes())
    width = {"uint16": 2, "int32": 4, "uint32": 4}[tokens["dtype"]]
    data[tokens["offset"]:tokens["offset"] + width] = b"\xff" * width  # a token id of 65535 (> 6000)
    (copy / shard["file"]).write_bytes(bytes(data))
    entry["path"] = str(copy)
    edited = tmp_path / "mixture.lock.json"
    edited.write_text(json.dumps(doc))
    p = run_train(["--mixture", str(edited), "--model_config", str(tiny_config(tmp_path)), "--output_dir",
                   str(tmp_path / "o"), "--max_steps", "2", "--max_seq_length", "128", "--engine", "torch",
                   "--save_strategy", "no"], check=False)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[-1].startswith("error: ") and shard["file"] in lines[-1] and "vocab" in lines[-1], lines[-1]
    assert sum(ln.startswith("error:") for ln in lines) == 1


def test_a_stream_fault_from_a_dataloader_worker_is_its_own_line():
    """torch re-raises a worker's StreamError with the worker's traceback in the message; the
    trainer's `error:` line is the fault itself."""
    from torch._utils import ExceptionWrapper

    from train.stream import StreamError
    from train.trainer import stream_fault
    line = "/data/ds/shard-00000.h5: token id 65535 >= vocab size 6000 in sample 3 of dataset 'pt'"
    try:
        raise StreamError(line)
    except StreamError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(StreamError) as e:
        wrapped.reraise()
    assert "Traceback" in str(e.value) and stream_fault(e.value) == line
    assert stream_fault(StreamError(line)) == line
