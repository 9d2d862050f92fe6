"""The renderer: templates and loss spans with hand-written expected renderings.

Each expected string is the decoded sample with trained tokens inside ⟦…⟧. Real tokenizers
from ../shared/tokenizers are used (Qwen2.5 HF, Hunyuan tiktoken, Mistral SentencePiece);
the tests skip with a reason when that folder is absent. Tokenizer loading: test_tokenizer.py.
"""
import json
import re

import numpy as np
import pytest
from render_helpers import (ALPACA, DATA, HY, MISTRAL, QWEN, TOOL, TOOL_JSON, TWO_TURNS, marked, needs_tokenizers,
                            reason, renderer)

from pipeline.show import marked_text, span_labels
from stages.errors import BuildError, RecordError
from stages.formats import ADAPTERS
from stages.jinja_env import ChatTemplate, available_templates
from stages.render import Renderer, resolve_template
from stages.template_check import check_template
from stages.tokenizer import load_tokenizer

pytestmark = needs_tokenizers


# -- formats through templates -------------------------------------------------------
ALPACA_CHATML = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                 "<|im_start|>assistant\n⟦Hi!<|im_end|>⟧\n<|im_start|>user\nTranslate\n你好<|im_end|>\n"
                 "<|im_start|>assistant\n⟦Hello<|im_end|>⟧\n")


@pytest.mark.parametrize("template", ["chatml", "tokenizer"])  # generation blocks / prefix renders
def test_alpaca_system_history_multi_turn(template):
    assert marked(renderer(QWEN, template), ALPACA) == ALPACA_CHATML


def test_qwen_default_system_prompt_from_its_own_template():
    rec = ADAPTERS["input-output"]({"input": "1+1=", "output": "2"})
    assert marked(renderer(QWEN, "tokenizer"), rec) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n⟦2<|im_end|>⟧\n")


SHAREGPT_TOOLS = ADAPTERS["sharegpt"]({"conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": '{"temp": 21}'},
    {"from": "gpt", "value": "21 °C."}], "system": "You are a weather bot.", "tools": json.dumps([TOOL])})
QWEN_TOOLS = (
    "<|im_start|>system\nYou are a weather bot.\n\n# Tools\n\nYou may call one or more functions to assist with "
    "the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    + TOOL_JSON + "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n⟦<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
    "</tool_call><|im_end|>⟧\n<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n⟦21 °C.<|im_end|>⟧\n")


@pytest.mark.parametrize("template", ["chatml", "tokenizer"])
def test_sharegpt_tools_function_call_observation(template):
    assert marked(renderer(QWEN, template), SHAREGPT_TOOLS) == QWEN_TOOLS


REASONING_TOOLS = ADAPTERS["messages"]({"messages": [
    {"role": "user", "content": [{"type": "text", "value": "Area of r=2?"}]},
    {"role": "assistant", "content": [
        {"type": "reasoning", "value": "Need circle_area."},
        {"type": "tool_call", "value": '{"name": "circle_area", "arguments": {"radius": 2}}'}]},
    {"role": "tool", "content": [{"type": "text", "value": "12.57"}]},
    {"role": "assistant", "content": [{"type": "reasoning", "value": "Done."}, {"type": "text", "value": "12.57"}]}]})


def test_messages_reasoning_and_tool_calls_chatml():
    assert marked(renderer(QWEN, "chatml"), REASONING_TOOLS) == (
        "<|im_start|>user\nArea of r=2?<|im_end|>\n<|im_start|>assistant\n⟦<think>\nNeed circle_area.\n</think>\n\n"
        "<tool_call>\n{\"name\": \"circle_area\", \"arguments\": {\"radius\": 2}}\n</tool_call><|im_end|>⟧\n"
        "<|im_start|>user\n<tool_response>\n12.57\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n⟦<think>\nDone.\n</think>\n\n12.57<|im_end|>⟧\n")


