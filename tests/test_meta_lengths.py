"""meta.json lengths with FM9G semantics, shard joining and the build driver's refusals, on the
sample tokenizer (no ../shared). Lengths are recomputed with the tokenizer itself."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import orjson
import pytest

from pipeline.build import build_mixture
from stages.shard import read_shard

from conftest import ROOT, SAMPLE

TOK = SAMPLE / "tokenizer"
FM9G_ORDER = ["language", "nlines", "nbytes", "length_distribute", "avg_token_per_line",
              "hdfs_path", "data_sample"]
BUCKETS = ["less_4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k", "64k-128k", "128k-256k", "more_256k"]


def manifest(tmp_path, datasets, max_length=256, **top):
    entries = [{"task_name": "t", "abs_weight": 1.0, "format": "text", "overflow": "segment", **d}
               for d in datasets]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({"tokenizer": str(TOK), "template": "chatml", "max_length": max_length,
                                "seed": 1, "datasets": entries, **top}))
    return str(path)


def words(n, seed):
    return " ".join(f"w{(seed * 31 + k * 7) % 997}" for k in range(n))


def write_texts(path, texts):
    path.write_bytes(b"".join(orjson.dumps({"text": t}) + b"\n" for t in texts))


def shard_samples(d, meta):
    out = []
    for s in meta["shards"]:
        arr = read_shard(d / s["file"], mmap=False)
        out += [(int(arr.source_record[i]), np.asarray(arr.sample(i)).tolist()) for i in range(arr.n_samples)]
    return out


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_segmented_record_lengths_are_the_tokenizers(tmp_path):
    """max_length 256, records up to ~9k tokens: nlines counts records, length_distribute sums
    to it and holds the records' full lengths (4k-8k, 8k-16k buckets), the samples are cut."""
    from tokenizers import Tokenizer
    texts = [words(n, i) for i, n in enumerate([5, 300, 1500, 2500, 5000, 40, 1])]  # ~3.9 tokens a word
    write_texts(tmp_path / "docs.jsonl", texts)
    _, (plan,), _ = build_mixture(manifest(tmp_path, [{"dataset_name": "docs", "path": "docs.jsonl"}]),
                                  out=str(tmp_path / "out"), workers=1)
    meta_bytes = (plan.entry.final / "meta.json").read_bytes()
    m = orjson.loads(meta_bytes)
    assert list(m)[:len(FM9G_ORDER)] == FM9G_ORDER and list(m["length_distribute"]) == BUCKETS
    # independent: the tokenizer's own ids (+ the special tokens the build adds, checked here)
    tk = Tokenizer.from_file(str(TOK / "tokenizer.json"))
    eos, bos = m["tokenizer"]["eos_id"], m["tokenizer"]["bos_id"]
    by_record: dict[int, list[int]] = {}
    for rec, ids in shard_samples(plan.entry.final, m):
        assert len(ids) <= 256
        by_record.setdefault(rec, []).extend(ids)
    lengths = []
    for rec, text in enumerate(texts):
        ids = tk.encode(text, add_special_tokens=False).ids
        assert by_record[rec] in ([*ids, eos], [bos, *ids, eos]), rec
        lengths.append(len(by_record[rec]))
    lengths = np.array(lengths)
    assert m["nlines"] == len(texts) == m["records_read"] and m["n_samples"] > m["nlines"]
    edges = [0, 4000, 8000, 16000, 32000, 64000, 128000, 256000, np.inf]
    assert list(m["length_distribute"].values()) == [int(((lengths >= a) & (lengths < b)).sum())
                                                     for a, b in zip(edges, edges[1:])]
    assert sum(m["length_distribute"].values()) == m["nlines"]
    assert m["length_distribute"]["4k-8k"] >= 1 and m["length_distribute"]["8k-16k"] >= 1
    assert m["record_tokens"] == int(lengths.sum()) and m["record_length_percentiles"]["max"] == lengths.max()
    assert m["sample_length_percentiles"]["max"] == 256
    assert sum(m["sample_length_histogram"]["counts"]) == m["n_samples"]
    # shard entries carry the byte offsets of the arrays: a raw memory map reads the same tokens
    sh = m["shards"][0]
    t = sh["arrays"]["tokens"]
    raw = np.memmap(plan.entry.final / sh["file"], dtype=t["dtype"], mode="r", offset=t["offset"],
                    shape=tuple(t["shape"]))
    with h5py.File(plan.entry.final / sh["file"], "r") as f:
        assert np.array_equal(raw, f["tokens"][...])
    # byte-deterministic: a second build elsewhere writes the same meta.json
    _, (again,), _ = build_mixture(manifest(tmp_path, [{"dataset_name": "docs", "path": "docs.jsonl"}]),
                                   out=str(tmp_path / "out2"), workers=2)
    assert (again.entry.final / "meta.json").read_bytes() == meta_bytes


