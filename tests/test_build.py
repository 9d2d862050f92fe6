"""End-to-end build of sample_data: identical for any worker count, reused when nothing
changed, memory-mappable, and verify catches damage."""
import hashlib
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import orjson
import pytest

from pipeline.build import build_mixture
from stages.shard import read_shard

from conftest import ROOT, SAMPLE


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT,
                          capture_output=True, text=True, **kw)


def dir_bytes(d):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file() and not f.name.startswith(".")}


@pytest.fixture(scope="module")
def built(tmp_path_factory, sample_tokenizer):
    out = tmp_path_factory.mktemp("w1")
    lock, plans, _ = build_mixture(str(SAMPLE / "mixture.json"), out=str(out), workers=1)
    return lock, plans


def test_workers_give_identical_bytes(built, tmp_path):
    _, plans1 = built
    _, plans2, _ = build_mixture(str(SAMPLE / "mixture.json"), out=str(tmp_path), workers=2)
    for p1, p2 in zip(plans1, plans2):
        assert p1.entry.final.name == p2.entry.final.name  # same key
        assert dir_bytes(p1.entry.final) == dir_bytes(p2.entry.final)


def test_second_build_reuses_everything(built):
    lock, plans = built
    out = lock.parent
    _, again, _ = build_mixture(str(SAMPLE / "mixture.json"), out=str(out), workers=1)
    assert [p.status for p in again] == ["reuse"] * len(again)
    assert [p.meta for p in again] == [p.meta for p in plans]


def test_tokens_memory_map_at_the_hdf5_offset(built):
    _, plans = built
    for p in plans:
        for sh in p.meta["shards"]:
            path = p.entry.final / sh["file"]
            with h5py.File(path, "r") as f:
                d = f["tokens"]
                assert d.chunks is None and d.compression is None
                direct = d[...]
                mm = np.memmap(path, dtype=d.dtype, mode="r", offset=d.id.get_offset(), shape=d.shape)
            assert np.array_equal(mm, direct)
            assert np.array_equal(read_shard(path).tokens, direct)


def test_meta_matches_shards(built):
    _, plans = built
    for p in plans:
        m = p.meta
        lengths = np.concatenate([np.diff(read_shard(p.entry.final / s["file"]).offsets) for s in m["shards"]])
        assert m["n_samples"] == len(lengths) and m["n_tokens"] == int(lengths.sum())
        assert m["records_read"] == m["nlines"] + sum(m["skipped"].values())
        for s in m["shards"]:
            assert hashlib.sha256((p.entry.final / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        assert m["sample_length_percentiles"]["max"] == int(lengths.max())
        assert m["tokenizer"]["vocab_size"] <= 65536 and m["dtype"] == "uint16"


def test_verify_ok_then_catches_a_flipped_byte_and_a_truncated_shard(built, tmp_path):
    lock, plans = built
    assert run_cli("verify", str(lock)).returncode == 0
    d = tmp_path / "copy"
    shutil.copytree(plans[0].entry.final, d)
    shard = d / "shard-00000.h5"
    with h5py.File(shard, "r") as f:
        off = f["tokens"].id.get_offset()
    data = bytearray(shard.read_bytes())
    data[off + 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_cli("verify", str(d))
    assert r.returncode == 1 and "shard-00000.h5: sha256 differs" in r.stdout
    shard.write_bytes(bytes(data[: len(data) // 2]))
    r = run_cli("verify", str(d))
    assert r.returncode == 1 and "shard-00000.h5" in r.stdout


def test_inspect_and_show(built, tmp_path):
    lock, plans = built
    r = run_cli("inspect", str(lock), "--json")
    assert r.returncode == 0
    metas = orjson.loads(r.stdout)
    assert set(metas) == {p.spec.dataset_name for p in plans}
    png = tmp_path / "lengths.png"
    r = run_cli("inspect", str(lock), "--plot", str(png))
    assert r.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"
    # issue 15: record (before overflow) and sample (after) figures are labelled; max_length marked
    assert "per record, before overflow" in r.stdout and "per sample, after overflow" in r.stdout
    assert r.stdout.count("◀ max_length 1024") == sum(
        p.meta["sample_length_percentiles"]["max"] >= 1024 or
        any(lo <= 1024 < hi for lo, hi in zip(p.meta["sample_length_histogram"]["edges"],
                                              p.meta["sample_length_histogram"]["edges"][1:]))
        for p in plans)
    sft = next(p for p in plans if p.meta["build"]["format"] != "text")
    r = run_cli("show", str(lock), "--dataset", sft.spec.dataset_name, "--index", "0", "--color", "never")
    assert r.returncode == 0 and "⟦" in r.stdout and "⟧" in r.stdout


def test_changed_max_length_is_a_new_key(built, tmp_path):
    _, plans = built
    _, other, _ = build_mixture(str(SAMPLE / "mixture.json"), out=str(tmp_path), workers=1, max_length=64)
    assert all(a.entry.key != b.entry.key for a, b in zip(plans, other))
    assert all(p.meta["sample_length_percentiles"]["max"] <= 64 for p in other)
    assert any(p.meta["skipped"].get("no_trained_tokens_after_truncation") for p in other)


def test_inspect_escapes_a_crafted_dataset_name(built, tmp_path):
    """A dataset_name in a crafted meta.json must not reach the terminal as escape sequences."""
    _, plans = built
    d = tmp_path / "crafted"
    shutil.copytree(plans[0].entry.final, d)
    meta = orjson.loads((d / "meta.json").read_bytes())
    meta["dataset_name"] = "evil\x1b]0;pwned\x07\x1b[2J[bold]x"
    meta["skipped"] = {"r\x1b[31m": 1}
    (d / "meta.json").write_bytes(orjson.dumps(meta))
    r = run_cli("inspect", str(d))
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J[bold]x" in r.stdout  # shown, escaped, markup literal
    png = tmp_path / "p.png"
    assert run_cli("inspect", str(d), "--plot", str(png)).returncode == 0 and png.stat().st_size > 0


def test_cache_list_defaults_to_the_cache_of_the_build(built, tmp_path):
    lock, plans = built
    env = {k: v for k, v in os.environ.items() if k != "TOKENMILL_CACHE"}
    mix = tmp_path / "m" / "mixture.json"
    mix.parent.mkdir()
    shutil.copy(SAMPLE / "mixture.json", mix)
    for name in ("pretrain_en.txt", "pretrain_zh.jsonl", "alpaca_zh.json", "sharegpt_en.jsonl",
                 "messages_mixed.jsonl", "tokenizer"):
        (mix.parent / name).symlink_to(SAMPLE / name)
    r = run_cli("build", str(mix), "--workers", "1", env=env)
    assert r.returncode == 0, r.stderr
    # `cache list MANIFEST` finds the cache the build next to it used (<manifest dir>/build/cache)
    r = run_cli("cache", "list", str(mix), env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(ln.split()[0] for ln in r.stdout.splitlines()) == sorted(p.spec.dataset_name for p in plans)
    assert str(mix.parent / "build" / "cache") in r.stderr
    # usage errors exit 2 through argparse
    r = run_cli("cache", "gc", str(mix), env=env)
    assert r.returncode == 2 and "usage:" in r.stderr
    r = run_cli("build", str(mix), "--workers", "0", env=env)
    assert r.returncode == 2 and "usage:" in r.stderr
