"""Content-addressed reuse: what changes a key, what does not, concurrent and killed builds."""
import json
import os
import signal
import subprocess
import sys
import time

import orjson

from pipeline.build import build_mixture

from conftest import ROOT


def write_manifest(tmp, tokenizer, weights=(0.5, 0.5), template="tokenizer", name="mix.json"):
    (tmp / "a.jsonl").write_bytes(b"".join(
        orjson.dumps({"text": f"pretraining document number {i}, with words."}) + b"\n" for i in range(40)))
    if not (tmp / "b.jsonl").exists():
        (tmp / "b.jsonl").write_bytes(b"".join(orjson.dumps(
            {"instruction": f"question {i}?", "input": "", "output": f"answer {i}."}) + b"\n" for i in range(40)))
    m = {"tokenizer": tokenizer, "template": template, "max_length": 256, "seed": 7, "datasets": [
        {"dataset_name": "a", "task_name": "pt", "abs_weight": weights[0], "path": "a.jsonl"},
        {"dataset_name": "b", "task_name": "sft", "abs_weight": weights[1], "path": "b.jsonl"}]}
    (tmp / name).write_text(json.dumps(m))
    return str(tmp / name)


def statuses(plans):
    return {p.spec.dataset_name: p.status for p in plans}


def test_reuse_rules(tmp_path, sample_tokenizer):
    mix = write_manifest(tmp_path, sample_tokenizer)
    _, plans, _ = build_mixture(mix, workers=1)
    assert statuses(plans) == {"a": "build", "b": "build"}
    # a weight change rebuilds nothing, but the lock follows it
    mix = write_manifest(tmp_path, sample_tokenizer, weights=(0.9, 0.1))
    lock, plans, _ = build_mixture(mix, workers=1)
    assert statuses(plans) == {"a": "reuse", "b": "reuse"}
    shares = {d["dataset_name"]: d["token_share"] for d in orjson.loads(lock.read_bytes())["datasets"]}
    assert abs(shares["a"] - 0.9) < 1e-9
    # same size, new bytes, mtime restored: only that dataset rebuilds (content hash, not size+mtime)
    b = tmp_path / "b.jsonl"
    st = b.stat()
    data = bytearray(b.read_bytes())
    i = data.index(b"answer 3")
    data[i:i + 8] = b"ANSWER 3"
    b.write_bytes(bytes(data))
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert b.stat().st_size == st.st_size
    time.sleep(2.1)  # past the memo's trust window: only the stat stamp can reveal the edit
    _, plans, _ = build_mixture(mix, workers=1)
    assert statuses(plans) == {"a": "reuse", "b": "build"}
    # another template: every chat dataset rebuilds; --force rebuilds everything
    _, plans, _ = build_mixture(mix, workers=1, template="chatml")
    assert statuses(plans) == {"a": "build", "b": "build"}
    _, plans, _ = build_mixture(mix, workers=1, force=True)
    assert statuses(plans) == {"a": "build", "b": "build"}


def test_two_concurrent_builds_share_one_cache(tmp_path, sample_tokenizer):
    mix = write_manifest(tmp_path, sample_tokenizer)
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "build", mix, "--out", str(tmp_path / f"out{k}"),
                               "--cache", str(cache), "--workers", "1"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    built = sorted(d.name for d in cache.iterdir() if d.is_dir())
    assert [n.rsplit("-", 1)[0] for n in built] == ["a", "b"]  # one copy each, no partial left
    locks = [orjson.loads((tmp_path / f"out{k}" / "mixture.lock.json").read_bytes()) for k in range(2)]
    assert [d["path"] for d in locks[0]["datasets"]] == [d["path"] for d in locks[1]["datasets"]]


def test_killed_build_leaves_nothing_reusable(tmp_path, sample_tokenizer):
    mix = write_manifest(tmp_path, sample_tokenizer)
    big = tmp_path / "a.jsonl"  # make the build long enough to kill
    big.write_bytes(b"".join(orjson.dumps({"text": f"doc {i} " + "word " * 300}) + b"\n" for i in range(30000)))
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "build", mix, "--workers", "1"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / "build" / "cache"
    deadline = time.time() + 120
    while time.time() < deadline and not (cache.exists() and any(cache.glob("a-*.partial"))):
        time.sleep(0.2)
    time.sleep(0.3)  # a unit or two in (the fast encoder builds this file in about a second)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not any((d / "meta.json").exists() for d in cache.iterdir() if d.is_dir() and d.name.startswith("a-"))
    _, plans, _ = build_mixture(mix, workers=1)  # the next build starts (or resumes) cleanly
    assert statuses(plans)["a"] == "build"
    assert plans[0].meta["nlines"] == 30000


