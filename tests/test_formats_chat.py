"""Chat format adapters: every source format → the canonical record, written out by hand;
and conversations that cannot be rendered faithfully are refused with a named field."""
import json

import pytest

from stages.errors import RecordError
from stages.formats import ADAPTERS, check_conversation, parse_tools

TOOL = {"name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def fails(fmt, raw, field, reason):
    with pytest.raises(RecordError) as e:
        ADAPTERS[fmt](raw)
    assert (e.value.field, e.value.reason) == (field, reason), str(e.value)
    return e.value


# -- alpaca ------------------------------------------------------------------------------
def test_alpaca_with_system_history_and_input():
    got = ADAPTERS["alpaca"]({"instruction": "Translate", "input": "你好", "output": "Hello",
                              "system": "Be brief.", "history": [["Hi", "Hi!"], ["Who are you?", "A bot."]]})
    assert got == {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A bot."},
        {"role": "user", "content": "Translate\n你好"}, {"role": "assistant", "content": "Hello"}]}


def test_alpaca_errors():
    fails("alpaca", {"instruction": "q", "output": "a", "history": [["only query"]]}, "history[0]", "wrong_type")
    fails("alpaca", {"instruction": "q", "output": "a", "history": "no"}, "history", "wrong_type")
    fails("alpaca", {"instruction": "", "input": "", "output": "a"}, "instruction", "empty_sample")
    fails("alpaca", {"instruction": "q", "output": " "}, "output", "empty_sample")


# -- sharegpt ----------------------------------------------------------------------------
def test_sharegpt_tools_function_call_observation():
    raw = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "21 °C."}],
        "system": "You are a weather bot.", "tools": json.dumps([TOOL])}
    assert ADAPTERS["sharegpt"](raw) == {
        "messages": [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "21 °C."}],
        "tools": [TOOL]}


def test_sharegpt_system_role_and_string_arguments():
    raw = {"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "q"},
        {"from": "function_call", "value": '[{"name": "f", "arguments": "{\\"x\\": 1}"}, {"name": "g"}]'},
        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]}
    msgs = ADAPTERS["sharegpt"](raw)["messages"]
    assert msgs[0] == {"role": "system", "content": "S"}
    assert msgs[2]["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                                     {"type": "function", "function": {"name": "g", "arguments": {}}}]


@pytest.mark.parametrize("turns,field,reason", [
    (["human"], "conversations", "bad_conversation"),  # odd length: no answer
    (["human", "gpt", "human"], "conversations", "bad_conversation"),  # odd length
    (["human", "human", "gpt"], "conversations[1]", "bad_conversation"),
    (["human", "gpt", "gpt"], "conversations[2]", "bad_conversation"),
    (["gpt", "human", "gpt"], "conversations[0]", "bad_conversation"),
    (["human", "observation", "gpt"], "conversations[1]", "bad_conversation"),
    (["human", "gpt", "observation", "human", "gpt"], "conversations[3]", "bad_conversation"),
    (["human", "gpt", "system", "gpt"], "conversations[2]", "bad_conversation"),
])
def test_sharegpt_non_alternating_is_refused_never_reshaped(turns, field, reason):
    conv = [{"from": t, "value": "x"} for t in turns]
    fails("sharegpt", {"conversations": conv}, field, reason)


def test_sharegpt_errors_name_the_source_position_with_a_top_level_system():
    conv = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}, {"from": "gpt", "value": "c"}]
    fails("sharegpt", {"conversations": conv, "system": "S"}, "conversations[1]", "bad_conversation")


