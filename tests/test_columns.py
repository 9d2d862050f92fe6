"""Column mappings (stages/columns.py, issue 15): a file with its own keys builds, through the
real pipeline, exactly the ids and loss spans of the same records written in the canonical
keys; mapped keys missing from a record are named by the file's own key."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixtures.manifest import ManifestError, load_manifest
from pipeline.build import build_mixture
from stages.columns import DatasetFormat
from stages.errors import RecordError
from stages.formats import ADAPTERS
from stages.shard import read_shard

from conftest import SAMPLE


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def samples(plan) -> list[tuple[list[int], list | None]]:
    """(token ids, loss spans) of every sample of a built dataset, read from its shard files."""
    out = []
    for sh in plan.meta["shards"]:
        a = read_shard(plan.entry.final / sh["file"], mmap=False)
        for i in range(len(a.offsets) - 1):
            ids = a.tokens[a.offsets[i]:a.offsets[i + 1]].tolist()
            spans = (None if a.loss_spans is None
                     else a.loss_spans[a.loss_span_offsets[i]:a.loss_span_offsets[i + 1]].tolist())
            out.append((ids, spans))
    return out


def build_datasets(tmp: Path, datasets: list[dict], *, tokenizer: str | None = None,
                   template: str = "chatml", **kw) -> dict:
    """Build an object-form manifest of `datasets` → {dataset_name: plan}."""
    manifest = {"tokenizer": tokenizer or str(SAMPLE / "tokenizer"), "template": template,
                "max_length": 4096, "datasets": datasets}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "mixture.json"
    path.write_text(json.dumps(manifest))
    _, plans, _ = build_mixture(str(path), out=str(tmp / "out"), workers=1, **kw)
    return {p.spec.dataset_name: p for p in plans}


def assert_same_build(plans: dict, a: str, b: str) -> None:
    got, want = samples(plans[a]), samples(plans[b])
    assert len(got) == len(want) > 0
    for (ids, spans), (ids2, spans2) in zip(got, want):
        assert ids == ids2
        assert spans == spans2


QA = [{"question": "What is 2+2?", "answer": "4", "id": 1},
      {"question": "Name a colour.", "answer": "Blue.", "id": 2}]


@pytest.mark.parametrize("layout,columns", [
    ({"question": "q", "answer": "a"}, {"prompt": "question", "response": "answer"}),
    ({"input": "q", "label": "a"}, {"prompt": "input", "response": "label"}),
    ({"prompt": "q", "response": "a"}, {"prompt": "prompt", "response": "response"}),
])
def test_alpaca_mappings_build_like_canonical_alpaca(tmp_path, layout, columns):
    pk, rk = list(layout)
    mapped = [{pk: r["question"], rk: r["answer"], "id": r["id"]} for r in QA]
    canonical = [{"instruction": r["question"], "input": "", "output": r["answer"]} for r in QA]
    plans = build_datasets(tmp_path, [
        {"dataset_name": "mapped", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "m.jsonl", mapped)),
         "columns": columns},
        {"dataset_name": "canon", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "c.jsonl", canonical)),
         "format": "alpaca"}])
    assert_same_build(plans, "mapped", "canon")
    assert plans["mapped"].job.format.base == "alpaca"


def test_query_system_history_columns(tmp_path):
    mapped = [{"q": "Translate", "ctx": "chat", "sys": "Be brief.", "past": [["hi", "hello"]], "a": "聊天"}]
    canonical = [{"instruction": "Translate", "input": "chat", "system": "Be brief.",
                  "history": [["hi", "hello"]], "output": "聊天"}]
    plans = build_datasets(tmp_path, [
        {"dataset_name": "mapped", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "m.jsonl", mapped)),
         "formatting": "alpaca",
         "columns": {"prompt": "q", "query": "ctx", "system": "sys", "history": "past", "response": "a"}},
        {"dataset_name": "canon", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "c.jsonl", canonical)),
         "format": "alpaca"}])
    assert_same_build(plans, "mapped", "canon")


def test_sharegpt_messages_with_role_content_tags(tmp_path):
    mapped = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                            {"role": "assistant", "content": "a2"}]}]
    canonical = [{"messages": mapped[0]["messages"]}]
    plans = build_datasets(tmp_path, [
        {"dataset_name": "mapped", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "m.jsonl", mapped)),
         "formatting": "sharegpt", "columns": {"messages": "messages"},
         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                  "assistant_tag": "assistant", "system_tag": "system"}},
        {"dataset_name": "canon", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "c.jsonl", canonical)),
         "format": "messages"}])
    assert_same_build(plans, "mapped", "canon")


def test_content_text_mapping(tmp_path):
    docs = ["first document", "second one, longer than the first"]
    plans = build_datasets(tmp_path, [
        {"dataset_name": "mapped", "abs_weight": 1, "columns": {"prompt": "content"},
         "path": str(write_jsonl(tmp_path / "m.jsonl", [{"content": d, "url": "x"} for d in docs]))},
        {"dataset_name": "canon", "abs_weight": 1, "format": "text",
         "path": str(write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs]))}])
    got, want = samples(plans["mapped"]), samples(plans["canon"])
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    for ids, spans in got:  # every token trains (a text dataset has no spans, or one full span)
        assert spans in (None, [[0, len(ids)]])
    assert plans["mapped"].job.format.base == "text"


def test_mapping_is_part_of_the_cache_key(tmp_path):
    rows = [{"a": "x", "b": "y"}]
    path = str(write_jsonl(tmp_path / "m.jsonl", rows))
    plans = build_datasets(tmp_path, [
        {"dataset_name": "ab", "abs_weight": 1, "path": path, "columns": {"prompt": "a", "response": "b"}},
        {"dataset_name": "ba", "abs_weight": 1, "path": path, "columns": {"prompt": "b", "response": "a"}}])
    assert plans["ab"].entry.key != plans["ba"].entry.key
    assert samples(plans["ab"]) != samples(plans["ba"])


def test_missing_mapped_key_names_the_files_key():
    fmt = DatasetFormat.of("alpaca", {"prompt": "question", "response": "answer"})
    with pytest.raises(RecordError) as info:
        ADAPTERS[fmt]({"question": "q"})
    assert info.value.reason == "missing_field" and info.value.field == "answer"
    with pytest.raises(RecordError) as info:  # the adapter's own faults, renamed back
        ADAPTERS[fmt]({"question": 5, "answer": "a"})
    assert info.value.reason == "wrong_type" and info.value.field == "question"
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    sg = DatasetFormat.of("sharegpt", {"messages": "dialog"}, tags)
    for turns, field, reason in (
        ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "dialog[1].role", "unknown_role"),
        ([{"role": "user", "content": "q"}, {"role": "assistant"}], "dialog[1].content", "missing_field"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}], "dialog[1].content",
         "wrong_type"),
        ([{"role": "user", "content": "q"}], "dialog", "bad_conversation"),
    ):
        with pytest.raises(RecordError) as info:
            ADAPTERS[sg]({"dialog": turns})
        assert (info.value.field, info.value.reason) == (field, reason)


def test_a_same_named_key_is_not_read_when_its_column_is_remapped():
    fmt = DatasetFormat.of("alpaca", {"prompt": "input", "response": "label"})
    got = ADAPTERS[fmt]({"input": "Q", "label": "A", "instruction": "not me"})
    assert got["messages"] == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_format_value_round_trip_and_identity_columns_drop_out():
    fmt = DatasetFormat.of("sharegpt", {"messages": "m"}, {"role_tag": "role", "user_tag": "human"})
    assert (fmt.base, fmt.column_map, fmt.tag_map) == ("sharegpt", {"messages": "m"}, {"role_tag": "role"})
    # the serialised form the cache key and meta.json hold (compact sorted JSON), read back equal
    assert str(fmt) == 'sharegpt {"columns":{"messages":"m"},"tags":{"role_tag":"role"}}'
    assert DatasetFormat.parse(str(fmt)) == fmt and hash(fmt) == hash(str(fmt))
    assert DatasetFormat.of("text", {"prompt": "text"}) == "text" and DatasetFormat.of("text").is_text
    assert str(DatasetFormat.of("alpaca", {"prompt": "instruction", "response": "output"})) == "alpaca"
    assert not DatasetFormat.of("alpaca", {"prompt": "instruction"}).mapped


def write_manifest(tmp: Path, entry: dict) -> Path:
    (tmp / "d.jsonl").write_text('{"a": "x", "b": "y"}\n')
    m = {"tokenizer": str(SAMPLE / "tokenizer"), "datasets": [{"dataset_name": "d", "abs_weight": 1,
                                                               "path": "d.jsonl", **entry}]}
    path = tmp / "m.json"
    path.write_text(json.dumps(m))
    return path


@pytest.mark.parametrize("entry,where,text", [
    ({"columns": {"promt": "a"}}, "datasets[0].columns.promt", "did you mean 'prompt'"),
    ({"columns": {"prompt": ""}}, "datasets[0].columns.prompt", "must not be empty"),
    ({"columns": {"prompt": 3}}, "datasets[0].columns.prompt", "expected string"),
    ({"tags": {"role": "r"}}, "datasets[0].tags.role", "unknown key"),
    ({"formatting": "openai"}, "datasets[0].formatting", "must be one of alpaca, sharegpt"),
    ({"format": "text", "columns": {"response": "b"}}, "datasets[0].columns.response", "has no 'response'"),
    ({"columns": {"prompt": "a", "response": "a"}}, "datasets[0].columns.response", "already mapped"),
    ({"format": "alpaca", "tags": {"role_tag": "r"}}, "datasets[0].tags", "sharegpt only"),
    ({"format": "alpaca", "formatting": "sharegpt"}, "datasets[0].formatting", "contradicts"),
])
def test_mapping_keys_are_validated(tmp_path, entry, where, text):
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(tmp_path, entry))
    assert any(p == where and text in what for p, what in info.value.problems), info.value.problems


def test_mapping_travels_in_the_spec_format(tmp_path):
    spec = load_manifest(write_manifest(tmp_path, {"columns": {"prompt": "a", "response": "b"}})).datasets[0]
    assert (spec.format.base, spec.format.column_map, spec.format.tag_map) == (
        "alpaca", {"prompt": "a", "response": "b"}, {})
    assert ADAPTERS[spec.format]({"a": "x", "b": "y"})["messages"][1] == {"role": "assistant", "content": "y"}
    assert np.array_equal([1], [1])
