"""A real mixture from /work/shared — two pretraining corpora and two SFT corpora through the
Qwen2.5 tokenizer — checked against computations made here, independently of the pipeline:
ids from the `tokenizers` library and `apply_chat_template`, raw records re-read from the
source files by `source_record`, and meta.json statistics recomputed with numpy/hashlib."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import h5py
import numpy as np
import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
if not SHARED.is_dir():
    pytest.skip(f"{SHARED} is absent: the real-corpus build tests need the shared corpora "
                "and tokenizers", allow_module_level=True)

QWEN = SHARED / "tokenizers" / "qwen2.5-family-internvl2_5-1b"
CORPORA = SHARED / "corpora"
C4 = CORPORA / "llamafactory-pretrain-en" / "c4_demo.jsonl"
FEVER = CORPORA / "medicalgpt-pretrain-zh-en" / "fever.txt"
ALPACA_ZH = CORPORA / "llamafactory-alpaca-en-zh" / "alpaca_zh_demo.json"
MEDICAL = CORPORA / "medicalgpt-sharegpt-zh" / "medical_sft_1K_format.jsonl"
_missing = [str(p) for p in (QWEN / "tokenizer.json", C4, FEVER, ALPACA_ZH, MEDICAL) if not p.exists()]
if _missing:
    pytest.skip(f"shared files missing: {', '.join(_missing)}", allow_module_level=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.build import build_mixture  # noqa: E402
from stages.shard import read_shard  # noqa: E402

MAX_LENGTH = 4096
IM_END = 151645  # Qwen2.5 <|im_end|>: the eos of this tokenizer
PRETRAIN = ("c4", "fever")
SFT = ("alpaca_zh", "medical")
FM9G_BUCKETS = ("less_4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k", "64k-128k", "128k-256k", "more_256k")
FM9G_EDGES = (0, 4000, 8000, 16000, 32000, 64000, 128000, 256000, np.inf)

DATASETS = {
    "c4": dict(path=C4, task_name="pretrain", format="text", language="en"),
    "fever": dict(path=FEVER, task_name="pretrain", format="text", language="zh"),
    "alpaca_zh": dict(path=ALPACA_ZH, task_name="sft", format="alpaca", language="zh",
                      overflow="truncate"),
    "medical": dict(path=MEDICAL, task_name="sft", format="sharegpt", language="zh",
                    overflow="truncate"),
}


def write_manifest(folder: Path, names) -> Path:
    """Object-form manifest with source paths relative to the manifest's folder."""
    folder.mkdir(parents=True, exist_ok=True)
    datasets = []
    for name in names:
        d = DATASETS[name]
        entry = {"dataset_name": name, "task_name": d["task_name"], "abs_weight": 1.0,
                 "path": os.path.relpath(d["path"], folder), "format": d["format"],
                 "language": d["language"], "allow_repeat": True}
        if "overflow" in d:
            entry["overflow"] = d["overflow"]
        datasets.append(entry)
    manifest = {"tokenizer": os.path.relpath(QWEN, folder), "template": "tokenizer",
                "max_length": MAX_LENGTH, "seed": 1234, "datasets": datasets}
    path = folder / "mixture.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    manifest = write_manifest(base / "manifest", list(DATASETS))
    lock, plans, _ = build_mixture(str(manifest), out=str(base / "out"), workers=2, on_error="skip")
    return lock, {p.spec.dataset_name: p for p in plans}


# ----------------------------------------------------------------- independent references

@functools.lru_cache(maxsize=1)
def raw_tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(QWEN / "tokenizer.json"))


@functools.lru_cache(maxsize=1)
def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(QWEN))


def chat_ids(messages, **kw) -> list[int]:
    out = hf_tokenizer().apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    if isinstance(out, dict) or hasattr(out, "keys"):  # older/newer transformers
        out = out["input_ids"]
    return list(out)


