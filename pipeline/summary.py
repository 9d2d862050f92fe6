"""The one-screen summary at the end of a build."""
from __future__ import annotations

import sys


def print_summary(lock_path, plans, warnings) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"tokenmill build → {lock_path}")
    for c, j in (("dataset", "left"), ("status", "left"), ("samples", "right"), ("tokens", "right"),
                 ("trained", "right"), ("skipped", "right"), ("truncated", "right"), ("dir", "left")):
        table.add_column(c, justify=j)
    for p in plans:
        m = p.meta
        table.add_row(p.spec.dataset_name, "built" if p.status == "build" else "reused",
                      f"{m['n_samples']:,}", f"{m['n_tokens']:,}", f"{m['n_loss_tokens']:,}",
                      str(sum(m["skipped"].values())), str(m["truncated_samples"]), p.entry.final.name)
    console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for w in warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
