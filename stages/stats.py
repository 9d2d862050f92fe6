"""meta.json statistics, computed from real token counts (DESIGN §4).

Statistics are computed streaming: each work unit reports its lengths as a sparse histogram
(`length_counts`: distinct lengths and how often each occurs) and the driver merges them in
a `LengthCounts`, whose memory is O(distinct lengths) — bounded by the longest length, never
by the number of samples. Percentiles from the merged histogram are exact (integer lengths).
"""
from __future__ import annotations

import json

import numpy as np

# FM9G's bucket names and decimal, half-open edges — kept verbatim for compatibility.
FM9G_BUCKETS = ("less_4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k", "64k-128k", "128k-256k", "more_256k")
FM9G_EDGES = (4000, 8000, 16000, 32000, 64000, 128000, 256000)
PERCENTILES = (50, 90, 99)


def length_counts(lengths) -> dict[str, list[int]]:
    """A unit's lengths as a sparse histogram {"lengths": [distinct, ascending], "counts": [...]}
    (what a unit summary carries; JSON-serialisable)."""
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    return {"lengths": values.tolist(), "counts": counts.tolist()}


class LengthCounts:
    """Merged sparse length histogram: add units one by one, then read the statistics."""

    def __init__(self):
        self.counts: dict[int, int] = {}

    def add(self, part: dict[str, list[int]]) -> None:
        for v, c in zip(part["lengths"], part["counts"]):
            self.counts[v] = self.counts.get(v, 0) + c

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.counts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        values = np.array(sorted(self.counts), dtype=np.int64)
        return values, np.array([self.counts[v] for v in values.tolist()], dtype=np.int64)

    @property
    def n(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def total(self) -> int:
        return int(sum(v * c for v, c in self.counts.items()))

    def distribute(self) -> dict[str, int]:
        return length_distribute(*self.arrays())

    def percentiles(self) -> dict[str, int]:
        return length_percentiles(*self.arrays())

    def histogram(self) -> dict[str, list[int]]:
        return length_histogram(*self.arrays())


def _weights(values: np.ndarray, counts: np.ndarray | None) -> np.ndarray:
    return np.ones(len(values), np.int64) if counts is None else np.asarray(counts, np.int64)


def length_distribute(values, counts=None) -> dict[str, int]:
    """FM9G buckets, in FM9G's order. `values` are lengths (each once, or with `counts`)."""
    values = np.asarray(values, np.int64)
    idx = np.searchsorted(np.array(FM9G_EDGES), values, side="right")
    per = np.bincount(idx, weights=_weights(values, counts), minlength=len(FM9G_BUCKETS))
    return {name: int(c) for name, c in zip(FM9G_BUCKETS, per)}


def length_percentiles(values, counts=None) -> dict[str, int]:
    """min, p50, p90, p99, max; equal to numpy's percentile(method="lower") of the expanded
    lengths: the element at index floor(q/100 * (n-1)) of the sorted lengths."""
    values = np.asarray(values, np.int64)
    w = _weights(values, counts)
    n = int(w.sum())
    if n == 0:
        return {k: 0 for k in ("min", "p50", "p90", "p99", "max")}
    order = np.argsort(values, kind="stable")
    values, w = values[order], w[order]
    cum = np.cumsum(w)
    out = {"min": int(values[0])}
    for q in PERCENTILES:
        idx = (q * (n - 1)) // 100  # integer arithmetic: no float rounding at bucket edges
        out[f"p{q}"] = int(values[np.searchsorted(cum, idx, side="right")])
    out["max"] = int(values[-1])
    return out


def length_histogram(values, counts=None) -> dict[str, list[int]]:
    """Power-of-two edges [0, 16, 32, …]; bins are [lo, hi), the last one closed."""
    values = np.asarray(values, np.int64)
    top = int(values.max()) if len(values) else 1
    edges = [0, 16]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    hist, _ = np.histogram(values, bins=edges, weights=_weights(values, counts))
    return {"edges": edges, "counts": [int(c) for c in hist]}


def truncate_sample(value, width: int = 50):
    """FM9G data_sample rule: strings cut to `width` chars + '...', lists to their first
    element, JSON held in a string truncated recursively."""
    if isinstance(value, dict):
        return {k: truncate_sample(v, width) for k, v in value.items()}
    if isinstance(value, list):
        return [truncate_sample(value[0], width)] if value else []
    if isinstance(value, str):
        s = value.strip()
        if s[:1] in "[{" and s[-1:] in "]}":
            try:
                return json.dumps(truncate_sample(json.loads(s), width), ensure_ascii=False)
            except ValueError:
                pass
        return value[:width] + "..." if len(value) > width else value
    return value
