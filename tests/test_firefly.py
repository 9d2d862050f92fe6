"""Firefly multi-turn, LLaMA-Factory typed-part messages and OpenAI string tool arguments
(stages/formats.py, issues 14 and 15): each builds, through the real pipeline, the ids and
spans of the equivalent canonical record (converted independently here)."""
from __future__ import annotations

import json

import pytest

from stages.errors import RecordError
from stages.formats import ADAPTERS, detect_format

from conftest import SHARED
from test_columns import assert_same_build, build_datasets, write_jsonl

QWEN = SHARED / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
CORPORA = SHARED / "corpora"
need_shared = pytest.mark.skipif(not QWEN.is_dir() or not CORPORA.is_dir(),
                                 reason=f"{SHARED} is absent: needs the Qwen2.5 tokenizer and corpora")

FIREFLY = [
    {"conversation_id": 1, "category": "Brainstorming", "system": "You are Firefly.",
     "conversation": [{"human": "Give me a name.", "assistant": "Luna."},
                      {"human": "Another?", "assistant": "Sol."}]},
    {"conversation_id": 2, "conversation": [{"human": "你好", "assistant": "你好！"}]},
]


def firefly_as_messages(rec: dict) -> dict:
    msgs = [{"role": "system", "content": rec["system"]}] if rec.get("system") else []
    for turn in rec["conversation"]:
        msgs += [{"role": "user", "content": turn["human"]}, {"role": "assistant", "content": turn["assistant"]}]
    return {"messages": msgs}


def test_firefly_is_detected_and_builds_like_messages(tmp_path):
    assert detect_format(FIREFLY[0]) == "firefly"
    plans = build_datasets(tmp_path, [
        {"dataset_name": "firefly", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "f.jsonl", FIREFLY))},
        {"dataset_name": "named", "abs_weight": 1, "format": "firefly",
         "path": str(write_jsonl(tmp_path / "n.jsonl", FIREFLY))},
        {"dataset_name": "canon", "abs_weight": 1, "format": "messages",
         "path": str(write_jsonl(tmp_path / "c.jsonl", [firefly_as_messages(r) for r in FIREFLY]))}])
    assert plans["firefly"].job.format == "firefly"
    assert_same_build(plans, "firefly", "canon")
    assert_same_build(plans, "named", "canon")


@pytest.mark.parametrize("rec,field,reason", [
    ({"conversation": [{"human": "q"}]}, "conversation[0].assistant", "missing_field"),
    ({"conversation": [{"human": None, "assistant": "a"}]}, "conversation[0].human", "wrong_type"),
    ({"conversation": []}, "conversation", "empty_sample"),
    ({"conversation": [{"human": "q", "assistant": " "}]}, "conversation", "empty_sample"),
])
def test_firefly_errors(rec, field, reason):
    with pytest.raises(RecordError) as info:
        ADAPTERS["firefly"](rec)
    assert (info.value.field, info.value.reason) == (field, reason)


TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                         "parameters": {"type": "object",
                                                        "properties": {"city": {"type": "string"}}}}}


def typed_record() -> dict:
    """LLaMA-Factory v1 typed parts: a tools part on the system turn, tool_calls (plural)."""
    return {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "Be helpful."},
                                       {"type": "tools", "value": json.dumps([TOOL])}]},
        {"role": "user", "content": [{"type": "text", "value": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": "Two cities: two calls."},
            {"type": "tool_calls", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                        {"name": "get_weather", "arguments": {"city": "Rome"}}])}]},
        {"role": "tool", "content": [{"type": "text", "value": "sunny"}]},
        {"role": "tool", "content": [{"type": "text", "value": "rainy"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "Paris is sunny, Rome rainy."}]}]}


def typed_as_openai(rec: dict) -> dict:
    """Independent conversion of typed parts to OpenAI messages."""
    out, tools = [], None
    for m in rec["messages"]:
        msg = {"role": m["role"], "content": "".join(p["value"] for p in m["content"] if p["type"] == "text")}
        reasoning = "".join(p["value"] for p in m["content"] if p["type"] == "reasoning")
        if reasoning:
            msg["reasoning_content"] = reasoning
        calls = []
        for p in m["content"]:
            if p["type"] == "tool_call":
                calls.append(json.loads(p["value"]))
            elif p["type"] == "tool_calls":
                calls += json.loads(p["value"])
            elif p["type"] == "tools":
                tools = json.loads(p["value"])
        if calls:
            msg["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        out.append(msg)
    if "tools" in rec:
        tools = json.loads(rec["tools"]) if isinstance(rec["tools"], str) else rec["tools"]
    return {"messages": out, **({"tools": tools} if tools else {})}


def test_typed_parts_with_tools_and_tool_calls_parts_build_like_openai(tmp_path):
    rec = typed_record()
    plans = build_datasets(tmp_path, [
        {"dataset_name": "typed", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "t.jsonl", [rec]))},
        {"dataset_name": "canon", "abs_weight": 1,
         "path": str(write_jsonl(tmp_path / "c.jsonl", [typed_as_openai(rec)]))}])
    assert_same_build(plans, "typed", "canon")
    got = ADAPTERS["messages"](rec)
    assert got["tools"] == [TOOL] and got["messages"][0] == {"role": "system", "content": "Be helpful."}


