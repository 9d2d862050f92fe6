"""Format adapters: a raw record (dict or text line) → one canonical record.

Canonical records are plain dicts, which is also what user transforms receive:
  {"text": str}                                  pretraining document
  {"input": str, "output": str}                  FM9G input/output (prompt untrained)
  {"messages": [{"role", "content", ...}], ...}  chat; optional "tools", "reasoning_effort"
Adapters never reshape a conversation silently: a wrong type, an unknown role or a
conversation that does not end with an assistant turn raises RecordError naming the field.
"""
from __future__ import annotations

from typing import Any, Callable

from .errors import RecordError

FORMATS = ("text", "input-output", "alpaca", "sharegpt", "messages")
CHAT_ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool",
                  "tool": "tool", "function": "tool"}


def _str(value: Any, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"must be a string, got {type(value).__name__}", field=field)
    if not allow_empty and not value.strip():
        raise RecordError("empty_sample", "is empty", field=field)
    return value


def _dict(value: Any, field: str = "") -> dict:
    if not isinstance(value, dict):
        raise RecordError("wrong_type", f"record must be a JSON object, got {type(value).__name__}",
                          field=field or None)
    return value


def _list(value: Any, field: str) -> list:
    if not isinstance(value, list):
        raise RecordError("wrong_type", f"must be a list, got {type(value).__name__}", field=field)
    if not value:
        raise RecordError("empty_sample", "is an empty list", field=field)
    return value


def detect_format(raw: Any) -> str:
    """Guess a dataset's format from one record; fail when the keys do not decide it."""
    if isinstance(raw, str):
        return "text"
    if not isinstance(raw, dict):
        raise RecordError("unknown_format", f"cannot detect format of a JSON {type(raw).__name__}")
    keys = set(raw)
    candidates = []
    if "messages" in keys:
        candidates.append("messages")
    if "conversations" in keys:
        candidates.append("sharegpt")
    if {"instruction", "output"} <= keys:
        candidates.append("alpaca")
    elif {"input", "output"} <= keys:
        candidates.append("input-output")
    if "text" in keys and not candidates:
        candidates.append("text")
    if len(candidates) != 1:
        why = "none of" if not candidates else f"ambiguous ({', '.join(candidates)}) among"
        raise RecordError("unknown_format",
                          f"format: auto is unsure — keys {sorted(keys)} match {why} "
                          f"{', '.join(FORMATS)}; set \"format\" for this dataset")
    return candidates[0]


def adapt_text(raw: Any) -> dict:
    if isinstance(raw, str):
        return {"text": _str(raw, "text", allow_empty=False)}
    raw = _dict(raw)
    if "text" not in raw:
        raise RecordError("missing_field", "missing", field="text")
    return {"text": _str(raw["text"], "text", allow_empty=False)}


def adapt_input_output(raw: Any) -> dict:
    raw = _dict(raw)
    if "output" not in raw:
        raise RecordError("missing_field", "missing", field="output")
    out = {"input": _str(raw.get("input", ""), "input"),
           "output": _str(raw["output"], "output", allow_empty=False)}
    return out


def adapt_alpaca(raw: Any) -> dict:
    raw = _dict(raw)
    for key in ("instruction", "output"):
        if key not in raw:
            raise RecordError("missing_field", "missing", field=key)
    instruction = _str(raw["instruction"], "instruction")
    inp = _str(raw.get("input") or "", "input")
    prompt = f"{instruction}\n{inp}" if inp else instruction
    if not prompt.strip():
        raise RecordError("empty_sample", "instruction and input are both empty", field="instruction")
    messages = []
    if raw.get("system"):
        messages.append({"role": "system", "content": _str(raw["system"], "system")})
    for t, turn in enumerate(raw.get("history") or []):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise RecordError("wrong_type", "must be a [query, response] pair", field=f"history[{t}]")
        messages.append({"role": "user", "content": _str(turn[0], f"history[{t}][0]")})
        messages.append({"role": "assistant", "content": _str(turn[1], f"history[{t}][1]")})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _str(raw["output"], "output", allow_empty=False)})
    return {"messages": messages}


