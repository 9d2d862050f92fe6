"""The shape every canonical conversation has (stages/formats.py adapters check it).

At most a leading system turn, then a user turn, then assistant turns that alternate with user
turns (or with the tool results answering them), ending with an assistant turn that has
something to train on. A conversation that breaks this is a RecordError naming the field,
never reshaped.
"""
from __future__ import annotations

from .errors import RecordError


def _has_output(msg: dict) -> bool:
    return bool(msg["content"].strip() or msg.get("tool_calls") or (msg.get("reasoning_content") or "").strip())


def check_conversation(messages: list[dict], field: str, offset: int = 0) -> list[dict]:
    """At most a leading system turn, then a user turn, then assistant turns that alternate
    with user turns (or with the tool results answering them), ending with an assistant turn.
    `offset`: messages added in front of the source list (a top-level system prompt), so error
    fields name the source position."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    body = messages[start:]
    if not body:
        raise RecordError("empty_sample", "has no user or assistant turn", field=field)

    def where(i: int) -> str:
        return f"{field}[{start + i - offset}]"

    prev = None
    for i, msg in enumerate(body):
        role = msg["role"]
        if role == "system":
            raise RecordError("bad_conversation", "system turn after the start", field=where(i))
        if prev is None and role != "user":
            raise RecordError("bad_conversation", f"starts with a {role} turn, not a user turn", field=where(i))
        if role == "user" and prev == "user":
            raise RecordError("bad_conversation", "two user turns in a row (not alternating)", field=where(i))
        if role == "assistant" and prev == "assistant":
            raise RecordError("bad_conversation", "two assistant turns in a row (not alternating)", field=where(i))
        if role == "tool" and prev not in ("assistant", "tool"):
            raise RecordError("bad_conversation", "a tool result that answers no assistant turn", field=where(i))
        if role == "user" and prev == "tool":
            raise RecordError("bad_conversation", "a user turn after tool results (the assistant never "
                              "answered them)", field=where(i))
        prev = role
    if body[-1]["role"] != "assistant":
        raise RecordError("bad_conversation", f"does not end with an assistant turn (ends with {body[-1]['role']}"
                          f"{', odd-length conversation' if len(body) % 2 else ''})", field=field)
    if not any(m["role"] == "assistant" and _has_output(m) for m in body):
        raise RecordError("empty_sample", "has no assistant content to train on", field=field)
    return messages
