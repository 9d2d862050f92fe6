"""`pipeline show`: a sample decoded with trained spans marked and each span labelled with
the role and message it trains, found by re-reading the sample's source record. Expected
labels and texts come from the raw source records read here (not from the pipeline).

The Qwen2.5 case uses ../shared and skips with a reason when it is absent."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import orjson
import pytest

from pipeline.build import build_mixture
from pipeline.cli import main
from stages.shard import read_shard

from conftest import SAMPLE, SHARED

QWEN = SHARED / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
needs_qwen = pytest.mark.skipif(not (QWEN / "tokenizer.json").is_file(),
                                reason=f"{QWEN} is absent (the shared tokenizers)")
LABELLED = re.compile(r"\[([^\]⟦]+)\]⟦(.*?)⟧", re.S)
EOT = "<|im_end|>"  # end of turn of both tokenizers' templates


def jsonl_head(src: Path, dst: Path, n: int) -> Path:
    lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()][:n]
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst


def make(folder: Path, tokenizer, datasets: dict, max_length: int = 2048, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m = {"tokenizer": str(tokenizer), "max_length": max_length, "seed": 99, **extra, "datasets": [
        {"dataset_name": name, "abs_weight": 1.0, "path": str(path), **kw} for name, (path, kw) in datasets.items()]}
    (folder / "mixture.json").write_text(json.dumps(m), encoding="utf-8")
    lock, plans, _ = build_mixture(str(folder / "mixture.json"), workers=1)
    return lock


def show(capsys, target, *args) -> str:
    assert main(["show", str(target), "--color", "never", *args]) == 0
    return capsys.readouterr().out


def shard_of(lock: Path, dataset: str):
    entry = next(d for d in orjson.loads(lock.read_bytes())["datasets"] if d["dataset_name"] == dataset)
    d = Path(entry["path"])
    meta = orjson.loads((d / "meta.json").read_bytes())
    assert len(meta["shards"]) == 1
    return d, read_shard(d / meta["shards"][0]["file"])


def assistant_turns(raw: dict) -> list[tuple[str, str]]:
    """(label, trained text) of each assistant turn of a raw ShareGPT record, by position."""
    return [(f"assistant#{j}", turn["value"] + EOT) for j, turn in enumerate(raw["conversations"])
            if turn["from"] == "gpt"]


@pytest.fixture(scope="module")
def share_src(tmp_path_factory) -> Path:
    return jsonl_head(SAMPLE / "sharegpt_en.jsonl", tmp_path_factory.mktemp("src") / "share.jsonl", 12)


@pytest.mark.parametrize("tokenizer", ["sample", pytest.param("qwen", marks=needs_qwen)])
def test_labels_name_the_roles_of_multi_turn_samples(tmp_path, capsys, share_src, sample_tokenizer, tokenizer):
    tok = sample_tokenizer if tokenizer == "sample" else QWEN
    lock = make(tmp_path, tok, {"share": (share_src, {})})
    raws = [json.loads(x) for x in share_src.read_text(encoding="utf-8").splitlines()]
    _, arrays = shard_of(lock, "share")
    multi = 0
    for i in range(arrays.n_samples):
        raw = raws[int(arrays.source_record[i])]
        want = assistant_turns(raw)
        out = show(capsys, lock, "--dataset", "share", "--index", str(i))
        assert LABELLED.findall(out) == want, out
        assert "note: trained spans" not in out and "after [role#message]" in out
        multi += len(want) > 1
    assert multi >= 2  # the subset has multi-turn conversations


def test_segmented_samples_are_labelled_by_their_piece(tmp_path, capsys, share_src, sample_tokenizer):
    lock = make(tmp_path, sample_tokenizer, {"share": (share_src, {"overflow": "segment"})}, max_length=48)
    raws = [json.loads(x) for x in share_src.read_text(encoding="utf-8").splitlines()]
    _, arrays = shard_of(lock, "share")
    rec = int(arrays.source_record[0])
    pieces = [i for i in range(arrays.n_samples) if int(arrays.source_record[i]) == rec]
    assert len(pieces) >= 2
    want = dict(assistant_turns(raws[rec]))
    seen = set()
    for k, i in enumerate(pieces):
        out = show(capsys, lock, "--index", str(i))
        assert f"(stored piece {k + 1} of the record, overflow: segment)" in out
        found = LABELLED.findall(out)
        assert found, out
        for label, text in found:
            assert label in want and text in want[label], (label, text)
            seen.add(label)
    assert seen == set(want)  # every assistant turn trains in some piece


def test_edited_source_is_shown_without_labels(tmp_path, capsys, share_src, sample_tokenizer):
    src = shutil.copy(share_src, tmp_path / "edited.jsonl")
    lock = make(tmp_path / "m", sample_tokenizer, {"share": (src, {})})
    before = show(capsys, lock, "--index", "0")
    assert LABELLED.search(before)
    rows = Path(src).read_text(encoding="utf-8").splitlines()
    raw = json.loads(rows[0])
    raw["conversations"][-1]["value"] = "Something else entirely."
    Path(src).write_text("\n".join([json.dumps(raw)] + rows[1:]) + "\n", encoding="utf-8")
    out = show(capsys, lock, "--index", "0")
    assert "note: trained spans are not labelled with their roles" in out
    assert "re-rendered now gives other tokens than the stored sample" in out
    assert not LABELLED.search(out) and "⟦" in out  # still shown, as stored
    assert "Something else" not in out


def test_transform_seed_comes_from_meta(tmp_path, capsys, share_src, sample_tokenizer):
    (tmp_path / "t.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    m = [dict(x) for x in data['messages']]\n"
        "    m[-1]['content'] += ' #%d' % r.randint(0, 10**9)\n"
        "    return dict(data, messages=m)\n", encoding="utf-8")
    lock = make(tmp_path, sample_tokenizer, {"share": (share_src, {"transforms": str(tmp_path / "t.py")})})
    out = show_fn(capsys, lock, index=1, transform=str(tmp_path / "t.py"))
    labels = LABELLED.findall(out)
    assert labels and re.search(r" #\d+<\|im_end\|>$", labels[-1][1])
    d, _ = shard_of(lock, "share")
    out = show_fn(capsys, d, index=1, transform=str(tmp_path / "t.py"))  # a built dir: meta.json keeps the seed (99)
    assert LABELLED.findall(out) == labels


def show_fn(capsys, target, **kw) -> str:
    from pipeline.show import show as show_sample
    assert show_sample(str(target), color=False, **kw) == 0
    return capsys.readouterr().out


def test_a_transform_named_only_by_meta_json_is_never_imported(tmp_path, capsys, share_src, sample_tokenizer):
    marker = tmp_path / "imported"
    script = tmp_path / "t.py"
    script.write_text("def transform(data, num_sample, r):\n    return data\n", encoding="utf-8")
    lock = make(tmp_path, sample_tokenizer, {"share": (share_src, {"transforms": str(script)})})
    d, _ = shard_of(lock, "share")
    # a crafted (or shared) dir: the script now runs code at import time
    script.write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                      "def transform(data, num_sample, r):\n    return data\n", encoding="utf-8")
    for target in (d, lock):
        out = show(capsys, target, "--index", "0")  # not named by the user: not imported
        assert "runs only when you name it (--transform FILE)" in out and not LABELLED.search(out)
        out = show_fn(capsys, target, index=0, transform=str(script))  # named, but not the built file
        assert "changed since the build (sha256 differs)" in out and not LABELLED.search(out)
        assert not marker.exists()
    out = show_fn(capsys, d, index=0, transform=str(tmp_path / "other.py"))
    assert "is not the file the dataset was built with" in out and not marker.exists()


def test_show_names_the_source_file_of_a_many_file_dataset(tmp_path, capsys, share_src, sample_tokenizer):
    folder = tmp_path / "src"
    folder.mkdir()
    rows = share_src.read_text(encoding="utf-8").splitlines()
    (folder / "a.jsonl").write_text("\n".join(rows[:3]) + "\n", encoding="utf-8")
    (folder / "b.jsonl").write_text("\n".join(rows[3:6]) + "\n", encoding="utf-8")
    lock = make(tmp_path, sample_tokenizer, {"share": (folder, {})})
    seen = set()
    for i in range(6):
        out = show(capsys, lock, "--index", str(i))
        head = out.splitlines()[0]
        assert "its file" not in head
        seen |= {name for name in ("a.jsonl", "b.jsonl") if head.endswith(str(folder / name))}
    assert seen == {"a.jsonl", "b.jsonl"}


def test_template_file_needs_template_flag(tmp_path, capsys, share_src, sample_tokenizer):
    from importlib import resources
    mine = tmp_path / "my_chat.jinja"
    mine.write_text((resources.files("stages") / "templates" / "chatml.jinja").read_text(encoding="utf-8"),
                    encoding="utf-8")
    lock = make(tmp_path / "m", sample_tokenizer, {"share": (share_src, {})}, template=str(mine))
    out = show(capsys, lock, "--index", "2")
    assert "built with the template file my_chat.jinja" in out and "pass --template" in out
    assert not LABELLED.search(out)
    out = show(capsys, lock, "--index", "2", "--template", str(mine))
    raws = [json.loads(x) for x in share_src.read_text(encoding="utf-8").splitlines()]
    _, arrays = shard_of(lock, "share")
    assert LABELLED.findall(out) == assistant_turns(raws[int(arrays.source_record[2])])
    other = tmp_path / "other.jinja"
    other.write_text(mine.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    out = show(capsys, lock, "--index", "2", "--template", str(other))
    assert "is not the one the dataset was built with" in out


def test_documents_and_colour(tmp_path, capsys, share_src, sample_tokenizer):
    pre = tmp_path / "pre.txt"
    pre.write_text("\n".join((SAMPLE / "pretrain_en.txt").read_text(encoding="utf-8").splitlines()[:3]) + "\n",
                   encoding="utf-8")
    lock = make(tmp_path, sample_tokenizer, {"pre": (pre, {}), "share": (share_src, {})})
    out = show(capsys, lock, "--dataset", "pre")
    assert "a document: every token trains" in out and "note: trained spans" not in out
    assert main(["show", str(lock), "--dataset", "share", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[2m[assistant#2]\x1b[0m\x1b[32m" in out and "⟦" not in out