def test_a_tools_part_alone_makes_no_system_turn_and_belongs_on_system():
    rec = typed_record()
    rec["messages"][0]["content"] = rec["messages"][0]["content"][1:]
    got = ADAPTERS["messages"](rec)
    assert got["messages"][0]["role"] == "user" and got["tools"] == [TOOL]
    rec["messages"][1]["content"].append({"type": "tools", "value": "[]"})
    with pytest.raises(RecordError) as info:
        ADAPTERS["messages"](rec)
    assert (info.value.field, info.value.reason) == ("messages[1].content[1].type", "unsupported_part")


@need_shared
@pytest.mark.slow
@pytest.mark.parametrize("name", ["llamafactory-reasoning-toolcall/reason_tool_use_demo_50.jsonl",
                                  "llamafactory-v1-messages/v1_sft_demo.jsonl"])
def test_real_typed_part_files_build_like_their_openai_conversion(tmp_path, name):
    recs = [json.loads(line) for line in (CORPORA / name).read_text().splitlines()][:60]
    canon = []
    for r in recs:
        c = typed_as_openai(r)
        for m, src in zip(c["messages"], r["messages"]):
            if "loss_weight" in src:
                m["loss_weight"] = int(src["loss_weight"])
        canon.append(c)
    plans = build_datasets(tmp_path, [
        {"dataset_name": "real", "abs_weight": 1, "path": str(CORPORA / name)},  # the whole file, as it is
        {"dataset_name": "real60", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "r.jsonl", recs))},
        {"dataset_name": "canon", "abs_weight": 1, "path": str(write_jsonl(tmp_path / "c.jsonl", canon))}])
    assert plans["real"].meta["skipped"] == {}
    assert_same_build(plans, "real60", "canon")


# -- issue 14: OpenAI string arguments ----------------------------------------------------
def tool_chat(arguments, tools) -> dict:
    return {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}], "tools": tools}


def shard_bytes(plans) -> list[bytes]:
    p = plans["tools"]
    return [(p.entry.final / sh["file"]).read_bytes() for sh in p.meta["shards"]]


@need_shared
@pytest.mark.parametrize("template", ["tokenizer", "chatml"])
def test_string_and_object_arguments_give_byte_identical_shards(tmp_path, template):
    forms = {"object": tool_chat({"city": "Paris"}, [TOOL]),
             "string": tool_chat(json.dumps({"city": "Paris"}), [json.dumps(TOOL)])}
    src = tmp_path / "tools.jsonl"  # same path for both: the shard names its source
    built = {}
    for name, rec in forms.items():
        write_jsonl(src, [rec, {**rec, "tools": json.dumps(rec["tools"])}])
        built[name] = build_datasets(tmp_path / name, [{"dataset_name": "tools", "abs_weight": 1, "path": str(src)}],
                                     tokenizer=str(QWEN), template=template)
    assert shard_bytes(built["object"]) == shard_bytes(built["string"])
    # ... and both are rendered as an object, never double-encoded (decoded with the tokenizer itself).
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(QWEN))
    from test_columns import samples
    text = tok.decode(samples(built["string"]["tools"])[0][0])
    assert '"arguments": {"city": "Paris"}' in text and '\\"city\\"' not in text


def test_non_json_string_arguments_stay_strings():
    got = ADAPTERS["messages"](tool_chat("city=Paris", [TOOL]))
    assert got["messages"][1]["tool_calls"][0]["function"]["arguments"] == "city=Paris"
    got = ADAPTERS["messages"](tool_chat('["Paris"]', [TOOL]))  # JSON, but not an object
    assert got["messages"][1]["tool_calls"][0]["function"]["arguments"] == '["Paris"]'
    with pytest.raises(RecordError) as info:
        ADAPTERS["messages"](tool_chat({}, ["{not json"]))
    assert (info.value.field, info.value.reason) == ("tools[0]", "bad_tools")


@pytest.mark.parametrize("content,reason", [(None, "wrong_type"), (5, "wrong_type")])
def test_null_user_content_is_a_wrong_type_fault(content, reason):
    with pytest.raises(RecordError) as info:
        ADAPTERS["messages"]({"messages": [{"role": "user", "content": content},
                                           {"role": "assistant", "content": "a"}]})
    assert (info.value.field, info.value.reason) == ("messages[0].content", reason)
    with pytest.raises(RecordError) as info:  # null is fine only beside tool calls
        ADAPTERS["messages"]({"messages": [{"role": "user", "content": "q"},
                                           {"role": "assistant", "content": None}]})
    assert info.value.reason == "wrong_type"

    assert ADAPTERS["messages"](tool_chat({"city": "Paris"}, json.dumps([TOOL])))["tools"] == [TOOL]


def test_record_template_variables_reach_the_renderer():
    """issue 14: a record's own template variables are kept by every chat adapter."""
    extra = {"enable_thinking": False, "template_kwargs": {"token_suffix": "<x>"}}
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for fmt, rec in (("messages", {"messages": chat}), ("firefly", FIREFLY[1]),
                     ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}),
                     ("alpaca", {"instruction": "q", "output": "a"})):
        got = ADAPTERS[fmt]({**rec, **extra})
        assert got["template_kwargs"] == {"token_suffix": "<x>"}
        assert got.get("enable_thinking", False) is False
