"""Manifest parsing and validation (mixtures/manifest.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mixtures.manifest import ManifestError, load_manifest
from stages.fm9g_index import write_fm9g_index

REPO = Path(__file__).resolve().parents[1]

# The mixture list of the FM9G README (seeds/004), character for character.
FM9G_README_MIXTURE = """[
    {
        "dataset_name": "medical_o1_reasoning",
        "task_name": "medical_o1_reasoning",
        "abs_weight": 0.5,
        "path": "/FM9G4770B/data_test/indexed_data/medical_train",
        "transforms": "./add_template.py",
        "allow_repeat": true,
        "nlines": 17278,
        "ave_tokens_per_line": 351,
        "total_tokens": 0.0006
    },
    {
        "dataset_name": "ralpaca_zh",
        "task_name": "ralpaca_zh",
        "abs_weight": 0.5,
        "path": "/FM9G4770B/data_test/indexed_data/data_ralpaca_zh",
        "transforms": "./script_cpmc.py",
        "allow_repeat": true,
        "nlines": 48818,
        "ave_tokens_per_line": 204,
        "total_tokens": 0.001
    }
]
"""


@pytest.fixture
def tree(tmp_path: Path, monkeypatch) -> Path:
    """A manifest folder with a tokenizer stand-in, two data files and the two transforms;
    also the current directory, which keyword overrides are relative to."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "a.jsonl").write_text('{"input": "q", "output": "a"}\n')
    (tmp_path / "b.txt").write_text("hello\n")
    for name in ("add_template.py", "script_cpmc.py"):
        shutil.copy(REPO / "sample_data" / "transforms" / name, tmp_path / name)
    return tmp_path


def write(folder: Path, doc, name: str = "mix.json") -> Path:
    path = folder / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc, indent=2))
    return path


