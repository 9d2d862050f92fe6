"""Fault catalogue (issue 16), sources / cache / workers: every case ends in a clear one-line
`error:` (exit 1) or a counted fault with `records_read == nlines + Σ skipped` — never a
quietly shorter dataset, a traceback, a write through a planted link or a worker left running."""
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pipeline.cache import CacheEntry, FingerprintMemo
from pipeline.cli import main

from conftest import ROOT

N = 4000
# varied text (hex digests) so that half of a compressed file holds many whole lines
LINES = [orjson.dumps({"text": f"document {i}: {hashlib.sha256(str(i).encode()).hexdigest()}"}) + b"\n"
         for i in range(N)]
DATA = b"".join(LINES)
IS_ROOT = os.geteuid() == 0


def manifest(tmp: Path, tokenizer: str, sources: dict, **extra) -> str:
    """sources: dataset name -> path (relative to tmp) or a dict of extra dataset fields."""
    datasets = []
    for name, src in sources.items():
        d = {"dataset_name": name, "task_name": "pt", "abs_weight": 1.0}
        d.update({"path": src} if isinstance(src, str) else src)
        datasets.append(d)
    m = {"tokenizer": tokenizer, "template": "chatml", "max_length": 256, "seed": 1,
         "datasets": datasets, **extra}
    (tmp / "mix.json").write_text(json.dumps(m))
    return str(tmp / "mix.json")


def build(tmp: Path, capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["build", str(tmp / "mix.json"), "--workers", "1", "--out", str(tmp / "out"), *args])
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def built_meta(tmp: Path, name: str) -> dict:
    lock = orjson.loads((tmp / "out" / "mixture.lock.json").read_bytes())
    d = next(d for d in lock["datasets"] if d["dataset_name"] == name)
    return orjson.loads((Path(d["path"]) / "meta.json").read_bytes())


def assert_counts(meta: dict):
    assert meta["records_read"] == meta["nlines"] + sum(meta["skipped"].values())


# -- truncated and corrupt containers -----------------------------------------------------

def _gz_prefix_lines(blob: bytes) -> int:  # independent: zlib on the bytes that are there
    return zlib.decompressobj(wbits=31).decompress(blob).count(b"\n")


def _zst_prefix_lines(blob: bytes) -> int:
    return zstandard.ZstdDecompressor().decompressobj().decompress(blob).count(b"\n")