def source_lines(path: Path) -> list[bytes]:
    """Physical lines, 0-based; the record number of a line file is its line number."""
    lines = path.read_bytes().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln[:-1] if ln.endswith(b"\r") else ln for ln in lines]


def pretrain_texts(name: str) -> dict[int, str]:
    """record number → document text, re-read from the source file."""
    lines = source_lines(DATASETS[name]["path"])
    if name == "c4":
        return {i: json.loads(ln)["text"] for i, ln in enumerate(lines)}
    return {i: ln.decode("utf-8") for i, ln in enumerate(lines) if ln.strip()}  # blank: no record


def sft_messages(name: str) -> dict[int, list[dict]]:
    """record number → chat messages rebuilt from the raw record."""
    if name == "alpaca_zh":
        out = {}
        for i, r in enumerate(json.loads(ALPACA_ZH.read_text(encoding="utf-8"))):
            user = r["instruction"] + "\n" + r["input"] if r.get("input") else r["instruction"]
            out[i] = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        return out
    role = {"human": "user", "gpt": "assistant"}
    return {i: [{"role": role[t["from"]], "content": t["value"]} for t in json.loads(ln)["conversations"]]
            for i, ln in enumerate(source_lines(MEDICAL))}


def shard_paths(plan) -> list[Path]:
    return [plan.entry.final / s["file"] for s in plan.meta["shards"]]


def samples(plan):
    """(source_record, ids, spans) of every sample, in shard order."""
    for path in shard_paths(plan):
        arr = read_shard(path, mmap=False)
        for i in range(arr.n_samples):
            yield int(arr.source_record[i]), np.asarray(arr.sample(i)).tolist(), arr.spans(i)


def rejected(plan) -> dict[int, str]:
    path = plan.entry.final / "rejects.jsonl"
    if not path.exists():
        return {}
    # "line" is 1-based (the N of fail mode's file:N); source_record is 0-based
    return {r["line"] - 1: r["reason"] for r in map(json.loads, path.read_text().splitlines())}


# ----------------------------------------------------------------- tests

