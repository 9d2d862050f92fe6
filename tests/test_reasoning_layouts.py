"""Reasoning and template-variable layouts exactly as the Hunyuan A13B, Hy3 and FM9G trainers
write them (issue 14; seeds-anchors §2.2, seeds 000/002). Each expected string is written by
hand: the decoded sample with trained tokens inside ⟦…⟧. Hunyuan uses the real A13B tiktoken
tokenizer from ../shared; Hy3 a small byte-level tokenizer made here with Hy3's control tokens."""
import importlib.util
import re
from pathlib import Path

import pytest
from render_helpers import HY, QWEN, needs_tokenizers

from pipeline.show import marked_text
from stages.errors import BuildError, RecordError
from stages.formats import ADAPTERS
from stages.render import Renderer, resolve_template
from stages.template_check import check_template
from stages.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
HY3_CONTROLS = ["<｜hy_begin▁of▁sentence｜>", "<｜reasoning_mode｜>", "<｜hy_User｜>", "<｜hy_Assistant｜>",
                "<｜hy_eos｜>", "<think>", "</think>"]
HY3_CONTROLS += [re.sub(r"(｜>|>)$", r":opensource\1", t) for t in HY3_CONTROLS]


def render(r: Renderer, record):
    enc = r.encode_batch([record])[0]
    if isinstance(enc, RecordError):
        raise enc
    return marked_text(r.tok, enc.ids, enc.spans), enc


def refused(r: Renderer, record) -> RecordError:
    enc = r.encode_batch([record])[0]
    assert isinstance(enc, RecordError), f"expected a refusal, got {marked_text(r.tok, enc.ids, enc.spans)!r}"
    return enc


def msgs(*pairs, **top):
    """("user", "q"), ("assistant", "a"[, reasoning]) … → a canonical messages record."""
    out = []
    for p in pairs:
        m = {"role": p[0], "content": p[1]}
        if len(p) > 2:
            m["reasoning_content"] = p[2]
        out.append(m)
    return {"messages": out, **top}


# -- hy3, with a small tokenizer that has Hy3's control tokens ---------------------------
@pytest.fixture(scope="module")
def hy3(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(byte_chars))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<｜hy_eos｜>")
    hf.add_special_tokens({"additional_special_tokens": HY3_CONTROLS})
    out = tmp_path_factory.mktemp("hy3tok")
    hf.save_pretrained(str(out))
    tok = load_tokenizer(str(out))
    assert tok.vocab_size < 300 and all(t in tok.control_tokens for t in HY3_CONTROLS)
    return Renderer(tok, resolve_template("hy3", tok))


HY3_HEAD = "<｜hy_begin▁of▁sentence｜><｜reasoning_mode｜>reasoning_effort:"


def test_hy3_history_turns_render_an_empty_think(hy3):
    rec = msgs(("user", "1+1=?"), ("assistant", "2", "Add one."), ("user", "2+2=?"), ("assistant", "4", "Add two."),
               reasoning_effort="high")
    text, enc = render(hy3, rec)
    assert text == (HY3_HEAD + "high<｜hy_User｜>1+1=?<｜hy_Assistant｜>⟦<think></think>2<｜hy_eos｜>⟧"
                    "<｜hy_User｜>2+2=?<｜hy_Assistant｜>⟦<think>Add two.</think>4<｜hy_eos｜>⟧")
    assert enc.notes == ("history_reasoning_dropped",)
    assert check_template(hy3, [rec]).ok


def test_hy3_inline_think_is_parsed_into_reasoning_and_answer(hy3):
    inline = msgs(("user", "1+1=?"), ("assistant", "<think>Add one.</think>2"), reasoning_effort="high")
    fields = msgs(("user", "1+1=?"), ("assistant", "2", "Add one."), reasoning_effort="high")
    text, enc = render(hy3, inline)
    assert text == HY3_HEAD + "high<｜hy_User｜>1+1=?<｜hy_Assistant｜>⟦<think>Add one.</think>2<｜hy_eos｜>⟧"
    assert enc.ids.tolist() == render(hy3, fields)[1].ids.tolist()
    empty = msgs(("user", "q"), ("assistant", "<think></think>a"), reasoning_effort="no_think")
    assert render(hy3, empty)[0] == HY3_HEAD + "no_think<｜hy_User｜>q<｜hy_Assistant｜>⟦<think></think>a<｜hy_eos｜>⟧"
    err = refused(hy3, msgs(("user", "q"), ("assistant", "<think>r</think>a"), reasoning_effort="no_think"))
    assert err.reason == "reasoning_effort_conflict"


@pytest.mark.parametrize("rec,effort,note", [
    (msgs(("user", "q"), ("assistant", "a", "r")), "high", "reasoning_effort_default_high"),
    (msgs(("user", "q"), ("assistant", "a")), "no_think", "reasoning_effort_default_no_think"),
    (msgs(("user", "q"), ("assistant", "a", "r"), reasoning_effort="low"), "low", None)])
def test_hy3_missing_reasoning_effort_rule_is_counted(hy3, rec, effort, note):
    text, enc = render(hy3, rec)
    think = "<think>r</think>" if "reasoning_content" in rec["messages"][1] else "<think></think>"
    assert text == HY3_HEAD + f"{effort}<｜hy_User｜>q<｜hy_Assistant｜>⟦{think}a<｜hy_eos｜>⟧"
    assert enc.notes == ((note,) if note else ())


