"""Format adapters: a raw record (dict or text line) → one canonical record.

Canonical records are plain dicts, which is also what user transforms receive:
  {"text": str}                                  pretraining document
  {"input": str, "output": str}                  FM9G input/output (prompt untrained)
  {"messages": [...], "tools"?: [...], "reasoning_effort"?: str, "template_kwargs"?: {...}}
Chat messages are OpenAI-style, as Hugging Face chat templates expect them:
  {"role": "system" | "user" | "assistant" | "tool", "content": str,
   "reasoning_content"?: str, "tool_calls"?: [{"type": "function", "function": {"name", "arguments"}}],
   "loss_weight"?: 0 | 1, "name"?: str, "tool_call_id"?: str}
`tools` is a list of JSON schemas (a JSON string in the source is parsed).

What each source format becomes:
* alpaca: `system`, `history` [[query, response], …], then `instruction` + "\\n" + `input` → `output`.
* sharegpt: `conversations[{from, value}]` with human/gpt/system/function_call/observation
  (function_call → an assistant turn with `tool_calls`, observation → a `tool` turn);
  top-level `system`, `tools` and `reasoning_effort`. Every other turn field is read as a
  messages turn's is (`_message`: reasoning, tool_calls, loss_weight, name, typed parts), so a
  messages file read as sharegpt through column `tags` loses nothing.
* messages: plain string content or typed parts `[{type, value}]` (`text` → content,
  `reasoning` → reasoning_content, `tool_call` / `tool_calls` → tool_calls, and on the system
  turn `tools` → the record's tools, LLaMA-Factory's typed-part schema), per-message `loss_weight`,
  `reasoning_content` (alias `reasoning`, `thinking`), `tool_calls`; top-level
  `reasoning_effort` and `tools`. Hunyuan's inline `<think>…</think><answer>…</answer>` and a
  `/no_think` prefix in user text are data, kept verbatim. Content may be null only on an
  assistant turn with tool calls (the OpenAI form); elsewhere null is a `wrong_type`.
* firefly: `conversation[{human, assistant}, …]` with an optional top-level `system`.
Tool-call `arguments` and tool schemas given as JSON strings (the OpenAI API form) are parsed
into objects, so string and object forms render the same tokens; a string that is not a JSON
object stays a string.
A DatasetFormat may carry a column mapping (stages/columns.py): `ADAPTERS[fmt]` applies it first.
Adapters never reshape a conversation silently: a wrong type, an unknown role, a conversation
that is odd-length, does not alternate, or does not end with an assistant turn raises
RecordError naming the field (the build fails there, or counts it under `--on-error skip`).
"""
from __future__ import annotations

from typing import Any, Callable

from . import constants
from .columns import ColumnMap, DatasetFormat
from .conversation import check_conversation
from .constants import FORMATS
from .errors import RecordError
from .tool_calls import _openai_tool_calls, _tool_call, _tool_calls, parse_tools

CHAT_ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
                  "system": "system", "function_call": "assistant", "observation": "tool",
                  "tool": "tool", "function": "tool"}
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
PASSTHROUGH_KEYS = ("name", "tool_call_id")


def _str(value: Any, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise RecordError("wrong_type", f"must be a string, got {_type(value)}", field=field)
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
    if "conversation" in keys:
        candidates.append("firefly")
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


def _loss_weight(value: Any, role: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise RecordError("unsupported_loss_weight", f"must be 0 or 1 (loss spans are on/off), got {value!r}",
                          field=field)
    if value and role != "assistant":
        raise RecordError("unsupported_loss_weight", f"loss_weight 1 on a {role} turn: only assistant turns "
                          "train (use \"loss\": \"all\" to train on prompts too)", field=field)
    return int(value)


# -- adapters ---------------------------------------------------------------------------
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
    out = {"input": _str(raw.get("input") or "", "input"),
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
    history = raw.get("history") or []
    if not isinstance(history, list):
        raise RecordError("wrong_type", "must be a list of [query, response] pairs", field="history")
    for t, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2):
            raise RecordError("wrong_type", "must be a [query, response] pair", field=f"history[{t}]")
        messages.append({"role": "user", "content": _str(turn[0], f"history[{t}][0]")})
        messages.append({"role": "assistant", "content": _str(turn[1], f"history[{t}][1]")})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _str(raw["output"], "output", allow_empty=False)})
    out = {"messages": check_conversation(messages, "messages")}
    tools = parse_tools(raw.get("tools"))
    if tools:
        out["tools"] = tools
    return _template_vars(raw, out)


