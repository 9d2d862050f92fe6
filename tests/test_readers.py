"""Readers and format adapters: every container, provenance, and clear failures."""
import gzip
import json

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from stages.errors import BuildError, RecordError
from stages.formats import ADAPTERS, detect_format
from stages.readers import expand_source, iter_unit, plan_units

RECORDS = [{"text": f"document {i} " * (i + 1)} for i in range(5)]


def read_all(path, **kw):
    units = plan_units(expand_source(str(path)), **kw)
    return [(u.file, rec, raw) for u in units for rec, raw in iter_unit(u)]


def jsonl_bytes(records):
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


@pytest.mark.parametrize("name,writer", [
    ("a.jsonl", lambda p: p.write_bytes(jsonl_bytes(RECORDS))),
    ("a.json", lambda p: p.write_text(json.dumps(RECORDS))),
    ("lines.json", lambda p: p.write_bytes(jsonl_bytes(RECORDS))),  # JSON Lines saved as .json
    ("a.jsonl.gz", lambda p: p.write_bytes(gzip.compress(jsonl_bytes(RECORDS)))),
    ("a.jsonl.zst", lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(RECORDS)))),
    ("a.parquet", lambda p: pq.write_table(pa.Table.from_pylist(RECORDS), p)),
])
def test_containers_give_the_same_records_with_provenance(tmp_path, name, writer):
    path = tmp_path / name
    writer(path)
    got = read_all(path)
    assert [raw for _, _, raw in got] == RECORDS
    assert [rec for _, rec, _ in got] == list(range(5))
    assert {f for f, _, _ in got} == {str(path)}


def test_single_json_object(tmp_path):
    p = tmp_path / "one.json"
    p.write_text(json.dumps(RECORDS[0]))
    assert [raw for _, _, raw in read_all(p)] == [RECORDS[0]]


def test_txt_lines_and_paragraphs(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first line\nsecond\n\nthird para a\nthird para b\n")
    assert [(r, t) for _, r, t in read_all(p)] == [(0, "first line"), (1, "second"), (3, "third para a"), (4, "third para b")]
    paras = [(r, t) for _, r, t in read_all(p, txt_paragraphs=True)]
    assert paras == [(0, "first line\nsecond"), (3, "third para a\nthird para b")]


def test_dirs_and_globs_sorted(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.jsonl").write_bytes(jsonl_bytes(RECORDS[:2]))
    (tmp_path / "d" / "sub" / "a.jsonl").write_bytes(jsonl_bytes(RECORDS[2:]))
    (tmp_path / "d" / "notes.md").write_text("ignored")
    files = expand_source(str(tmp_path / "d"))
    assert [f.split("/d/")[1] for f in files] == ["b.jsonl", "sub/a.jsonl"]
    assert expand_source(str(tmp_path / "d" / "**" / "*.jsonl")) == sorted(files)
    with pytest.raises(BuildError, match="matches no readable files"):
        expand_source(str(tmp_path / "d" / "*.parquet"))


def test_byte_range_units_keep_line_numbers(tmp_path):
    p = tmp_path / "big.jsonl"
    recs = [{"text": f"r{i} " + "x" * (i % 7)} for i in range(1000)]
    p.write_bytes(jsonl_bytes(recs))
    units = plan_units([str(p)], unit_bytes=1000)
    assert len(units) > 5
    got = [(rec, raw) for u in units for rec, raw in iter_unit(u)]
    assert got == list(enumerate(recs))


def test_bad_lines_are_yielded_as_errors_not_raised(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": \n{"text": "\xff\xfe"}\n')
    got = read_all(p)
    assert got[0][2] == {"text": "ok"}
    assert isinstance(got[1][2], RecordError) and got[1][2].reason == "invalid_json"
    assert isinstance(got[2][2], RecordError) and got[2][2].reason == "invalid_utf8"


def test_detect_format():
    assert detect_format("plain") == "text"
    assert detect_format({"text": "x"}) == "text"
    assert detect_format({"input": "a", "output": "b"}) == "input-output"
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"messages": []}) == "messages"
    with pytest.raises(RecordError, match="unsure"):
        detect_format({"messages": [], "conversations": []})
    with pytest.raises(RecordError, match="unsure"):
        detect_format({"prompt": "x", "response": "y"})


def test_adapters_to_canonical():
    alpaca = ADAPTERS["alpaca"]({"instruction": "Q", "input": "ctx", "output": "A", "system": "S",
                                 "history": [["q0", "a0"]]})
    assert alpaca["messages"] == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "a0"}, {"role": "user", "content": "Q\nctx"},
        {"role": "assistant", "content": "A"}]
    share = ADAPTERS["sharegpt"]({"conversations": [{"from": "human", "value": "hi"},
                                                    {"from": "gpt", "value": "yo"}]})
    assert share["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    msgs = ADAPTERS["messages"]({"messages": [
        {"role": "user", "content": [{"type": "text", "value": "a"}, {"type": "text", "value": "b"}]},
        {"role": "assistant", "content": "c"}]})
    assert msgs["messages"][0]["content"] == "ab"
    assert ADAPTERS["input-output"]({"input": "p", "output": "r"}) == {"input": "p", "output": "r"}


