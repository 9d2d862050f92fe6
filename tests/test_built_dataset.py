"""stages/built_dataset.py (the built-dir contract), stages/shard.concat_shards and the one
overflow rule (stages/overflow.py), checked against h5py, numpy and plain loops."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import orjson
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from stream_fixtures import make_dataset  # noqa: E402

from stages.built_dataset import (DatasetError, describe_shard, open_built, write_meta)  # noqa: E402
from stages.errors import RecordError  # noqa: E402
from stages.overflow import apply_overflow, cut_starts, piece_bounds, stored_piece_starts  # noqa: E402
from stages.shard import ShardArrays, concat_shards, read_shard, write_shard  # noqa: E402


def arrays(rng, lengths, spans=True):
    off = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=off[1:])
    sp = [np.array([[0, max(1, n // 2)]]) for n in lengths]
    return ShardArrays(tokens=rng.integers(0, 1000, int(off[-1])).astype(np.uint16), offsets=off,
                       source_record=np.arange(len(lengths), dtype=np.int64),
                       loss_spans=np.concatenate(sp + [np.zeros((0, 2))]).astype(np.int32) if spans else None,
                       loss_span_offsets=np.arange(len(lengths) + 1, dtype=np.int64) if spans else None)


def test_write_meta_is_atomic_deterministic_and_keeps_order_when_asked(tmp_path):
    meta = {"b": 1, "a": {"y": [1, 2], "x": None}}
    write_meta(tmp_path, meta)
    assert (tmp_path / "meta.json").read_bytes() == orjson.dumps(
        meta, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    write_meta(tmp_path, meta, sort_keys=False)
    raw = (tmp_path / "meta.json").read_text()
    assert raw.index('"b"') < raw.index('"a"') and raw.endswith("}\n")
    assert json.loads(raw) == meta
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary left behind


def test_describe_shard_gives_byte_offsets_a_plain_memmap_reads(tmp_path):
    rng = np.random.default_rng(0)
    a = arrays(rng, [3, 0, 7, 5])
    write_shard(tmp_path / "s.h5", a, "src")
    e = describe_shard(tmp_path / "s.h5")
    assert (e["n_samples"], e["n_tokens"]) == (4, 15)
    with h5py.File(tmp_path / "s.h5") as f:
        for name, info in e["arrays"].items():
            got = np.memmap(tmp_path / "s.h5", dtype=info["dtype"], mode="r", offset=info["offset"],
                            shape=tuple(info["shape"]))
            assert np.array_equal(got, f[name][...]), name


@pytest.mark.parametrize("spans", [True, False])
def test_concat_shards_joins_units_and_one_unit_is_byte_identical(tmp_path, spans):
    rng = np.random.default_rng(1)
    units = [arrays(rng, L, spans) for L in ([4, 1, 9], [2], [], [6, 6])]
    unit_files = ["a.jsonl", "a.jsonl", "b.jsonl", "c.jsonl"]  # a continues; b gave no sample
    paths = []
    for k, (u, src) in enumerate(zip(units, unit_files)):
        paths.append(tmp_path / f"u{k}.h5")
        write_shard(paths[-1], u, src)
    concat_shards(paths[:1], tmp_path / "one.h5")
    assert (tmp_path / "one.h5").read_bytes() == paths[0].read_bytes()
    concat_shards(paths, tmp_path / "all.h5")
    got = read_shard(tmp_path / "all.h5", mmap=False)
    want_samples = [(u.sample(i), u.spans(i)) for u in units for i in range(u.n_samples)]
    assert got.n_samples == len(want_samples)
    for i, (t, s) in enumerate(want_samples):
        assert np.array_equal(got.sample(i), t)
        if spans:
            assert np.array_equal(got.spans(i), s)
    assert got.loss_spans is None if not spans else got.loss_spans.dtype == np.int32
    # provenance: one run per file in order, the empty unit's file an empty run
    assert got.source_files == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert got.source_file_offsets.tolist() == [0, 4, 4, 6]
    per_sample = [src for u, src in zip(units, unit_files) for _ in range(u.n_samples)]
    assert [got.source_files[int(np.searchsorted(got.source_file_offsets, i, "right")) - 1]
            for i in range(got.n_samples)] == per_sample
    assert got.source_record.tolist() == [r for u in units for r in u.source_record.tolist()]
    with h5py.File(tmp_path / "all.h5") as f:
        assert f["offsets"].dtype == np.int64 and f["tokens"].chunks is None
        assert f["source_file_offsets"].dtype == np.int64 and f["source_files"].dtype.kind == "S"
        assert dict(f.attrs) == {"format_version": 2, "n_samples": len(want_samples),
                                 "n_tokens": sum(len(u.tokens) for u in units)}


def test_open_built_lists_shards_lengths_and_locates(tmp_path):
    lens = [5, 1, 7, 3, 9, 2, 4]
    d = make_dataset(tmp_path, "x", lens, n_shards=3)
    b = open_built(d)
    assert b.n_samples == 7 and len(b.shards) == 3
    assert b.sample_lengths().tolist() == lens
    firsts = np.cumsum([0] + [s["n_samples"] for s in b.shards])
    for i in range(7):
        j, k = b.locate(i)
        assert firsts[j] + k == i and 0 <= k < b.shards[j]["n_samples"]
    with pytest.raises(IndexError):
        b.locate(7)
    b.check("cheap")
    b.check("full")


@pytest.mark.parametrize("edit, field", [
    (lambda m: m.pop("key"), "(top level)"),
    (lambda m: m.update(n_samples="3"), "n_samples"),
    (lambda m: m["shards"][0].update(file="../elsewhere.h5"), "shards/0/file"),
    (lambda m: m["tokenizer"].pop("vocab_size"), "tokenizer"),
    (lambda m: m.update(schema_version=99), "schema_version"),
])
def test_an_invalid_meta_is_one_clear_error(tmp_path, edit, field):
    d = make_dataset(tmp_path, "x", [3, 4])
    m = json.loads((d / "meta.json").read_text())
    edit(m)
    (d / "meta.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError) as e:
        open_built(d)
    assert str(e.value).startswith(f"{d}/meta.json: field '{field}'")
    (d / "meta.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        open_built(d)


def test_cheap_check_reads_no_hdf5_and_full_check_reads_everything(tmp_path, monkeypatch):
    d = make_dataset(tmp_path, "x", [3, 4, 5], n_shards=2)
    b = open_built(d)
    monkeypatch.setitem(sys.modules, "h5py", None)  # an h5py import would now fail
    b.check("cheap", lock_entry={"key": b.meta["key"], "nlines": 3})
    with pytest.raises(DatasetError, match="another dataset's dir"):
        b.check("cheap", lock_entry={"key": "0" * 64})
    with pytest.raises(DatasetError, match="lock nlines 4 != 3"):
        b.check("cheap", lock_entry={"nlines": 4})
    monkeypatch.undo()
    shard = d / b.shards[0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[b.shards[0]["arrays"]["tokens"]["offset"]] ^= 1
    shard.write_bytes(bytes(raw))
    b.check("cheap")
    with pytest.raises(DatasetError, match="sha256 differs"):
        b.check("full")
    shard.write_bytes(bytes(raw[:b.shards[0]["arrays"]["tokens"]["offset"] + 2]))
    with pytest.raises(DatasetError, match="past the end"):
        b.check("cheap")
    shard.unlink()
    with pytest.raises(DatasetError, match=f"{shard}: missing"):
        b.check("full")


def test_records_read_must_be_nlines_plus_skipped(tmp_path):
    d = make_dataset(tmp_path, "x", [3, 4])
    m = json.loads((d / "meta.json").read_text())
    m["skipped"] = {"bad_json": 2}
    write_meta(d, m)
    with pytest.raises(DatasetError, match="records_read 2 != nlines 2 \\+ skipped 2"):
        open_built(d).check("full")


# ------------------------------------------------------------------ the overflow rule
@pytest.mark.parametrize("policy", ["segment", "truncate", "drop"])
def test_piece_bounds_is_cut_starts_per_sample(policy):
    rng = np.random.default_rng(2)
    n = rng.integers(0, 50, 200)
    item, a, b = piece_bounds(n, 16, policy)
    want = [(j, s, min(s + 16, int(n[j]))) for j in range(len(n))
            for s in cut_starts(int(n[j]), 16, policy).tolist()]
    assert list(zip(item.tolist(), a.tolist(), b.tolist())) == want
    for j in range(len(n)):  # the rule itself, written out
        starts = cut_starts(int(n[j]), 16, policy).tolist()
        if n[j] <= 16:
            assert starts == [0]
        else:
            assert starts == {"segment": list(range(0, int(n[j]), 16)), "truncate": [0],
                              "drop": []}[policy]


def test_build_and_show_agree_on_the_stored_segments():
    class Enc:
        def __init__(self, ids, spans):
            self.ids, self.spans = ids, spans
    rng = np.random.default_rng(3)
    for _ in range(100):
        n = int(rng.integers(1, 60))
        cuts = np.sort(rng.choice(n + 1, size=2, replace=False))
        spans = np.array([cuts], np.int32)
        enc = Enc(np.arange(n), spans)
        starts = stored_piece_starts(n, 10, "segment", spans)
        try:
            pieces, _ = apply_overflow(enc, 10, "segment")
        except RecordError:
            pieces = []
        assert [p.ids[0] for p in pieces] == starts