def test_hy3_token_suffix_from_the_record(hy3):
    rec = msgs(("user", "q"), ("assistant", "a"), token_suffix="opensource")
    text, _ = render(hy3, rec)
    assert text == ("<｜hy_begin▁of▁sentence:opensource｜><｜reasoning_mode:opensource｜>reasoning_effort:no_think"
                    "<｜hy_User:opensource｜>q<｜hy_Assistant:opensource｜>⟦<think:opensource></think:opensource>a"
                    "<｜hy_eos:opensource｜>⟧")
    err = refused(hy3, dict(rec, token_suffix="other"))  # control strings the tokenizer does not have
    assert err.reason == "control_string_not_a_token" and "<｜hy_begin▁of▁sentence:other｜>" in str(err)


def test_hy3_on_a_tokenizer_without_its_control_tokens_is_refused():
    if not QWEN.is_dir():
        pytest.skip("../shared/tokenizers is not available")
    with pytest.raises(BuildError, match=re.escape("'<｜hy_Assistant｜>', which is not one token")):
        resolve_template("hy3", load_tokenizer(str(QWEN)))


# -- hunyuan (A13B), the real tiktoken tokenizer ---------------------------------------
@pytest.fixture(scope="module")
def hunyuan():
    if not HY.is_dir():
        pytest.skip("../shared/tokenizers is not available")
    tok = load_tokenizer(str(HY))
    return Renderer(tok, resolve_template("hunyuan", tok))


SEED_SYSTEM = "You are a helpful assistant."
FAST = ("<|startoftext|>You are a helpful assistant.<|extra_4|>/no_think Why is seawater salty?<|extra_0|>"
        "⟦<think>\n\n</think>\n<answer>\nSalts from rocks.\n</answer><|eos|>⟧")


@needs_tokenizers
def test_hunyuan_no_think_with_inline_data_is_not_wrapped_twice(hunyuan):
    inline = ADAPTERS["messages"]({"reasoning_effort": "no_think", "messages": [
        {"role": "system", "content": SEED_SYSTEM}, {"role": "user", "content": "/no_think Why is seawater salty?"},
        {"role": "assistant", "content": "<think>\n\n</think>\n<answer>\nSalts from rocks.\n</answer>"}]})
    plain = ADAPTERS["messages"]({"reasoning_effort": "no_think", "messages": [
        {"role": "system", "content": SEED_SYSTEM}, {"role": "user", "content": "Why is seawater salty?"},
        {"role": "assistant", "content": "Salts from rocks."}]})
    no_field = {"messages": inline["messages"]}
    for rec in (inline, plain, no_field):  # the three spellings of seed 000's fast-thinking example
        assert render(hunyuan, rec)[0] == FAST
    assert render(hunyuan, inline)[1].ids.tolist() == render(hunyuan, plain)[1].ids.tolist()
    mixed = ADAPTERS["messages"]({"reasoning_effort": "no_think", "messages": [  # prefix written, wrapper not
        {"role": "system", "content": SEED_SYSTEM}, {"role": "user", "content": "/no_think Why is seawater salty?"},
        {"role": "assistant", "content": "Salts from rocks."}]})
    assert render(hunyuan, mixed)[0] == FAST
    assert check_template(hunyuan, [inline, plain, mixed]).ok


@needs_tokenizers
@pytest.mark.parametrize("effort,user,assistant,reasoning,field", [
    ("no_think", "q", "<think>\nslow\n</think>\n<answer>\na\n</answer>", None, "messages[1].content"),
    ("no_think", "q", "a", "slow", "messages[1].reasoning_content"),
    ("high", "/no_think q", "a", None, "messages[0].content"),
    ("no_think", "q", "<think>\n\n</think>\na", None, "messages[1].content"),  # empty think, no <answer>
])
def test_hunyuan_field_and_inline_form_disagree(hunyuan, effort, user, assistant, reasoning, field):
    m = {"role": "assistant", "content": assistant}
    if reasoning:
        m["reasoning_content"] = reasoning
    err = refused(hunyuan, {"reasoning_effort": effort, "messages": [{"role": "user", "content": user}, m]})
    assert err.reason == "reasoning_effort_conflict" and err.field == field


# -- EOS already in the data (FM9G add_template.py + template none) -----------------------
@needs_tokenizers
def test_eos_written_by_the_transform_is_not_appended_twice():
    spec = importlib.util.spec_from_file_location("add_template", ROOT / "sample_data/transforms/add_template.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rec = script.transform({"input": "Hi", "output": "Hello"}, 0, None)
    assert rec["output"].endswith("<|im_end|>")
    tok = load_tokenizer(str(QWEN))
    assert tok.eos_token == "<|im_end|>"
    text, enc = render(Renderer(tok, resolve_template("none", tok)), rec)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n⟦Hello<|im_end|>⟧")
    assert enc.ids[-1] == tok.eos_id and enc.ids.tolist().count(tok.eos_id) == 1  # the prompt's are text
    assert enc.notes == ("eos_in_data",)
    plain, enc2 = render(Renderer(tok, resolve_template("none", tok)), {"input": "Hi", "output": "Hello"})
    assert plain == "Hi⟦Hello<|im_end|>⟧" and enc2.notes == ()


# -- per-record template variables ------------------------------------------------------
@needs_tokenizers
def test_enable_thinking_from_the_record(tmp_path):
    tmpl = tmp_path / "qwen3ish.jinja"
    tmpl.write_text("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
                    "{%- if m.role == 'assistant' %}{% generation %}"
                    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                    "{%- endif %}{{- m.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
                    "{%- else %}{{- m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}")
    tok = load_tokenizer(str(QWEN))
    r = Renderer(tok, resolve_template(str(tmpl), tok))
    rec = msgs(("user", "q"), ("assistant", "a"))
    assert render(r, rec)[0] == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n⟦a<|im_end|>⟧\n"
    assert render(r, dict(rec, enable_thinking=False))[0] == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n⟦<think>\n\n</think>\n\na<|im_end|>⟧\n")
