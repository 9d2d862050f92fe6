"""Issue 24: `python -m train --mixture <FM9G list>` takes the pipeline's --template,
--tokenizer and --max-length and builds with them (the list form names neither)."""
import json
from pathlib import Path

import pytest

from test_train_helpers import TOKENIZER

from train.__main__ import build_data
from train.args import TrainError, parse_args


@pytest.fixture
def fm9g_list(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"input": f"question {i}", "output": f"answer {i}"}) + "\n"
                            for i in range(6)))
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps([{"dataset_name": "qa", "task_name": "qa", "abs_weight": 1.0,
                                "path": str(data), "allow_repeat": True}]))
    return lst


def test_fm9g_list_takes_template_tokenizer_and_max_length(fm9g_list, tmp_path):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = parse_args(["--mixture", str(fm9g_list), "--tokenizer", str(TOKENIZER), "--template", "none",
                      "--max-length", "96", "--model_config", "C", "--output_dir", str(tmp_path / "o"),
                      "--max_steps", "1"])
    assert cfg.tokenizer_name_or_path == str(TOKENIZER) and cfg.template == "none" and cfg.max_seq_length == 96
    lock = json.loads(build_data(cfg, str(TOKENIZER), hf).read_text())
    assert lock["max_length"] == 96 and lock["tokenizer"]["path"] == str(Path(TOKENIZER).resolve())
    meta = json.loads((Path(lock["datasets"][0]["path"]) / "meta.json").read_text())
    assert meta["template"]["name"] == "none"


def test_fm9g_list_without_tokenizer_names_the_flag(fm9g_list, tmp_path):
    cfg = parse_args(["--mixture", str(fm9g_list), "--template", "none", "--model_config", "C",
                      "--output_dir", str(tmp_path / "o"), "--max_steps", "1"])
    with pytest.raises(TrainError, match="tokenizer"):
        build_data(cfg, str(TOKENIZER), None)


@pytest.mark.slow
@pytest.mark.parametrize("mix,probs", [("concat", None), ("interleave_under", "0.25,0.75")])
def test_lf_dataset_list_mixes_as_llama_factory(tmp_path, mix, probs):
    """`dataset: a,b` through dataset_info.json: concat trains each record once per epoch (token
    shares = the datasets' tokens); interleave draws samples with interleave_probs."""
    from transformers import AutoTokenizer
    from test_train_helpers import SAMPLE
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "chats": {"file_name": str(SAMPLE / "messages_mixed.jsonl"), "formatting": "sharegpt",
                  "columns": {"messages": "messages"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant", "system_tag": "system"}},
        "alpaca": {"file_name": str(SAMPLE / "alpaca_zh.json")}}))
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"model_name_or_path: M\ndataset_dir: {tmp_path}\ndataset: chats, alpaca\n"
                        f"output_dir: {tmp_path / 'o'}\ncutoff_len: 256\nmix_strategy: {mix}\n"
                        + (f"interleave_probs: {probs}\n" if probs else ""))
    cfg = parse_args([str(cfg_file)])
    lock = json.loads(build_data(cfg, str(TOKENIZER), AutoTokenizer.from_pretrained(TOKENIZER)).read_text())
    ds = lock["datasets"]
    assert [d["dataset_name"] for d in ds] == ["chats", "alpaca"] and lock["max_length"] == 256
    if mix == "concat":
        total = sum(d["n_tokens"] for d in ds)
        for d in ds:
            assert d["token_share"] == pytest.approx(d["n_tokens"] / total)
    else:
        assert [d["sample_probability"] for d in ds] == pytest.approx([0.25, 0.75])