def test_overflow_drop_counts_dropped_tokens(tmp_path):
    texts = [words(n, i) for i, n in enumerate([10, 400, 20, 900])]
    write_texts(tmp_path / "d.jsonl", texts)
    mix = manifest(tmp_path, [{"dataset_name": "d", "path": "d.jsonl", "overflow": "drop"}], max_length=128)
    _, (plan,), _ = build_mixture(mix, out=str(tmp_path / "out"), workers=1)
    m = plan.meta
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(str(TOK / "tokenizer.json"))
    full = [len(tk.encode(t, add_special_tokens=False).ids) for t in texts]
    kept = {rec for rec, _ in shard_samples(plan.entry.final, m)}
    extra = m["n_tokens"] - sum(full[r] for r in kept)  # special tokens per kept record
    per = extra // len(kept)
    dropped = [r for r in range(len(texts)) if r not in kept]
    assert dropped == [1, 3] and m["skipped"] == {"too_long": 2}
    assert m["dropped_tokens"] == sum(full[r] + per for r in dropped)
    assert m["records_read"] == m["nlines"] + sum(m["skipped"].values()) == 4
    assert sum(m["length_distribute"].values()) == m["nlines"] == 2


def _units(tmp_path, monkeypatch, unit_bytes=3000):
    import pipeline.build as pb
    from stages.readers import plan_units
    monkeypatch.setattr(pb, "plan_units", functools.partial(plan_units, unit_bytes=unit_bytes))
    write_texts(tmp_path / "many.jsonl", [words(20 + i % 50, i) for i in range(400)])
    return manifest(tmp_path, [{"dataset_name": "many", "path": "many.jsonl"}])


def _dir(plan):
    return {f.name: f.read_bytes() for f in sorted(plan.entry.final.iterdir())
            if f.is_file() and not f.name.startswith(".")}


