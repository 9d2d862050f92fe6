"""LLaMA-Factory's dataset registry as a source (mixtures/registry.py, issue 15): the real
data/dataset_info.json laid out as a user's data/ folder with the demo files beside it —
every entry whose file is there builds, with the ids and spans of the same file named
directly in its canonical format; hub-only entries are refused with one clear line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mixtures.manifest import ManifestError, load_manifest
from mixtures.registry import HUB_KEYS
from stages.errors import POLICY_REASONS

from conftest import SAMPLE, SHARED
from test_columns import assert_same_build, build_datasets

CORPORA = SHARED / "corpora"
REGISTRY = CORPORA / "llamafactory-dataset-registry" / "dataset_info.json"
if not REGISTRY.is_file():
    pytest.skip(f"{REGISTRY} is absent: the registry tests need ../shared/corpora", allow_module_level=True)

# What each present entry is when named directly (the canonical equivalent).
CANONICAL = {"identity": "alpaca", "alpaca_en_demo": "alpaca", "alpaca_zh_demo": "alpaca",
             "glaive_toolcall_en_demo": "sharegpt", "wiki_demo": "text", "c4_demo": "text"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A user's LLaMA-Factory data/ folder: the registry plus every demo file in ../shared/corpora."""
    data = tmp_path_factory.mktemp("lf") / "data"
    data.mkdir()
    shutil.copy(REGISTRY, data / "dataset_info.json")
    for f in CORPORA.glob("*/*"):
        if f.suffix in (".json", ".jsonl", ".txt") and f.parent != REGISTRY.parent:
            shutil.copy(f, data / f.name)
    return data


def registry() -> dict:
    return json.loads(REGISTRY.read_text())


def present(data: Path) -> list[str]:
    return [name for name, e in registry().items() if "file_name" in e and (data / e["file_name"]).exists()]


def test_every_present_entry_is_one_we_know(data_dir):
    assert sorted(present(data_dir)) == sorted(CANONICAL)


@pytest.mark.slow
def test_every_present_entry_builds_like_its_file_named_directly(data_dir, tmp_path):
    datasets = []
    for name in present(data_dir):
        datasets.append({"dataset_info": str(data_dir / "dataset_info.json"), "dataset": name, "abs_weight": 1})
        datasets.append({"dataset_name": f"{name}-direct", "abs_weight": 1, "format": CANONICAL[name],
                         "path": str(data_dir / registry()[name]["file_name"])})
    plans = build_datasets(tmp_path, datasets)
    for name in present(data_dir):
        assert plans[name].meta["nlines"] > 0
        # nothing set aside but by the overflow policy (chat truncates by default: a prompt longer
        # than max_length leaves nothing to train), and the same records either way
        assert set(plans[name].meta["skipped"]) <= POLICY_REASONS
        assert plans[name].meta["skipped"] == plans[f"{name}-direct"].meta["skipped"]
        assert_same_build(plans, name, f"{name}-direct")


def manifest(tmp: Path, entry: dict) -> Path:
    path = tmp / "m.json"
    path.write_text(json.dumps({"tokenizer": str(SAMPLE / "tokenizer"),
                                "datasets": [{"abs_weight": 1, **entry}]}))
    return path


def test_hub_only_entries_are_refused_with_one_line(data_dir, tmp_path):
    hub_only = [n for n, e in registry().items() if "file_name" not in e and any(k in e for k in HUB_KEYS)]
    assert len(hub_only) > 50
    for name in hub_only:
        with pytest.raises(ManifestError) as info:
            load_manifest(manifest(tmp_path, {"dataset_info": str(data_dir / "dataset_info.json"),
                                              "dataset": name}))
        (where, what), = info.value.problems
        assert where == "datasets[0].dataset"
        assert f"dataset {name!r}: hub-only entry" in what and "\n" not in what


def test_registry_entry_defaults_and_mapping(data_dir, tmp_path):
    mix = load_manifest(manifest(tmp_path, {"dataset_info": str(data_dir / "dataset_info.json"),
                                            "dataset": "glaive_toolcall_en_demo"}))
    spec, = mix.datasets
    assert spec.dataset_name == spec.task_name == "glaive_toolcall_en_demo"
    assert spec.path == str(data_dir / "glaive_toolcall_en_demo.json")
    assert spec.format == "sharegpt"  # columns messages→conversations, tools→tools: the adapter's own keys


def test_dataset_dir_unknown_name_and_both_sources(data_dir, tmp_path):
    elsewhere = tmp_path / "reg"
    elsewhere.mkdir()
    shutil.copy(data_dir / "dataset_info.json", elsewhere / "dataset_info.json")
    spec, = load_manifest(manifest(tmp_path, {"dataset_info": str(elsewhere / "dataset_info.json"),
                                              "dataset": "c4_demo", "dataset_dir": str(data_dir)})).datasets
    assert spec.path == str(data_dir / "c4_demo.jsonl") and spec.format == "text"
    with pytest.raises(ManifestError, match="not found in"):  # LLaMA-Factory looks in the registry's folder
        load_manifest(manifest(tmp_path, {"dataset_info": str(elsewhere / "dataset_info.json"),
                                          "dataset": "c4_demo"}))
    with pytest.raises(ManifestError, match="no such entry"):
        load_manifest(manifest(tmp_path, {"dataset_info": str(data_dir / "dataset_info.json"),
                                          "dataset": "alpaca_demo_nope"}))
    with pytest.raises(ManifestError, match="not both"):
        load_manifest(manifest(tmp_path, {"dataset_info": str(data_dir / "dataset_info.json"),
                                          "dataset": "c4_demo", "path": "x.jsonl"}))
    with pytest.raises(ManifestError, match=r"datasets\[0\]\.dataset: missing required key"):
        load_manifest(manifest(tmp_path, {"dataset_info": str(data_dir / "dataset_info.json")}))


def test_ranking_is_ignored_with_a_note_and_multimodal_refused(tmp_path):
    (tmp_path / "dpo.json").write_text(json.dumps([{"conversations": [{"from": "human", "value": "q"},
                                                                       {"from": "gpt", "value": "a"}],
                                                     "chosen": {"from": "gpt", "value": "c"}}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "pref": {"file_name": "dpo.json", "ranking": True, "formatting": "sharegpt",
                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "mm": {"file_name": "dpo.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                             "images": "images"}}}))
    with pytest.warns(UserWarning, match="ranking: true ignored"):
        mix = load_manifest(manifest(tmp_path, {"dataset_info": "dataset_info.json", "dataset": "pref"}))
    assert any("ranking: true ignored" in n for n in mix.notes)
    assert mix.datasets[0].format == "sharegpt"
    with pytest.raises(ManifestError, match="multimodal column 'images'"):
        load_manifest(manifest(tmp_path, {"dataset_info": "dataset_info.json", "dataset": "mm"}))