@pytest.mark.parametrize("name,compress,prefix_lines,kind", [
    ("a.jsonl.gz", gzip.compress, _gz_prefix_lines, "gzip stream"),
    ("a.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b), _zst_prefix_lines, "zstd stream"),
])
def test_truncated_compressed_source_fails_or_counts(tmp_path, capsys, sample_tokenizer, name, compress,
                                                    prefix_lines, kind):
    blob = compress(DATA)
    cut = blob[: len(blob) // 2]
    (tmp_path / name).write_bytes(cut)
    whole = prefix_lines(cut)  # complete lines before the cut
    assert 0 < whole < N
    manifest(tmp_path, sample_tokenizer, {"a": name})
    rc, err = build(tmp_path, capsys)
    line = one_error_line(err)
    assert rc == 1
    assert f"{tmp_path / name}:{whole + 1}: truncated or corrupt {kind} after {whole} lines" in line
    assert line.endswith("[corrupt_source]")
    rc, err = build(tmp_path, capsys, "--on-error", "skip")
    assert rc == 0, err
    meta = built_meta(tmp_path, "a")
    assert meta["nlines"] == whole and meta["skipped"] == {"corrupt_source": 1}
    assert_counts(meta)


def test_whole_compressed_sources_read_completely(tmp_path, capsys, sample_tokenizer):
    # several zstd frames back to back (pzstd, `cat a.zst b.zst`) are one stream, not a truncation
    z = zstandard.ZstdCompressor()
    (tmp_path / "a.jsonl.zst").write_bytes(z.compress(b"".join(LINES[:100])) +
                                           z.compress(b"".join(LINES[100:])))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(DATA))
    manifest(tmp_path, sample_tokenizer, {"a": "a.jsonl.zst", "b": "b.jsonl.gz"})
    rc, err = build(tmp_path, capsys)
    assert rc == 0, err
    for name in "ab":
        meta = built_meta(tmp_path, name)
        assert meta["nlines"] == N and meta["skipped"] == {}
        assert_counts(meta)


def test_parquet_truncated_or_corrupt(tmp_path, capsys, sample_tokenizer):
    rows = [{"text": f"row {i} of the table {hashlib.sha256(str(i).encode()).hexdigest()}"} for i in range(N)]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / "a.parquet", row_group_size=500)
    raw = (tmp_path / "pq" / "a.parquet").read_bytes()
    (tmp_path / "pq" / "b.parquet").write_bytes(raw[: len(raw) // 2])  # the footer is gone
    manifest(tmp_path, sample_tokenizer, {"p": {"path": "pq", "format": "text"}})
    rc, err = build(tmp_path, capsys)
    line = one_error_line(err)
    assert rc == 1 and f"{tmp_path / 'pq' / 'b.parquet'}:1: truncated or corrupt parquet file after 0 rows" in line
    rc, err = build(tmp_path, capsys, "--on-error", "skip")
    assert rc == 0, err
    meta = built_meta(tmp_path, "p")
    assert meta["nlines"] == N and meta["skipped"] == {"corrupt_source": 1}
    assert_counts(meta)


def test_parquet_with_a_damaged_page_stops_at_that_row(tmp_path):
    from stages.readers import iter_unit, plan_units
    rows = [{"text": f"row {i} {hashlib.sha256(str(i).encode()).hexdigest()}"} for i in range(N)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=500)
    raw = bytearray((tmp_path / "a.parquet").read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 256] = bytes(256)
    (tmp_path / "a.parquet").write_bytes(bytes(raw))
    got = [r for u in plan_units([str(tmp_path / "a.parquet")]) for r in iter_unit(u)]
    *good, (k, fault) = got
    assert 0 < k < N and [r for _, r in good] == rows[:k]
    assert fault.reason == "corrupt_source" and f"after {k} rows" in fault.detail


def test_not_a_gzip_file_is_one_clear_line(tmp_path, capsys, sample_tokenizer):
    (tmp_path / "x.jsonl.gz").write_bytes(DATA[:500])  # plain bytes under a .gz name
    manifest(tmp_path, sample_tokenizer, {"x": {"path": "x.jsonl.gz", "format": "text"}})
    rc, err = build(tmp_path, capsys)
    line = one_error_line(err)
    assert rc == 1 and "x.jsonl.gz:1: truncated or corrupt gzip stream after 0 lines: BadGzipFile" in line
    manifest(tmp_path, sample_tokenizer, {"x": "x.jsonl.gz"})  # format auto: the cause is still named
    rc, err = build(tmp_path, capsys)
    line = one_error_line(err)
    assert rc == 1 and "no readable record" in line and "BadGzipFile" in line


@pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 file anyway: permission faults need a non-root user")
def test_unreadable_source_is_one_clear_line(tmp_path, capsys, sample_tokenizer):
    p = tmp_path / "a.jsonl.zst"
    p.write_bytes(zstandard.ZstdCompressor().compress(DATA))
    p.chmod(0)
    manifest(tmp_path, sample_tokenizer, {"a": "a.jsonl.zst"})
    rc, err = build(tmp_path, capsys)
    assert rc == 1 and f"{p}: cannot read: Permission denied" in one_error_line(err)


# -- read-only and shared caches ------------------------------------------------------------

@contextlib.contextmanager
def read_only_view(src: Path, at: Path):
    """`at` shows `src` through a read-only bind mount (root only: chmod does not stop root)."""
    at.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(at)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(at)], check=True)
        yield at
    finally:
        subprocess.run(["umount", str(at)], check=True)


def _can_mount() -> bool:
    return IS_ROOT and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="a read-only bind mount needs root and mount(8)")


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")}