def entry(**over) -> dict:
    base = {"dataset_name": "a", "task_name": "a", "abs_weight": 1.0, "path": "a.jsonl"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def obj(*datasets, **settings) -> dict:
    return {"tokenizer": "tok", **settings, "datasets": list(datasets) or [entry()]}


def fails(path: Path, json_path: str, fragment: str = "", **kw) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_manifest(path, **kw)
    err = info.value
    text = str(err)
    assert str(path) in text
    assert any(p == json_path for p, _ in err.problems), text
    assert f"{path}: {json_path}: " in text
    assert fragment in text, text
    return err


# --------------------------------------------------------------------------- good manifests

def test_fm9g_readme_example_loads_verbatim(tree: Path):
    indexed = tree / "indexed_data"
    for name in ("medical_train", "data_ralpaca_zh"):
        write_fm9g_index(tree / "a.jsonl", indexed / name, language="zh")
    # Only the absolute data root differs from the README text.
    text = FM9G_README_MIXTURE.replace("/FM9G4770B/data_test/indexed_data", str(indexed))
    path = write(tree, text)

    mix = load_manifest(path, tokenizer=str(tree / "tok"))
    assert mix.form == "fm9g"
    # the list form's input/output strings are the training text: no chat template by default
    assert (mix.template, mix.max_length, mix.seed) == ("none", 4096, 1234)
    assert mix.tokenizer == str(tree / "tok")
    assert len(mix.manifest_sha256) == 64
    med, alp = mix.datasets
    assert med.dataset_name == med.task_name == "medical_o1_reasoning"
    assert med.path == str(indexed / "medical_train")
    assert med.transforms == str(tree / "add_template.py")
    assert alp.transforms == str(tree / "script_cpmc.py")
    assert (med.abs_weight, med.allow_repeat, med.overflow, med.format) == (0.5, True, None, "auto")  # overflow: by format
    assert (alp.declared_nlines, alp.declared_ave_tokens_per_line, alp.declared_total_tokens) == (48818, 204, 0.001)
    assert med.incontext_weight == (1.0,)


def test_fm9g_readme_example_unmodified_only_misses_its_data(tree: Path):
    path = write(tree, FM9G_README_MIXTURE)
    err = fails(path, "[0].path", "/FM9G4770B/data_test/indexed_data/medical_train", tokenizer=str(tree / "tok"))
    assert {p for p, _ in err.problems} == {"[0].path", "[1].path"}


def test_fm9g_extra_keys_and_aliases(tree: Path):
    doc = [entry(weight=1.0, oversize_rule="head", incontext_weight=[0.5, 0.5], do_compact=False,
                 is_long=True, avg_tokens=120, abs_weight=2),
           entry(dataset_name="b", task_name="b", path="b.txt", ave_tokens=-1, oversize_rule="drop")]
    mix = load_manifest(write(tree, doc), tokenizer=str(tree / "tok"), max_length=2048, seed=7,
                        template="chatml")
    a, b = mix.datasets
    assert a.overflow == "truncate" and b.overflow == "drop"
    assert a.declared_ave_tokens_per_line == 120 and b.declared_ave_tokens_per_line is None
    assert a.incontext_weight == (0.5, 0.5) and a.abs_weight == 2.0
    assert (mix.max_length, mix.seed, mix.template) == (2048, 7, "chatml")


def test_do_compact_warns(tree: Path):
    with pytest.warns(UserWarning, match=r"\[0\]\.do_compact: do_compact is not supported"):
        load_manifest(write(tree, [entry(do_compact=True)]), tokenizer="tok")


def test_object_form_loads_and_overrides(tree: Path):
    (tree / "shards").mkdir()
    (tree / "shards" / "x-0.jsonl").write_text("{}\n")
    (tree / "my.jinja").write_text("{{ messages }}")
    doc = obj(entry(format="input-output", language="zh", transforms="add_template.py",
                    allow_repeat=False, overflow="drop", task_name=...),
              entry(dataset_name="glob", path="shards/*.jsonl", format="text"),
              template="my.jinja", max_length=1024, seed=5)
    path = write(tree, doc)
    mix = load_manifest(path)
    assert mix.form == "object"
    assert mix.tokenizer == str(tree / "tok")
    assert mix.template == str(tree / "my.jinja")
    assert (mix.max_length, mix.seed) == (1024, 5)
    a, g = mix.datasets
    assert a.task_name == "a"  # defaults to dataset_name in the object form
    assert (a.format, a.language, a.allow_repeat, a.overflow) == ("input-output", "zh", False, "drop")
    assert a.transforms == str(tree / "add_template.py")
    assert g.path == str(tree / "shards" / "*.jsonl")

    over = load_manifest(path, max_length=64, seed=0, template="none")
    assert (over.max_length, over.seed, over.template) == (64, 0, "none")


def test_zero_weight_allowed_when_another_is_positive(tree: Path):
    mix = load_manifest(write(tree, obj(entry(abs_weight=0), entry(dataset_name="b", abs_weight=1))))
    assert [d.abs_weight for d in mix.datasets] == [0.0, 1.0]


# --------------------------------------------------------------------------- bad manifests

def test_unknown_key(tree: Path):
    fails(write(tree, obj(entry(abs_wieght=1))), "datasets[0].abs_wieght", "did you mean 'abs_weight'")


def test_unknown_top_level_key(tree: Path):
    fails(write(tree, obj(tokeniser="tok")), "tokeniser", "unknown key")


def test_fm9g_only_keys_rejected_in_object_form(tree: Path):
    fails(write(tree, obj(entry(oversize_rule="head"))), "datasets[0].oversize_rule", "unknown key")


def test_wrong_type(tree: Path):
    fails(write(tree, obj(entry(), entry(dataset_name="b", abs_weight="0.5"))),
          "datasets[1].abs_weight", "expected number, got string")


def test_wrong_type_bool(tree: Path):
    fails(write(tree, [entry(allow_repeat="yes")]), "[0].allow_repeat", "expected boolean", tokenizer="tok")


def test_missing_required_key(tree: Path):
    fails(write(tree, [entry(path=...)]), "[0].path", "missing required key", tokenizer="tok")


def test_missing_task_name_in_fm9g_form(tree: Path):
    fails(write(tree, [entry(task_name=...)]), "[0].task_name", "missing required key", tokenizer="tok")


def test_missing_datasets(tree: Path):
    fails(write(tree, {"tokenizer": "tok"}), "datasets", "missing required key")


def test_empty_list(tree: Path):
    fails(write(tree, []), "$", "must not be empty", tokenizer="tok")


def test_missing_path(tree: Path):
    fails(write(tree, obj(entry(path="nope.jsonl"))), "datasets[0].path", "no such file or directory")


def test_glob_matching_nothing(tree: Path):
    fails(write(tree, obj(entry(path="data/*.parquet"))), "datasets[0].path", "glob matches no file")


def test_missing_transforms(tree: Path):
    fails(write(tree, obj(entry(transforms="nope.py"))), "datasets[0].transforms", "not found")


def test_duplicate_dataset_name(tree: Path):
    fails(write(tree, obj(entry(), entry(task_name="other"))), "datasets[1].dataset_name",
          "duplicate dataset_name 'a' (first used at datasets[0])")


def test_duplicate_task_name_is_fine(tree: Path):
    mix = load_manifest(write(tree, [entry(), entry(dataset_name="b")]), tokenizer=str(tree / "tok"))
    assert [d.task_name for d in mix.datasets] == ["a", "a"]


def test_negative_weight(tree: Path):
    fails(write(tree, obj(entry(abs_weight=-0.1))), "datasets[0].abs_weight", "must be >= 0")


def test_all_weights_zero(tree: Path):
    fails(write(tree, obj(entry(abs_weight=0), entry(dataset_name="b", abs_weight=0.0))),
          "datasets[*].abs_weight", "every abs_weight is 0")


@pytest.mark.parametrize("name", ["a/b", "a\\b", "..", "", ".hidden", "."])
def test_dataset_name_escaping_output_dir(tree: Path, name: str):
    fails(write(tree, obj(entry(dataset_name=name))), "datasets[0].dataset_name", "plain folder name")


@pytest.mark.parametrize("key,value", [("format", "csv"), ("overflow", "head")])
def test_bad_enum(tree: Path, key: str, value: str):
    fails(write(tree, obj(entry(**{key: value}))), f"datasets[0].{key}", "must be one of")


def test_bad_oversize_rule(tree: Path):
    fails(write(tree, [entry(oversize_rule="cut")]), "[0].oversize_rule", "must be one of", tokenizer="tok")


def test_bad_template_name(tree: Path):
    fails(write(tree, obj(template="llama")), "template", "must be one of tokenizer, chatml")


def test_missing_template_file(tree: Path):
    fails(write(tree, obj(template="gone.jinja")), "template", "template file not found")


def test_bad_override(tree: Path):
    fails(write(tree, obj()), "max_length (override)", "must be >= 1", max_length=0)


def test_ave_tokens_aliases_conflict(tree: Path):
    fails(write(tree, [entry(ave_tokens_per_line=10, avg_tokens=11)]), "[0].avg_tokens",
          "give only one of", tokenizer="tok")


def test_negative_declared_tokens(tree: Path):
    fails(write(tree, [entry(ave_tokens_per_line=-5)]), "[0].ave_tokens_per_line", "-1", tokenizer="tok")


def test_no_tokenizer(tree: Path):
    fails(write(tree, [entry()]), "tokenizer", "--tokenizer")


def test_tokenizer_path_missing(tree: Path):
    fails(write(tree, obj(tokenizer="no_tok")), "tokenizer", "no such file or directory")


def test_invalid_json_names_line_and_column(tree: Path):
    path = write(tree, '[\n  {"dataset_name": "a",,}\n]')
    err = fails(path, "$", "line 2 column 24", tokenizer="tok")
    assert "invalid JSON" in str(err)


def test_duplicate_json_key(tree: Path):
    path = write(tree, '{"tokenizer": "tok", "datasets": [{"dataset_name": "a", "abs_weight": 1, '
                       '"abs_weight": 2, "path": "a.jsonl"}]}')
    fails(path, "datasets[0].abs_weight", "more than once")


def test_nan_rejected(tree: Path):
    fails(write(tree, '[{"dataset_name": "a", "task_name": "a", "abs_weight": NaN, "path": "a.jsonl"}]'),
          "$", "NaN", tokenizer="tok")


def test_not_a_list_or_object(tree: Path):
    fails(write(tree, '"hello"'), "$", "expected a JSON list")


def test_reports_every_fault(tree: Path):
    err = fails(write(tree, obj(entry(abs_weight=-1), entry(dataset_name="b", path="missing"))),
                "datasets[0].abs_weight")
    assert len(str(err).splitlines()) == 1  # schema faults come first, alone
    err = fails(write(tree, obj(entry(path="x"), entry(dataset_name="b", path="y"))), "datasets[1].path")
    assert {p for p, _ in err.problems} == {"datasets[0].path", "datasets[1].path"}


# --------------------------------------------------------------------------- trust_remote_code

def test_trust_remote_code_key_and_override(tree: Path):
    assert load_manifest(write(tree, obj())).trust_remote_code is False
    path = write(tree, obj(trust_remote_code=True))
    assert load_manifest(path).trust_remote_code is True
    assert load_manifest(path, trust_remote_code=False).trust_remote_code is False  # override wins
    assert load_manifest(write(tree, [entry()]), tokenizer="tok", trust_remote_code=True).trust_remote_code
    fails(write(tree, obj(trust_remote_code="yes")), "trust_remote_code", "expected boolean, got string")
    fails(write(tree, obj()), "trust_remote_code (override)", "expected boolean", trust_remote_code=1)


def _own_loader_tokenizer(folder: Path) -> Path:
    """The sample tokenizer behind a loader of its own: tokenizer_config.json's auto_map names
    a class in a .py file of the dir (a PreTrainedTokenizerFast subclass)."""
    src = REPO / "sample_data" / "tokenizer"
    d = folder / "own_loader_tok"
    d.mkdir()
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(src / name, d / name)
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("backend", None)
    config.update(tokenizer_class="WrappedTokenizer",
                  auto_map={"AutoTokenizer": [None, "wrapped_tokenizer.WrappedTokenizer"]})
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (d / "wrapped_tokenizer.py").write_text(
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class WrappedTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n", encoding="utf-8")
    return d


def test_trust_remote_code_reaches_driver_and_workers(tmp_path: Path, capsys, monkeypatch):
    """Without the switch the build stops with a clear message (exit 1); with the manifest key
    or the --trust-remote-code flag the dir's own loader runs — in the driver and in worker
    processes — and the samples are those of the plain tokenizer. The switch is not part of
    the cache key: the key and the flag reuse one built dir."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pipeline.cli import main
    from stages.shard import read_shard
    from stages.tokenizer import load_tokenizer
    tok = _own_loader_tokenizer(tmp_path)
    data = tmp_path / "share.jsonl"
    data.write_text("".join((REPO / "sample_data" / "sharegpt_en.jsonl").read_text(
        encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8")

    def manifest(name, **settings):
        return write(tmp_path, {"tokenizer": str(tok), "max_length": 512, **settings, "datasets": [
            {"dataset_name": "share", "abs_weight": 1, "path": str(data)}]}, name)

    plain, keyed = manifest("plain.json"), manifest("keyed.json", trust_remote_code=True)
    for cmd in ("build", "plan"):
        assert main([cmd, str(plain), *(["--workers", "2"] if cmd == "build" else [])]) == 1
        err = capsys.readouterr().err
        assert "names its own loader (WrappedTokenizer); if you trust that code, pass trust_remote_code" in err
        assert "--trust-remote-code" in err
    assert main(["build", str(keyed), "--workers", "2"]) == 0  # two worker processes
    out = capsys.readouterr().out
    assert "│ built " in out
    assert main(["build", str(plain), "--workers", "2", "--trust-remote-code"]) == 0
    assert "│ reused " in capsys.readouterr().out
    assert main(["plan", str(plain), "--trust-remote-code"]) == 0
    capsys.readouterr()
    assert type(load_tokenizer(str(tok), trust_remote_code=True).hf).__name__ == "WrappedTokenizer"

    # the same ids as the plain sample tokenizer gives these records
    lock = json.loads((tmp_path / "build" / "mixture.lock.json").read_text())
    d = Path(lock["datasets"][0]["path"])
    meta = json.loads((d / "meta.json").read_text())
    ref = load_tokenizer(str(REPO / "sample_data" / "tokenizer"))
    arrays = read_shard(d / meta["shards"][0]["file"])
    text = ref.hf.apply_chat_template(
        [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
         for t in json.loads(data.read_text(encoding="utf-8").splitlines()[0])["conversations"]],
        tokenize=True, return_dict=False)
    assert arrays.sample(0).tolist() == list(text)
    # show needs the switch too
    assert main(["show", str(tmp_path / "build" / "mixture.lock.json"), "--color", "never"]) == 1
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "build" / "mixture.lock.json"), "--color", "never",
                 "--trust-remote-code"]) == 0
    assert "[assistant#2]⟦" in capsys.readouterr().out


# --------------------------------------------------------------------------- issues 12, 15, 16

@pytest.mark.parametrize("literal", ["1e309", "-1e309", "1E400"])
def test_overflowing_weight_is_refused(tree: Path, literal: str):
    doc = '{"tokenizer": "tok", "datasets": [{"dataset_name": "a", "abs_weight": %s, "path": "a.jsonl"}]}'
    err = fails(write(tree, doc % literal), "datasets[0].abs_weight")
    assert json.loads(literal) in (float("inf"), float("-inf"))  # what the JSON parser made of it
    assert any("finite" in what or ">= 0" in what for _, what in err.problems)


def test_overflowing_counts_and_incontext_weights_are_refused(tree: Path):
    doc = ('{"tokenizer": "tok", "datasets": [{"dataset_name": "a", "abs_weight": 1, "path": "a.jsonl", '
           '"nlines": 1e999, "incontext_weight": [1e999]}]}')
    err = fails(write(tree, doc), "datasets[0].nlines", "finite")
    assert any(p == "datasets[0].incontext_weight[0]" for p, _ in err.problems)


def test_two_weights_of_1e308_share_tokens_evenly(tree: Path):
    from mixtures.lock import make_lock
    mix = load_manifest(write(tree, obj(entry(abs_weight=1e308), entry(dataset_name="b", abs_weight=1e308))))
    meta = {"key": "k", "nlines": 2, "n_samples": 2, "n_tokens": 1, "tokenizer": {"sha256": "s"}}
    lock, _ = make_lock(mix, [(s, f"/d/{s.dataset_name}", meta) for s in mix.datasets])
    assert [d["token_share"] for d in lock["datasets"]] == [0.5, 0.5]
    assert [d["sample_probability"] for d in lock["datasets"]] == [0.5, 0.5]


@pytest.mark.parametrize("value", ["", None])
def test_empty_or_null_transforms_mean_none(tree: Path, value):
    doc = [entry(transforms=value)]
    spec, = load_manifest(write(tree, doc), tokenizer="tok").datasets
    assert spec.transforms is None


def test_shard_tokens_top_level_per_dataset_and_override(tree: Path):
    from stages.constants import DEFAULT_SHARD_TOKENS
    mix = load_manifest(write(tree, obj(entry(), entry(dataset_name="b", shard_tokens=7))))
    assert DEFAULT_SHARD_TOKENS == 2**30
    assert mix.shard_tokens == 2**30 and [d.shard_tokens for d in mix.datasets] == [2**30, 7]
    mix = load_manifest(write(tree, obj(entry(), entry(dataset_name="b", shard_tokens=7), shard_tokens=100)))
    assert [d.shard_tokens for d in mix.datasets] == [100, 7]
    mix = load_manifest(write(tree, [entry()]), tokenizer="tok", shard_tokens=5)  # FM9G form: the CLI flag
    assert mix.shard_tokens == 5 and mix.datasets[0].shard_tokens == 5
    fails(write(tree, obj(entry(shard_tokens=0))), "datasets[0].shard_tokens", ">= 1")
    fails(write(tree, obj(entry(), shard_tokens=1.5)), "shard_tokens", "expected integer")


def test_vocabularies_come_from_stages_constants(tree: Path, monkeypatch):
    """A .jinja among the built-in templates is a template name (issue 12): the manifest
    asks stages.constants, which lists stages/templates/ — not a list of its own."""
    from stages import constants
    shipped = sorted(p.stem for p in (REPO / "stages" / "templates").glob("*.jinja"))
    assert constants.builtin_templates() == shipped
    for name in shipped:
        assert load_manifest(write(tree, obj(template=name))).template == name
    monkeypatch.setattr(constants, "builtin_templates", lambda: shipped + ["my_model"])
    assert load_manifest(write(tree, obj(template="my_model"))).template == "my_model"
    monkeypatch.undo()
    fails(write(tree, obj(template="my_model")), "template", "must be one of")
    assert load_manifest(write(tree, obj(entry(format="firefly")))).datasets[0].format == "firefly"


def test_template_switches_and_multi_turn_per_dataset(tree: Path):
    """`template_kwargs` (template switches) and `multi_turn` per dataset (issue 26): the switches
    reach the dataset spec (and from there the renderer and the cache key); multi_turn: last is
    loss: last, per_turn is loss: per_turn; an unknown policy is a manifest error."""
    from pipeline.cache import dataset_key
    doc = obj(entry(template_kwargs={"enable_thinking": False}, multi_turn="last"),
              entry(dataset_name="b", task_name="b", multi_turn="final"),
              entry(dataset_name="c", task_name="c", multi_turn="per_turn"))
    a, b, c = load_manifest(write(tree, doc)).datasets
    assert a.template_kwargs == '{"enable_thinking": false}' and a.loss == "last"
    assert b.template_kwargs is None and b.loss == "assistant" and c.loss == "per_turn"
    base = dict(sources=[], format="messages", transform_sha256=None, seed=1, template_sha256="t",
                tokenizer_sha256="k", max_length=8, overflow="segment", loss="assistant", txt_paragraphs=False)
    assert dataset_key(**base) != dataset_key(**base, template_kwargs=a.template_kwargs)
    with pytest.raises(ManifestError, match="multi_turn"):
        load_manifest(write(tree, obj(entry(multi_turn="sometimes"))))
