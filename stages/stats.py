"""meta.json statistics, computed from real token counts (DESIGN §4)."""
from __future__ import annotations

import json

import numpy as np

# FM9G's bucket names and decimal, half-open edges — kept verbatim for compatibility.
FM9G_BUCKETS = ("less_4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k", "64k-128k", "128k-256k", "more_256k")
FM9G_EDGES = (4000, 8000, 16000, 32000, 64000, 128000, 256000)


def length_distribute(lengths: np.ndarray) -> dict[str, int]:
    idx = np.searchsorted(np.array(FM9G_EDGES), lengths, side="right")
    counts = np.bincount(idx, minlength=len(FM9G_BUCKETS))
    return {name: int(c) for name, c in zip(FM9G_BUCKETS, counts)}


def length_percentiles(lengths: np.ndarray) -> dict[str, int]:
    if len(lengths) == 0:
        return {k: 0 for k in ("min", "p50", "p90", "p99", "max")}
    p = np.percentile(lengths, [50, 90, 99], method="lower")
    return {"min": int(lengths.min()), "p50": int(p[0]), "p90": int(p[1]), "p99": int(p[2]),
            "max": int(lengths.max())}


def length_histogram(lengths: np.ndarray) -> dict[str, list[int]]:
    """Power-of-two edges [0, 16, 32, …]; bins are [lo, hi), the last one closed."""
    top = int(lengths.max()) if len(lengths) else 1
    edges = [0, 16]
    while edges[-1] <= top:
        edges.append(edges[-1] * 2)
    counts, _ = np.histogram(lengths, bins=edges)
    return {"edges": edges, "counts": [int(c) for c in counts]}


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