def test_sharegpt_bad_tools_and_calls():
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    fails("sharegpt", {"conversations": conv, "tools": "[not json"}, "tools", "bad_tools")
    fails("sharegpt", {"conversations": conv, "tools": '"a string"'}, "tools", "bad_tools")
    bad = [{"from": "human", "value": "q"}, {"from": "function_call", "value": "call f"},
           {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]
    fails("sharegpt", {"conversations": bad}, "conversations[1].value", "bad_tool_call")
    bad[1]["value"] = '{"arguments": {}}'
    fails("sharegpt", {"conversations": bad}, "conversations[1].value[0]", "bad_tool_call")


def test_sharegpt_empty_tools_are_dropped():
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    assert "tools" not in ADAPTERS["sharegpt"]({"conversations": conv, "tools": "[]"})
    assert parse_tools("") is None and parse_tools(TOOL) == [TOOL]


# -- messages ----------------------------------------------------------------------------
def test_messages_typed_parts_reasoning_tool_calls_and_tools_string():
    raw = {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "Use tools."}]},
        {"role": "user", "content": [{"type": "text", "value": "Area of r=2?"}]},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": "Need circle_area."},
            {"type": "tool_call", "value": '{"name": "circle_area", "arguments": {"radius": 2}}'}]},
        {"role": "tool", "content": [{"type": "text", "value": "12.57"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Got it. "},
                                          {"type": "reasoning", "value": "Answer."},
                                          {"type": "text", "value": "About "}, {"type": "text", "value": "12.57."}]}],
        "tools": json.dumps([{"type": "function", "function": TOOL}])}
    assert ADAPTERS["messages"](raw) == {
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "Area of r=2?"},
            {"role": "assistant", "content": "", "reasoning_content": "Need circle_area.", "tool_calls": [
                {"type": "function", "function": {"name": "circle_area", "arguments": {"radius": 2}}}]},
            {"role": "tool", "content": "12.57"},
            {"role": "assistant", "content": "About 12.57.", "reasoning_content": "Got it. Answer."}],
        "tools": [{"type": "function", "function": TOOL}]}


def test_messages_loss_weight_reasoning_effort_and_fields():
    raw = {"reasoning_effort": "high", "messages": [
        {"role": "user", "content": [{"type": "text", "value": "hi"}], "loss_weight": 0.0},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet", "loss_weight": 1.0},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "bye", "reasoning": "r2", "loss_weight": 0}]}
    got = ADAPTERS["messages"](raw)
    assert got["reasoning_effort"] == "high"
    assert got["messages"] == [
        {"role": "user", "content": "hi", "loss_weight": 0},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet", "loss_weight": 1},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "bye", "reasoning_content": "r2", "loss_weight": 0}]


def test_messages_hunyuan_inline_think_and_no_think_are_kept_as_text():
    raw = {"messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "/no_think Why is seawater salty?"},
        {"role": "assistant", "content": "<think>\n\n</think>\n<answer>\nSalts.\n</answer>"}]}
    assert ADAPTERS["messages"](raw)["messages"] == raw["messages"]


@pytest.mark.parametrize("msgs,field,reason", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss_weight": 0.5}],
     "messages[1].loss_weight", "unsupported_loss_weight"),
    ([{"role": "user", "content": "q", "loss_weight": 1}, {"role": "assistant", "content": "a"}],
     "messages[0].loss_weight", "unsupported_loss_weight"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": [
        {"type": "text", "value": "a"}, {"type": "reasoning", "value": "late"}]}],
     "messages[1].content[1].type", "unsupported_part"),
    ([{"role": "user", "content": [{"type": "image", "value": "x.png"}]}, {"role": "assistant", "content": "a"}],
     "messages[0].content[0].type", "unsupported_part"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>a",
                                         "reasoning_content": "x"}],
     "messages[1].content", "bad_reasoning"),
    ([{"role": "user", "content": "q", "reasoning_content": "x"}, {"role": "assistant", "content": "a"}],
     "messages[0]", "bad_reasoning"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tool_calls": "f()"}],
     "messages[1].tool_calls", "bad_tool_call"),
    ([{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}], "messages[1].role", "unknown_role"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}],
     "messages[1].content", "wrong_type"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}], "messages", "empty_sample"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}],
     "messages", "bad_conversation"),
])
def test_messages_errors(msgs, field, reason):
    fails("messages", {"messages": msgs}, field, reason)


def test_reasoning_effort_must_be_a_string():
    fails("messages", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       "reasoning_effort": 3}, "reasoning_effort", "wrong_type")


def test_fm9g_input_output():
    assert ADAPTERS["input-output"]({"input": "问：", "output": "答"}) == {"input": "问：", "output": "答"}
    assert ADAPTERS["input-output"]({"output": "only"}) == {"input": "", "output": "only"}
    fails("input-output", {"input": "q", "output": ""}, "output", "empty_sample")


def test_check_conversation_allows_parallel_tool_results():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
            {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "a"}]
    assert check_conversation(msgs, "messages") is msgs