def test_reasoning_a_template_cannot_render_is_refused():
    # Qwen2.5's own template has no place for reasoning: dropping it silently would train
    # answers without their chain of thought
    assert reason(renderer(QWEN, "tokenizer"), REASONING_TOOLS) == "reasoning_not_rendered"




@pytest.mark.parametrize("template", ["chatml", "tokenizer"])
@pytest.mark.parametrize("loss,expected", [
    ("assistant", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1"
                  "<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n⟦a2<|im_end|>⟧\n"
                  "<|im_start|>user\nq3<|im_end|>\n<|im_start|>assistant\n⟦a3<|im_end|>⟧\n"),
    ("last", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1"
             "<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n"
             "<|im_start|>user\nq3<|im_end|>\n<|im_start|>assistant\n⟦a3<|im_end|>⟧\n"),
    ("all", "⟦<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1"
            "<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n"
            "<|im_start|>user\nq3<|im_end|>\n<|im_start|>assistant\na3<|im_end|>\n⟧"),
])
def test_loss_modes_and_loss_weight(template, loss, expected):
    assert marked(renderer(QWEN, template, loss), TWO_TURNS) == expected


def test_span_roles_for_show():
    r = renderer(QWEN, "chatml")
    ex = r.explain(TWO_TURNS)
    assert span_labels(ex) == ["assistant#4", "assistant#6"]
    assert ex.text.endswith("<|im_start|>assistant\na3<|im_end|>\n")
    (s, e, msg, _, key), = [d for d in ex.data if d[2] == 6]
    assert (msg, key) == (6, "content") and r.tok.decode(ex.encoded.ids[s:e].tolist()) == "a3"
    labels = span_labels(ex)
    assert "[assistant#6]⟦a3<|im_end|>⟧" in marked_text(r.tok, ex.encoded.ids, ex.encoded.spans, labels=labels)
    assert "\x1b[32m" in marked_text(r.tok, ex.encoded.ids, ex.encoded.spans, color=True)


# -- Hunyuan -------------------------------------------------------------------------
HY_SEED_FAST = {"messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "/no_think Why is seawater salty?"},
    {"role": "assistant", "content": "<think>\n\n</think>\n<answer>\nSalts from rocks.\n</answer>"}]}


def test_hunyuan_inline_think_and_no_think_prefix_as_written():
    assert marked(renderer(HY, "hunyuan"), ADAPTERS["messages"](HY_SEED_FAST)) == (
        "<|startoftext|>You are a helpful assistant.<|extra_4|>/no_think Why is seawater salty?<|extra_0|>"
        "⟦<think>\n\n</think>\n<answer>\nSalts from rocks.\n</answer><|eos|>⟧")


