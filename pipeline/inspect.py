"""`pipeline inspect`: the statistics of built dirs as a table, terminal histograms and, with
--plot, a PNG of the length distributions.

Two kinds of figure, labelled as such: per *record* (a source record's full token length,
before the overflow policy — FM9G's nlines / length_distribute, what one reads to choose
max_length) and per *sample* (what the shards hold, after overflow). Text taken from a
meta.json (a dataset name, a reason) is shown with control characters escaped: a crafted
dir cannot send terminal escape sequences.
"""
from __future__ import annotations

import sys
from pathlib import Path

import orjson

from stages.built_dataset import BuiltMeta
from stages.stats import FM9G_BUCKETS

from .verify import built_dirs

COLUMNS = ("records", "tok/record", "record max", "samples", "tokens", "loss tokens", "tok/sample",
           "p50", "p90", "p99", "max", "skipped", "truncated")


def load_meta(d: Path) -> dict:
    """meta.json of a built dir, validated (stages.built_dataset.BuiltMeta): a broken one is
    one error line naming the dir and field, not a KeyError later."""
    return BuiltMeta.read(d).raw


def safe(value) -> str:
    """Printable text: control characters (ESC, CR, BEL, …) written as escapes."""
    s = str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def sample_percentiles(meta: dict) -> dict:
    return meta.get("sample_length_percentiles") or meta.get("length_percentiles") or {}


def sample_histogram(meta: dict) -> dict:
    return meta.get("sample_length_histogram") or meta.get("length_histogram") or {"edges": [0, 16],
                                                                                    "counts": [0]}


def row(meta: dict) -> list[str]:
    p, r = sample_percentiles(meta), meta.get("record_length_percentiles") or {}
    nlines = meta.get("nlines", 0)
    rec_tokens = meta.get("record_tokens")
    return [f"{nlines:,}", f"{rec_tokens / max(nlines, 1):.1f}" if rec_tokens is not None else "-",
            str(r.get("max", "-")),
            f"{meta['n_samples']:,}", f"{meta['n_tokens']:,}", f"{meta['n_loss_tokens']:,}",
            f"{meta['n_tokens'] / max(meta['n_samples'], 1):.1f}", str(p.get("p50", "-")),
            str(p.get("p90", "-")), str(p.get("p99", "-")), str(p.get("max", "-")),
            str(sum(meta["skipped"].values())), str(meta["truncated_samples"])]


def text_histogram(meta: dict, width: int = 40) -> str:
    """Sample lengths (after overflow), power-of-two bins; the bin holding max_length marked."""
    h = sample_histogram(meta)
    max_length = (meta.get("build") or {}).get("max_length")
    top = max(h["counts"] or [0]) or 1
    lines = []
    for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
        bar = "█" * max(int(round(width * c / top)), 1 if c else 0)
        mark = f"  ◀ max_length {max_length}" if max_length is not None and lo <= max_length < hi else ""
        lines.append(f"  [{lo:>7}, {hi:>7})  {bar:<{width}} {c}{mark}")
    if max_length is not None and h["edges"] and max_length >= h["edges"][-1]:
        lines.append(f"  (max_length {max_length} is above every sample)")
    return "\n".join(lines)


def record_buckets(meta: dict) -> str:
    dist = meta.get("length_distribute") or {}
    return "  " + "  ".join(f"{k} {dist.get(k, 0):,}" for k in FM9G_BUCKETS)


def inspect(path: str, plot: str | None = None, as_json: bool = False) -> int:
    dirs = built_dirs(path)
    metas = {d: load_meta(d) for d in dirs}
    if as_json:
        sys.stdout.write(orjson.dumps({m["dataset_name"]: m for m in metas.values()},
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
        table = Table(title="tokenmill: built datasets (lengths in tokens)",
                      caption="records: source records before overflow (FM9G nlines) · "
                              "samples: what the shards hold, after overflow; p50…max per sample")
        table.add_column("dataset")
        for c in COLUMNS:
            table.add_column(c, justify="right")
        for m in metas.values():
            table.add_row(escape(safe(m["dataset_name"])), *row(m))
        console = Console(width=None if sys.stdout.isatty() else 160)
        console.print(table)
        for m in metas.values():
            b = m.get("build") or {}
            skipped = ", ".join(f"{safe(k)} {v}" for k, v in m["skipped"].items()) or "none"
            console.print("\n[bold]" + escape(safe(m["dataset_name"])) + "[/bold]"
                          + escape(f" — format {safe(b.get('format'))}, template "
                                   f"{safe(m['template']['name'])}, max_length {b.get('max_length')}, "
                                   f"skipped {skipped}"))
            if m.get("render_notes"):
                console.print(escape("layout rules applied: " + ", ".join(
                    f"{safe(k)} {v:,}" for k, v in m["render_notes"].items())), highlight=False)
            console.print("per record, before overflow (FM9G length_distribute):", highlight=False)
            console.print(record_buckets(m), markup=False, highlight=False)
            console.print("per sample, after overflow:", highlight=False)
            console.print(text_histogram(m), markup=False, highlight=False)
    if plot:
        plot_lengths(dirs, metas, plot)
    return 0


def plot_lengths(dirs, metas, out: str):
    """One panel per dataset, the same x range on all: sample lengths (after overflow) and
    record lengths (before), with max_length marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    hists = {d: (sample_histogram(metas[d]), metas[d].get("record_length_histogram")) for d in dirs}
    right = max([h["edges"][-1] for pair in hists.values() for h in pair if h] + [16])
    fig, axes = plt.subplots(len(dirs), 1, figsize=(8, 2.6 * len(dirs)), squeeze=False, sharex=True)
    for ax, d in zip(axes[:, 0], dirs):
        m = metas[d]
        samples, records = hists[d]
        if records:
            ax.stairs(records["counts"], records["edges"], color="#c84", label="records (before overflow)")
        ax.stairs(samples["counts"], samples["edges"], fill=True, color="#3a7", alpha=0.7,
                  label="samples (after overflow)")
        max_length = (m.get("build") or {}).get("max_length")
        if max_length:
            ax.axvline(max_length, color="#a22", linestyle="--", label=f"max_length {max_length}")
        ax.set_xscale("log", base=2)
        ax.set_xlim(1, right)
        name = safe(m["dataset_name"]).replace("$", r"\$")  # not mathtext
        ax.set_title(f"{name}: {m.get('nlines', 0):,} records → "
                     f"{m['n_samples']:,} samples, {m['n_tokens']:,} tokens")
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("tokens per record / sample")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
