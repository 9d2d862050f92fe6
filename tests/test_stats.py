"""stages/stats.py: the streaming statistics equal numpy on the expanded lengths (no ../shared)."""
import numpy as np
import pytest

from stages import stats


def merged(parts):
    c = stats.LengthCounts()
    for p in parts:
        c.add(stats.length_counts(p))
    return c


@pytest.mark.parametrize("seed", range(6))
def test_merged_unit_histograms_equal_numpy_on_all_lengths(seed):
    rng = np.random.default_rng(seed)
    parts = [rng.integers(1, rng.choice([50, 5000, 400000]), size=rng.integers(0, 300))
             for _ in range(rng.integers(1, 8))]
    every = np.concatenate(parts)
    c = merged(parts)
    assert c.n == len(every) and c.total == int(every.sum())
    if len(every):
        want = np.percentile(every, [50, 90, 99], method="lower")
        assert c.percentiles() == {"min": int(every.min()), "p50": int(want[0]), "p90": int(want[1]),
                                   "p99": int(want[2]), "max": int(every.max())}
    # FM9G buckets: decimal half-open edges, counted independently here
    edges = [0, 4000, 8000, 16000, 32000, 64000, 128000, 256000, np.inf]
    want = [int(((every >= lo) & (every < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
    assert list(c.distribute().values()) == want
    assert sum(c.distribute().values()) == len(every)
    h = c.histogram()
    counts, _ = np.histogram(every, bins=h["edges"])
    assert h["counts"] == counts.tolist() and h["edges"][-1] > (every.max() if len(every) else 0)


def test_percentiles_every_small_n():
    """method="lower" index floor(q(n-1)/100) at every n up to 300: integer arithmetic, no
    float rounding at the edges."""
    for n in range(1, 301):
        x = np.arange(n) * 3 + 1
        want = np.percentile(x, [50, 90, 99], method="lower")
        got = stats.length_percentiles(*np.unique(x, return_counts=True))
        assert (got["p50"], got["p90"], got["p99"]) == tuple(int(w) for w in want), n


def test_bucket_order_and_edges():
    d = stats.length_distribute([3999, 4000, 7999, 8000, 255999, 256000, 10**7])
    assert list(d) == ["less_4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k", "64k-128k", "128k-256k",
                       "more_256k"]
    assert d == {"less_4k": 1, "4k-8k": 2, "8k-16k": 1, "16k-32k": 0, "32k-64k": 0, "64k-128k": 0,
                 "128k-256k": 1, "more_256k": 2}


def test_empty():
    c = stats.LengthCounts()
    assert c.n == 0 and c.percentiles() == {k: 0 for k in ("min", "p50", "p90", "p99", "max")}
    assert sum(c.distribute().values()) == 0 and sum(c.histogram()["counts"]) == 0


def test_memory_is_distinct_lengths_not_samples():
    c = stats.LengthCounts()
    for _ in range(1000):
        c.add(stats.length_counts(np.full(1000, 512)))
    assert c.n == 10**6 and len(c.counts) == 1


def test_truncate_sample_fm9g_rule():
    s = stats.truncate_sample({"a": "x" * 60, "b": [1, 2], "c": '{"k": "' + "y" * 60 + '"}'})
    assert s["a"] == "x" * 50 + "..." and s["b"] == [1]
    assert s["c"] == '{"k": "' + "y" * 50 + '..."}'
