"""FM9G index dirs (stages/fm9g_index.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from stages.fm9g_index import (LegacyIndexWarning, is_fm9g_index_dir, iter_fm9g_records,
                               read_fm9g_offsets, write_fm9g_index)

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "sample_data" / "tokenizer"

RECORDS = [{"input": "", "output": "中国的首都是北京。"}, {"input": "q", "output": "a"},
           {"input": "", "output": "x" * 300}]
LINES = [json.dumps(r, ensure_ascii=False).encode() for r in RECORDS]


def jsonl(tmp_path: Path, trailing_newline: bool = True) -> Path:
    path = tmp_path / "src.jsonl"
    path.write_bytes(b"\n".join(LINES) + (b"\n" if trailing_newline else b""))
    return path


def legacy_dir(tmp_path: Path, *, text: bool = True, h5: bool = True) -> Path:
    """What FM9G's convert_json2index.py writes: n cumulative END offsets, no leading 0."""
    d = tmp_path / "legacy"
    d.mkdir()
    data = b"".join(line + b"\n" for line in LINES)
    (d / "data.jsonl").write_bytes(data)
    ends = np.cumsum([len(line) + 1 for line in LINES])
    assert ends[-1] == len(data)
    if text:
        (d / "index").write_text("".join(f"{e}\n" for e in ends))
    if h5:
        with h5py.File(d / "index.h5", "w") as f:
            f.create_dataset("index", data=ends)
    (d / "meta.json").write_text(json.dumps({"language": "zh", "nlines": len(LINES)}))
    return d


def test_writer_output_is_reader_correct(tmp_path: Path):
    out = tmp_path / "idx"
    offsets = write_fm9g_index(jsonl(tmp_path), out, language="zh")
    assert is_fm9g_index_dir(out)
    text = (out / "index").read_text().split()
    assert len(text) == len(LINES) + 1 and text[0] == "0"
    with h5py.File(out / "index.h5") as f:
        np.testing.assert_array_equal(f["index"][...], offsets)
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"language": "zh", "nlines": 3, "nbytes": (out / "data.jsonl").stat().st_size}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reader-correct form reads without a warning
        np.testing.assert_array_equal(read_fm9g_offsets(out), offsets)
        assert [line for _, line in iter_fm9g_records(out)] == LINES


def test_legacy_index_keeps_first_record(tmp_path: Path):
    d = legacy_dir(tmp_path)
    with pytest.warns(LegacyIndexWarning, match="legacy FM9G index") as caught:
        offsets = read_fm9g_offsets(d)
    assert str(d) in str(caught[0].message)
    assert offsets[0] == 0 and len(offsets) == len(LINES) + 1
    with pytest.warns(LegacyIndexWarning):
        records = list(iter_fm9g_records(d))
    assert [i for i, _ in records] == [0, 1, 2]
    assert [json.loads(line) for _, line in records] == RECORDS  # line 0 included


def test_index_h5_only(tmp_path: Path):
    d = legacy_dir(tmp_path, text=False)
    assert is_fm9g_index_dir(d)
    with pytest.warns(LegacyIndexWarning):
        assert [json.loads(line) for _, line in iter_fm9g_records(d)] == RECORDS
    # And a reader-correct index.h5 alone.
    out = tmp_path / "idx"
    write_fm9g_index(jsonl(tmp_path), out)
    (out / "index").unlink()
    assert [line for _, line in iter_fm9g_records(out)] == LINES


def test_text_index_preferred_over_h5(tmp_path: Path):
    out = tmp_path / "idx"
    write_fm9g_index(jsonl(tmp_path), out)
    with h5py.File(out / "index.h5", "w") as f:
        f.create_dataset("index", data=np.array([0, 5], dtype=np.int64))  # wrong on purpose
    assert len(read_fm9g_offsets(out)) == len(LINES) + 1


def test_size_mismatch_raises(tmp_path: Path):
    out = tmp_path / "idx"
    write_fm9g_index(jsonl(tmp_path), out)
    with open(out / "data.jsonl", "ab") as f:
        f.write(b'{"extra": 1}\n')
    with pytest.raises(ValueError, match=f"{out}.*index ends at byte"):
        read_fm9g_offsets(out)


