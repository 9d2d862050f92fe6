"""`pipeline inspect`: the statistics of built dirs as a table, a terminal histogram and,
with --plot, a PNG of the length distributions."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import orjson

from stages.shard import read_shard

from .verify import built_dirs

COLUMNS = ("samples", "tokens", "loss tokens", "avg len", "p50", "p90", "p99", "max", "skipped", "truncated")


def load_meta(d: Path) -> dict:
    return orjson.loads((d / "meta.json").read_bytes())


def lengths_of(d: Path, meta: dict) -> np.ndarray:
    parts = [np.diff(read_shard(d / s["file"]).offsets) for s in meta["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def row(meta: dict) -> list[str]:
    p = meta["length_percentiles"]
    return [f"{meta['n_samples']:,}", f"{meta['n_tokens']:,}", f"{meta['n_loss_tokens']:,}",
            f"{meta['n_tokens'] / max(meta['n_samples'], 1):.1f}", str(p["p50"]), str(p["p90"]),
            str(p["p99"]), str(p["max"]), str(sum(meta["skipped"].values())),
            str(meta["truncated_samples"])]


def text_histogram(meta: dict, width: int = 40) -> str:
    h = meta["length_histogram"]
    top = max(h["counts"]) or 1
    lines = []
    for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
        bar = "█" * max(int(round(width * c / top)), 1 if c else 0)
        lines.append(f"  [{lo:>7}, {hi:>7})  {bar:<{width}} {c}")
    return "\n".join(lines)


def inspect(path: str, plot: str | None = None, as_json: bool = False) -> int:
    dirs = built_dirs(path)
    metas = {d: load_meta(d) for d in dirs}
    if as_json:
        sys.stdout.write(orjson.dumps({m["dataset_name"]: m for m in metas.values()},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        from rich.console import Console
        from rich.table import Table
        table = Table(title="tokenmill: built datasets (lengths in tokens)")
        table.add_column("dataset")
        for c in COLUMNS:
            table.add_column(c, justify="right")
        for m in metas.values():
            table.add_row(m["dataset_name"], *row(m))
        console = Console(width=None if sys.stdout.isatty() else 160)
        console.print(table)
        for m in metas.values():
            console.print(f"\n[bold]{m['dataset_name'].replace('[', '(')}[/bold] — format {m['build']['format']}, "
                          f"template {m['template']['name']}, max_length {m['build']['max_length']}, "
                          f"skipped {m['skipped'] or 'none'}")
            console.print(text_histogram(m), markup=False, highlight=False)
    if plot:
        plot_lengths(dirs, metas, plot)
    return 0


def plot_lengths(dirs, metas, out: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(dirs), 1, figsize=(8, 2.6 * len(dirs)), squeeze=False)
    for ax, d in zip(axes[:, 0], dirs):
        m = metas[d]
        lengths = lengths_of(d, m)
        ax.hist(lengths, bins=m["length_histogram"]["edges"], color="#3a7", edgecolor="white")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{m['dataset_name']}: {m['n_samples']:,} samples, {m['n_tokens']:,} tokens")
        ax.set_xlabel("tokens per sample")
        ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