@needs_mount
def test_read_only_cache_built_is_reused_empty_is_refused(tmp_path, capsys, sample_tokenizer, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    (tmp_path / "a.jsonl").write_bytes(DATA)
    manifest(tmp_path, sample_tokenizer, {"a": "a.jsonl"})
    cache = tmp_path / "cache"
    rc, err = build(tmp_path, capsys, "--cache", str(cache))
    assert rc == 0, err
    first = built_meta(tmp_path, "a")
    (cache / ".fingerprints.json").unlink()  # another user's cache: no memo of ours in it
    before = _tree(cache)
    with read_only_view(cache, tmp_path / "ro") as ro:
        rc, err = build(tmp_path, capsys, "--cache", str(ro))
        assert rc == 0, err
        assert "Traceback" not in err
        assert built_meta(tmp_path, "a")["key"] == first["key"]
        lock = orjson.loads((tmp_path / "out" / "mixture.lock.json").read_bytes())
        assert lock["datasets"][0]["path"].startswith(str(ro))
    assert _tree(cache) == before  # nothing written into the shared cache
    assert list((tmp_path / "state" / "tokenmill" / "fingerprints").glob("*.json"))  # memo went here

    empty = tmp_path / "empty"
    empty.mkdir()
    with read_only_view(empty, tmp_path / "ro2") as ro:
        rc, err = build(tmp_path, capsys, "--cache", str(ro))
    line = one_error_line(err)
    assert rc == 1 and f"{ro}: the cache dir is not writable (Read-only file system): cannot build a" in line


def test_planted_partial_and_final_links_are_not_followed(tmp_path, capsys, sample_tokenizer):
    (tmp_path / "a.jsonl").write_bytes(b"".join(LINES[:50]))
    manifest(tmp_path, sample_tokenizer, {"a": "a.jsonl"})
    cache = tmp_path / "cache"
    rc, err = build(tmp_path, capsys, "--cache", str(cache))
    assert rc == 0, err
    final = next(d for d in cache.iterdir() if d.name.startswith("a-") and d.is_dir())
    good = {f.name: f.read_bytes() for f in final.glob("*.h5")}
    victim = tmp_path / "victim"
    victim.mkdir()
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    (crafted / "meta.json").write_text('{"n_samples": 0}')
    shutil.rmtree(final)
    partial = final.with_name(final.name + ".partial")
    partial.symlink_to(victim)      # the build must not write into the link's target …
    final.symlink_to(crafted)       # … nor take a planted link as a built dataset
    rc, err = build(tmp_path, capsys, "--cache", str(cache))
    assert rc == 0, err
    assert list(victim.iterdir()) == [] and [p.name for p in crafted.iterdir()] == ["meta.json"]
    assert not final.is_symlink() and final.is_dir() and not os.path.lexists(partial)
    assert {f.name: f.read_bytes() for f in final.glob("*.h5")} == good
    meta = built_meta(tmp_path, "a")
    assert meta["nlines"] == 50
    assert_counts(meta)


def test_planted_lock_link_is_refused_without_touching_its_target(tmp_path, capsys, sample_tokenizer):
    (tmp_path / "a.jsonl").write_bytes(b"".join(LINES[:10]))
    manifest(tmp_path, sample_tokenizer, {"a": "a.jsonl"})
    cache = tmp_path / "cache"
    rc, _ = build(tmp_path, capsys, "--cache", str(cache))
    assert rc == 0
    entry_dir = next(d for d in cache.iterdir() if d.name.startswith("a-") and d.is_dir())
    shutil.rmtree(entry_dir)
    lock = Path(str(entry_dir) + ".lock")
    if lock.exists():
        lock.unlink()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    lock.symlink_to(precious)
    rc, err = build(tmp_path, capsys, "--cache", str(cache))
    line = one_error_line(err)
    assert rc == 1 and "the lock file is a symlink; refusing to follow it" in line
    assert precious.read_text() == "keep me"


# -- disk full --------------------------------------------------------------------------------

@contextlib.contextmanager
def small_tmpfs(at: Path, size: str):
    at.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(at)], check=True)
    try:
        yield at
    finally:
        subprocess.run(["umount", str(at)], check=True)


