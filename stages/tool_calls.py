"""Tool calls and tool schemas in records: parsed and checked once for every adapter.

A JSON string (LLaMA-Factory, the OpenAI API form) is parsed: `tools` given as a string, a
tool schema or its `parameters` given as a string, a tool call given as a string, and tool-call
`arguments` given as a string of a JSON object all become objects, so string and object forms
render identical tokens. An `arguments` string that is not a JSON object stays a string.
"""
from __future__ import annotations

import json
from typing import Any

from .errors import RecordError

def _json(value: Any, field: str, reason: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as e:
            raise RecordError(reason, f"is not valid JSON ({e})", field=field) from None
    return value


def parse_tools(value: Any, field: str = "tools") -> list | None:
    """`tools` as a list of JSON schemas; a JSON string (LLaMA-Factory) is parsed."""
    if value is None or value == "" or value == []:
        return None
    tools = _json(value, field, "bad_tools")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise RecordError("bad_tools", "must be a list of JSON objects (function schemas)", field=field)
    tools = [_tool_schema(t, f"{field}[{i}]") for i, t in enumerate(tools)]
    return tools or None


def _tool_schema(value: Any, field: str) -> dict:
    """One tool schema; a JSON string of one (or of its `parameters`) is parsed."""
    tool = _json(value, field, "bad_tools")
    if not isinstance(tool, dict):
        raise RecordError("bad_tools", "must be a JSON object (a function schema)", field=field)
    fn = tool.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("parameters"), str):
        params = _parameters(fn["parameters"], f"{field}.function.parameters")
        tool = {**tool, "function": {**fn, "parameters": params}}
    elif fn is None and isinstance(tool.get("parameters"), str):
        tool = {**tool, "parameters": _parameters(tool["parameters"], f"{field}.parameters")}
    return tool


def _parameters(value: str, field: str) -> dict:
    params = _json(value, field, "bad_tools")
    if not isinstance(params, dict):
        raise RecordError("bad_tools", "must be a JSON object (a JSON schema)", field=field)
    return params


def _tool_call(value: Any, field: str) -> dict:
    """{"name", "arguments"} (a dict or a JSON string of one) → an OpenAI-style tool call.
    `arguments` given as a JSON string of an object becomes that object, which is what
    chat templates render with `| tojson`."""
    call = _json(value, field, "bad_tool_call")
    if not isinstance(call, dict):
        raise RecordError("bad_tool_call", "must be a JSON object {name, arguments}", field=field)
    fn = call.get("function", call)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RecordError("bad_tool_call", "has no function name", field=field)
    out = {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments", {}))}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _arguments(args: Any) -> Any:
    """A JSON string of an object → that object; any other string stays as it is."""
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            return args
        if isinstance(parsed, dict):
            return parsed
    return args


def _openai_tool_calls(calls: Any, field: str) -> list[dict]:
    """A message's own `tool_calls` (OpenAI form, or a JSON string of it): kept as given
    except that string `arguments` holding a JSON object become that object."""
    calls = _json(calls, field, "bad_tool_call")
    if not isinstance(calls, list) or not calls or not all(isinstance(c, dict) for c in calls):
        raise RecordError("bad_tool_call", "must be a non-empty list of objects", field=field)
    out = []
    for call in calls:
        fn = call.get("function")
        if isinstance(fn, dict) and "arguments" in fn:
            call = {**call, "function": {**fn, "arguments": _arguments(fn["arguments"])}}
        elif fn is None and "arguments" in call:
            call = {**call, "arguments": _arguments(call["arguments"])}
        out.append(call)
    return out


def _tool_calls(value: Any, field: str) -> list[dict]:
    calls = _json(value, field, "bad_tool_call")
    if isinstance(calls, dict):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RecordError("bad_tool_call", "must be a tool call or a non-empty list of them", field=field)
    return [_tool_call(c, f"{field}[{i}]") for i, c in enumerate(calls)]