def adapt_sharegpt(raw: Any) -> dict:
    raw = _dict(raw)
    if "conversations" not in raw:
        raise RecordError("missing_field", "missing", field="conversations")
    turns = _list(raw["conversations"], "conversations")
    messages = []
    if raw.get("system"):
        messages.append({"role": "system", "content": _str(raw["system"], "system")})
    for t, turn in enumerate(turns):
        field = f"conversations[{t}]"
        turn = _dict(turn, field)
        who = turn.get("from", turn.get("role"))
        if who not in SHAREGPT_ROLES:
            raise RecordError("unknown_role", f"unknown role {who!r}", field=f"{field}.from")
        value = _str(turn.get("value", turn.get("content")), f"{field}.value")
        messages.append({"role": SHAREGPT_ROLES[who], "content": value})
    out = {"messages": check_conversation(messages, "conversations")}
    if raw.get("tools"):
        out["tools"] = raw["tools"]
    return out


def _content(value: Any, field: str) -> str:
    """Plain string content, or typed parts [{type: text, value|text}] joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for p, part in enumerate(value):
            part = _dict(part, f"{field}[{p}]")
            if part.get("type", "text") != "text":
                raise RecordError("unsupported_part", f"content part type {part.get('type')!r} "
                                  "is not supported here", field=f"{field}[{p}].type")
            parts.append(_str(part.get("value", part.get("text")), f"{field}[{p}].value"))
        return "".join(parts)
    if value is None:
        return ""
    raise RecordError("wrong_type", f"must be a string or a list of parts, got {type(value).__name__}",
                      field=field)


def adapt_messages(raw: Any) -> dict:
    raw = _dict(raw)
    if "messages" not in raw:
        raise RecordError("missing_field", "missing", field="messages")
    messages = []
    for m, msg in enumerate(_list(raw["messages"], "messages")):
        field = f"messages[{m}]"
        msg = _dict(msg, field)
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise RecordError("unknown_role", f"unknown role {role!r}", field=f"{field}.role")
        out = {"role": role, "content": _content(msg.get("content"), f"{field}.content")}
        for key in ("reasoning_content", "tool_calls", "loss_weight", "name", "tool_call_id"):
            if key in msg and msg[key] is not None:
                out[key] = msg[key]
        messages.append(out)
    out = {"messages": check_conversation(messages, "messages")}
    for key in ("tools", "reasoning_effort"):
        if raw.get(key) is not None:
            out[key] = raw[key]
    return out


def check_conversation(messages: list[dict], field: str) -> list[dict]:
    """At most a leading system turn, then user/tool and assistant turns that alternate,
    ending with an assistant turn that has content."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RecordError("empty_sample", "has no user or assistant turn", field=field)
    prev = None
    for i, msg in enumerate(body):
        role = msg["role"]
        if role == "system":
            raise RecordError("bad_conversation", "system turn after the start", field=f"{field}[{i}]")
        if role == prev == "user" or (role == "assistant" and prev == "assistant" and
                                      not body[i - 1].get("tool_calls")):
            raise RecordError("bad_conversation", f"two {role} turns in a row (not alternating)",
                              field=f"{field}[{i + len(messages) - len(body)}]")
        prev = role
    if body[0]["role"] == "assistant":
        raise RecordError("bad_conversation", "starts with an assistant turn", field=field)
    if body[-1]["role"] != "assistant":
        raise RecordError("bad_conversation", "does not end with an assistant turn "
                          "(odd-length conversation)", field=field)
    if not any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")
                                             or m.get("reasoning_content")) for m in body):
        raise RecordError("empty_sample", "has no assistant content to train on", field=field)
    return messages


ADAPTERS: dict[str, Callable[[Any], dict]] = {
    "text": adapt_text, "input-output": adapt_input_output, "alpaca": adapt_alpaca,
    "sharegpt": adapt_sharegpt, "messages": adapt_messages,
}


def record_kind(record: dict) -> str:
    """text | input-output | chat — what the renderer does with a canonical record."""
    if "messages" in record:
        return "chat"
    if "output" in record:
        return "input-output"
    return "text"
