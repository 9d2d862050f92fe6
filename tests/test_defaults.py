"""Defaults users expect (issue 24): chat records are truncated and text documents segmented
when the manifest gives no `overflow`; a manifest value still wins."""
from __future__ import annotations

import json

import numpy as np
import orjson

from pipeline.build import build_mixture
from stages.shard import read_shard

from conftest import SAMPLE

TOK = SAMPLE / "tokenizer"
MAX = 64


def _words(n: int, seed: int) -> str:
    return " ".join(f"w{(seed * 31 + k * 7) % 997}" for k in range(n))


def _samples(plan) -> list[tuple[int, list[int]]]:
    meta = plan.meta
    out = []
    for s in meta["shards"]:
        arr = read_shard(plan.entry.final / s["file"], mmap=False)
        out += [(int(arr.source_record[i]), np.asarray(arr.sample(i)).tolist()) for i in range(arr.n_samples)]
    return out


def _build(tmp_path, extra: dict | None = None):
    texts = [_words(n, i) for i, n in enumerate([10, 200, 90])]
    (tmp_path / "docs.jsonl").write_bytes(b"".join(orjson.dumps({"text": t}) + b"\n" for t in texts))
    chats = [{"instruction": _words(n, i + 7), "input": "", "output": _words(m, i + 9)}
             for i, (n, m) in enumerate([(5, 5), (4, 200), (3, 3), (120, 3)])]
    (tmp_path / "sft.jsonl").write_bytes(b"".join(orjson.dumps(c) + b"\n" for c in chats))
    entries = [{"dataset_name": "docs", "task_name": "pt", "abs_weight": 1.0, "path": "docs.jsonl"},
               {"dataset_name": "sft", "task_name": "sft", "abs_weight": 1.0, "path": "sft.jsonl",
                **(extra or {})}]
    (tmp_path / "mix.json").write_text(json.dumps({"tokenizer": str(TOK), "template": "tokenizer",
                                                   "max_length": MAX, "seed": 1, "datasets": entries}))
    _, plans, _ = build_mixture(str(tmp_path / "mix.json"), out=str(tmp_path / "out"), workers=1)
    return texts, chats, {p.spec.dataset_name: p for p in plans}


