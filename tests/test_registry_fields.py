"""A LLaMA-Factory registry entry reads its file as fully as naming the file directly does
(issue 24): `formatting: sharegpt` + role/content `tags` over an OpenAI-style messages file keeps
every field the messages reader keeps (reasoning_content, reasoning_effort, tool calls,
loss_weight, tools) — the same shard bytes either way. A mapped key no record has is refused
naming the key and the file; malformed entries are one error line each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixtures.manifest import ManifestError, load_manifest
from stages.errors import BuildError

from conftest import SAMPLE
from test_columns import build_datasets, write_jsonl

TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers.",
                                         "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}
RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."}],
     "reasoning_effort": "high"},
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello", "reasoning_content": "A greeting.", "loss_weight": 0},
                  {"role": "user", "content": "Add 1"},
                  {"role": "assistant", "content": None,
                   "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{\"a\": 1}"}}]},
                  {"role": "tool", "content": "2"},
                  {"role": "assistant", "content": "It is 2."}],
     "tools": [TOOL]},
]
TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
        "system_tag": "system", "observation_tag": "tool"}


def registry(tmp: Path, entries: dict) -> Path:
    path = tmp / "dataset_info.json"
    path.write_text(json.dumps(entries))
    return path


def shard_bytes(plan) -> list[bytes]:
    return [(plan.entry.final / sh["file"]).read_bytes() for sh in plan.meta["shards"]]


def test_sharegpt_tags_over_messages_keep_every_field(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", RECORDS)
    info = registry(tmp_path, {"chat": {"file_name": "chat.jsonl", "formatting": "sharegpt",
                                        "columns": {"messages": "messages", "tools": "tools"}, "tags": TAGS}})
    direct = build_datasets(tmp_path / "direct", [{"dataset_name": "chat", "abs_weight": 1, "path": str(data)}])
    via = build_datasets(tmp_path / "registry", [{"dataset_info": str(info), "dataset": "chat", "abs_weight": 1}])
    assert direct["chat"].job.format == "messages" and via["chat"].job.format.base == "sharegpt"
    assert direct["chat"].meta["n_samples"] == len(RECORDS) == via["chat"].meta["n_samples"]
    assert shard_bytes(direct["chat"]) == shard_bytes(via["chat"])
    # the reasoning is in the samples (decoded by the tokenizer library itself)
    from tokenizers import Tokenizer
    from test_columns import samples
    tok = Tokenizer.from_file(str(SAMPLE / "tokenizer" / "tokenizer.json"))
    text = tok.decode(samples(via["chat"])[0][0], skip_special_tokens=False)
    assert "Two and two make four." in text


def test_a_mapped_key_no_record_has_is_refused_naming_key_and_file(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": "q", "output": "a", "sys": "s"}] * 2)
    with pytest.raises(BuildError) as e:
        build_datasets(tmp_path, [{"dataset_name": "qa", "abs_weight": 1, "path": str(data),
                                   "columns": {"prompt": "instruction", "system": "sys_prompt_typo"}}])
    assert "'sys_prompt_typo'" in str(e.value) and str(data) in str(e.value) and "columns.system" in str(e.value)
    # a key some records have is fine: those records are built without that part
    data2 = write_jsonl(tmp_path / "qa2.jsonl", [{"instruction": "q", "output": "a"},
                                                  {"instruction": "q", "output": "a", "sys": "s"}])
    plans = build_datasets(tmp_path / "ok", [{"dataset_name": "qa", "abs_weight": 1, "path": str(data2),
                                              "columns": {"prompt": "instruction", "system": "sys"}}])
    assert plans["qa"].meta["n_samples"] == 2


@pytest.mark.parametrize("entry,text", [
    ({"file_name": "x.jsonl", "columns": ["prompt", "response"]}, 'columns must be a JSON object of names, got ["prompt"'),
    ({"file_name": "x.jsonl", "columns": "prompt"}, 'columns must be a JSON object of names, got "prompt"'),
    ({"file_name": "x.jsonl", "formatting": "sharegpt", "tags": ["role"]}, "tags must be a JSON object"),
    ({"file_name": "x.jsonl", "formatting": "sharegpt", "tags": "role"}, "tags must be a JSON object"),
    ({"file_name": 3}, "file_name must be a non-empty string, got 3"),
    ({"file_name": ["x.jsonl"]}, "file_name must be a non-empty string"),
    ({"file_name": "x.jsonl", "columns": {"prompt": 1}}, "columns.prompt must be a non-empty string, got 1"),
    ({"file_name": "x.jsonl", "columns": {"prompt": None}}, "columns.prompt must be a non-empty string, got null"),
    ({"file_name": "x.jsonl", "formatting": "sharegpt", "tags": {"role_tag": {"a": 1}}}, "tags.role_tag must be"),
    ({"file_name": "x.jsonl", "formatting": ["alpaca"]}, 'formatting ["alpaca"] is not supported'),
])
def test_malformed_registry_entries_are_one_error_line(tmp_path, entry, text, capsys):
    write_jsonl(tmp_path / "x.jsonl", [{"instruction": "q", "output": "a"}])
    info = registry(tmp_path, {"bad": entry})
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"tokenizer": str(SAMPLE / "tokenizer"),
                                    "datasets": [{"dataset_info": str(info), "dataset": "bad", "abs_weight": 1}]}))
    with pytest.raises(ManifestError) as e:
        load_manifest(manifest)
    assert text in str(e.value) and "'bad'" in str(e.value)
    from pipeline.cli import main
    assert main(["plan", str(manifest)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and text in err