def test_every_record_is_a_sample_or_a_listed_reject(built):
    _, plans = built
    for name, plan in plans.items():
        if name in PRETRAIN:
            expected = set(pretrain_texts(name))
        else:
            expected = set(sft_messages(name))
        got = {rec for rec, _, _ in samples(plan)}
        rej = rejected(plan)
        assert got.isdisjoint(rej), name
        assert got | set(rej) == expected, name
        m = plan.meta
        assert m["records_read"] == len(expected) == m["nlines"] + sum(m["skipped"].values())
        assert sum(m["skipped"].values()) == len(rej)
    # these corpora are clean: nothing may be set aside
    assert all(p.meta["skipped"] == {} for p in plans.values())


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretraining_ids_equal_tokenizers_encoding(built, name):
    _, plans = built
    plan = plans[name]
    tk = raw_tokenizer()
    assert hf_tokenizer().bos_token is None  # Qwen: no BOS, EOS = <|im_end|>
    texts = pretrain_texts(name)
    pieces: dict[int, list[list[int]]] = {}
    for rec, ids, spans in samples(plan):
        assert spans is None  # pretraining: no loss_spans, every token trained
        assert 0 < len(ids) <= MAX_LENGTH
        pieces.setdefault(rec, []).append(ids)
    records = sorted(pieces)
    encoded = tk.encode_batch([texts[r] for r in records], add_special_tokens=False)
    n_segmented = 0
    for rec, enc in zip(records, encoded):
        segs = pieces[rec]
        expected = enc.ids + [IM_END]
        assert sum(segs, []) == expected, f"{name} record {rec}"
        # segment overflow: full max_length pieces, the rest in the last one
        assert all(len(s) == MAX_LENGTH for s in segs[:-1])
        assert len(segs) == -(-len(expected) // MAX_LENGTH)
        n_segmented += len(segs) > 1
    if name == "c4":
        assert n_segmented > 0  # the long-document path was exercised
    assert plan.meta["truncated_tokens"] == 0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level BPE alphabet (the standard mapping, written out here)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def _token_bytes_table():
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    added = {int(i): t.content for i, t in hf_tokenizer().added_tokens_decoder.items()}
    return to_byte, added


def token_bytes(t: int) -> bytes:
    to_byte, added = _token_bytes_table()
    if t in added:
        return added[t].encode("utf-8")
    return bytes(to_byte[c] for c in raw_tokenizer().id_to_token(t))


def expected_trained(messages, ids) -> tuple[list[tuple[int, int]], list[bool]]:
    """Expected [start, end) spans: the tokens that cover, in the rendered text, each
    assistant turn's content + <|im_end|> — located by prefix renders (the text
    render(messages[:i], add_generation_prompt=True) ends where turn i's content starts),
    and mapped to tokens through each token's own bytes (byte-level BPE; the tokenizer
    NFC-normalises, so positions are taken in the normalised text). Also → whether each
    turn's content starts on a token boundary."""
    hf = hf_tokenizer()
    text = unicodedata.normalize("NFC", hf.apply_chat_template(messages, tokenize=False))
    ends = np.cumsum([len(token_bytes(t)) for t in ids])
    starts = ends - np.array([len(token_bytes(t)) for t in ids])
    assert ends[-1] == len(text.encode("utf-8"))
    mask = np.zeros(len(ids), dtype=bool)
    aligned = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = unicodedata.normalize(
            "NFC", hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        content = unicodedata.normalize("NFC", m["content"]) + "<|im_end|>"
        assert text[len(prefix): len(prefix) + len(content)] == content
        bs = len(prefix.encode("utf-8"))
        be = bs + len(content.encode("utf-8"))
        mask |= (ends > bs) & (starts < be)
        aligned.append(bool(np.any(starts == bs)))
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [tuple(map(int, e)) for e in edges.reshape(-1, 2)], aligned


@pytest.mark.parametrize("name", SFT)
def test_sft_ids_and_trained_tokens_equal_the_chat_template(built, name):
    _, plans = built
    plan = plans[name]
    tk = raw_tokenizer()
    conversations = sft_messages(name)
    checked = straddling = 0
    for rec, ids, spans in samples(plan):
        assert spans is not None and len(spans) > 0
        if len(ids) >= MAX_LENGTH:  # possibly truncated: only the prefix can be compared
            continue
        messages = conversations[rec]
        expected = chat_ids(messages)
        assert ids == expected, f"{name} record {rec}: ids differ from apply_chat_template"
        # position level: the trained tokens are exactly those covering each assistant
        # turn's content + <|im_end|> (not the role header, not the newline after it)
        want, aligned = expected_trained(messages, ids)
        assert [tuple(x) for x in spans.tolist()] == want, f"{name} record {rec}"
        # decoded: per assistant turn, its content + <|im_end|>. Where the content begins
        # with whitespace, BPE merges it with the template's "\n" after "assistant" into one
        # token (apply_chat_template does the same); that token is trained, so the decoded
        # span then starts with that extra template newline and nothing else.
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        decoded = [tk.decode(ids[s:e], skip_special_tokens=False) for s, e in spans.tolist()]
        assert len(decoded) == len(assistant)
        for d, c, ok in zip(decoded, assistant, aligned):
            if ok:
                assert d == c + "<|im_end|>", f"{name} record {rec}"
            else:
                straddling += 1
                assert c[:1].isspace() and d == "\n" + c + "<|im_end|>", f"{name} record {rec}"
        checked += 1
    assert checked == plan.meta["nlines"] - plan.meta["truncated_samples"] > 0
    assert straddling <= checked // 20  # rare: only contents that start with whitespace


def test_meta_statistics_recomputed_from_the_shards(built):
    _, plans = built
    for name, plan in plans.items():
        m = plan.meta
        on_disk = orjson.loads((plan.entry.final / "meta.json").read_bytes())
        assert on_disk == m
        lengths, records, n_loss = [], [], 0
        for sh in m["shards"]:
            path = plan.entry.final / sh["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sh["sha256"]
            with h5py.File(path, "r") as f:
                offsets = f["offsets"][...]
                tokens = f["tokens"][...]
                src = f["source_record"][...]
                assert offsets[0] == 0 and offsets[-1] == len(tokens)
                assert f.attrs["n_samples"] == sh["n_samples"] == len(offsets) - 1
                assert f.attrs["n_tokens"] == sh["n_tokens"] == len(tokens)
                if "loss_spans" in f:
                    sp = f["loss_spans"][...]
                    n_loss += int((sp[:, 1] - sp[:, 0]).sum())
                else:
                    n_loss += len(tokens)
            lengths.append(np.diff(offsets))
            records.append(src)
        lengths = np.concatenate(lengths)
        records = np.concatenate(records)
        assert m["n_samples"] == len(lengths)
        assert m["nlines"] == len(np.unique(records))
        assert m["n_tokens"] == int(lengths.sum())
        assert m["n_loss_tokens"] == n_loss
        if name in PRETRAIN:
            assert n_loss == m["n_tokens"]
        else:
            assert 0 < n_loss < m["n_tokens"]
        assert m["avg_token_per_line"] == m["n_tokens"] / m["nlines"]
        assert m["nbytes"] == os.path.getsize(DATASETS[name]["path"])
        # per sample (after overflow), from the shards
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="lower")
        assert m["sample_length_percentiles"] == {"min": int(lengths.min()), "p50": int(p50),
                                                  "p90": int(p90), "p99": int(p99),
                                                  "max": int(lengths.max())}
        edges = m["sample_length_histogram"]["edges"]
        assert edges[0] == 0 and edges[-1] > lengths.max()
        counts, _ = np.histogram(lengths, bins=edges)
        assert m["sample_length_histogram"]["counts"] == counts.tolist()
        assert sum(m["sample_length_histogram"]["counts"]) == len(lengths)
        # per record (before overflow; FM9G semantics): sums to nlines, and for pretraining the
        # record lengths are the tokenizer's own encoding + EOS
        assert sum(m["length_distribute"].values()) == m["nlines"]
        assert list(m["length_distribute"]) == list(FM9G_BUCKETS)
        if name in PRETRAIN:
            texts = pretrain_texts(name)
            kept = sorted(set(records.tolist()))
            rec_len = np.array([len(e.ids) + 1 for e in raw_tokenizer().encode_batch(
                [texts[r] for r in kept], add_special_tokens=False)])
        elif m["truncated_samples"] == 0:
            rec_len = lengths  # nothing cut: one sample per record, the same length
        else:
            rec_len = None
        if rec_len is not None:
            want = {b: int(((rec_len >= lo) & (rec_len < hi)).sum())
                    for b, lo, hi in zip(FM9G_BUCKETS, FM9G_EDGES[:-1], FM9G_EDGES[1:])}
            assert m["length_distribute"] == want, name
            assert m["record_tokens"] == int(rec_len.sum())
            assert m["record_length_percentiles"]["max"] == int(rec_len.max())
        assert m["length_unit"] == "tokens"
        assert m["tokenizer"]["vocab_size"] == len(hf_tokenizer()) and m["dtype"] == "uint32"
        assert m["build"]["max_length"] == MAX_LENGTH
        assert m["build"]["overflow"] == DATASETS[name].get("overflow", "segment")


def test_lengths_fill_the_expected_buckets(built):
    """c4 has documents over 4000 tokens: segments of exactly 4096 land in 4k-8k."""
    _, plans = built
    c4 = plans["c4"].meta
    # built with max_length 4096, the records' own lengths still reach past it (issue 15)
    assert c4["sample_length_percentiles"]["max"] == MAX_LENGTH
    assert c4["record_length_percentiles"]["max"] > MAX_LENGTH
    assert sum(v for k, v in c4["length_distribute"].items() if k != "less_4k") > 0
    for name in ("fever", "alpaca_zh"):
        dist = plans[name].meta["length_distribute"]
        assert dist["less_4k"] == plans[name].meta["nlines"]


def test_tokens_memory_map_at_the_hdf5_offset(built):
    _, plans = built
    for plan in plans.values():
        for path in shard_paths(plan):
            with h5py.File(path, "r") as f:
                d = f["tokens"]
                assert d.chunks is None and d.compression is None
                assert d.dtype == np.uint32  # vocab 151674 > 65536
                direct = d[...]
                offset = d.id.get_offset()
            assert offset is not None
            mm = np.memmap(path, dtype=direct.dtype, mode="r", offset=offset, shape=direct.shape)
            assert np.array_equal(mm, direct)
            assert np.array_equal(read_shard(path).tokens, direct)


def test_verify_cli_accepts_the_build(built):
    lock, _ = built
    r = subprocess.run([sys.executable, "-m", "pipeline", "verify", str(lock)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_lock_names_the_built_dirs(built):
    lock, plans = built
    data = orjson.loads(Path(lock).read_bytes())
    assert data["max_length"] == MAX_LENGTH
    by_name = {d["dataset_name"]: d for d in data["datasets"]}
    assert set(by_name) == set(DATASETS)
    for name, plan in plans.items():
        assert Path(by_name[name]["path"]) == plan.entry.final
        assert by_name[name]["key"] == plan.meta["key"]
        # docs/formats.md: the lock's nlines counts samples (segments included)
        assert by_name[name]["nlines"] == plan.meta["n_samples"]
        assert by_name[name]["ave_tokens_per_line"] == plan.meta["n_tokens"] / plan.meta["n_samples"]


def _dir_bytes(d: Path) -> dict[str, bytes]:
    """Every file of a built dir but the cache's own bookkeeping (dotfiles: .last_used)."""
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())
            if f.is_file() and not f.name.startswith(".")}


def test_one_and_two_workers_give_identical_bytes(built, tmp_path, monkeypatch):
    """Smaller subset, cut into several work units per file (~64 KiB) so the two workers
    really interleave; the shards and meta.json must be byte-identical, and the samples the
    same as the single-unit build of the module fixture."""
    import pipeline.build as pb
    from stages.readers import plan_units
    monkeypatch.setattr(pb, "plan_units", functools.partial(plan_units, unit_bytes=64 << 10))
    manifest = write_manifest(tmp_path / "manifest", ["c4", "fever", "medical"])
    # a small target shard size: consecutive units are joined into shards of ~40k tokens
    _, plans1, _ = build_mixture(str(manifest), out=str(tmp_path / "w1"), workers=1, shard_tokens=40_000)
    _, plans2, _ = build_mixture(str(manifest), out=str(tmp_path / "w2"), workers=2, shard_tokens=40_000)
    assert [p.status for p in plans1] == [p.status for p in plans2] == ["build"] * 3
    _, full = built
    c4 = plans1[0]
    assert 1 < len(c4.meta["shards"]) < len(c4.units)  # several units really were made, and joined
    for p1, p2 in zip(plans1, plans2):
        assert all(s["n_tokens"] <= 40_000 for s in p1.meta["shards"]) or len(p1.meta["shards"]) == len(p1.units)
        assert p1.entry.final.name == p2.entry.final.name
        b1, b2 = _dir_bytes(p1.entry.final), _dir_bytes(p2.entry.final)
        assert sorted(b1) == sorted(b2) and "meta.json" in b1
        for fname in b1:
            assert b1[fname] == b2[fname], f"{p1.spec.dataset_name}/{fname} differs"
        ref = full[p1.spec.dataset_name]
        got = [(r, ids) for r, ids, _ in samples(p1)]
        assert got == [(r, ids) for r, ids, _ in samples(ref)]
