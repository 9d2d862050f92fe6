"""Mixture lock (mixtures/lock.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixtures.lock import LockError, make_lock, read_lock, write_lock
from mixtures.manifest import DatasetSpec, Mixture

TOKENIZER = {"path": "/tok", "vocab_size": 32000, "sha256": "ab" * 32}


def spec(name: str, weight: float, **kw) -> DatasetSpec:
    return DatasetSpec(dataset_name=name, task_name=name, abs_weight=weight, path=f"/src/{name}", **kw)


def meta(nlines: int, n_tokens: int, key: str = "k" * 64, tokenizer: dict = TOKENIZER) -> dict:
    return {"key": key, "nlines": nlines, "n_tokens": n_tokens, "tokenizer": dict(tokenizer)}


def mixture(*specs: DatasetSpec) -> Mixture:
    return Mixture(manifest_path="/m.json", manifest_sha256="0" * 64, form="object",
                   tokenizer="/tok", template="tokenizer", max_length=4096, seed=1234,
                   datasets=tuple(specs))


def lock_for(pairs, tmp_path: Path):
    specs = [s for s, _ in pairs]
    built = [(s, str(tmp_path / f"{s.dataset_name}-key"), m) for s, m in pairs]
    return make_lock(mixture(*specs), built)


def test_shares_and_probabilities_match_numpy(tmp_path: Path):
    weights = np.array([0.5, 0.3, 0.2, 0.0])
    nlines = np.array([1000, 50, 7, 10])
    n_tokens = np.array([351_000, 100_000, 7_700, 500])
    pairs = [(spec(f"d{i}", float(w)), meta(int(n), int(t), key=f"{i}" * 64))
             for i, (w, n, t) in enumerate(zip(weights, nlines, n_tokens))]
    lock, warns = lock_for(pairs, tmp_path)
    assert warns == []

    ave = n_tokens / nlines
    share = weights / weights.sum()
    prob = (weights / ave) / (weights / ave).sum()
    got = lock["datasets"]
    np.testing.assert_allclose([d["token_share"] for d in got], share, rtol=1e-12)
    np.testing.assert_allclose([d["sample_probability"] for d in got], prob, rtol=1e-12)
    np.testing.assert_allclose([d["ave_tokens_per_line"] for d in got], ave)
    np.testing.assert_allclose([d["total_tokens"] for d in got], n_tokens / 1e9)
    # The token-share rule: expected tokens per draw from each dataset ∝ abs_weight.
    expected_tokens = prob * ave
    np.testing.assert_allclose(expected_tokens / expected_tokens.sum(), share, rtol=1e-12)

    d0 = got[0]
    assert d0["path"] == str(tmp_path / "d0-key") and d0["key"] == "0" * 64
    assert (d0["nlines"], d0["task_name"], d0["abs_weight"], d0["allow_repeat"]) == (1000, "d0", 0.5, True)
    assert lock["schema_version"] == 1 and lock["manifest_sha256"] == "0" * 64
    assert (lock["seed"], lock["max_length"], lock["tokenizer"]) == (1234, 4096, TOKENIZER)


def test_fm9g_readme_total_tokens_ten_times_too_small(tmp_path: Path):
    # The README's mixture: nlines × ave_tokens_per_line is ~10× its total_tokens.
    med = spec("medical_o1_reasoning", 0.5, declared_nlines=17278, declared_ave_tokens_per_line=351,
               declared_total_tokens=0.0006)
    alp = spec("ralpaca_zh", 0.5, declared_nlines=48818, declared_ave_tokens_per_line=204,
               declared_total_tokens=0.001)
    lock, warns = lock_for([(med, meta(17278, 17278 * 351)), (alp, meta(48818, 48818 * 204))], tmp_path)
    assert len(warns) == 2, warns
    assert all("total_tokens" in w for w in warns)
    assert "'medical_o1_reasoning'" in warns[0] and "0.0006" in warns[0] and "10.1×" in warns[0]
    assert "'ralpaca_zh'" in warns[1] and "9.96×" in warns[1]
    assert lock["datasets"][1]["total_tokens"] == pytest.approx(48818 * 204 / 1e9)


def test_small_differences_do_not_warn_large_ones_do(tmp_path: Path):
    ok = spec("ok", 1, declared_nlines=1020, declared_ave_tokens_per_line=96, declared_total_tokens=1e-4)
    off = spec("off", 1, declared_nlines=800, declared_ave_tokens_per_line=200)
    _, warns = lock_for([(ok, meta(1000, 100_000)), (off, meta(1000, 100_000))], tmp_path)
    assert len(warns) == 2
    assert all("'off'" in w for w in warns)
    assert any("nlines = 800" in w for w in warns) and any("ave_tokens_per_line = 200" in w for w in warns)


def test_empty_dataset_warns_and_gets_probability_zero(tmp_path: Path):
    lock, warns = lock_for([(spec("a", 1), meta(10, 1000)), (spec("empty", 1), meta(0, 0))], tmp_path)
    assert [d["sample_probability"] for d in lock["datasets"]] == [1.0, 0.0]
    assert lock["datasets"][1]["ave_tokens_per_line"] == 0.0
    assert any("'empty'" in w and "never drawn" in w for w in warns)


def test_all_empty_is_an_error(tmp_path: Path):
    with pytest.raises(LockError, match="nothing to train on"):
        lock_for([(spec("a", 1), meta(0, 0)), (spec("b", 0), meta(5, 50))], tmp_path)


def test_tokenizer_disagreement_is_an_error(tmp_path: Path):
    other = {**TOKENIZER, "sha256": "cd" * 32}
    with pytest.raises(LockError, match="'b' was built with tokenizer sha256 cdcd"):
        lock_for([(spec("a", 1), meta(1, 1)), (spec("b", 1), meta(1, 1, tokenizer=other))], tmp_path)


def test_bad_meta_is_an_error(tmp_path: Path):
    bad = meta(1, 1)
    del bad["n_tokens"]
    with pytest.raises(LockError, match=r"a-key/meta.json: n_tokens: missing required key"):
        lock_for([(spec("a", 1), bad)], tmp_path)


def test_built_must_match_manifest(tmp_path: Path):
    with pytest.raises(LockError, match="do not match"):
        make_lock(mixture(spec("a", 1), spec("b", 1)), [(spec("a", 1), str(tmp_path), meta(1, 1))])


def test_write_read_roundtrip_is_deterministic(tmp_path: Path):
    lock, _ = lock_for([(spec("b", 1, allow_repeat=False), meta(3, 30)), (spec("a", 2), meta(4, 80))], tmp_path)
    p1, p2 = tmp_path / "out" / "mixture.lock.json", tmp_path / "again.json"
    write_lock(lock, p1)
    write_lock(lock, p2)
    raw = p1.read_bytes()
    assert raw == p2.read_bytes()
    assert raw.startswith(b'{\n  "datasets": [') and raw.endswith(b"}\n")  # sorted keys, indent 2
    assert read_lock(p1) == json.loads(raw) == lock
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mixture.lock.json"]  # no temp left


def test_read_lock_errors(tmp_path: Path):
    lock, _ = lock_for([(spec("a", 1), meta(3, 30))], tmp_path)
    path = tmp_path / "lock.json"

    write_lock({**lock, "schema_version": 2}, path)
    with pytest.raises(LockError, match=f"{path}: schema_version: .*got 2"):
        read_lock(path)

    broken = json.loads(json.dumps(lock))
    del broken["datasets"][0]["key"]
    write_lock(broken, path)
    with pytest.raises(LockError, match=r"datasets\[0\]\.key: missing required key"):
        read_lock(path)

    write_lock({k: v for k, v in lock.items() if k != "seed"}, path)
    with pytest.raises(LockError, match="seed: missing required key"):
        read_lock(path)

    path.write_text('{"schema_version": 1,\n  oops}')
    with pytest.raises(LockError, match=f"{path}: invalid JSON at line 2"):
        read_lock(path)

    with pytest.raises(LockError, match="cannot read"):
        read_lock(tmp_path / "missing.json")


def test_read_lock_checks_probabilities_sum(tmp_path: Path):
    lock, _ = lock_for([(spec("a", 1), meta(3, 30)), (spec("b", 1), meta(3, 30))], tmp_path)
    lock["datasets"][0]["sample_probability"] = 0.9
    write_lock(lock, tmp_path / "l.json")
    with pytest.raises(LockError, match="sums to"):
        read_lock(tmp_path / "l.json")



def test_token_weighting_shares_follow_built_tokens(tmp_path: Path):
    """`weights: tokens`: share ∝ abs_weight × built tokens (numpy), the lock's abs_weight as given."""
    from dataclasses import replace
    weights = np.array([1.0, 1.0, 2.0])
    nlines, n_tokens = np.array([100, 7, 40]), np.array([255_000, 7_000, 40_000])
    pairs = [(spec(f"d{i}", float(w)), meta(int(n), int(t), key=f"{i}" * 64))
             for i, (w, n, t) in enumerate(zip(weights, nlines, n_tokens))]
    built = [(s, str(tmp_path / s.dataset_name), m) for s, m in pairs]
    lock, _ = make_lock(replace(mixture(*[s for s, _ in pairs]), weights="tokens"), built)
    share = weights * n_tokens / (weights * n_tokens).sum()
    ave = n_tokens / nlines
    prob = (share / ave) / (share / ave).sum()
    np.testing.assert_allclose([d["token_share"] for d in lock["datasets"]], share, rtol=1e-12)
    np.testing.assert_allclose([d["sample_probability"] for d in lock["datasets"]], prob, rtol=1e-12)
    assert [d["abs_weight"] for d in lock["datasets"]] == weights.tolist()


