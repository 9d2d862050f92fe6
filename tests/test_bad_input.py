"""Bad input, under both --on-error policies. Every bad record either stops the build with
exit 1 and `file:line` + reason (fail), or is counted by reason in meta.json and listed in
rejects.jsonl while every good record around it is kept (skip). Nothing is lost silently:
records_read == nlines + sum(skipped)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_TOK = ROOT / "sample_data" / "tokenizer"
QWEN = ROOT.parent / "shared" / "tokenizers" / "qwen2.5-family-internvl2_5-1b"

if (SAMPLE_TOK / "tokenizer.json").is_file():
    TOKENIZER = SAMPLE_TOK
elif (QWEN / "tokenizer.json").is_file():
    TOKENIZER = QWEN
else:
    pytest.skip("no tokenizer: neither sample_data/tokenizer nor the shared Qwen2.5 tokenizer "
                "is present", allow_module_level=True)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _has_chat_template(tok: Path) -> bool:
    if (tok / "chat_template.jinja").is_file() or (tok / "chat_template.json").is_file():
        return True
    cfg = tok / "tokenizer_config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text(encoding="utf-8")).get("chat_template"))


TEMPLATE = "tokenizer" if _has_chat_template(TOKENIZER) else "chatml"

from pipeline.build import build_mixture  # noqa: E402
from stages.shard import read_shard  # noqa: E402


def _j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def text_line(i: int) -> bytes:
    return _j({"text": f"good document number {i}, with some words in it."})


def chat_line(i: int, turns: int = 2) -> bytes:
    conv = [{"from": "human" if t % 2 == 0 else "gpt", "value": f"turn {t} of conversation {i}"}
            for t in range(turns)]
    return _j({"conversations": conv})


@dataclass(frozen=True)
class Case:
    id: str
    file: str  # file name (its suffix picks the reader)
    format: str
    bad: bytes  # the bad record's raw line
    reason: str
    field: str | None
    good: str = "text"  # kind of the good records around it: text | chat | txt


CASES = [
    Case("malformed_json", "data.jsonl", "text", b'{"text": "unterminated', "invalid_json", None),
    Case("text_not_a_string", "data.jsonl", "text", b'{"text": 5}', "wrong_type", "text"),
    Case("value_not_a_string", "chat.jsonl", "sharegpt",
         _j({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 7}]}),
         "wrong_type", "conversations[1].value", good="chat"),
    Case("invalid_utf8_jsonl", "data.jsonl", "text", b'{"text": "caf\xe9 \xff\xfe broken"}',
         "invalid_utf8", None),
    Case("invalid_utf8_txt", "data.txt", "text", b"caf\xe9 \xff\xfe broken", "invalid_utf8", None,
         good="txt"),
    Case("empty_text", "data.jsonl", "text", b'{"text": ""}', "empty_sample", "text"),
    Case("odd_length_sharegpt", "chat.jsonl", "sharegpt",
         _j({"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                               {"from": "human", "value": "q2 without an answer"}]}),
         "bad_conversation", "conversations", good="chat"),
]
BAD_AT = 2  # 0-based record of the bad line: two good records before, two after
N_RECORDS = 5


def good_line(case: Case, i: int) -> bytes:
    if case.good == "chat":
        return chat_line(i)
    if case.good == "txt":
        return f"good plain line number {i}, with some words in it.".encode()
    return text_line(i)


def write_case(folder: Path, case: Case, name: str | None = None) -> Path:
    lines = [case.bad if i == BAD_AT else good_line(case, i) for i in range(N_RECORDS)]
    src = folder / (name or case.file)
    src.write_bytes(b"\n".join(lines) + b"\n")
    return src


def write_manifest(folder: Path, datasets: list[tuple[str, Path, str]]) -> Path:
    manifest = {
        "tokenizer": os.path.relpath(TOKENIZER, folder), "template": TEMPLATE,
        "max_length": 512, "seed": 7,
        "datasets": [{"dataset_name": n, "task_name": n, "abs_weight": 1.0, "path": src.name,
                      "format": fmt} for n, src, fmt in datasets],
    }
    path = folder / "mixture.json"
    path.write_text(json.dumps(manifest))
    return path


def run_build(manifest: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "build", str(manifest), "--out", str(out),
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)


def built_dirs(out: Path) -> list[Path]:
    cache = out / "cache"
    return [d for d in cache.iterdir() if d.is_dir() and (d / "meta.json").is_file()] if cache.is_dir() else []


def rejects_of(plan) -> list[dict]:
    path = plan.entry.final / "rejects.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def source_records(plan) -> list[int]:
    return [int(r) for s in plan.meta["shards"]
            for r in read_shard(plan.entry.final / s["file"]).source_record]


# ------------------------------------------------------------------------- fail

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fail_policy_exits_1_naming_file_line_and_reason(case, tmp_path):
    src = write_case(tmp_path, case)
    manifest = write_manifest(tmp_path, [("bad", src, case.format)])
    r = run_build(manifest, tmp_path / "out", "--workers", "1", "--on-error", "fail")
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr
    assert f"{src.name}:{BAD_AT + 1}:" in err, err  # 1-based line number
    assert f"[{case.reason}]" in err, err
    if case.field:
        assert f"field '{case.field}'" in err, err
    assert "Traceback" not in err
    # nothing half-built is published, and no lock is written
    assert built_dirs(tmp_path / "out") == []
    assert not (tmp_path / "out" / "mixture.lock.json").exists()


def test_fail_policy_across_worker_processes(tmp_path):
    """The RecordError crosses the process pool intact (file, line, field, reason)."""
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(text_line(i) for i in range(N_RECORDS)) + b"\n")
    case = CASES[2]  # conversations[1].value is an int
    bad = write_case(tmp_path, case)
    manifest = write_manifest(tmp_path, [("good", good, "text"), ("bad", bad, case.format)])
    r = run_build(manifest, tmp_path / "out", "--workers", "2", "--on-error", "fail")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{bad.name}:{BAD_AT + 1}:" in r.stderr
    assert f"field '{case.field}'" in r.stderr and f"[{case.reason}]" in r.stderr


def test_txt_line_numbers_count_blank_lines(tmp_path):
    """Blank lines in a txt file are not records, but line numbers stay physical."""
    src = tmp_path / "doc.txt"
    src.write_bytes(b"first line\n\nsecond line\n   \nbad \xff line\nlast line\n")
    manifest = write_manifest(tmp_path, [("doc", src, "text")])
    r = run_build(manifest, tmp_path / "out", "--workers", "1", "--on-error", "fail")
    assert r.returncode == 1 and "doc.txt:5:" in r.stderr and "[invalid_utf8]" in r.stderr, r.stderr
    _, plans, _ = build_mixture(str(manifest), out=str(tmp_path / "skip"), workers=1, on_error="skip")
    (plan,) = plans
    assert source_records(plan) == [0, 2, 5]
    assert [(x["line"], x["reason"]) for x in rejects_of(plan)] == [(5, "invalid_utf8")]  # = doc.txt:5
    assert plan.meta["records_read"] == 4 == plan.meta["nlines"] + sum(plan.meta["skipped"].values())


# ------------------------------------------------------------------------- skip

@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_skip_policy_counts_lists_and_keeps_the_good_records(case, tmp_path):
    src = write_case(tmp_path, case)
    manifest = write_manifest(tmp_path, [("bad", src, case.format)])
    lock, plans, _ = build_mixture(str(manifest), out=str(tmp_path / "out"), workers=1, on_error="skip")
    (plan,) = plans
    meta = plan.meta
    assert meta["skipped"] == {case.reason: 1}
    assert meta["rejects"] == "rejects.jsonl"
    (rej,) = rejects_of(plan)
    assert Path(rej["source"]).resolve() == src.resolve()
    assert rej["line"] == BAD_AT + 1 and rej["reason"] == case.reason and rej["field"] == case.field
    assert isinstance(rej["detail"], str) and rej["detail"]
    # nothing lost: every other record is a sample, in order
    assert meta["records_read"] == N_RECORDS
    assert meta["records_read"] == meta["nlines"] + sum(meta["skipped"].values())
    assert source_records(plan) == [i for i in range(N_RECORDS) if i != BAD_AT]
    assert meta["nlines"] == N_RECORDS - 1
    assert Path(lock).is_file()
    # and the good records are the right ones, token for token
    _check_good_samples(plan, case)


def _check_good_samples(plan, case: Case):
    from tokenizers import Tokenizer
    if case.good == "chat":
        return  # ids of chat samples are checked against apply_chat_template elsewhere
    tk = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(TOKENIZER))
    head = [hf.convert_tokens_to_ids(hf.bos_token)] if hf.bos_token else []
    tail = [hf.convert_tokens_to_ids(hf.eos_token)]
    arr = [read_shard(plan.entry.final / s["file"]) for s in plan.meta["shards"]]
    lines = [good_line(case, i) for i in range(N_RECORDS)]
    for a in arr:
        for i in range(a.n_samples):
            rec = int(a.source_record[i])
            raw = lines[rec].decode()
            text = raw if case.good == "txt" else json.loads(raw)["text"]
            want = head + tk.encode(text, add_special_tokens=False).ids + tail
            assert a.sample(i).tolist() == want


def test_skip_policy_with_every_fault_in_one_file(tmp_path):
    """All the jsonl faults in one text file between good records: each is counted under
    its own reason, listed in record order, and every good record is kept."""
    bad = [b'{"text": "unterminated', b'{"text": 5}', b'{"text": "caf\xe9 \xff"}', b'{"text": ""}',
           b"", b"[1, 2]", b'{"other": "x"}']
    reasons = ["invalid_json", "wrong_type", "invalid_utf8", "empty_sample", "empty_line",
               "wrong_type", "missing_field"]
    lines, bad_at = [text_line(0)], []
    for i, b in enumerate(bad):
        bad_at.append(len(lines))
        lines += [b, text_line(len(lines) + 1)]
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    manifest = write_manifest(tmp_path, [("mixed", src, "text")])
    _, plans, _ = build_mixture(str(manifest), out=str(tmp_path / "out"), workers=1, on_error="skip")
    (plan,) = plans
    meta = plan.meta
    want = {}
    for r in reasons:
        want[r] = want.get(r, 0) + 1
    assert meta["skipped"] == want
    assert [(x["line"], x["reason"]) for x in rejects_of(plan)] == [(b + 1, r) for b, r in zip(bad_at, reasons)]
    assert meta["records_read"] == len(lines) == meta["nlines"] + sum(meta["skipped"].values())
    assert source_records(plan) == [i for i in range(len(lines)) if i not in bad_at]


def test_skip_policy_sharegpt_faults_in_one_file(tmp_path):
    bad = [
        _j({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 7}]}),
        _j({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                              {"from": "human", "value": "q2"}]}),
        _j({"conversations": [{"from": "human", "value": "q"}]}),
        _j({"conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}]}),
        _j({"conversations": []}),
    ]
    reasons = ["wrong_type", "bad_conversation", "bad_conversation", "unknown_role", "empty_sample"]
    lines, bad_at = [chat_line(0)], []
    for b in bad:
        bad_at.append(len(lines))
        lines += [b, chat_line(len(lines) + 1, turns=4)]
    src = tmp_path / "chat.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    manifest = write_manifest(tmp_path, [("chat", src, "sharegpt")])
    _, plans, _ = build_mixture(str(manifest), out=str(tmp_path / "out"), workers=1, on_error="skip")
    (plan,) = plans
    meta = plan.meta
    assert meta["skipped"] == {"bad_conversation": 2, "empty_sample": 1, "unknown_role": 1, "wrong_type": 1}
    assert [(x["line"], x["reason"]) for x in rejects_of(plan)] == [(b + 1, r) for b, r in zip(bad_at, reasons)]
    assert meta["records_read"] == len(lines) == meta["nlines"] + sum(meta["skipped"].values())
    assert source_records(plan) == [i for i in range(len(lines)) if i not in bad_at]
    assert meta["n_loss_tokens"] > 0


def test_cached_skip_build_is_refused_under_fail(tmp_path):
    """A build that set records aside under skip is not silently reused by a fail build."""
    case = CASES[0]
    src = write_case(tmp_path, case)
    manifest = write_manifest(tmp_path, [("bad", src, case.format)])
    out = tmp_path / "out"
    build_mixture(str(manifest), out=str(out), workers=1, on_error="skip")
    r = run_build(manifest, out, "--workers", "1", "--on-error", "fail")
    assert r.returncode == 1 and "rejects.jsonl" in r.stderr, r.stderr


def test_record_numbers_across_work_units(tmp_path, monkeypatch):
    """Files cut into many small work units: rejects and source_record still carry the
    physical line numbers (blank txt lines included, a last line without newline too), the
    same for 1 and 2 workers, and under fail the first bad line (in file order) is named."""
    import functools

    import pipeline.build as pb
    from stages.errors import RecordError
    from stages.readers import plan_units
    monkeypatch.setattr(pb, "plan_units", functools.partial(plan_units, unit_bytes=40))
    lines = [text_line(i) for i in range(12)]
    lines[3], lines[7], lines[9] = b'{"text": 5}', b"", b'{"text": "x\xff"}'
    (tmp_path / "u.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    txt = [b"line %d" % i for i in range(12)]
    txt[2], txt[5], txt[10] = b"", b"bad \xff", b"  "
    (tmp_path / "u.txt").write_bytes(b"\n".join(txt))  # no final newline
    manifest = write_manifest(tmp_path, [("u", tmp_path / "u.jsonl", "text"),
                                         ("t", tmp_path / "u.txt", "text")])
    seen = []
    for workers in (1, 2):
        _, plans, _ = build_mixture(str(manifest), out=str(tmp_path / f"w{workers}"), workers=workers,
                                    on_error="skip", shard_tokens=1)  # one shard per unit
        u, t = plans
        assert len(u.meta["shards"]) > 2 and len(t.meta["shards"]) > 1
        assert [(x["line"], x["reason"]) for x in rejects_of(u)] == [  # 1-based, as file:N
            (4, "wrong_type"), (8, "empty_line"), (10, "invalid_utf8")]
        assert source_records(u) == [0, 1, 2, 4, 5, 6, 8, 10, 11]
        assert u.meta["records_read"] == 12 == u.meta["nlines"] + sum(u.meta["skipped"].values())
        assert [(x["line"], x["reason"]) for x in rejects_of(t)] == [(6, "invalid_utf8")]
        assert source_records(t) == [0, 1, 3, 4, 6, 7, 8, 9, 11]
        assert t.meta["records_read"] == 10 == t.meta["nlines"] + sum(t.meta["skipped"].values())
        seen.append([(p.meta, [(p.entry.final / s["file"]).read_bytes() for s in p.meta["shards"]])
                     for p in plans])
    assert seen[0] == seen[1]
    with pytest.raises(RecordError) as err:
        build_mixture(str(manifest), out=str(tmp_path / "fail"), workers=2, on_error="fail")
    assert "u.jsonl:4:" in str(err.value) and "[wrong_type]" in str(err.value)