@pytest.mark.skipif(not _can_mount(), reason="a small tmpfs needs root and mount(8)")
def test_full_disk_memo_touch_and_publish_leave_nothing_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    with small_tmpfs(tmp_path / "fs", "256k") as fs:
        memo = FingerprintMemo(fs)
        memo.data["/x"] = [1, 2, 3, 4, "old"]
        assert memo.save() == fs / ".fingerprints.json"
        saved = (fs / ".fingerprints.json").read_bytes()
        entry = CacheEntry(fs, "a", "0" * 64)
        entry.make_partial()
        with contextlib.suppress(OSError):  # fill the disk
            with open(fs / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        memo.data.update({f"/f{i}": [i, i, i, i, "x" * 64] for i in range(5000)})
        assert memo.save() == memo.fallback  # the cache is full: the per-user state dir holds it
        assert (fs / ".fingerprints.json").read_bytes() == saved  # old memo intact, no torn file
        from stages.fsutil import atomic_write_bytes
        with pytest.raises(OSError):  # meta.json cannot be written: the dir must not become valid
            atomic_write_bytes(entry.partial / "meta.json", b"{" + b" " * 400_000 + b"}")
        assert not (entry.partial / "meta.json").exists()
        assert entry.publish(replace=False) is True
        assert not entry.is_valid()  # published without meta.json: a later build rebuilds it
        assert entry.touch() is False
        assert sorted(p.name for p in fs.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")) == []


# -- runaway workers ------------------------------------------------------------------------

SPIN = ("import multiprocessing\n"
        "def transform(data, num_sample, r):\n"
        "    if multiprocessing.parent_process() is not None:  # spin in pool workers only\n"
        "        while True:\n            pass\n"
        "    return data\n")


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # a short-lived child already gone
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _start_spinning_build(tmp_path: Path, tokenizer: str):
    (tmp_path / "spin.py").write_text(SPIN)
    for name in "ab":
        (tmp_path / f"{name}.jsonl").write_bytes(b"".join(LINES[:20]))
    manifest(tmp_path, tokenizer, {n: {"path": f"{n}.jsonl", "transforms": "spin.py"} for n in "ab"})
    driver = subprocess.Popen([sys.executable, "-m", "pipeline", "build", str(tmp_path / "mix.json"),
                               "--workers", "2", "--out", str(tmp_path / "out")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    cmdline = None
    deadline = time.time() + 120
    while time.time() < deadline:  # bounded poll: two pool workers (forks: same cmdline) running
        if driver.poll() is not None:
            pytest.fail(f"the build ended early: {driver.communicate()}")
        cmdline = cmdline or _cmdline(driver.pid)
        workers = [k for k in _children(driver.pid) if _alive(k) and _cmdline(k) == cmdline]
        if len(workers) >= 2:
            return driver, workers
        time.sleep(0.1)
    driver.kill()
    pytest.fail("the pool workers did not start")


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.slow
def test_workers_die_with_a_killed_driver(tmp_path, sample_tokenizer):
    driver, workers = _start_spinning_build(tmp_path, sample_tokenizer)
    driver.send_signal(signal.SIGKILL)
    driver.communicate()
    left = _wait_gone(workers, 5.0)
    for p in left:  # never leave them to spin on the test machine
        os.kill(p, signal.SIGKILL)
    assert left == [], f"workers {left} outlived the SIGKILLed driver"


@pytest.mark.slow
def test_sigterm_stops_a_build_like_ctrl_c(tmp_path, sample_tokenizer):
    driver, workers = _start_spinning_build(tmp_path, sample_tokenizer)
    driver.send_signal(signal.SIGTERM)
    try:
        _, err = driver.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # show where it hangs (faulthandler dumps on SIGABRT)
        driver.send_signal(signal.SIGABRT)
        _, err = driver.communicate()
        for p in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        pytest.fail(f"the driver did not stop on SIGTERM:\n{err[-4000:]}")
    left = _wait_gone(workers, 5.0)
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert driver.returncode in (130, 143), err
    assert "interrupted: finished work units are kept" in err and "Traceback" not in err
    assert left == []


# -- lazy dispatch (issue 13): a bounded window of units in flight, results in task order -----

class _Plan:
    def __init__(self, name):
        self.spec, self.job = type("Spec", (), {"dataset_name": name})(), None


class _Unit:
    def __init__(self, index):
        self.index = index


def _fake_unit(job, unit):
    return {"unit": unit.index, "pid": os.getpid()}


class _Progress:
    def advance(self, name, summary):
        pass


@pytest.mark.parametrize("workers", [1, 2])
def test_units_are_dispatched_lazily_in_order(monkeypatch, workers):
    import pipeline.executors as ex
    monkeypatch.setattr(ex, "process_unit", _fake_unit)
    plan, pulled, got = _Plan("a"), [], []

    def tasks():
        for i in range(50):
            pulled.append(i)
            yield plan, _Unit(i)

    def on_result(p, unit, summary):
        assert summary["unit"] == unit.index == len(got)  # task order
        assert len(pulled) - len(got) <= 2 * workers + 1  # never all 50 pending at once
        got.append(unit.index)

    ex.run_local(tasks(), workers, _Progress(), on_result=on_result)
    assert got == list(range(50))
