"""Crafted and corrupted shards (issue 16): `pipeline verify` exits 1 naming the fault, and the
training stream refuses with a StreamError naming the shard before any batch - both run in a
subprocess, so a segfault in compiled code fails the test instead of killing pytest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from stream_fixtures import make_dataset, make_lock  # noqa: E402

from pipeline.verify import verify_path  # noqa: E402
from stages.built_dataset import describe_shard, write_meta  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STREAM = """
import sys
from train.stream import MixtureStream, StreamError
try:
    s = MixtureStream(sys.argv[1], 32, batch_size=2, verify=sys.argv[2])
    for b in s.loader():
        print("BATCH", flush=True)
        break
except StreamError as e:
    print(f"error: {e}")
    sys.exit(1)
"""
# Every case in one subprocess (one torch import): `pipeline verify` through the CLI's main
# and the stream at each check level; a crash of compiled code ends the process (rc != 0).
RUNNER = """
import contextlib, io, json, sys
from pipeline.cli import main
from train.stream import MixtureStream, StreamError
import train.store
if sys.argv[2:] == ["large"]:  # treat every shard as too large for the whole check when mapped
    train.store.FULL_CHECK_ON_MAP = -1
for job in json.loads(open(sys.argv[1]).read()):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["verify", job["dir"]])
    res = {"id": job["id"], "verify": [rc, out.getvalue()], "stream": {}}
    for level in ("cheap", "full"):
        try:
            s = MixtureStream(job["lock"], 32, batch_size=2, verify=level)
            next(iter(s.loader()))
            res["stream"][level] = [0, "BATCH"]
        except StreamError as e:
            res["stream"][level] = [1, str(e)]
        except Exception as e:  # not a clear refusal: the test fails on it
            res["stream"][level] = [2, repr(e)]
    print(json.dumps(res), flush=True)