def test_transform_build_is_reproducible(tmp_path, sample_tokenizer):
    (tmp_path / "t.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    if r.random() < 0.2:\n        return None\n"
        "    data['text'] = data['text'] + ' #' + str(r.randint(0, 10**6))\n    return data\n")
    mix = write_manifest(tmp_path, sample_tokenizer)
    m = json.loads(open(mix).read())
    m["datasets"][0]["transforms"] = "t.py"
    (tmp_path / "mix.json").write_text(json.dumps(m))
    _, p1, _ = build_mixture(mix, workers=1)
    first = {f.name: f.read_bytes() for f in p1[0].entry.final.glob("*.h5")}
    _, p2, _ = build_mixture(mix, workers=2, force=True)
    assert statuses(p2)["a"] == "build"
    assert first == {f.name: f.read_bytes() for f in p2[0].entry.final.glob("*.h5")}
    meta = p2[0].meta
    assert meta["skipped"].get("transform_skipped", 0) > 0
    assert meta["records_read"] == meta["nlines"] + sum(meta["skipped"].values())


def test_cache_list_and_gc(tmp_path, sample_tokenizer):
    mix = write_manifest(tmp_path, sample_tokenizer)
    lock, plans, _ = build_mixture(mix, workers=1)
    _, old, _ = build_mixture(mix, workers=1, template="chatml", out=str(tmp_path / "other"),
                              cache=str(tmp_path / "build" / "cache"))
    cache = tmp_path / "build" / "cache"
    listed = subprocess.run([sys.executable, "-m", "pipeline", "cache", "list", "--cache", str(cache)],
                            cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0 and listed.stdout.count("\n") == 4  # a and b, two templates each
    gc = subprocess.run([sys.executable, "-m", "pipeline", "cache", "gc", "--cache", str(cache),
                         "--keep", str(lock)], cwd=ROOT, capture_output=True, text=True)
    assert gc.returncode == 0
    kept = {d.name for d in cache.iterdir() if d.is_dir()}
    assert kept == {p.entry.final.name for p in plans}  # the other template's dirs are gone
    gc = subprocess.run([sys.executable, "-m", "pipeline", "cache", "gc", "--cache", str(cache),
                         "--keep", str(lock), "--older-than", "0"], cwd=ROOT, capture_output=True, text=True)
    assert gc.returncode == 0 and {d.name for d in cache.iterdir() if d.is_dir()} == kept


def test_gc_never_empties_the_cache_by_accident(tmp_path, sample_tokenizer, capsys):
    """An unset shell variable after --keep, a manifest given as the lock, a negative age or a
    lock of another cache: refused (exit 2, one line) with every built dir still there."""
    import pytest

    from pipeline.cli import main
    mix = write_manifest(tmp_path, sample_tokenizer)
    build_mixture(mix, workers=1)
    cache = tmp_path / "build" / "cache"
    lock = tmp_path / "build" / "mixture.lock.json"
    before = sorted(d.name for d in cache.iterdir() if d.is_dir())
    assert len(before) == 2
    other = json.loads(lock.read_text())
    for d in other["datasets"]:
        d["key"] = "0" * 64
    (tmp_path / "other.lock.json").write_text(json.dumps(other))
    base = ["cache", "gc", "--cache", str(cache)]
    for argv in (["--keep"], ["--keep", ""], ["--keep", mix], ["--keep", str(tmp_path / "none.json")],
                 ["--older-than", "-1"], ["--older-than", "nan"], ["--keep", str(tmp_path / "other.lock.json")]):
        capsys.readouterr()
        try:
            code = main(base + argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert "Traceback" not in err and "error:" in err, (argv, err)
        assert sorted(d.name for d in cache.iterdir() if d.is_dir()) == before, argv
    # nothing to remove is said, not silent
    assert main(base + ["--keep", str(lock)]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert sorted(d.name for d in cache.iterdir() if d.is_dir()) == before
    # a dir whose meta.json is broken is listed as such and never removed (its key is unknown)
    (cache / "odd-0123456789abcdef").mkdir()
    (cache / "odd-0123456789abcdef" / "meta.json").write_text("{")
    assert main(["cache", "list", "--cache", str(cache)]) == 0
    assert "INVALID" in capsys.readouterr().out
    assert main(base + ["--older-than", "0"]) == 0  # emptying on purpose
    assert sorted(d.name for d in cache.iterdir() if d.is_dir()) == ["odd-0123456789abcdef"]


def test_shard_target_size_is_part_of_the_key():
    from pipeline.cache import dataset_key
    base = dict(sources=[{"name": "a.jsonl", "bytes": 10, "hash": "h"}], format="text", transform_sha256=None,
                seed=1, template_sha256="t", tokenizer_sha256="k", max_length=256, overflow="segment",
                loss="assistant", txt_paragraphs=False)
    keys = {dataset_key(**base), dataset_key(**base, shard_tokens=1 << 30), dataset_key(**base, shard_tokens=1 << 20)}
    assert len(keys) == 3
    assert dataset_key(**base, shard_tokens=1 << 20) == dataset_key(**base, shard_tokens=1 << 20)
    assert dataset_key(**{**base, "seed": 2}) == dataset_key(**base)  # without a transform the seed changes nothing