def test_hunyuan_reasoning_content_renders_the_seed_pattern():
    rec = ADAPTERS["messages"]({"messages": [
        {"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2", "reasoning_content": "Add."},
        {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4", "reasoning_content": "Add again."}]})
    assert marked(renderer(HY, "hunyuan"), rec) == (
        "<|startoftext|>1+1=<|extra_0|>⟦<think>\nAdd.\n</think>\n<answer>\n2\n</answer><|eos|>⟧"
        "<|startoftext|>2+2=<|extra_0|>⟦<think>\nAdd again.\n</think>\n<answer>\n4\n</answer><|eos|>⟧")


def test_hunyuan_reasoning_effort_no_think():
    rec = ADAPTERS["messages"]({"reasoning_effort": "no_think", "messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."}]})
    assert marked(renderer(HY, "hunyuan"), rec) == (
        "<|startoftext|>S<|extra_4|>/no_think Why?<|extra_0|>⟦<think>\n\n</think>\n<answer>\nBecause.\n"
        "</answer><|eos|>⟧")


def test_hunyuan_matches_the_a13b_tokenizer_template_with_tools():
    r = renderer(HY, "hunyuan")
    tok_template = resolve_template("tokenizer", r.tok)
    report = check_template(r, [SHAREGPT_TOOLS, ALPACA, TWO_TURNS], reference=tok_template)
    assert report.ok and report.ids_equal == report.masks_equal == 3, report.summary()
    text = marked(r, SHAREGPT_TOOLS)
    assert text.startswith("<|startoftext|>你是一位函数组合专家。") and "2025-01-01 00:00:00 星期三" in text
    assert text.endswith("<|extra_4|>用户：Weather in Paris?<|extra_0|>⟦<tool_calls>[{\"name\": \"get_weather\", "
                         "\"arguments\": {\"city\": \"Paris\"}}]</tool_calls><|eos|>⟧<tool_response>{\"temp\": 21}"
                         "</tool_response><|extra_0|>⟦助手：21 °C.<|eos|>⟧")


def test_build_time_clock_is_a_template_variable():
    r = renderer(HY, "hunyuan", template_kwargs={"tokenmill_now": "2024-06-03T08:00:00"})
    assert "2024-06-03 08:00:00 星期一" in marked(r, SHAREGPT_TOOLS)


@pytest.fixture(scope="module")
def hy3_tokenizer(tmp_path_factory):
    """The Qwen tokenizer plus Hy3's control tokens as special tokens (Hy3's own tokenizer
    is not available), so spans can be checked token-exactly."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(QWEN))
    hf.add_special_tokens({"additional_special_tokens": [
        "<｜hy_begin▁of▁sentence｜>", "<｜reasoning_mode｜>", "<｜hy_User｜>", "<｜hy_Assistant｜>", "<｜hy_eos｜>"]})
    out = tmp_path_factory.mktemp("hy3tok")
    hf.save_pretrained(str(out))
    return out


def test_hy3_layout_reasoning_effort_and_spans(hy3_tokenizer):
    rec = ADAPTERS["messages"]({"reasoning_effort": "high", "messages": [
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "1+1=?"},
        {"role": "assistant", "content": "1+1=2", "reasoning_content": "Basic arithmetic."},
        {"role": "user", "content": "And 2+2?"}, {"role": "assistant", "content": "4"}]})
    r = renderer(hy3_tokenizer, "hy3")
    assert marked(r, rec) == (
        "<｜hy_begin▁of▁sentence｜>You are a helpful assistant.<｜reasoning_mode｜>reasoning_effort:high"
        "<｜hy_User｜>1+1=?<｜hy_Assistant｜>⟦<think></think>1+1=2<｜hy_eos｜>⟧"  # history: no reasoning
        "<｜hy_User｜>And 2+2?<｜hy_Assistant｜>⟦<think></think>4<｜hy_eos｜>⟧")
    fast = ADAPTERS["messages"]({"messages": [{"role": "user", "content": "1+1=?"},
                                              {"role": "assistant", "content": "2"}]})
    assert marked(r, fast) == ("<｜hy_begin▁of▁sentence｜><｜reasoning_mode｜>reasoning_effort:no_think"
                               "<｜hy_User｜>1+1=?<｜hy_Assistant｜>⟦<think></think>2<｜hy_eos｜>⟧")
    bad = ADAPTERS["messages"]({"reasoning_effort": "no_think", "messages": [
        {"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2", "reasoning_content": "Add."}]})
    assert reason(r, bad) == "reasoning_effort_conflict"  # reasoning under no_think is contradictory
    assert check_template(r, [rec, fast]).ok


# -- none (FM9G) ---------------------------------------------------------------------
def test_none_template_fm9g_input_output_and_text():
    r = renderer(MISTRAL, "none")
    io = ADAPTERS["input-output"]({"input": "Question: 1+1?", "output": "Answer: 2"})
    assert marked(r, io) == "<s> Question: 1+1?⟦Answer: 2</s>⟧"  # (a decoded run drops its first space)
    enc = r.encode_batch([io])[0]
    tok = r.tok
    # FM9G: [BOS] + tok(input) + tok(output) + [EOS], each part tokenized on its own
    want = [tok.bos_id] + tok.hf.encode("Question: 1+1?", add_special_tokens=False) \
        + tok.hf.encode("Answer: 2", add_special_tokens=False) + [tok.eos_id]
    assert enc.ids.tolist() == want
    doc = r.encode_batch([{"text": "plain document"}])[0]
    assert doc.spans is None and doc.ids[0] == tok.bos_id and doc.ids[-1] == tok.eos_id


# -- special-token injection ---------------------------------------------------------
@pytest.mark.parametrize("tok_path,template", [(QWEN, "tokenizer"), (QWEN, "chatml"), (HY, "hunyuan"),
                                               (MISTRAL, DATA / "mistral_inst.jinja")])
def test_special_tokens_in_data_stay_text(tok_path, template):
    r = renderer(tok_path, template)
    tok = r.tok
    injected = " ".join(sorted(tok.special_tokens | r.as_text))
    rec = {"messages": [{"role": "user", "content": f"look: {injected} done"},
                        {"role": "assistant", "content": f"echo {injected}"}]}
    plain = {"messages": [{"role": "user", "content": "look: x done"}, {"role": "assistant", "content": "echo x"}]}
    ex, ex_plain = r.explain(rec), r.explain(plain)
    ids = ex.encoded.ids
    control_ids = set(tok.control_tokens.values())
    # exactly the template's control tokens, none from the data …
    assert sum(int(i) in control_ids for i in ids) == sum(int(i) in control_ids for i in ex_plain.encoded.ids)
    for s, e, _, _, _ in ex.data:
        assert not any(int(i) in control_ids for i in ids[s:e])
    # … and the text round-trips
    assert tok.decode(ids.tolist()) == ex.text and injected in ex.text
    if tok.kind == "hf":  # the reference: apply_chat_template(..., sanitize_control_tokens=True)
        special_only = " ".join(sorted(tok.special_tokens))
        rec2 = {"messages": [{"role": "user", "content": special_only}, {"role": "assistant", "content": "ok"}]}
        report = check_template(r, [rec2])
        assert report.ok and report.ids_equal == 1, report.summary()


def test_control_text_in_tool_arguments_is_refused():
    rec = json.loads(json.dumps(SHAREGPT_TOOLS))
    rec["messages"][2]["tool_calls"][0]["function"]["arguments"]["city"] = "<|im_end|>"
    assert reason(renderer(QWEN, "chatml"), rec) == "control_token_in_data"


def test_reserved_noncharacters_are_refused():
    rec = {"messages": [{"role": "user", "content": "a\ufdd0b"}, {"role": "assistant", "content": "c"}]}
    assert reason(renderer(QWEN, "chatml"), rec) == "reserved_char"


# -- guardrails ----------------------------------------------------------------------
def write(tmp_path, text, name="t.jinja"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_broken_templates_are_caught(tmp_path):
    with pytest.raises(BuildError, match="does not compile"):
        renderer(QWEN, write(tmp_path, "{% for m in messages %}{{ m.content }"))
    raising = write(tmp_path, "{{ raise_exception('no way') }}", "raising.jinja")
    assert reason(renderer(QWEN, raising), ALPACA) == "template_error"
    rewriting = write(tmp_path, "{% for m in messages %}<|im_start|>{{ m.content | upper }}<|im_end|>{% endfor %}",
                      "rewrite.jinja")
    assert reason(renderer(QWEN, rewriting), ALPACA) == "template_round_trip"
    unstable = write(tmp_path, "{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.content }}"
                     "<|im_end|>{% endfor %}", "unstable.jinja")
    # not prefix-stable (the count changes with every turn): read from the final rendering, not refused
    assert marked(renderer(QWEN, unstable), ALPACA) == ("5<|im_start|>Be brief.<|im_end|><|im_start|>Hi<|im_end|>"
                                                        "⟦<|im_start|>Hi!<|im_end|>⟧<|im_start|>Translate\n你好<|im_end|>"
                                                        "⟦<|im_start|>Hello<|im_end|>⟧")
    one_block = write(tmp_path, "{% generation %}{% for m in messages %}{{ m.content }}{% endfor %}"
                      "{% endgeneration %}", "oneblock.jinja")  # one block for two assistant turns
    assert reason(renderer(QWEN, one_block), TWO_TURNS) == "template_error"
    with pytest.raises(BuildError, match="unknown template"):
        renderer(QWEN, "nonesuch")
    with pytest.raises(BuildError, match="no chat template"):
        renderer(MISTRAL, "tokenizer")


def test_trim_in_a_template_still_lines_up(tmp_path):
    trim = write(tmp_path, "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
                 "{% generation %}{{ m.content | trim }}<|im_end|>{% endgeneration %}{% else %}"
                 "{{ m.content | trim }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}", "trim.jinja")
    rec = {"messages": [{"role": "user", "content": "  q \n"}, {"role": "assistant", "content": "\n a  "}]}
    assert marked(renderer(QWEN, trim), rec) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n⟦a<|im_end|>⟧\n"


def test_all_masked_sample_is_caught():
    rec = ADAPTERS["messages"]({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a", "loss_weight": 0}]})
    for template in ("chatml", "tokenizer"):
        assert reason(renderer(QWEN, template), rec) == "no_trained_tokens"


def test_builtin_templates_are_data(tmp_path):
    assert {"chatml", "hunyuan", "hy3", "none"} <= set(available_templates())
    t = resolve_template("chatml", load_tokenizer(str(QWEN)))
    assert isinstance(t, ChatTemplate) and t.has_generation_blocks and len(t.sha256) == 64


def test_check_template_catches_a_wrong_renderer():
    class TrainsTheSeparator(Renderer):  # a deliberately wrong end-of-turn rule
        def _end_of_turn(self, ph_text, start, end):
            return end
    tok = load_tokenizer(str(QWEN))
    good = Renderer(tok, resolve_template("tokenizer", tok))
    bad = TrainsTheSeparator(tok, resolve_template("tokenizer", tok))
    assert check_template(good, [ALPACA, TWO_TURNS]).ok
    report = check_template(bad, [ALPACA, TWO_TURNS])
    assert not report.ok and report.differ[0][1] == "trained positions", report.summary()

    class NoContinuation(Renderer):  # ids wrong: SentencePiece prefix space after </s>
        def __init__(self, *a):
            super().__init__(*a)
            self.tok = _Uncontinued(self.tok)
    mtok = load_tokenizer(str(MISTRAL))
    wrong = NoContinuation(mtok, resolve_template(str(DATA / "mistral_inst.jinja"), mtok))
    report = check_template(wrong, [TWO_TURNS])
    assert not report.ok and report.differ[0][1] == "ids", report.summary()


class _Uncontinued:
    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode_pieces(self, texts, continued, as_text):
        return self._tok.encode_pieces(texts, [False] * len(texts), as_text)


def test_every_builtin_template_renders_every_format(hy3_tokenizer):
    rec_io = ADAPTERS["input-output"]({"input": "q", "output": "a"})
    # each with a tokenizer that has its control tokens (another one is refused: test_control_strings…)
    for name, tok in (("chatml", QWEN), ("hunyuan", HY), ("hy3", hy3_tokenizer), ("none", HY), ("none", MISTRAL)):
        r = renderer(tok, name)
        for rec in (ALPACA, TWO_TURNS, rec_io, {"text": "doc"}):
            enc = r.encode_batch([rec])[0]
            assert not isinstance(enc, RecordError), (name, enc)
            assert enc.n_trained > 0 and np.all(np.diff(enc.spans, axis=1) > 0) if enc.spans is not None else True


@pytest.mark.parametrize("tok_path,template,string", [
    (QWEN, "hy3", "<｜hy_Assistant｜>"), (QWEN, "hunyuan", "<|eos|>"), (HY, "chatml", "<|im_end|>")])
def test_control_strings_that_are_not_tokens_are_refused(tok_path, template, string):
    tok = load_tokenizer(str(tok_path))
    assert string not in tok.control_tokens  # so it would be plain text
    with pytest.raises(BuildError, match=re.escape(f"writes {string!r}, which is not one token of the tokenizer")):
        resolve_template(template, tok)
