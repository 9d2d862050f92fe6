"""FM9G transform scripts (mixtures/transforms.py, sample_data/transforms)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from mixtures.transforms import (TransformError, apply_transform, load_transform,
                                 record_rng)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data" / "transforms"


def script(tmp_path: Path, body: str, name: str = "t.py") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


RANDOM_SCRIPT = """
def transform(data, num_sample, r):
    return {"input": "", "output": data["text"] + " " + str(r.random()) + " " + str(num_sample)}
"""


def run(t, data, i=0, **kw):
    kw.setdefault("seed", 1234)
    kw.setdefault("dataset_name", "ds")
    kw.setdefault("source", "src.jsonl")
    return apply_transform(t, data, record_index=i, **kw)


def test_load_transform_metadata(tmp_path: Path):
    path = script(tmp_path, RANDOM_SCRIPT)
    t = load_transform(path)
    assert t.path == str(path)
    import hashlib
    assert t.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # Same source, another file: loaded once; different source: a different module.
    other = load_transform(script(tmp_path, RANDOM_SCRIPT, "copy.py"))
    assert other.sha256 == t.sha256
    assert load_transform(script(tmp_path, RANDOM_SCRIPT + "\n# v2\n", "v2.py")).sha256 != t.sha256


def test_same_seed_same_result(tmp_path: Path):
    t = load_transform(script(tmp_path, RANDOM_SCRIPT))
    assert run(t, {"text": "a"}, 5) == run(t, {"text": "a"}, 5)
    # And through a pickle round trip (worker processes).
    t2 = pickle.loads(pickle.dumps(t))
    assert run(t2, {"text": "a"}, 5) == run(t, {"text": "a"}, 5)


def test_rng_depends_on_record_dataset_and_seed():
    draws = lambda *a: [record_rng(*a).random() for _ in range(3)]  # noqa: E731
    assert draws(1, "ds", 0) == draws(1, "ds", 0)
    assert draws(1, "ds", 0) != draws(1, "ds", 1)
    assert draws(1, "ds", 0) != draws(2, "ds", 0)
    assert draws(1, "ds", 0) != draws(1, "other", 0)
    # Stable across processes and releases (sha256-based, not the salted hash()): pinned.
    assert record_rng(1234, "ds", 0).random() == 0.8594099147159244


def test_different_record_index_different_r(tmp_path: Path):
    t = load_transform(script(tmp_path, RANDOM_SCRIPT))
    outs = {run(t, {"text": "a"}, i)["output"] for i in range(20)}
    assert len(outs) == 20


def test_num_sample_passed(tmp_path: Path):
    t = load_transform(script(tmp_path, RANDOM_SCRIPT))
    assert run(t, {"text": "a"}, num_sample=3)["output"].endswith(" 3")


def test_none_and_empty_output_skip(tmp_path: Path):
    t = load_transform(script(tmp_path, """
def transform(data, num_sample, r):
    kind = data["kind"]
    if kind == "none":
        return None
    if kind == "empty":
        return {"input": "q", "output": ""}
    if kind == "missing":
        return {"input": "q"}
    if kind == "no_input":
        return {"output": "a"}
    return data
"""))
    assert run(t, {"kind": "none"}) is None
    assert run(t, {"kind": "empty"}) is None
    assert run(t, {"kind": "missing"}) is None
    assert run(t, {"kind": "no_input"}) == {"input": "", "output": "a"}
    chat = {"kind": "chat", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert run(t, chat) == chat  # passed through (checked like an input record)
    assert run(t, {"kind": "t", "text": "x"}) == {"kind": "t", "text": "x"}


def test_no_transform_is_identity():
    rec = {"text": "x"}
    assert run(None, rec) is rec


def test_raising_transform_names_dataset_record_and_traceback(tmp_path: Path):
    t = load_transform(script(tmp_path, """
def helper(data):
    return data["missing_field"]

def transform(data, num_sample, r):
    return helper(data)