def test_tiny_shard_target_joins_units(tmp_path, monkeypatch):
    mix = _units(tmp_path, monkeypatch)
    _, (one,), _ = build_mixture(mix, out=str(tmp_path / "one"), workers=1)  # default: one shard
    _, (w1,), _ = build_mixture(mix, out=str(tmp_path / "w1"), workers=1, shard_tokens=5000)
    _, (w2,), _ = build_mixture(mix, out=str(tmp_path / "w2"), workers=2, shard_tokens=5000)
    _, (per,), _ = build_mixture(mix, out=str(tmp_path / "per"), workers=2, shard_tokens=1)
    n_units = len(one.units)
    assert n_units > 4 and len(one.meta["shards"]) == 1 and len(per.meta["shards"]) == n_units
    assert 1 < len(w1.meta["shards"]) < n_units
    assert all(s["n_tokens"] <= 5000 for s in w1.meta["shards"])
    # the same samples (ids and record numbers) in the same order, whatever the shard size
    ref = shard_samples(one.entry.final, one.meta)
    for p in (w1, w2, per):
        assert shard_samples(p.entry.final, p.meta) == ref
    assert _dir(w1) == _dir(w2)  # byte-identical for 1 and 2 workers
    assert w1.entry.key != one.entry.key  # the target size is part of the key
    for p in (one, w1, per):
        for s in p.meta["shards"]:
            assert hashlib.sha256((p.entry.final / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert not list(w1.entry.final.glob("unit-*"))  # units consumed by the assemble step


def test_every_record_set_aside_ends_with_summary_and_one_error(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": 5}\n{"nope": 1}\n{"text": []}\n')
    mix = manifest(tmp_path, [{"dataset_name": "bad", "path": "bad.jsonl"}])
    r = cli("build", mix, "--out", str(tmp_path / "out"), "--workers", "1", "--on-error", "skip")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no lock written" in r.stdout and "bad" in r.stdout  # the summary table
    assert "skipped in bad:" in r.stdout and "rejects.jsonl" in r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "nothing to train on" in errors[0]
    (d,) = [p for p in (tmp_path / "out" / "cache").iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    m = json.loads((d / "meta.json").read_text())
    assert m["nlines"] == 0 and m["records_read"] == 3 == m["nlines"] + sum(m["skipped"].values())
    rejects = [json.loads(x) for x in (d / "rejects.jsonl").read_text().splitlines()]
    assert [x["line"] for x in rejects] == [1, 2, 3]  # 1-based, as fail mode's file:N


EDIT_TRANSFORM = '''
import os
def transform(data, num_sample, r):
    if data["text"].startswith("first"):
        path = os.environ["EDIT_PATH"]
        mode = os.environ["EDIT_MODE"]
        raw = open(path, "rb").read()
        if mode == "same-size":
            open(path, "r+b").write(raw[:-8].replace(b"second", b"SECOND") + raw[-8:])
        else:
            open(path, "wb").write(raw[: len(raw) // 2])
    return data
'''


@pytest.mark.parametrize("mode", ["same-size", "shorter"])
def test_source_edited_during_the_build_is_not_published(tmp_path, mode):
    src = tmp_path / "e.jsonl"
    write_texts(src, ["first " + words(30, 0)] + [f"second {words(30, i)}" for i in range(1, 60)])
    (tmp_path / "edit.py").write_text(EDIT_TRANSFORM)
    mix = manifest(tmp_path, [{"dataset_name": "e", "path": "e.jsonl", "transforms": "edit.py"}])
    env = {**os.environ, "EDIT_PATH": str(src), "EDIT_MODE": mode}
    r = subprocess.run([sys.executable, "-m", "pipeline", "build", mix, "--out", str(tmp_path / "out"),
                        "--workers", "1"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "changed while it was being built" in r.stderr and str(src) in r.stderr
    cache = tmp_path / "out" / "cache"
    assert not [p for p in cache.iterdir() if (p / "meta.json").exists()]  # nothing published
    assert not (tmp_path / "out" / "mixture.lock.json").exists()


BROKEN = {
    "raises": "def transform(data, num_sample, r):\n    if 'x3 ' in data['text']:\n        raise ValueError('boom')\n    return data\n",
    "exits": "import sys\ndef transform(data, num_sample, r):\n    if 'x3 ' in data['text']:\n        sys.exit(3)\n    return data\n",
    "shape": "def transform(data, num_sample, r):\n    return ['not', 'a', 'dict'] if 'x3 ' in data['text'] else data\n",
}


@pytest.mark.parametrize("kind", sorted(BROKEN))
@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_broken_transform_is_one_error_naming_the_record(tmp_path, kind, on_error):
    write_texts(tmp_path / "t.jsonl", [f"x{i} " + words(10, i) for i in range(8)])
    (tmp_path / "bad.py").write_text(BROKEN[kind])
    mix = manifest(tmp_path, [{"dataset_name": "tds", "path": "t.jsonl", "transforms": "bad.py"}])
    r = cli("build", mix, "--out", str(tmp_path / "out"), "--workers", "2", "--on-error", on_error)
    assert r.returncode == 1, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("error: ") and "bad.py" in first and "'tds'" in first, r.stderr
    assert "t.jsonl:4" in first  # record x3 is line 4 (1-based)
    assert "pipeline/" not in r.stderr  # our frames are not shown, the script's are
    if kind != "shape":
        assert "bad.py" in "\n".join(r.stderr.splitlines()[1:])  # the script's traceback below


@pytest.mark.parametrize("name,why", [("n" * 300, "too long"), ("a\ud800b", "cannot be a file name")])
def test_dataset_name_the_filesystem_refuses(tmp_path, name, why):
    write_texts(tmp_path / "x.jsonl", ["hello world"])
    mix = manifest(tmp_path, [{"dataset_name": name, "path": "x.jsonl"}])
    r = cli("build", mix, "--out", str(tmp_path / "out"), "--workers", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: ") and repr(name) in line and why in line


def test_control_characters_in_a_dataset_name_do_not_reach_the_terminal(tmp_path):
    write_texts(tmp_path / "x.jsonl", ["hello world"])
    mix = manifest(tmp_path, [{"dataset_name": "ok\x1b[2Jname", "path": "x.jsonl"}])
    r = cli("build", mix, "--out", str(tmp_path / "out"), "--workers", "1")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "ok\\x1b[2Jname" in r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_under_the_cache_is_one_line_and_no_valid_dir(tmp_path):
    cache = tmp_path / "small"
    cache.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(cache)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        write_texts(tmp_path / "big.jsonl", [words(400, i) for i in range(2000)])  # ~1.6 MB of tokens
        mix = manifest(tmp_path, [{"dataset_name": "big", "path": "big.jsonl"}])
        r = cli("build", mix, "--out", str(tmp_path / "out"), "--cache", str(cache), "--workers", "1")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "no space left" in lines[0].lower(), r.stderr
        assert not [p for p in cache.iterdir() if not p.name.endswith(".partial")
                    and (p / "meta.json").is_file()]
    finally:
        subprocess.run(["umount", str(cache)])


def test_render_notes_count_what_the_layout_rules_decided(tmp_path):
    """template none on a response that already ends with the EOS text: the EOS is not
    appended twice, and meta.json counts the record under render_notes (issue 14)."""
    (tmp_path / "a.jsonl").write_bytes(b'{"instruction": "hi", "input": "", "output": "hello<|im_end|>"}\n'
                                       b'{"instruction": "hi", "input": "", "output": "plain"}\n')
    mix = manifest(tmp_path, [{"dataset_name": "a", "path": "a.jsonl", "format": "alpaca",
                               "overflow": "truncate"}], template="none")
    _, (plan,), _ = build_mixture(mix, out=str(tmp_path / "out"), workers=1)
    assert plan.meta["render_notes"] == {"eos_in_data": 1} and plan.meta["nlines"] == 2
    eos = plan.meta["tokenizer"]["eos_id"]
    first = shard_samples(plan.entry.final, plan.meta)[0][1]
    assert first[-1] == eos and first[-2] != eos  # one EOS, not two