def adapt_sharegpt(raw: Any) -> dict:
    raw = _dict(raw)
    if "conversations" not in raw:
        raise RecordError("missing_field", "missing", field="conversations")
    turns = _list(raw["conversations"], "conversations")
    messages, part_tools, dropped = [], None, 0
    if raw.get("system"):
        messages.append({"role": "system", "content": _str(raw["system"], "system")})
    for t, turn in enumerate(turns):
        field = f"conversations[{t}]"
        turn = _dict(turn, field)
        who = turn.get("from", turn.get("role"))
        if who not in SHAREGPT_ROLES:
            raise RecordError("unknown_role", f"unknown role {who!r}", field=f"{field}.from")
        key = "content" if "value" not in turn and "content" in turn else "value"
        if who == "function_call":
            value = _str(turn.get(key), f"{field}.{key}")
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": _tool_calls(value, f"{field}.{key}")})
            continue
        # the turn's other fields (reasoning, tool calls, loss_weight, …) as a messages turn has them
        msg = {k: v for k, v in turn.items() if k not in ("from", "value", "role", "content")}
        msg["role"] = SHAREGPT_ROLES[who]
        if key in turn:
            msg["content"] = turn[key]
        out, tools = _message(msg, field, f"{field}.{key}")
        if tools is not None:
            if part_tools is not None:
                raise RecordError("bad_tools", "tools given twice (two tools parts)", field=f"{field}.{key}")
            part_tools = tools
            if not out["content"] and t == 0 and out["role"] == "system" and not messages:
                dropped = 1
                continue
        messages.append(out)
    out = {"messages": check_conversation(messages, "conversations",
                                          offset=len(messages) - len(turns) + dropped)}
    return _chat_extras(raw, out, part_tools)