def test_misaligned_index_raises(tmp_path: Path):
    out = tmp_path / "idx"
    write_fm9g_index(jsonl(tmp_path), out)
    size = (out / "data.jsonl").stat().st_size
    (out / "index").write_text(f"0\n7\n{size}\n")
    with pytest.raises(ValueError, match="record 0 does not end at a line end"):
        list(iter_fm9g_records(out))


def test_last_line_without_newline_and_slices(tmp_path: Path):
    out = tmp_path / "idx"
    write_fm9g_index(jsonl(tmp_path, trailing_newline=False), out)
    assert [line for _, line in iter_fm9g_records(out)] == LINES
    assert list(iter_fm9g_records(out, start=1, stop=2)) == [(1, LINES[1])]
    assert list(iter_fm9g_records(out, start=2)) == [(2, LINES[2])]


def test_empty_file(tmp_path: Path):
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    out = tmp_path / "idx"
    write_fm9g_index(src, out)
    assert read_fm9g_offsets(out).tolist() == [0]
    assert list(iter_fm9g_records(out)) == []


def test_not_an_index_dir(tmp_path: Path):
    assert not is_fm9g_index_dir(tmp_path)
    assert not is_fm9g_index_dir(jsonl(tmp_path))
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "index").write_text("0\n3\n")
    assert not is_fm9g_index_dir(tmp_path)  # no meta.json


def _manifest(tmp_path: Path, legacy: Path, *, other: bool = False) -> Path:
    """The legacy dir as an input-output dataset (FM9G style, template none); `other`: plus a
    second source, so a 2-worker build runs its units in forked workers."""
    datasets = [{"dataset_name": "fm9g_legacy", "abs_weight": 1.0, "path": str(legacy),
                 "format": "input-output"}]
    if other:
        datasets.append({"dataset_name": "more", "abs_weight": 1.0, "path": str(jsonl(tmp_path)),
                         "format": "input-output"})
    m = tmp_path / "manifest.json"
    m.write_text(json.dumps({"tokenizer": str(TOKENIZER), "template": "none", "max_length": 512,
                             "datasets": datasets}))
    return m


def _notices(err: str) -> list[str]:
    return [line for line in err.splitlines() if "legacy FM9G index" in line]


def test_build_reports_legacy_index_as_one_line(tmp_path: Path, capsys):
    """`pipeline build` of a legacy index dir: the notice is one `warning:` line naming the dir
    (no `file:line: UserWarning:` prefix, no Python source line), and every record is built."""
    from pipeline.cli import main
    d = legacy_dir(tmp_path)
    assert main(["build", str(_manifest(tmp_path, d)), "--workers", "1"]) == 0
    out = capsys.readouterr()
    assert _notices(out.err) == [f"warning: {d}: legacy FM9G index (end offsets only, as written by "
                                 "convert_json2index.py); reading it with a leading 0 so line 0 is kept"]
    assert "UserWarning" not in out.err and "warnings.warn" not in out.err and ".py:" not in out.err
    meta = json.loads(next((tmp_path / "build" / "cache").glob("fm9g_legacy-*/meta.json")).read_text())
    assert meta["n_samples"] == len(RECORDS)  # line 0 kept
    assert warnings.showwarning is not None and warnings.showwarning.__module__ != "pipeline.cli"


def test_build_workers_report_legacy_index_as_one_line(tmp_path: Path):
    """The same from a forked build worker (2 workers, 2 sources): one line, once."""
    d = legacy_dir(tmp_path)
    p = subprocess.run([sys.executable, "-m", "pipeline", "build", str(_manifest(tmp_path, d, other=True)),
                        "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert _notices(p.stderr) == [f"warning: {d}: legacy FM9G index (end offsets only, as written by "
                                  "convert_json2index.py); reading it with a leading 0 so line 0 is kept"]
    assert "UserWarning" not in p.stderr and "warnings.warn" not in p.stderr
    assert "fm9g_legacy" in p.stdout  # the summary table


def test_other_warnings_keep_pythons_format(capsys):
    """Only tokenmill's own warning categories are shortened: a library's keeps file:line."""
    from pipeline.cli import _show_warning
    _show_warning(LegacyIndexWarning("x: legacy"), LegacyIndexWarning, "/a/stages/fm9g_index.py", 9)
    _show_warning(UserWarning("from a library"), UserWarning, "/lib/thing.py", 3, line="warn()")
    assert capsys.readouterr().err == "warning: x: legacy\n/lib/thing.py:3: UserWarning: from a library\n  warn()\n"