def test_load_lock_is_the_validated_lock_typed(tmp_path: Path):
    from mixtures.lock import Lock, LockEntry, load_lock
    pairs = [(spec("a", 0.7), meta(10, 1000, key="a" * 64)), (spec("b", 0.3, allow_repeat=False),
                                                              meta(5, 200, key="b" * 64))]
    lock, _ = lock_for(pairs, tmp_path)
    write_lock(lock, tmp_path / "l.json")
    typed = load_lock(tmp_path / "l.json")
    assert isinstance(typed, Lock) and typed.raw == lock
    assert (typed.seed, typed.max_length, typed.tokenizer) == (lock["seed"], lock["max_length"], lock["tokenizer"])
    assert all(isinstance(e, LockEntry) for e in typed.datasets)
    for e, d in zip(typed.datasets, lock["datasets"]):
        assert {k: getattr(e, k) for k in d} == d  # every field the writer writes, typed
    assert typed.entry("b").allow_repeat is False
    with pytest.raises(LockError, match="no dataset 'c'"):
        typed.entry("c")
    bad = dict(lock, datasets=[dict(lock["datasets"][0], key=5)] + lock["datasets"][1:])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(LockError, match=r"bad.json: datasets\[0\].key"):
        load_lock(tmp_path / "bad.json")