def _content(value: Any, field: str, role: str) -> tuple[str, str | None, list | None, list | None]:
    """Plain string content, or typed parts [{type, value|text}] → (text, reasoning, tool_calls,
    tools). Parts of one type are joined in order; reasoning must come before the answer and
    the tool calls (the only order a chat template can render); a `tools` part (the function
    schemas, LLaMA-Factory v1) belongs on the system turn."""
    if isinstance(value, str):
        return value, None, None, None
    if not isinstance(value, list):
        raise RecordError("wrong_type", f"must be a string or a list of parts, got {_type(value)}",
                          field=field)
    text, reasoning, calls, tools = [], [], [], []
    for p, part in enumerate(value):
        pf = f"{field}[{p}]"
        part = _dict(part, pf)
        kind = part.get("type", "text")
        body = part.get("value", part.get("text"))
        if kind == "text":
            text.append(_str(body, f"{pf}.value"))
        elif kind in ("reasoning", "thinking"):
            if text or calls:
                raise RecordError("unsupported_part", "a reasoning part after answer text or a tool call "
                                  "cannot be rendered in order", field=f"{pf}.type")
            reasoning.append(_str(body, f"{pf}.value"))
        elif kind == "tool_call":
            calls.append(_tool_call(body, f"{pf}.value"))
        elif kind == "tool_calls":
            calls.extend(_tool_calls(body, f"{pf}.value"))
        elif kind == "tools":
            if role != "system":
                raise RecordError("unsupported_part", f"a tools part on a {role} turn (the function "
                                  "schemas belong on the system turn)", field=f"{pf}.type")
            tools.extend(parse_tools(body, f"{pf}.value") or [])
        else:
            raise RecordError("unsupported_part", f"content part type {kind!r} is not supported "
                              "(text, reasoning, tool_call, tool_calls, tools)", field=f"{pf}.type")
    return ("".join(text), ("".join(reasoning) if reasoning else None), (calls or None),
            (tools if any(p.get("type") == "tools" for p in value) else None))


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _message(msg: dict, field: str, content_field: str) -> tuple[dict, list | None]:
    """One chat turn whose role is a CHAT_ROLES name → (canonical message, the tools of a
    typed `tools` part or None). The one reading of a turn's fields, for messages and sharegpt."""
    role = msg["role"]
    content = msg.get("content")
    if content is None:
        # OpenAI: an assistant turn that only calls tools has content null (or none).
        if not (role == "assistant" and msg.get("tool_calls")):
            if "content" not in msg:
                raise RecordError("missing_field", "missing", field=content_field)
            raise RecordError("wrong_type", "must be a string or a list of parts, got null", field=content_field)
        content = ""
    text, reasoning, calls, tools = _content(content, content_field, role)
    out: dict = {"role": role, "content": text}
    for key in REASONING_KEYS:
        if msg.get(key) is not None:
            if reasoning is not None:
                raise RecordError("bad_reasoning", "reasoning given twice (typed parts and a field)",
                                  field=f"{field}.{key}")
            reasoning = _str(msg[key], f"{field}.{key}")
    if reasoning is not None:
        if role != "assistant":
            raise RecordError("bad_reasoning", f"reasoning on a {role} turn", field=field)
        if text.lstrip().startswith("<think>"):
            raise RecordError("bad_reasoning", "reasoning given both inline (<think>) and as a field",
                              field=content_field)
        out["reasoning_content"] = reasoning
    if msg.get("tool_calls") is not None:
        if calls:
            raise RecordError("bad_tool_call", "tool calls given twice (typed parts and tool_calls)",
                              field=f"{field}.tool_calls")
        calls = _openai_tool_calls(msg["tool_calls"], f"{field}.tool_calls")
    if calls:
        if role != "assistant":
            raise RecordError("bad_tool_call", f"tool calls on a {role} turn", field=field)
        out["tool_calls"] = calls
    if msg.get("loss_weight") is not None:
        out["loss_weight"] = _loss_weight(msg["loss_weight"], role, f"{field}.loss_weight")
    for key in PASSTHROUGH_KEYS:
        if msg.get(key) is not None:
            out[key] = msg[key]
    return out, tools


def adapt_messages(raw: Any) -> dict:
    raw = _dict(raw)
    if "messages" not in raw:
        raise RecordError("missing_field", "missing", field="messages")
    messages, part_tools, dropped = [], None, 0
    for m, msg in enumerate(_list(raw["messages"], "messages")):
        field = f"messages[{m}]"
        msg = _dict(msg, field)
        role = msg.get("role")
        if role not in CHAT_ROLES:
            raise RecordError("unknown_role", f"unknown role {role!r}", field=f"{field}.role")
        out, tools = _message(msg, field, f"{field}.content")
        if tools is not None:
            if part_tools is not None:
                raise RecordError("bad_tools", "tools given twice (two tools parts)", field=f"{field}.content")
            part_tools = tools
            if not out["content"] and m == 0:  # a system turn that only carried the tools
                dropped = 1
                continue
        messages.append(out)
    out = {"messages": check_conversation(messages, "messages", offset=-dropped)}
    return _chat_extras(raw, out, part_tools)


def _chat_extras(raw: dict, out: dict, part_tools: list | None) -> dict:
    """A chat record's top-level fields: tools (a field, or a typed `tools` part), reasoning_effort,
    template variables."""
    tools = parse_tools(raw.get("tools"))
    if part_tools is not None:
        if tools and tools != part_tools:
            raise RecordError("bad_tools", "tools given both as a tools part and a top-level field, "
                              "and they differ", field="tools")
        tools = part_tools
    if tools:
        out["tools"] = tools
    effort = raw.get("reasoning_effort")
    if effort is not None and effort != "":
        out["reasoning_effort"] = _str(effort, "reasoning_effort")
    return _template_vars(raw, out)


