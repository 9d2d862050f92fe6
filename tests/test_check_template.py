"""`pipeline build --check-template N`: the first N samples of every chat dataset are compared
with the reference (transformers' chat-template renderer + the tokenizer's own encoding, i.e.
`tokenizer.apply_chat_template`) before anything is built; a difference stops the build with
exit status 1 naming the dataset, the record and what differs.

The Qwen2.5 tests use ../shared (real tokenizer and corpora) and skip with a reason when it is
absent; the sample-tokenizer tests always run."""
from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from pipeline.cli import main
from stages.shard import read_shard

from conftest import SAMPLE, SHARED

QWEN = SHARED / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
CORPORA = SHARED / "corpora"
ALPACA_EN = CORPORA / "llamafactory-alpaca-en-zh" / "alpaca_en_demo.json"
GLAIVE = CORPORA / "llamafactory-sharegpt-toolcall-en" / "glaive_toolcall_en_demo.json"
_missing = [str(p) for p in (QWEN / "tokenizer_config.json", ALPACA_EN, GLAIVE) if not p.exists()]
needs_shared = pytest.mark.skipif(bool(_missing), reason=f"{SHARED} (Qwen2.5 tokenizer and corpora) "
                                  f"is absent: missing {', '.join(_missing)}")
N_RECORDS = 12


def subset_jsonl(src: Path, dst: Path, n: int = N_RECORDS) -> Path:
    """The first n records of a JSON list / JSON Lines file, as JSON Lines."""
    text = src.read_text(encoding="utf-8")
    rows = json.loads(text)[:n] if src.suffix == ".json" else [
        json.loads(line) for line in text.splitlines() if line.strip()][:n]
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return dst


def subset_lines(src: Path, dst: Path, n: int = N_RECORDS) -> Path:
    dst.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    return dst


def write_manifest(folder: Path, tokenizer, datasets: dict, template: str = "tokenizer", **extra) -> Path:
    m = {"tokenizer": str(tokenizer), "template": template, "max_length": 2048, "datasets": [
        {"dataset_name": name, "abs_weight": 1.0, "path": str(path), **kw}
        for name, (path, kw) in datasets.items()], **extra}
    path = folder / "mixture.json"
    path.write_text(json.dumps(m), encoding="utf-8")
    return path


def build(capsys, manifest: Path, *flags) -> tuple[int, str, str]:
    rc = main(["build", str(manifest), "--workers", "1", *flags])
    out = capsys.readouterr()
    return rc, out.out, out.err


def built_dirs(folder: Path) -> list[Path]:
    cache = folder / "build" / "cache"
    return sorted(d for d in cache.iterdir() if (d / "meta.json").is_file()) if cache.is_dir() else []


