"""LLaMA-Factory template names (issue 26): a name resolves to the tokenizer's own chat template
when it has one (a note when the family disagrees), else our built-in of that family, else one
line; accepted in a manifest `template` and in an LF YAML."""
import json
from importlib import resources

import pytest

from test_train_helpers import SAMPLE, TOKENIZER

from stages.errors import BuildError
from stages.jinja_env import find_template
from stages.lf_names import LFTemplateError, resolve_lf_name

CHATML = (TOKENIZER / "chat_template.jinja").read_text()


class Tok:
    def __init__(self, chat_template):
        self.chat_template, self.path = chat_template, "tok"


def test_names_with_a_tokenizer_template_use_it():
    assert resolve_lf_name("qwen3", CHATML, lf=True) == ("tokenizer", None)  # same family: no note
    name, note = resolve_lf_name("llama3", CHATML, lf=True)
    assert name == "tokenizer" and "llama3" in note and "chatml family" in note
    t = find_template("qwen", Tok(CHATML))
    assert t.text == CHATML  # the tokenizer's own text, byte for byte


def test_names_without_a_tokenizer_template_use_the_builtin_family():
    hy3 = (resources.files("stages") / "templates" / "hy3.jinja").read_text(encoding="utf-8")
    assert find_template("hy_v3", Tok(None)).text == hy3
    assert resolve_lf_name("qwen", None, lf=True)[0] == "chatml"
    assert resolve_lf_name("empty", CHATML, lf=True) == ("none", None)  # LF's plain concatenation
    with pytest.raises(LFTemplateError, match="'llama3'.*no chat template"):
        resolve_lf_name("llama3", None, lf=True)
    with pytest.raises(BuildError, match="'mistral'"):
        find_template("mistral", Tok(None))


def test_our_names_keep_their_meaning_outside_an_lf_config():
    assert resolve_lf_name("chatml", CHATML) == ("chatml", None)
    assert resolve_lf_name("hunyuan", None) == ("hunyuan", None)
    assert resolve_lf_name("hunyuan", CHATML, lf=True)[0] == "tokenizer"  # LF's meaning in an LF config


def test_manifest_accepts_an_lf_name(tmp_path):
    from mixtures.manifest import load_manifest
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"tokenizer": str(TOKENIZER), "template": "qwen3", "max_length": 64, "datasets": [
        {"dataset_name": "c", "task_name": "c", "abs_weight": 1, "path": str(SAMPLE / "messages_mixed.jsonl")}]}))
    assert load_manifest(str(m)).template == "qwen3"
