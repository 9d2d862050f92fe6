"""Evaluation over a mixture whose datasets share tasks (5 datasets in 2 tasks), in every packing
mode, on one rank and on two (gloo): no crash (issue 25: `evaluate` once built its totals without
the dataset -> task map and died after a run's last step), and the per-task figures are the
held-out split's own: a task's loss equals the loss of a mixture of that task's datasets alone,
computed here with plain cross-entropy; tokens and samples add up to the totals.

The model is a bigram table (a token's logits depend on that token only), so a document's loss
does not depend on how rows are packed or split over ranks."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from stream_fixtures import VOCAB, make_dataset, make_lock  # noqa: E402
from test_train_helpers import free_port  # noqa: E402

from train.loop import Tasks, evaluate  # noqa: E402
from train.stream import MixtureStream  # noqa: E402

SEQ, ROWS, PCT = 64, 3, 20.0
TASK = {"a0": "alpha", "b0": "beta", "a1": "alpha", "b1": "beta", "a2": "alpha"}  # interleaved


class Bigram(torch.nn.Module):
    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids, use_cache=False, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.table(input_ids))


def _lock(root: Path, names: list[str], path: Path) -> Path:
    dirs = {n: make_dataset(root, n, [5 + (7 * k + 11 * i) % 56 for k in range(40)], seed=i,
                            spans="none" if n == "b1" else "sft", max_length=SEQ)
            for i, n in enumerate(TASK)}
    lock = make_lock(path, [{"dir": dirs[n], "abs_weight": 1.0, "name": n} for n in names], max_length=SEQ)
    doc = json.loads(lock.read_text())
    for d in doc["datasets"]:
        d["task_name"] = TASK[d["dataset_name"]]
    lock.write_text(json.dumps(doc))
    return lock


@pytest.fixture(scope="module")
def locks(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_mix")
    full = _lock(root, list(TASK), root / "all.lock.json")
    per_task = {t: _lock(root, [n for n in TASK if TASK[n] == t], root / f"{t}.lock.json") for t in ("alpha", "beta")}
    return full, per_task


def _stream(lock, mode, rank=0, world=1):
    return MixtureStream(lock, SEQ, rank=rank, world_size=world, mode=mode, batch_size=ROWS,
                         validation_percentage=PCT)


def _evaluate(lock, mode, rank=0, world=1) -> dict:
    stream = _stream(lock, mode, rank, world)
    tasks = Tasks.of_datasets([ds.task for ds in stream.datasets])
    return evaluate(Bigram(), stream, None, False, tasks)


def _plain_loss(lock, mode) -> tuple[float, int]:
    """Token-mean cross-entropy over the held-out split, straight from the batches."""
    model, total, n = Bigram(), 0.0, 0
    with torch.no_grad():
        for b in _stream(lock, mode).eval_batches():
            logits, labels = model(b["input_ids"]).logits[:, :-1], b["labels"][:, 1:]
            total += float(F.cross_entropy(logits.reshape(-1, VOCAB).double(), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum"))
            n += int((labels != -100).sum())
    return total / n, n


def _held_out(lock, mode) -> dict:
    out = {}
    for ds in _stream(lock, mode).datasets:
        out[ds.task] = out.get(ds.task, 0) + ds.n - ds.n_train
    return out


def _check_sums(res: dict, held: dict, mode: str) -> None:
    per = res["datasets"]
    assert list(per) == ["alpha", "beta"]
    assert sum(d["eval_trained_tokens"] for d in per.values()) == res["eval_tokens"] > 0
    weighted = sum(d["eval_loss"] * d["eval_trained_tokens"] for d in per.values())
    assert weighted / res["eval_tokens"] == pytest.approx(res["eval_loss"], rel=1e-12)
    got = {t: d["eval_samples"] for t, d in per.items()}
    if mode == "concat":  # a document cut over two blocks is a sample of each
        assert all(held[t] <= got[t] for t in held), (got, held)
    else:
        assert got == held


@pytest.mark.parametrize("mode", ["packed", "padded", "concat"])
def test_evaluate_reports_tasks_of_a_mixture_with_more_datasets(locks, mode):
    full, per_task = locks
    res = _evaluate(full, mode)
    held = _held_out(full, mode)
    assert all(held.values())
    _check_sums(res, held, mode)
    loss, n = _plain_loss(full, mode)
    assert res["eval_tokens"] == n and res["eval_loss"] == pytest.approx(loss, rel=1e-6)
    if mode != "concat":  # concat cuts blocks across documents: a task alone is cut elsewhere
        for task, lock in per_task.items():
            loss, n = _plain_loss(lock, mode)
            d = res["datasets"][task]
            assert d["eval_trained_tokens"] == n and d["eval_loss"] == pytest.approx(loss, rel=1e-6), task


def _two_rank_worker(rank: int, port: int, lock: str, out: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        res = {mode: _evaluate(lock, mode, rank, 2) for mode in ("packed", "padded", "concat")}
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_evaluate_on_two_ranks_matches_one(locks, tmp_path):
    """Each held-out sample is evaluated once over the ranks: the same per-task figures."""
    import torch.multiprocessing as mp
    full, _ = locks
    out = tmp_path / "two.json"
    mp.spawn(_two_rank_worker, args=(free_port(), str(full), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    for mode, res in two.items():
        _check_sums(res, _held_out(full, mode), mode)
        if mode == "concat":
            continue
        one = _evaluate(full, mode)
        assert res["eval_tokens"] == one["eval_tokens"], mode
        for task, d in one["datasets"].items():
            assert res["datasets"][task]["eval_trained_tokens"] == d["eval_trained_tokens"], (mode, task)
            assert res["datasets"][task]["eval_loss"] == pytest.approx(d["eval_loss"], rel=1e-9), (mode, task)