def qwen_template_with(old: str, new: str) -> str:
    text = json.loads((QWEN / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    assert text.count(old) == 1, old
    return text.replace(old, new)


# -- Qwen2.5 with its own template: passes, and the build equals apply_chat_template -----
@needs_shared
def test_qwen_own_template_passes_and_build_equals_apply_chat_template(tmp_path, capsys):
    from transformers import AutoTokenizer
    alpaca = subset_jsonl(ALPACA_EN, tmp_path / "alpaca_en.jsonl")
    glaive = subset_jsonl(GLAIVE, tmp_path / "glaive.jsonl")
    pre = subset_lines(SAMPLE / "pretrain_en.txt", tmp_path / "pre.txt")
    manifest = write_manifest(tmp_path, QWEN, {
        "alpaca": (alpaca, {"format": "alpaca"}), "glaive": (glaive, {"format": "sharegpt"}),
        "pre": (pre, {"format": "text"})})
    rc, out, err = build(capsys, manifest, "--check-template", "5")
    assert rc == 0, err
    for name in ("alpaca", "glaive"):
        assert (f"check-template {name}: template 'tokenizer': 5/5 samples with the reference's ids, "
                "5/5 with its trained positions") in out
    assert "check-template pre: skipped: text format" in out
    assert "reference: tokenizer.apply_chat_template" in out
    # the check runs before the build, and the summary table records it
    assert out.index("check-template alpaca") < out.index("tokenmill build")
    assert "ok 5/5 ids, 5/5 masks" in out and "skipped (text)" in out

    # independently: the built alpaca samples are transformers' apply_chat_template ids
    hf = AutoTokenizer.from_pretrained(str(QWEN))
    d = next(d for d in built_dirs(tmp_path) if d.name.startswith("alpaca-"))
    arrays = read_shard(d / orjson.loads((d / "meta.json").read_bytes())["shards"][0]["file"])
    rows = [json.loads(line) for line in alpaca.read_text(encoding="utf-8").splitlines()]
    for i in range(3):
        raw = rows[int(arrays.source_record[i])]
        prompt = f"{raw['instruction']}\n{raw['input']}" if raw["input"] else raw["instruction"]
        want = hf.apply_chat_template([{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": raw["output"]}],
                                      tokenize=True, return_dict=False)
        assert arrays.sample(i).tolist() == list(want)


@needs_shared
def test_drifted_copy_of_qwen_template_fails_before_building(tmp_path, capsys):
    # one newline more after every <|im_end|>: the kind of drift a hand-copied template has
    drift = tmp_path / "qwen_drift.jinja"
    drift.write_text(qwen_template_with("+ '<|im_end|>' + '\\n' }}", "+ '<|im_end|>' + '\\n\\n' }}"),
                     encoding="utf-8")
    share = subset_jsonl(SAMPLE / "sharegpt_en.jsonl", tmp_path / "share.jsonl")
    pre = subset_lines(SAMPLE / "pretrain_en.txt", tmp_path / "pre.txt")
    manifest = write_manifest(tmp_path, QWEN, {"share": (share, {}), "pre": (pre, {})},
                              template=str(drift))
    rc, out, err = build(capsys, manifest, "--check-template", "3")
    assert rc == 1
    assert "error: --check-template 3: 1 dataset(s) differ from the reference; nothing was built" in err
    assert f"dataset 'share': {share}:1: ids differ from the reference (tokenizer.apply_chat_template)" in err
    # the difference is shown as text: ours has the extra newline
    assert "ours '\\n\\n<|im_start|>" in err and "reference '\\n<|im_start|>" in err
    assert "check-template share: template 'qwen_drift vs tokenizer': 0/3 samples" in out
    assert built_dirs(tmp_path) == [] and not (tmp_path / "build" / "mixture.lock.json").exists()

    # compared with itself (a deliberate layout), the same template passes and builds
    rc, out, err = build(capsys, manifest, "--check-template", "3", "--check-against", "template")
    assert rc == 0, err
    assert "check-template share: template 'qwen_drift': 3/3 samples with the reference's ids" in out
    assert "--check-against template: the layout itself is not compared" in out
    assert len(built_dirs(tmp_path)) == 2


@needs_shared
def test_wrong_trained_positions_fail(tmp_path, capsys):
    """Same ids as Qwen's template, but its generation block trains the assistant header too.
    (One that leaves <|im_end|> out is fixed by the build: the stop token after a span trains.)"""
    line = "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    gen = qwen_template_with(line, (
        "        {%- if message.role == \"assistant\" %}\n"
        "            {%- generation %}{{- '<|im_start|>' + message.role + '\\n' }}{{- message.content }}"
        "{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}\n"
        "        {%- else %}\n" + line + "\n        {%- endif %}"))
    (tmp_path / "qwen_gen.jinja").write_text(gen, encoding="utf-8")
    share = subset_jsonl(SAMPLE / "sharegpt_en.jsonl", tmp_path / "share.jsonl", 4)
    manifest = write_manifest(tmp_path, QWEN, {"share": (share, {})}, template="qwen_gen.jinja")
    rc, out, err = build(capsys, manifest, "--check-template", "2")
    assert rc == 1
    assert "2/2 samples with the reference's ids, 0/2 with its trained positions" in out
    assert f"dataset 'share': {share}:1: trained positions differ from the reference" in err
    assert "ours trained, reference not trained" in err
    assert built_dirs(tmp_path) == []


# -- sample tokenizer (always runs) ---------------------------------------------------
@pytest.fixture()
def sample_manifest(tmp_path, sample_tokenizer):
    share = subset_jsonl(SAMPLE / "sharegpt_en.jsonl", tmp_path / "share.jsonl", 6)
    msgs = subset_jsonl(SAMPLE / "messages_mixed.jsonl", tmp_path / "msgs.jsonl", 6)
    pre = subset_lines(SAMPLE / "pretrain_en.txt", tmp_path / "pre.txt", 6)
    return tmp_path, lambda **kw: write_manifest(
        tmp_path, sample_tokenizer, {"share": (share, {}), "msgs": (msgs, {}), "pre": (pre, {})}, **kw)


def test_reused_datasets_are_checked_too(sample_manifest, capsys):
    folder, manifest = sample_manifest
    m = manifest()
    rc, out, _ = build(capsys, m)  # no check: nothing printed about it, no column
    assert rc == 0 and "check-template" not in out and "template check" not in out
    rc, out, err = build(capsys, m, "--check-template", "4")
    assert rc == 0, err
    assert out.count("│ reused ") == 3
    for name in ("share", "msgs"):
        assert (f"check-template {name}: template 'tokenizer': 4/4 samples with the reference's ids, "
                "4/4 with its trained positions") in out
    assert "check-template pre: skipped: text format" in out and "template check" in out


def test_template_none_is_checked_against_itself(sample_manifest, capsys):
    _, manifest = sample_manifest
    rc, out, err = build(capsys, manifest(template="none"), "--check-template", "3")
    assert rc == 0, err
    assert "check-template share: template 'none': 3/3 samples with the reference's ids, 3/3" in out
    assert "template 'none' is plain text, not a chat template, so its layout has no reference" in out


def test_transformed_records_are_checked_as_the_workers_see_them(tmp_path, capsys, sample_tokenizer):
    share = subset_jsonl(SAMPLE / "sharegpt_en.jsonl", tmp_path / "share.jsonl", 6)
    (tmp_path / "t.py").write_text(
        "def transform(data, num_sample, r):\n"
        "    if r.random() < 0.3:\n"
        "        return None\n"
        "    m = [dict(x) for x in data['messages']]\n"
        "    m[-1]['content'] += ' (%d)' % r.randint(0, 9)\n"  # text the transform writes (no control text)
        "    return dict(data, messages=m)\n", encoding="utf-8")
    m = write_manifest(tmp_path, sample_tokenizer, {"share": (share, {"transforms": "t.py"})})
    rc, out, err = build(capsys, m, "--check-template", "3")
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("check-template share:"))
    assert "3/3 samples with the reference's ids" in line
    # which records the transform skips, from its seeded r (seed 1234, as the build gives it)
    from mixtures.transforms import record_rng
    skips = [record_rng(1234, "share", i).random() < 0.3 for i in range(6)]
    upto = [i for i in range(6) if not skips[i]][2]  # the third record the check takes
    n_skipped = sum(skips[:upto])
    assert n_skipped, "choose another seed: no record skipped before the third kept one"
    assert f"passed over (the build reports these): transform_skipped {n_skipped}" in out
    meta = orjson.loads((built_dirs(tmp_path)[0] / "meta.json").read_bytes())
    assert meta["skipped"]["transform_skipped"] == sum(skips)


def test_check_template_usage(sample_manifest, capsys):
    _, manifest = sample_manifest
    with pytest.raises(SystemExit) as e:
        main(["build", str(manifest()), "--check-template", "-1"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["build", str(manifest()), "--check-template", "2", "--check-against", "other"])
    assert e.value.code == 2


def test_check_dataset_reports_record_locations(sample_manifest):
    """The API under the flag: a DatasetCheck names each checked record's file and line."""
    from mixtures.manifest import load_manifest
    from pipeline.build import plan_dataset
    from pipeline.check import check_dataset
    from stages.render import resolve_template
    from stages.tokenizer import load_tokenizer
    folder, manifest = sample_manifest
    mixture = load_manifest(manifest())
    tok = load_tokenizer(mixture.tokenizer)
    tmpl = resolve_template(mixture.template, tok)
    plans = [plan_dataset(s, mixture, tok, tmpl, folder / "cache", {}, "fail") for s in mixture.datasets]
    res = check_dataset(plans[0], tok, tmpl, mixture.template, 5)
    assert res.status == "ok" and res.report.checked == 5
    assert res.where == [(str(folder / "share.jsonl"), i) for i in range(5)]
    assert check_dataset(plans[2], tok, tmpl, mixture.template, 5).status == "skipped"
