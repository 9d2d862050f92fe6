"""Crash-safe resume and the Ray executor: both end byte-identical to a clean local build."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import orjson
import pytest

from conftest import ROOT


def digests(cache):
    out = {}
    for d in sorted(p for p in cache.iterdir() if p.is_dir() and (p / "meta.json").exists()):
        for f in sorted(d.iterdir()):
            if f.suffix in (".h5", ".json"):
                out[f"{d.name}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def corpus(tmp, tokenizer, n=6000):
    (tmp / "docs.jsonl").write_bytes(b"".join(
        orjson.dumps({"text": f"document {i}: " + " ".join(f"w{(i * 7 + k) % 997}" for k in range(60))}) + b"\n"
        for i in range(n)))
    (tmp / "mix.json").write_text(json.dumps({
        "tokenizer": tokenizer, "template": "chatml", "max_length": 512, "seed": 1,
        "datasets": [{"dataset_name": "docs", "task_name": "pt", "abs_weight": 1.0, "path": "docs.jsonl"}]}))
    return str(tmp / "mix.json")


def build(mix, cache, env, workers=1, extra=()):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "build", mix, "--cache", str(cache),
                             "--workers", str(workers), *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def env():
    return {**os.environ, "TOKENMILL_UNIT_BYTES": "40000"}  # many small units


def test_sigkill_then_resume_is_byte_identical(tmp_path, sample_tokenizer, env):
    mix = corpus(tmp_path, sample_tokenizer)
    one = ("--shard-tokens", "1")  # one shard per unit: a kept unit is the shard of its number
    clean = tmp_path / "clean"
    p = build(mix, clean, env, extra=one)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()

    cache = tmp_path / "killed"
    p = build(mix, cache, env, extra=one)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*.partial/unit-*.json"))) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # a unit is finished once its summary (.json) is in place; the kill may land between
    # its shard's rename and its summary's, and then it is rightly redone
    done_before = {f.name for f in cache.glob("*.partial/unit-*.h5")
                   if f.with_suffix(".json").exists()}
    assert done_before, "the build was killed before any unit finished"
    assert not any((d / "meta.json").exists() for d in cache.iterdir() if d.is_dir())
    mtimes = {f.name: f.stat().st_mtime_ns for f in cache.glob("*.partial/unit-*.h5")
              if f.name in done_before}

    p = build(mix, cache, env, extra=one)
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    assert digests(cache) == digests(clean)
    built = next(d for d in cache.iterdir() if d.is_dir() and (d / "meta.json").exists())
    for name, t in mtimes.items():  # finished units were kept, not redone
        shard = built / name.replace("unit-", "shard-")
        assert shard.stat().st_mtime_ns == t


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, sample_tokenizer, env):
    mix = corpus(tmp_path, sample_tokenizer)
    clean = tmp_path / "clean"
    assert build(mix, clean, env).wait(timeout=300) == 0
    cache = tmp_path / "interrupted"
    # a session of its own: Ctrl-C goes to the whole foreground group, driver and workers
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "build", mix, "--cache", str(cache), "--workers", "2"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*.partial/unit-*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err
    assert "Traceback" not in err, err
    assert not any((d / "meta.json").exists() for d in cache.iterdir() if d.is_dir())
    assert build(mix, cache, env, workers=2).wait(timeout=300) == 0
    assert digests(cache) == digests(clean)


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path, sample_tokenizer):
    ray = pytest.importorskip("ray")
    from pipeline.build import build_mixture
    src = tmp_path / "src"
    src.mkdir()
    for k in range(4):  # four files → four work units → four Ray tasks
        (src / f"part-{k}.jsonl").write_bytes(b"".join(
            orjson.dumps({"text": f"part {k} doc {i} " + "lorem ipsum " * (i % 40)}) + b"\n" for i in range(300)))
    (tmp_path / "mix.json").write_text(json.dumps({
        "tokenizer": sample_tokenizer, "template": "chatml", "max_length": 256, "seed": 1,
        "datasets": [{"dataset_name": "parts", "task_name": "pt", "abs_weight": 1.0, "path": "src"}]}))
    mix = str(tmp_path / "mix.json")
    build_mixture(mix, cache=str(tmp_path / "local"), out=str(tmp_path / "o1"), workers=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        _, plans, _ = build_mixture(mix, cache=str(tmp_path / "ray"), out=str(tmp_path / "o2"), executor="ray")
    finally:
        ray.shutdown()
    assert len(plans[0].meta["shards"]) == 1  # the four files join into one shard (below the target size)
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")


def test_parallel_assembly_is_byte_identical(tmp_path, sample_tokenizer, monkeypatch):
    """Shards joined and hashed in a pool (and sources re-hashed there) are the bytes the
    driver alone writes."""
    import functools
    import pipeline.build as b
    monkeypatch.setattr(b, "plan_units", functools.partial(b.plan_units, unit_bytes=40000))  # many units
    mix = corpus(tmp_path, sample_tokenizer, n=3000)
    b.build_mixture(mix, cache=str(tmp_path / "serial"), workers=1, shard_tokens=60000)
    monkeypatch.setattr(b, "PARALLEL_BYTES", 0)
    calls = []
    real = b.map_calls

    def spy(fn, work, **kw):
        calls.append((fn.__name__, len(work), kw.get("workers")))
        return real(fn, work, **kw)
    monkeypatch.setattr(b, "map_calls", spy)
    b.build_mixture(mix, cache=str(tmp_path / "pool"), workers=2, shard_tokens=60000)
    serial, pool = digests(tmp_path / "serial"), digests(tmp_path / "pool")
    assert serial == pool
    assert sum(k.endswith(".h5") for k in pool) >= 2
    assert ("join_shard", sum(k.endswith(".h5") for k in pool), 2) in calls