def test_chat_truncates_and_text_segments_by_default(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    texts, chats, plans = _build(tmp_path)
    docs, sft = plans["docs"], plans["sft"]
    assert docs.meta["build"]["overflow"] == "segment" and sft.meta["build"]["overflow"] == "truncate"
    # text: every token of every document is kept, split into pieces of at most MAX
    tk = Tokenizer.from_file(str(TOK / "tokenizer.json"))
    bos, eos = docs.meta["tokenizer"]["bos_id"], docs.meta["tokenizer"]["eos_id"]
    by_record: dict[int, list[int]] = {}
    for rec, ids in _samples(docs):
        assert len(ids) <= MAX
        by_record.setdefault(rec, []).extend(ids)
    for rec, text in enumerate(texts):
        ids = tk.encode(text, add_special_tokens=False).ids
        assert by_record[rec] in ([*ids, eos], [bos, *ids, eos]), rec
    assert docs.meta["n_samples"] > docs.meta["nlines"]
    # chat: one sample per record, the head of the conversation as the tokenizer renders it
    hf = AutoTokenizer.from_pretrained(str(TOK))
    got = _samples(sft)
    assert [rec for rec, _ in got] == [0, 1, 2]  # record 3: its prompt alone is over MAX
    assert sft.meta["skipped"] == {"no_trained_tokens_after_truncation": 1}
    for (rec, ids), c in zip(got, chats):
        full = hf.apply_chat_template([{"role": "user", "content": c["instruction"]},
                                       {"role": "assistant", "content": c["output"]}], tokenize=True)
        full = list(full["input_ids"] if hasattr(full, "keys") else full)
        assert ids == full[:MAX], rec
    assert sft.meta["n_samples"] == sft.meta["nlines"] == 3
    assert len(got[1][1]) == MAX  # record 1 was over MAX: cut, not split


def test_a_manifest_overflow_still_wins(tmp_path):
    _, _, plans = _build(tmp_path, {"overflow": "segment"})
    sft = plans["sft"]
    assert sft.meta["build"]["overflow"] == "segment"
    assert sft.meta["n_samples"] > sft.meta["nlines"]  # the long records were split


def test_a_yaml_manifest_gives_the_lock_of_its_json_twin(tmp_path):
    import hashlib

    import yaml
    _build(tmp_path)  # writes mix.json and its sources, builds into out/
    doc = json.loads((tmp_path / "mix.json").read_text())
    (tmp_path / "mix.yaml").write_text("# the same mixture, in YAML\n" + yaml.safe_dump(doc, sort_keys=False))
    build_mixture(str(tmp_path / "mix.yaml"), out=str(tmp_path / "yout"), cache=str(tmp_path / "out" / "cache"),
                  workers=1)
    j = json.loads((tmp_path / "out" / "mixture.lock.json").read_text())
    y = json.loads((tmp_path / "yout" / "mixture.lock.json").read_text())
    # manifest_sha256 is the manifest file's own sha256; everything else is the same
    assert j.pop("manifest_sha256") == hashlib.sha256((tmp_path / "mix.json").read_bytes()).hexdigest()
    assert y.pop("manifest_sha256") == hashlib.sha256((tmp_path / "mix.yaml").read_bytes()).hexdigest()
    assert j == y


def test_bad_yaml_and_deep_manifests_are_one_error_line(tmp_path, capsys):
    from pipeline.cli import main
    cases = {
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "deep.yaml": "[" * 100_000 + "]" * 100_000,
        "broken.yaml": "tokenizer: t\n  datasets: [\n",
        "dup.yml": "tokenizer: a\ntokenizer: b\ndatasets: []\n",
    }
    want = {"deep.json": "nested more than", "deep.yaml": "nested more than",
            "broken.yaml": "invalid YAML at line 2 column", "dup.yml": "tokenizer: key given more than once"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        capsys.readouterr()
        assert main(["plan", str(tmp_path / name)]) == 1, name
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("error: ") and want[name] in err, (name, err)


def test_dataset_dir_shares_follow_token_counts(tmp_path):
    """CLA `--dataset_dir`: the seed concatenates the dir's *.txt, so each file's token share
    is its size in tokens (not 1/n); `--dataset_dir_shares equal` keeps equal shares."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from train.__main__ import build_data
    from train.config import TrainConfig
    src = tmp_path / "txt"
    src.mkdir()
    docs = {"big": [_words(40 + i % 13, i) for i in range(60)], "small": [_words(9, i) for i in range(4)]}
    for name, lines in docs.items():
        (src / f"{name}.txt").write_text("\n".join(lines) + "\n")
    tk = Tokenizer.from_file(str(TOK / "tokenizer.json"))
    count = {n: [len(tk.encode(t, add_special_tokens=False).ids) for t in lines] for n, lines in docs.items()}
    chat = SimpleNamespace(chat_template=None)
    shares = {}
    for mode in ("tokens", "equal"):
        cfg = TrainConfig(dict(train_data_file=None, dataset_dir=str(src), mixture=None, dataset_dir_shares=mode,
                               output_dir=str(tmp_path / mode), max_seq_length=512,
                               data_cache_dir=str(tmp_path / "cache"), preprocessing_num_workers=1))
        lock = json.loads(build_data(cfg, str(TOK), chat).read_text())
        shares[mode] = {d["dataset_name"]: d["token_share"] for d in lock["datasets"]}
    # independent: the tokenizer's own counts, plus the one or two special tokens per document
    want = [{n: sum(c) + k * len(c) for n, c in count.items()} for k in (1, 2)]
    want = [{n: v / sum(w.values()) for n, v in w.items()} for w in want]
    assert any(all(abs(shares["tokens"][n] - w[n]) < 1e-9 for n in w) for w in want), (shares, want)
    assert shares["tokens"]["small"] < 0.05  # ~1.5%: not the 50% equal shares give
    assert shares["equal"] == {"big": 0.5, "small": 0.5}
