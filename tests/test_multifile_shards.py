"""Shards that span source files (issue 13): many small files join into one shard, and every
sample's (file, record) — `BuiltDataset.provenance`, the one reader `show` uses — equals what
reading the source files here gives. Old single-file shards (format 1, written below by a
fixture writer of that layout) still load, verify and show."""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import orjson
import pytest

from pipeline.build import build_mixture
from pipeline.cli import main
from pipeline.verify import verify_dir
from stages.built_dataset import describe_shard, open_built, write_meta
from stages.shard import read_shard

from conftest import SAMPLE

LABELLED = re.compile(r"\[([^\]⟦]+)\]⟦(.*?)⟧", re.S)
EOT = "<|im_end|>"


def build(folder: Path, tokenizer, src: Path, max_length: int = 2048, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m = {"tokenizer": str(tokenizer), "max_length": max_length, "seed": 5,
         "datasets": [{"dataset_name": "many", "abs_weight": 1.0, "path": str(src), **kw}]}
    (folder / "mixture.json").write_text(json.dumps(m), encoding="utf-8")
    lock, _, _ = build_mixture(str(folder / "mixture.json"), workers=1, on_error="skip")
    return lock


def built_dir(lock: Path) -> Path:
    return Path(orjson.loads(lock.read_bytes())["datasets"][0]["path"])


def show(capsys, target, index: int) -> str:
    assert main(["show", str(target), "--color", "never", "--index", str(index)]) == 0
    return capsys.readouterr().out


def assistant_turns(raw: dict) -> list[tuple[str, str]]:
    return [(f"assistant#{j}", t["value"] + EOT) for j, t in enumerate(raw["conversations"])
            if t["from"] == "gpt"]


def test_many_small_files_make_one_shard_with_exact_provenance(tmp_path, sample_tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    expect = []  # (file, record, marker) of every accepted record, in source order, read here
    counts = [3, 1, 0, 5, 2] * 8  # 40 files; a file of only a bad line gives no sample
    for k, n in enumerate(counts):
        lines = [json.dumps({"text": f"file{k} record{r} " + "word " * (r % 7)}) for r in range(n)]
        if k % 5 in (2, 3):
            lines.insert(0, "{not json")  # skipped: the file's later records keep their numbers
        (src / f"part-{k:03d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for p in sorted(src.iterdir()):  # directory order: the sorted file names
        rows = p.read_text(encoding="utf-8").splitlines()
        for r, row in enumerate(rows):
            try:
                text = json.loads(row)["text"]
            except json.JSONDecodeError:
                continue
            expect.append((p.resolve(), r, text.split(" word")[0].strip()))
    lock = build(tmp_path / "m", sample_tokenizer, src, format="text")
    d = built_dir(lock)
    ds = open_built(d)
    assert len(ds.shards) == 1 and ds.n_samples == len(expect)  # 40 files, one shard (2^30 target)
    assert verify_dir(d) == []
    from stages.tokenizer import load_tokenizer
    tok = load_tokenizer(ds.meta["tokenizer"]["path"])
    arrays = ds.shard_arrays(0)
    got = []
    for i in range(ds.n_samples):
        p = ds.provenance(i)
        assert p.piece == 0
        got.append((Path(p.file).resolve(), p.record))
        assert expect[i][2] in tok.decode(np.asarray(arrays.sample(i)).tolist()), i
    assert got == [(f, r) for f, r, _ in expect]
    # O(files): one run per file with a unit, the bad-line-only files as empty runs
    assert [Path(f).resolve() for f in arrays.source_files] == sorted(p.resolve() for p in src.iterdir())
    assert np.diff(arrays.source_file_offsets).tolist() == counts


def test_a_small_target_still_splits_and_verify_names_broken_provenance(tmp_path, sample_tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(6):
        (src / f"f{k}.jsonl").write_text("".join(json.dumps({"text": f"f{k} r{r} " + "x " * 30}) + "\n"
                                                 for r in range(4)), encoding="utf-8")
    lock = build(tmp_path / "m", sample_tokenizer, src, format="text", shard_tokens=600)
    d = built_dir(lock)
    ds = open_built(d)
    assert 1 < len(ds.shards) < 6 and verify_dir(d) == []  # shards join files but keep the target
    for sh, path in zip(ds.shards, ds.shard_paths):
        assert len(read_shard(path).source_files) == 1 or sh["n_tokens"] <= 600
    files = [Path(ds.provenance(i).file).name for i in range(ds.n_samples)]
    assert files == [f"f{k}.jsonl" for k in range(6) for _ in range(4)]
    # crafted faults: runs that do not cover the samples, a names list of the wrong length
    path = ds.shard_paths[0]
    with h5py.File(path, "r+") as f:
        last = len(f["source_file_offsets"]) - 1
        f["source_file_offsets"][last] += 1
    faults = "\n".join(verify_dir(d))
    assert "source_file_offsets are not a non-decreasing index" in faults
    with h5py.File(path, "r+") as f:
        f["source_file_offsets"][last] -= 1
        names = f["source_files"][...]
        del f["source_files"]
        f.create_dataset("source_files", data=names[:-1])
    assert "source_files has" in "\n".join(verify_dir(d))


@pytest.fixture(scope="module")
def share_rows() -> list[str]:
    return [x for x in (SAMPLE / "sharegpt_en.jsonl").read_text(encoding="utf-8").splitlines()
            if x.strip()][:12]


def split_files(folder: Path, rows: list[str], sizes: list[int]) -> list[Path]:
    folder.mkdir()
    out, at = [], 0
    for k, n in enumerate(sizes):
        out.append(folder / f"c{k}.jsonl")
        out[-1].write_text("\n".join(rows[at:at + n]) + "\n", encoding="utf-8")
        at += n
    return out


def test_show_renders_the_record_of_the_second_and_last_file(tmp_path, capsys, share_rows, sample_tokenizer):
    files = split_files(tmp_path / "src", share_rows, [3, 2, 1, 4, 2])
    lock = build(tmp_path / "m", sample_tokenizer, tmp_path / "src")
    ds = open_built(built_dir(lock))
    assert len(ds.shards) == 1 and ds.n_samples == 12
    for index, (file, rec) in ((3, (files[1], 0)), (4, (files[1], 1)), (10, (files[4], 0)),
                               (11, (files[4], 1))):
        out = show(capsys, lock, index)
        assert out.splitlines()[0].endswith(f"source record {rec} of {file.resolve()}"), out
        raw = json.loads(file.read_text(encoding="utf-8").splitlines()[rec])
        assert LABELLED.findall(out) == assistant_turns(raw), out
        assert "note:" not in out


def test_segmented_pieces_are_counted_within_their_own_file(tmp_path, capsys, share_rows, sample_tokenizer):
    """Each file holds one record, so consecutive files' samples share record number 0: the
    piece of a sample must be counted inside its file's run, or show re-renders the wrong
    piece and cannot label it."""
    files = split_files(tmp_path / "src", share_rows[:3], [1, 1, 1])
    lock = build(tmp_path / "m", sample_tokenizer, tmp_path / "src", max_length=48, overflow="segment")
    ds = open_built(built_dir(lock))
    provs = [ds.provenance(i) for i in range(ds.n_samples)]
    assert len(ds.shards) == 1 and {p.record for p in provs} == {0}
    firsts = [next(i for i, p in enumerate(provs) if Path(p.file).resolve() == f.resolve()) for f in files]
    assert firsts[0] == 0 and all(provs[i].piece == 0 for i in firsts)
    for i in (firsts[1], firsts[1] + 1, firsts[2]):
        out = show(capsys, lock, i)
        assert "note:" not in out and LABELLED.search(out), out
        assert f"(stored piece {provs[i].piece + 1} of the record" in out


def write_format1(d: Path) -> None:
    """Rewrite a built dir in the layout before issue 13 (format 1: one source file per
    shard in the `source` attribute, no source_files datasets; meta.json schema 1)."""
    meta = orjson.loads((d / "meta.json").read_bytes())
    for sh in meta["shards"]:
        p = d / sh["file"]
        a = read_shard(p, mmap=False)
        assert len(a.source_files) == 1
        p.unlink()
        with h5py.File(p, "w", track_order=False, libver=("earliest", "v110")) as f:
            for name, data in (("tokens", a.tokens), ("offsets", a.offsets), ("source_record", a.source_record),
                               ("loss_spans", a.loss_spans), ("loss_span_offsets", a.loss_span_offsets)):
                if data is not None:
                    f.create_dataset(name, data=data, track_times=False)
            f.attrs.update({"format_version": 1, "source": a.source_files[0], "n_samples": a.n_samples,
                            "n_tokens": len(a.tokens)})
        sh.update(describe_shard(p))
        assert "source_file_offsets" not in sh["arrays"]
    meta["schema_version"] = 1
    write_meta(d, meta, sort_keys=False)


def test_an_old_single_file_dir_still_loads_verifies_and_shows(tmp_path, capsys, share_rows, sample_tokenizer):
    (tmp_path / "one.jsonl").write_text("\n".join(share_rows[:4]) + "\n", encoding="utf-8")
    lock = build(tmp_path / "m", sample_tokenizer, tmp_path / "one.jsonl")
    d = built_dir(lock)
    new = show(capsys, lock, 2)
    write_format1(d)
    with h5py.File(d / "shard-00000.h5") as f:
        assert f.attrs["format_version"] == 1 and "source_files" not in f
    ds = open_built(d)
    assert verify_dir(d) == []
    assert [(Path(p.file), p.record) for p in map(ds.provenance, range(4))] == \
        [((tmp_path / "one.jsonl").resolve(), r) for r in range(4)]
    old = show(capsys, d, 2)
    assert old == new and LABELLED.findall(old) == assistant_turns(json.loads(share_rows[2]))


def test_concat_of_more_units_than_open_files_allowed(tmp_path):
    """A shard may join 10^4 units of small files: concat_shards keeps one input open at a
    time (run here under a 64-descriptor limit, with 300 inputs)."""
    import subprocess
    import sys

    from stages.shard import ShardArrays, write_shard
    rng = np.random.default_rng(0)
    want = []  # (file, record, tokens) per sample, as written
    for k in range(300):
        n = int(rng.integers(0, 3))
        lens = rng.integers(1, 6, n)
        off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        toks = rng.integers(0, 500, int(off[-1])).astype(np.uint16)
        recs = np.arange(n, dtype=np.int64) + k % 2  # files alternate starting at record 0 / 1
        write_shard(tmp_path / f"u{k:03d}.h5", ShardArrays(toks, off, recs), f"dir/file-{k // 2}.jsonl")
        want += [(f"dir/file-{k // 2}.jsonl", int(recs[i]), toks[off[i]:off[i + 1]].tolist()) for i in range(n)]
    code = ("import resource, sys, glob; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
            "from stages.shard import concat_shards; "
            "concat_shards(sorted(glob.glob(sys.argv[1] + '/u*.h5')), sys.argv[1] + '/all.h5')")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    got = read_shard(tmp_path / "all.h5", mmap=False)
    assert got.source_files == [f"dir/file-{j}.jsonl" for j in range(150)]  # two units per file: one run
    sfo = got.source_file_offsets
    assert [(got.source_files[int(np.searchsorted(sfo, i, "right")) - 1], int(got.source_record[i]),
             got.sample(i).tolist()) for i in range(got.n_samples)] == want
