"""HF datasets on disk (issue 24): a `save_to_disk` dir (Arrow) and a hub-cache snapshot
(`data/*.parquet`) build the same tokens as the JSON export of the same rows."""
from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from pipeline.build import build_mixture
from stages.errors import BuildError
from stages.readers import expand_source, iter_unit, plan_units
from stages.shard import read_shard

from conftest import SAMPLE

datasets = pytest.importorskip("datasets", reason="the test extra's `datasets` writes the HF layouts")


def _rows(n=300):
    return [{"instruction": f"question {i}: " + "词" * (i % 7) + " why?", "input": "" if i % 3 else f"ctx {i}",
             "output": f"answer number {i} " + "x" * (i % 11)} for i in range(n)]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    rows = _rows()
    (root / "rows.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(root / "saved"), max_shard_size="8KB")  # several Arrow files
    snap = root / "snapshot" / "data"
    snap.mkdir(parents=True)
    for k in range(2):
        ds.shard(2, k, contiguous=True).to_parquet(str(snap / f"train-0000{k}-of-00002.parquet"))
    (root / "snapshot" / "README.md").write_text("---\nlicense: mit\n---\n")
    return root, rows


def _tokens(plan) -> list[list[int]]:
    out = []
    for s in plan.meta["shards"]:
        arr = read_shard(plan.entry.final / s["file"], mmap=False)
        out += [np.asarray(arr.sample(i)).tolist() for i in range(arr.n_samples)]
    return out


def test_save_to_disk_and_snapshot_build_the_json_exports_tokens(layouts, tmp_path):
    root, rows = layouts
    assert len(expand_source(str(root / "saved"))) > 1  # the dataset_info/state json are not records
    entries = [{"dataset_name": n, "task_name": "sft", "abs_weight": 1.0, "path": str(root / p)}
               for n, p in (("json", "rows.jsonl"), ("saved", "saved"), ("snapshot", "snapshot"))]
    (tmp_path / "mix.json").write_text(json.dumps({"tokenizer": str(SAMPLE / "tokenizer"), "template": "chatml",
                                                   "max_length": 256, "seed": 1, "datasets": entries}))
    _, plans, _ = build_mixture(str(tmp_path / "mix.json"), out=str(tmp_path / "out"), workers=1)
    by = {p.spec.dataset_name: p for p in plans}
    want = _tokens(by["json"])
    assert by["json"].meta["nlines"] == len(rows) and len(want) == len(rows)
    for name in ("saved", "snapshot"):
        assert by[name].meta["records_read"] == len(rows), name
        assert _tokens(by[name]) == want, name
        assert by[name].meta["build"]["format"] == by["json"].meta["build"]["format"] == "alpaca"


def test_arrow_units_are_whole_batches_and_rows_keep_their_numbers(layouts):
    root, rows = layouts
    files = expand_source(str(root / "saved"))
    whole = [(u.file, r) for u in plan_units(files) for r in iter_unit(u)]
    small = plan_units(files, unit_bytes=1)  # one record batch a unit
    assert len(small) > len(files)
    assert [(u.file, r) for u in small for r in iter_unit(u)] == whole
    assert [r[1] for _, r in whole] == rows
    for f in files:  # provenance: the row number within its file
        assert [r[0] for g, r in whole if g == f] == list(range(sum(g == f for g, _ in whole)))


def test_several_splits_are_refused_not_mixed(layouts, tmp_path):
    root, rows = layouts
    ds = datasets.Dataset.from_list(rows[:10])
    datasets.DatasetDict(train=ds, test=ds).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(BuildError, match="splits: train, test.*give one split's folder"):
        expand_source(str(tmp_path / "dd"))
    assert expand_source(str(tmp_path / "dd" / "train"))  # one split's folder is fine
    snap = tmp_path / "snap" / "data"
    snap.mkdir(parents=True)
    for split in ("train", "test"):
        ds.to_parquet(str(snap / f"{split}-00000-of-00001.parquet"))
    with pytest.raises(BuildError, match=r"several splits \(test, train\)"):
        expand_source(str(tmp_path / "snap"))
    assert len(expand_source(str(snap / "train-*"))) == 1