@pytest.mark.parametrize("raw,field,reason", [
    ({"conversations": [{"from": "human", "value": "hi"}]}, "conversations", "bad_conversation"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}]},
     "conversations[1].value", "wrong_type"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "conversations[0].from", "unknown_role"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"},
                        {"from": "gpt", "value": "c"}]}, "conversations[1]", "bad_conversation"),
])
def test_sharegpt_errors_name_the_field(raw, field, reason):
    with pytest.raises(RecordError) as e:
        ADAPTERS["sharegpt"](raw)
    assert e.value.field == field and e.value.reason == reason


def test_bom_at_the_start_of_a_file_is_not_data(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.txt").write_bytes(bom + "héllo\nworld\n".encode())
    (tmp_path / "b.jsonl").write_bytes(bom + jsonl_bytes(RECORDS[:2]))
    (tmp_path / "c.json").write_bytes(bom + json.dumps(RECORDS[:2]).encode())
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(bom + b"para one\n\npara two\n"))
    assert [t for _, _, t in read_all(tmp_path / "a.txt")] == ["héllo", "world"]
    assert [t for _, _, t in read_all(tmp_path / "b.jsonl")] == RECORDS[:2]
    assert [t for _, _, t in read_all(tmp_path / "c.json")] == RECORDS[:2]
    assert [t for _, _, t in read_all(tmp_path / "d.txt.gz", txt_paragraphs=True)] == ["para one", "para two"]
    # only the file's first bytes: a BOM later in a file is text (U+FEFF), and a later unit's start is not a file start
    (tmp_path / "e.txt").write_bytes(b"x\n" + bom + b"y\n")
    assert [t for _, _, t in read_all(tmp_path / "e.txt")] == ["x", "\ufeffy"]


def test_hidden_entries_of_a_directory_source_are_skipped(tmp_path):
    d = tmp_path / "d"
    (d / ".ipynb_checkpoints").mkdir(parents=True)
    (d / "sub").mkdir()
    (d / "a.jsonl").write_bytes(jsonl_bytes(RECORDS[:2]))
    (d / "sub" / "b.jsonl").write_bytes(jsonl_bytes(RECORDS[2:]))
    (d / "._a.jsonl").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (d / ".DS_Store.json").write_bytes(b"\x00\x00\x00\x01Bud1")
    (d / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_bytes(jsonl_bytes(RECORDS))
    assert [f.split("/d/")[1] for f in expand_source(str(d))] == ["a.jsonl", "sub/b.jsonl"]
    assert expand_source(str(d / "._a.jsonl")) == [str(d / "._a.jsonl")]  # named explicitly: read


def test_unit_plan_is_memoised_by_content(tmp_path, monkeypatch):
    from pipeline.cache import file_fingerprint
    import stages.readers as readers
    p = tmp_path / "big.jsonl"
    p.write_bytes(jsonl_bytes([{"text": f"r{i} " + "x" * (i % 7)} for i in range(1000)]))
    monkeypatch.setattr(readers, "_TRUST_AFTER_S", -1e9)  # no trust window: only the stat stamp decides
    memo = {}
    file_fingerprint(str(p), memo)
    first = plan_units([str(p)], unit_bytes=1000, memo=memo)
    assert first == plan_units([str(p)], unit_bytes=1000)  # the same plan as an unmemoised scan
    monkeypatch.setattr(readers, "_scan_line_ranges", lambda *a: pytest.fail("re-scanned a memoised file"))
    assert plan_units([str(p)], unit_bytes=1000, memo=memo) == first
    monkeypatch.undo()
    monkeypatch.setattr(readers, "_TRUST_AFTER_S", -1e9)
    with open(p, "ab") as f:  # an edit changes the stamp: the memo is not used
        f.write(b'{"text": "one more"}\n')
    again = plan_units([str(p)], unit_bytes=1000, memo=memo)
    assert sum(1 for u in again for _ in iter_unit(u)) == 1001