"""


def run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def replace(f: h5py.File, name: str, data) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def crafted(tmp_path, edit, consistent_meta: bool):
    """A two-shard dataset (equal sample counts), shard 0 edited by edit(h5py file, meta);
    consistent_meta: meta.json rewritten to describe the edited file (sha256 and byte offsets
    match it: only the structure is wrong), else left as built."""
    d = make_dataset(tmp_path, "c", [5, 9, 3, 7, 4, 6], n_shards=2, seed=3)
    meta = json.loads((d / "meta.json").read_text())
    with h5py.File(d / "shard-00000.h5", "r+") as f:
        edit(f, meta)
    if consistent_meta:
        for k, s in enumerate(meta["shards"]):
            e = describe_shard(d / s["file"])
            s["sha256"], s["arrays"] = e["sha256"], e["arrays"]
    write_meta(d, meta)
    lock = make_lock(tmp_path / "lock.json", [{"dir": d, "abs_weight": 1.0}])
    return d, lock


def set_item(name, index, value):
    def edit(f, meta):
        a = f[name][...]
        a[index] = value
        replace(f, name, a)
    return edit


def uint64_offsets(f, meta):
    replace(f, "offsets", f["offsets"][...].astype(np.uint64))


def uint64_lso(f, meta):
    replace(f, "loss_span_offsets", f["loss_span_offsets"][...].astype(np.uint64))


def huge_uint64_offsets(f, meta):  # an int64 view of these starts negative
    o = f["offsets"][...].astype(np.uint64)
    o[1] = np.uint64(2**64 - 8)
    replace(f, "offsets", o)


def edited_n_tokens(f, meta):
    meta["shards"][0]["n_tokens"] += 5
    meta["n_tokens"] += 5


CASES = {
    "offsets uint64": (uint64_offsets, "offsets dtype uint64 (want int64)"),
    "offsets huge uint64": (huge_uint64_offsets, "offsets dtype uint64 (want int64)"),
    "loss_span_offsets uint64": (uint64_lso, "loss_span_offsets dtype uint64 (want int64)"),
    "offsets negative": (set_item("offsets", 1, -3), "offsets are not a non-decreasing index"),
    "offsets decreasing": (set_item("offsets", 2, 1), "offsets are not a non-decreasing index"),
    "offsets past the tokens": (set_item("offsets", -1, 10_000), "offsets are not a non-decreasing index"),
    "span outside its sample": (set_item("loss_spans", 0, [1, 10_000]), "lies outside the sample"),
    "span negative": (set_item("loss_spans", 0, [-4, 2]), "lies outside the sample"),
    "token id >= vocab": (set_item("tokens", 3, 1500), "token id 1500 >= vocab size 1000"),
    "edited n_tokens": (edited_n_tokens, "tokens shape"),
}


IDS = [(case, meta) for case in CASES for meta in (True, False)]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    jobs = []
    for k, (case, meta) in enumerate(IDS):
        d, lock = crafted(tmp_path_factory.mktemp(f"case{k}"), CASES[case][0], meta)
        jobs.append({"id": k, "dir": str(d), "lock": str(lock)})
    plan = tmp_path_factory.mktemp("plan") / "jobs.json"
    plan.write_text(json.dumps(jobs))
    r = run("-c", RUNNER, str(plan))
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])  # e.g. -11: a segfault
    return {x["id"]: x for x in map(json.loads, r.stdout.splitlines())}


@pytest.fixture(scope="module")
def outcomes_large(tmp_path_factory):
    """The stream on the same crafted shards, each taken as a large shard: only its layout and
    index end points are checked when mapped, the rest as the first window reads it."""
    jobs = []
    for k, (case, meta) in enumerate(IDS):
        if meta:
            d, lock = crafted(tmp_path_factory.mktemp(f"large{k}"), CASES[case][0], meta)
            jobs.append({"id": k, "dir": str(d), "lock": str(lock)})
    plan = tmp_path_factory.mktemp("plan") / "jobs.json"
    plan.write_text(json.dumps(jobs))
    r = run("-c", RUNNER, str(plan), "large")
    assert r.returncode == 0, (r.returncode, r.stderr[-3000:])  # e.g. -11: a segfault
    return {x["id"]: x for x in map(json.loads, r.stdout.splitlines())}


@pytest.mark.parametrize("case", [c for c in CASES if c != "token id >= vocab"])  # (the batch
def test_large_shards_are_bounds_checked_as_they_are_read(outcomes_large, case):  # check: below)
    res = outcomes_large[IDS.index((case, True))]
    for level, (rc, msg) in res["stream"].items():
        assert rc == 1 and "shard-00000.h5" in msg, (level, rc, msg)


@pytest.mark.parametrize("case, consistent_meta", IDS,
                         ids=[f"{c}-{'meta-rewritten' if m else 'meta-as-built'}" for c, m in IDS])
def test_verify_and_stream_refuse_a_crafted_shard(outcomes, case, consistent_meta):
    fault = CASES[case][1]
    res = outcomes[IDS.index((case, consistent_meta))]
    rc, out = res["verify"]
    assert rc == 1 and "shard-00000.h5" in out, res
    if consistent_meta:  # sha256 and byte offsets match the file: the structure is named
        assert fault in out, out
    else:  # meta.json as built: at least the checksum no longer matches
        assert "sha256 differs" in out or fault in out, out
    for level, (rc, msg) in res["stream"].items():
        if level == "cheap" and not consistent_meta and case != "edited n_tokens":
            continue  # meta.json as built maps the old bytes (bounds still checked on map)
        assert rc == 1 and "shard-00000.h5" in msg, (level, rc, msg)
        if consistent_meta and level == "cheap":
            assert fault in msg, msg


def test_verify_cli_exits_1_naming_the_fault(tmp_path):
    d, _ = crafted(tmp_path, uint64_offsets, True)
    v = run("-m", "pipeline", "verify", str(d))
    assert v.returncode == 1 and "Traceback" not in v.stderr, v.stderr
    assert "shard-00000.h5: offsets dtype uint64 (want int64)" in v.stdout, v.stdout


def test_two_equal_count_shards_swapped(tmp_path):
    """Same sample and token counts: only their checksums tell them apart (full check)."""
    d = make_dataset(tmp_path, "c", [5, 5, 5, 5], n_shards=2, seed=4)
    (d / "shard-00000.h5").rename(d / "tmp.h5")
    (d / "shard-00001.h5").rename(d / "shard-00000.h5")
    (d / "tmp.h5").rename(d / "shard-00001.h5")
    lock = make_lock(tmp_path / "lock.json", [{"dir": d, "abs_weight": 1.0}])
    v = run("-m", "pipeline", "verify", str(d))
    assert v.returncode == 1 and "shard-00000.h5: sha256 differs" in v.stdout, v.stdout
    r = run("-c", STREAM, str(lock), "full")
    assert r.returncode == 1 and "sha256 differs" in r.stdout and "BATCH" not in r.stdout


def test_invalid_meta_json_is_one_line_exit_1(tmp_path):
    d = make_dataset(tmp_path, "c", [5, 6])
    (d / "meta.json").write_text('{"schema_version": 1, "shards": [')
    v = run("-m", "pipeline", "verify", str(d))
    assert v.returncode == 1 and "Traceback" not in v.stderr
    out = [line for line in (v.stdout + v.stderr).splitlines() if line.strip()]
    assert len(out) == 1 and "meta.json: not valid JSON" in out[0], out


def test_a_lock_pointing_at_another_datasets_dir_is_refused(tmp_path):
    a = make_dataset(tmp_path, "a", [5, 6], seed=1)
    b = make_dataset(tmp_path, "b", [5, 6], seed=2)
    lock = make_lock(tmp_path / "lock.json", [{"dir": a, "abs_weight": 1.0}])
    data = json.loads(lock.read_text())
    data["datasets"][0]["path"] = str(b)
    lock.write_text(json.dumps(data))
    faults = verify_path(str(lock))
    assert any("another dataset's dir" in f for f in faults), faults
    r = run("-c", STREAM, str(lock), "cheap")
    assert r.returncode == 1 and "another dataset's dir" in r.stdout, r.stdout


def test_a_bad_token_in_a_shard_too_large_for_the_map_check_stops_the_batch(tmp_path, monkeypatch):
    """Shards above FULL_CHECK_ON_MAP are not scanned when mapped (that would cost O(tokens) at
    every start); the batch holding an out-of-vocabulary id is refused, naming shard and sample."""
    import train.store
    from train.stream import MixtureStream, StreamError
    d, lock = crafted(tmp_path, set_item("tokens", 3, 1500), consistent_meta=True)
    monkeypatch.setattr(train.store, "FULL_CHECK_ON_MAP", 0)
    with pytest.raises(StreamError) as e:
        for _ in MixtureStream(lock, 32, batch_size=1, verify="cheap").loader():
            pass
    msg = str(e.value)
    assert "token id 1500 >= vocab size 1000" in msg and "shard-00000.h5" in msg and "sample 0" in msg, msg
