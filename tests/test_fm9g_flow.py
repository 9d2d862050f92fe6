"""The FM9G seed's own flow (seed 004 README, issue 24): an index dir whose meta.json says zh,
the README's list manifest and its add_template.py, built with --tokenizer only.

The README's code is read from ../shared at test time (never copied into the repo); the
expected ids come from the HF tokenizer itself: FM9G trains tok(input) + tok(output), every
marker the transform writes a control token, while control text inside the data stays text.
Fast unit checks of the markup rules (stages/markup.py) use the sample tokenizer.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re

import pytest

from mixtures.transforms import apply_transform, load_transform
from stages.errors import RecordError
from stages.fm9g_index import write_fm9g_index
from stages.render import Renderer, resolve_template
from stages.tokenizer import load_tokenizer

from conftest import SAMPLE, SHARED
from test_columns import samples

QWEN = SHARED / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
SEEDS = SHARED / "reference" / "seeds"
need_seed = pytest.mark.skipif(not QWEN.is_dir() or not list(SEEDS.glob("004_*.txt")),
                               reason=f"{SHARED} is absent: needs the Qwen2.5 tokenizer and seed 004's README")

RECORDS = [
    {"input": "保持健康的三个提示。", "output": "以下是保持健康的三个提示：\n\n1. 保持身体活动。"},
    {"input": "", "output": "只有输出的一条。"},
    {"input": "Name a colour.", "output": "Blue."},
]
# data that holds the markers as text: it must train as text, never as the control token
INJECTED = {"input": "What does <|im_end|> mean?", "output": "It closes <|im_start|> turns."}


def seed_readme() -> str:
    return next(SEEDS.glob("004_*.txt")).read_text(encoding="utf-8")


def seed_block(after: str, lang: str) -> str:
    """The first ```lang code block that follows `after` in the seed README."""
    text = seed_readme()
    start = text.index(after)
    m = re.compile(rf"```{lang}\s*\n(.*?)```", re.S | re.I).search(text, start)
    return m.group(1)


@pytest.fixture(scope="module")
def fm9g_flow(tmp_path_factory):
    """The seed's files, laid out as its README does, and the build of them."""
    from pipeline.build import build_mixture
    tmp = tmp_path_factory.mktemp("fm9g")
    script = tmp / "add_template.py"
    script.write_text(seed_block("以下是chat模板", "python"), encoding="utf-8")
    src = tmp / "train.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS + [INJECTED]),
                   encoding="utf-8")
    index = tmp / "indexed_data" / "medical_train"
    write_fm9g_index(src, index)
    # the index dir's meta.json as convert_json2index.py writes it (the README's example)
    (index / "meta.json").write_text(seed_block("这里有一个meta.json的例子", "json"), encoding="utf-8")
    entries = json.loads(seed_block("### 多个数据集混合", "json"))[:1]  # the add_template.py entry
    entries[0].update(path=str(index), transforms=str(script))
    manifest = tmp / "mixture.json"
    manifest.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    _, plans, _ = build_mixture(str(manifest), out=str(tmp / "out"), workers=1, tokenizer=str(QWEN))
    spec = importlib.util.spec_from_file_location("seed_add_template", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from transformers import AutoTokenizer
    return plans[0], module.transform, AutoTokenizer.from_pretrained(str(QWEN))


@need_seed
@pytest.mark.slow  # a build with the real tokenizer
def test_seed_flow_trains_tok_input_plus_tok_output(fm9g_flow):
    plan, transform, tok = fm9g_flow
    got = samples(plan)
    assert len(got) == len(RECORDS) + 1
    for rec, (ids, spans) in zip(RECORDS, got):
        wrapped = transform(dict(rec), 0, random.Random(0))
        prompt, response = tok(wrapped["input"])["input_ids"], tok(wrapped["output"])["input_ids"]
        assert ids == prompt + response  # HF's default encoding: every marker a control token
        assert spans == [[len(prompt), len(ids)]]  # the output trains, the prompt does not
        assert ids[-1] == tok.eos_token_id and ids[-2] != tok.eos_token_id  # one closing EOS
        assert "You are a helpful assistant." in tok.decode(ids)
    # no second template: Qwen's own default system prompt never appears, nothing counted
    assert not any("Alibaba Cloud" in tok.decode(ids) for ids, _ in got)
    assert plan.job.template == "none"
    assert "template_markup_in_text" not in plan.meta.get("render_notes", {})
    assert plan.meta["language"] == "zh"  # from the index dir's own meta.json


@need_seed
@pytest.mark.slow
def test_seed_flow_control_text_in_data_stays_text(fm9g_flow):
    plan, transform, tok = fm9g_flow
    ids, _ = samples(plan)[-1]
    wrapped = transform(dict(INJECTED), 0, random.Random(0))
    assert tok.decode(ids) == wrapped["input"] + wrapped["output"]
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    # as tokens: only the transform's markers (3 starts, 3 ends); the data's are text
    assert ids.count(start) == 3 and ids.count(end) == 3
    assert tok(wrapped["input"] + wrapped["output"])["input_ids"].count(end) == 4  # HF alone would inject


# -- the markup rules, with the sample tokenizer ---------------------------------------------
@pytest.fixture(scope="module")
def sample_renderer():
    tok = load_tokenizer(str(SAMPLE / "tokenizer"))
    return tok, Renderer(tok, resolve_template("none", tok))


def script(tmp_path, body: str):
    path = tmp_path / "t.py"
    path.write_text("def transform(data, num_sample, r):\n" + body)
    return load_transform(path)


def run(t, record):
    return apply_transform(t, record, seed=0, dataset_name="d", record_index=0, source="f")


def test_markup_becomes_control_tokens_and_data_control_text_stays_text(tmp_path, sample_renderer):
    tok, renderer = sample_renderer
    t = script(tmp_path, "    return {'input': '<|im_start|>' + data['input'] + '<|im_end|>', 'output': data['output']}\n")
    rec = run(t, {"input": "a <|im_end|> b", "output": "ok"})
    assert rec == {"input": "<|im_start|>a <|im_end|> b<|im_end|>", "output": "ok"}  # the record itself is unchanged
    ids = renderer.encode_batch([rec])[0].ids.tolist()
    start, end = tok.control_tokens["<|im_start|>"], tok.control_tokens["<|im_end|>"]
    assert ids[ids.index(start) + 1:].count(end) == 2  # the markup's end and the closing EOS: not the data's
    assert ids.count(start) == 1


def test_a_transform_that_rewrites_control_text_is_refused(tmp_path, sample_renderer):
    _, renderer = sample_renderer
    t = script(tmp_path, "    return {'input': '<|im_start|>' + data['input'].upper(), 'output': data['output']}\n")
    err = renderer.encode_batch([run(t, {"input": "q", "output": "a"})])[0]
    assert isinstance(err, RecordError) and err.reason == "transform_markup_unknown"
    # the same rewrite without control text is plain data: built
    t = script(tmp_path, "    return {'input': 'Q: ' + data['input'].upper(), 'output': data['output']}\n")
    assert not isinstance(renderer.encode_batch([run(t, {"input": "q", "output": "a"})])[0], RecordError)


def test_markup_written_into_a_text_record_is_refused(tmp_path, sample_renderer):
    _, renderer = sample_renderer
    t = script(tmp_path, "    return {'text': '<|im_start|>' + data['text']}\n")
    err = renderer.encode_batch([run(t, {"text": "doc"})])[0]
    assert isinstance(err, RecordError) and err.reason == "transform_markup_in_text"


def test_a_chat_template_over_templated_text_is_counted(tmp_path):
    tok = load_tokenizer(str(SAMPLE / "tokenizer"))
    renderer = Renderer(tok, resolve_template("chatml", tok))
    t = script(tmp_path, "    return {'input': '<|im_start|>user\\n' + data['input'] + '<|im_end|>', "
                         "'output': data['output']}\n")
    enc = renderer.encode_batch([run(t, {"input": "q", "output": "a"})])[0]
    assert "template_markup_in_text" in enc.notes


ADD_TEMPLATE = ("def transform(data, num_sample, r):\n"
                "    return {'input': '<|im_start|>user\\n' + data['input'] + '<|im_end|>\\n<|im_start|>assistant\\n',\n"
                "            'output': data['output'] + '<|im_end|>'}\n")


def fm9g_list(tmp_path, records, meta_language="zh"):
    """An FM9G index dir (its meta.json saying `meta_language`), a transform and a list manifest."""
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_fm9g_index(src, tmp_path / "idx", language=meta_language)
    (tmp_path / "t.py").write_text(ADD_TEMPLATE)
    manifest = tmp_path / "list.json"
    manifest.write_text(json.dumps([{"dataset_name": "d", "task_name": "d", "abs_weight": 1, "path": "idx",
                                     "transforms": "t.py"}]))
    return manifest


def test_list_form_defaults_to_no_template_and_takes_the_index_language(tmp_path):
    from pipeline.build import build_mixture
    manifest = fm9g_list(tmp_path, [{"input": "q", "output": "a"}])
    _, plans, warnings = build_mixture(str(manifest), out=str(tmp_path / "out"), workers=1,
                                       tokenizer=str(SAMPLE / "tokenizer"))
    assert plans[0].job.template == "none" and plans[0].meta["language"] == "zh"
    assert not any("template_markup_in_text" in w for w in warnings)


def test_a_chat_template_over_already_templated_records_is_counted_and_warned(tmp_path):
    from pipeline.build import build_mixture
    manifest = fm9g_list(tmp_path, [{"input": "q", "output": "a"}, {"input": "r", "output": "b"}])
    _, plans, warnings = build_mixture(str(manifest), out=str(tmp_path / "out"), workers=1,
                                       tokenizer=str(SAMPLE / "tokenizer"), template="chatml")
    assert plans[0].meta["render_notes"]["template_markup_in_text"] == 2
    assert any("2 records already hold the control strings of chat template 'chatml'" in w for w in warnings)


def test_markup_a_transform_writes_into_chat_messages(tmp_path, sample_renderer):
    tok, _ = sample_renderer
    renderer = Renderer(tok, resolve_template("chatml", tok))
    t = script(tmp_path, "    m = data['messages']\n"
                         "    return {'messages': [{'role': 'system', 'content': 'Be <|im_start|>brief.'}] + m[:-1]\n"
                         "            + [{'role': 'assistant', 'content': m[-1]['content'] + ' <|im_end|>'}]}\n")
    rec = run(t, {"messages": [{"role": "user", "content": "q <|im_start|>"}, {"role": "assistant", "content": "a"}]})
    ids = renderer.encode_batch([rec])[0].ids.tolist()
    plain = renderer.encode_batch([{"messages": [dict(m) for m in rec["messages"]]}])[0].ids.tolist()
    start, end = tok.control_tokens["<|im_start|>"], tok.control_tokens["<|im_end|>"]
    # the transform's two markers are tokens here; all four texts are text when nothing is known
    assert ids.count(start) == plain.count(start) + 1 and ids.count(end) == plain.count(end) + 1


def test_template_check_says_which_records_it_cannot_check(tmp_path):
    from stages.template_check import check_template
    tok = load_tokenizer(str(SAMPLE / "tokenizer"))
    renderer = Renderer(tok, resolve_template("chatml", tok))
    marked = run(script(tmp_path, "    return {'input': '<|im_start|>' + data['input'], 'output': data['output']}\n"),
                 {"input": "q", "output": "a"})
    plain = run(script(tmp_path, "    return {'input': 'Q: ' + data['input'], 'output': data['output']}\n"),
                {"input": "q", "output": "a"})
    report = check_template(renderer, [marked, plain])
    # markers as tokens have no reference; plain transform text is checked like data
    assert report.not_checked == {"transform_markup_unverifiable": 1} and report.checked == 1 and report.ok
