"""The one-screen summary at the end of a build."""
from __future__ import annotations

import sys


def print_summary(lock_path, plans, warnings) -> None:
    """lock_path None: the build ended without a lock (every record set aside)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .inspect import safe  # names from a manifest: no raw control characters on the terminal
    title = f"tokenmill build → {lock_path}" if lock_path else "tokenmill build (no lock written)"
    table = Table(title=escape(safe(title)))
    for c, j in (("dataset", "left"), ("status", "left"), ("samples", "right"), ("tokens", "right"),
                 ("trained", "right"), ("skipped", "right"), ("truncated", "right"), ("encoder", "left"),
                 ("dir", "left")):
        table.add_column(c, justify=j)
    checks = [getattr(p, "template_check", None) for p in plans]  # --check-template results
    if any(checks):
        table.add_column("template check", justify="left")
    for p, check in zip(plans, checks):
        m = p.meta
        row = [escape(safe(p.spec.dataset_name)), "built" if p.status == "build" else "reused",
               f"{m['n_samples']:,}", f"{m['n_tokens']:,}", f"{m['n_loss_tokens']:,}",
               str(sum(m["skipped"].values())), str(m["truncated_samples"]),
               m["build"].get("encoder", ""), escape(safe(p.entry.final.name))]
        if any(checks):
            row.append(check.short if check else "")
        table.add_row(*row)
    console = Console(stderr=False, width=None if sys.stdout.isatty() else 160)
    console.print(table)
    for p in plans:  # why the fast path was or was not used (pipeline/encoders.py)
        if p.status == "build" and p.encoder_note:
            console.print(f"encoder for {escape(safe(p.spec.dataset_name))}: {escape(p.encoder_note)}",
                          highlight=False)
    ray_nodes = next((p.ray_nodes for p in plans if p.ray_nodes), None)
    if ray_nodes:  # the spread over the cluster (a build stuck on one node shows here)
        console.print(f"ray: {sum(ray_nodes.values())} units ran on {len(ray_nodes)} node(s) ("
                      + ", ".join(f"{n[:8]}: {c}" for n, c in sorted(ray_nodes.items())) + ")",
                      highlight=False)
    for p in plans:  # why records were set aside, and where they are listed
        skipped = p.meta["skipped"]
        if skipped:
            reasons = ", ".join(f"{r} {n:,}" for r, n in skipped.items())
            where = f" (listed in {p.entry.final / 'rejects.jsonl'})" if p.meta.get("rejects") else ""
            console.print(escape(safe(f"skipped in {p.spec.dataset_name}: {reasons}{where}")), highlight=False)
    for w in warnings:
        if w.startswith("note: "):
            console.print(escape(safe(w)), highlight=False)
        else:
            console.print(f"[yellow]warning:[/yellow] {escape(safe(w))}", highlight=False)