def _template_vars(raw: dict, out: dict) -> dict:
    """A chat record's own template variables (stages.constants.RECORD_TEMPLATE_VARS, e.g.
    `enable_thinking`, `token_suffix`) and `template_kwargs` reach the renderer, which checks them."""
    for key in getattr(constants, "RECORD_TEMPLATE_VARS", ()):
        if key not in out and raw.get(key) is not None and key != "reasoning_effort":
            out[key] = raw[key]
    if raw.get("template_kwargs") is not None:
        out["template_kwargs"] = raw["template_kwargs"]
    return out


def adapt_firefly(raw: Any) -> dict:
    """Firefly multi-turn: {"conversation": [{"human", "assistant"}, …], "system"?}."""
    raw = _dict(raw)
    if "conversation" not in raw:
        raise RecordError("missing_field", "missing", field="conversation")
    messages = []
    if raw.get("system") is not None and raw.get("system") != "":
        messages.append({"role": "system", "content": _str(raw["system"], "system")})
    for t, turn in enumerate(_list(raw["conversation"], "conversation")):
        field = f"conversation[{t}]"
        turn = _dict(turn, field)
        for key in ("human", "assistant"):
            if key not in turn:
                raise RecordError("missing_field", "missing", field=f"{field}.{key}")
        messages.append({"role": "user", "content": _str(turn["human"], f"{field}.human")})
        messages.append({"role": "assistant", "content": _str(turn["assistant"], f"{field}.assistant")})
    return _template_vars(raw, {"messages": check_conversation(messages, "conversation")})


class _AdapterTable(dict):
    """format → adapter. A mapped format (a DatasetFormat with columns or tags, or its string
    form; stages/columns.py) resolves to the mapping followed by the base adapter, so every
    `ADAPTERS[job.format]` lookup applies a dataset's mapping without knowing about it."""

    def __missing__(self, fmt) -> Callable[[Any], dict]:
        parsed = DatasetFormat.parse(fmt)
        if not parsed.mapped:
            if parsed.base in self:  # a DatasetFormat without a mapping: the base adapter
                return self[parsed.base]
            raise KeyError(fmt)
        if parsed.base not in self:
            raise KeyError(fmt)
        adapter = _mapped(self[parsed.base], ColumnMap(parsed.base, parsed.column_map, parsed.tag_map))
        self[str(parsed)] = adapter
        return adapter


def _mapped(adapter: Callable[[Any], dict], cmap: ColumnMap) -> Callable[[Any], dict]:
    def adapt(raw: Any) -> dict:
        try:
            return adapter(cmap.apply(raw))
        except RecordError as e:  # name the file's own keys, not the adapter's
            e.field = cmap.file_field(e.field)
            e.args = (str(e),)
            raise
    return adapt


ADAPTERS: dict[str, Callable[[Any], dict]] = _AdapterTable({
    "text": adapt_text, "input-output": adapt_input_output, "alpaca": adapt_alpaca,
    "sharegpt": adapt_sharegpt, "messages": adapt_messages, "firefly": adapt_firefly,
})


def validate_canonical(record: Any, where: str) -> dict:
    """Check a record that claims to be canonical (a transform's result) with the same checks
    as an adapted input record; → the record with its chat part normalised (tools parsed,
    string arguments as objects), other keys kept. RecordError's detail starts with `where`."""
    try:
        record = _dict(record)
        if "messages" in record:
            return {**record, **adapt_messages(record)}
        if "text" in record and "output" not in record:
            return {**record, **adapt_text(record)}
        return {**record, **adapt_input_output(record)}
    except RecordError as e:
        e.detail = f"{where}: {e.detail}"
        e.args = (str(e),)
        raise


def record_kind(record: dict) -> str:
    """text | input-output | chat — what the renderer does with a canonical record."""
    if "messages" in record:
        return "chat"
    if "output" in record:
        return "input-output"
    return "text"