"""))
    with pytest.raises(TransformError) as info:
        run(t, {"text": "x"}, 41, dataset_name="alpaca", source="/d/a.jsonl", source_record=7)
    msg = str(info.value)
    assert "'alpaca'" in msg
    assert "/d/a.jsonl:8" in msg  # 1-based, as fail-mode errors number records
    assert msg.splitlines()[0].endswith("KeyError: 'missing_field'")  # the cause on the first line
    assert info.value.traceback_text.startswith("Traceback")
    assert "Traceback" in msg and "helper" in msg and "KeyError: 'missing_field'" in msg
    assert str(t.path) in msg


def test_non_dict_result_is_error(tmp_path: Path):
    t = load_transform(script(tmp_path, "def transform(data, num_sample, r):\n    return [1]\n"))
    with pytest.raises(TransformError, match="returned list"):
        run(t, {"text": "x"})


def test_missing_transform_function(tmp_path: Path):
    with pytest.raises(TransformError, match="defines no function `transform"):
        load_transform(script(tmp_path, "def transfrom(data, num_sample, r):\n    return data\n"))


def test_wrong_signature(tmp_path: Path):
    with pytest.raises(TransformError, match="must accept"):
        load_transform(script(tmp_path, "def transform(data):\n    return data\n"))


def test_import_error_and_missing_file(tmp_path: Path):
    with pytest.raises(TransformError, match="failed to import"):
        load_transform(script(tmp_path, "import not_a_module_xyz\n"))
    with pytest.raises(TransformError, match="cannot read"):
        load_transform(tmp_path / "nope.py")


# --------------------------------------------------------------------------- sample scripts

def test_add_template():
    t = load_transform(SAMPLE / "add_template.py")
    out = run(t, {"input": "你好", "output": "你好！"})
    assert out == {
        "input": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                 "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
        "output": "你好！<|im_end|>",
    }
    assert run(t, {"input": "q", "output": ""}) is None
    assert run(t, {"input": "q"}) is None
    assert run(t, {"output": "plain"}) == {"input": "", "output": "plain"}
    assert run(t, {"text": "plain"}) == {"input": "", "output": "plain"}


def test_script_cpmc():
    t = load_transform(SAMPLE / "script_cpmc.py")
    assert run(t, {"text": "中国的首都是北京。"}) == {"input": "", "output": "中国的首都是北京。"}
    assert run(t, {"input": "q", "output": "a"}) == {"input": "q", "output": "a"}
    assert run(t, {"output": "a"}) == {"input": "", "output": "a"}
    assert run(t, {"text": "  \n"}) is None
    assert run(t, {"input": "q"}) is None


# --------------------------------------------------------------------------- issue 16: runaway / bad output

def test_sys_exit_is_a_transform_error_naming_script_and_record(tmp_path: Path):
    t = load_transform(script(tmp_path, "import sys\ndef transform(data, num_sample, r):\n    sys.exit(3)\n"))
    with pytest.raises(TransformError) as info:
        run(t, {"text": "x"}, 4, source="/d/a.jsonl")
    first = str(info.value).splitlines()[0]
    assert str(t.path) in first and "'ds'" in first and "/d/a.jsonl:5" in first and "sys.exit(3)" in first
    assert "SystemExit" in info.value.traceback_text
    again = pickle.loads(pickle.dumps(info.value))  # crosses from worker processes intact
    assert str(again) == str(info.value) and again.traceback_text == info.value.traceback_text


def test_bad_output_is_refused_like_a_bad_input_record(tmp_path: Path):
    from stages.errors import RecordError
    t = load_transform(script(tmp_path, """
def transform(data, num_sample, r):
    data["messages"][1]["role"] = "bot"
    return data
"""))
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(RecordError) as info:
        run(t, chat)
    assert info.value.reason == "unknown_role" and info.value.field == "messages[1].role"
    assert f"output of transform {t.path}" in info.value.detail
    t2 = load_transform(script(tmp_path, "def transform(data, num_sample, r):\n    return {'text': 5}\n", "u.py"))
    with pytest.raises(RecordError, match="wrong_type"):
        run(t2, {"text": "x"})


def test_bad_transform_output_through_the_build(tmp_path: Path, sample_tokenizer):
    import json
    from pipeline.build import build_mixture
    from stages.errors import RecordError
    t = script(tmp_path, """
def transform(data, num_sample, r):
    if data["messages"][0]["content"] == "q2":
        data["messages"][1]["role"] = "bot"
    return data
""")
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                    {"role": "assistant", "content": "a"}]}) + "\n"
                           for q in ("q1", "q2", "q3")))
    (tmp_path / "m.json").write_text(json.dumps({"tokenizer": sample_tokenizer, "template": "chatml", "datasets": [
        {"dataset_name": "d", "abs_weight": 1, "path": str(src), "transforms": str(t)}]}))
    with pytest.raises(RecordError) as info:
        build_mixture(str(tmp_path / "m.json"), out=str(tmp_path / "o1"), workers=1)
    assert f"{src}:2:" in str(info.value) and str(t) in str(info.value) and "'bot'" in str(info.value)
    _, plans, _ = build_mixture(str(tmp_path / "m.json"), out=str(tmp_path / "o2"), workers=1, on_error="skip")
    meta = plans[0].meta
    assert meta["nlines"] == 2 and meta["skipped"] == {"unknown_role": 1}
    assert meta["records_read"] == meta["nlines"] + sum(meta["skipped"].values())
