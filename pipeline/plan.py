"""`pipeline plan`: a dry run. For each dataset: built / reusable / to build, its tokens and
samples (exact from meta.json once built, else estimated from a sample of records), its token
share, and how many epochs a token budget gives it."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from mixtures.lock import LockError, load_lock
from stages.built_dataset import BuiltMeta
from stages.errors import RecordError
from stages.render import Renderer

from mixtures.manifest import load_manifest

from .build import default_cache, default_out, plan_datasets
from .cache import FingerprintMemo
from .reuse import LazyTokenizer, resolve
from .sampling import sample_records

SAMPLE_RECORDS = 200
REPEAT_WARN = 10.0


@dataclass
class PlanRow:
    dataset: str
    status: str  # built | reusable | to build
    tokens: float
    samples: float
    estimated: bool
    share: float
    allow_repeat: bool
    epochs: float | None = None


def _sampled(plan) -> tuple[list, int]:
    """(canonical records, their raw bytes): the first records as a build sees them —
    adapted and transformed, by the one sampler the encoder check and --check-template use."""
    sample = sample_records(plan.job, plan.units, SAMPLE_RECORDS, scan=SAMPLE_RECORDS * 5)
    return sample.records, sample.raw_bytes


def _estimate(plan, renderer: Renderer) -> tuple[float, float]:
    """(tokens, samples) from the first records, scaled by the sources' bytes."""
    recs, raw_bytes = _sampled(plan)
    enc = [e for e in renderer.encode_batch(recs) if not isinstance(e, RecordError)]
    if not enc or not raw_bytes:
        return 0.0, 0.0
    total_bytes = sum(s["bytes"] for s in plan.sources)
    records = total_bytes * len(recs) / raw_bytes
    cap = None if plan.job.overflow == "segment" else plan.job.max_length  # segment keeps all
    mean_len = sum(min(len(e.ids), cap or len(e.ids)) for e in enc) / len(enc)
    return records * mean_len, records


def make_plan(manifest: str, *, out: str | None = None, cache: str | None = None,
              tokens: float | None = None, tokenizer=None, template=None, max_length=None,
              trust_remote_code: bool | None = None, shard_tokens: int | None = None):
    mixture = load_manifest(manifest, shard_tokens=shard_tokens, tokenizer=tokenizer, template=template,
                            max_length=max_length, trust_remote_code=trust_remote_code)
    out_dir = Path(out) if out else default_out(manifest)
    cache_dir = Path(cache) if cache else default_cache(out_dir)
    tok = LazyTokenizer(mixture.tokenizer, mixture.trust_remote_code)  # loaded only to estimate
    memo = FingerprintMemo(cache_dir) if cache_dir.is_dir() else None
    plans, tmpl = plan_datasets(mixture, tok, resolve(cache_dir, mixture.template, tok, real=not cache_dir.is_dir()),
                                cache_dir, memo.data if memo else {}, "skip")
    locked = set()
    rows, warnings = [], [f"note: {n}" for n in mixture.notes]
    lock_path = out_dir / "mixture.lock.json"
    if lock_path.is_file():
        try:
            locked = {e.key for e in load_lock(lock_path).datasets}
        except LockError as e:  # the next build rewrites it; the plan still stands
            warnings.append(f"the existing lock is not used ({str(e).splitlines()[0]})")
    for spec, plan in zip(mixture.datasets, plans):
        if plan.entry.is_valid():
            meta = BuiltMeta.read(plan.entry.final)
            status = "built" if plan.entry.key in locked else "reusable"
            n_tok, n_samp, est = float(meta.n_tokens), float(meta.n_samples), False
        else:
            switches = json.loads(plan.job.template_kwargs) if plan.job.template_kwargs else None
            renderer = Renderer(tok.real, tmpl, plan.job.loss, template_kwargs=switches)
            (n_tok, n_samp), status, est = _estimate(plan, renderer), "to build", True
        rows.append(PlanRow(spec.dataset_name, status, n_tok, n_samp, est, 0.0, spec.allow_repeat))
    # The lock's rule (mixtures.lock.make_lock): share ∝ abs_weight, or × tokens under `weights: tokens`
    weight = [s.abs_weight * (r.tokens if mixture.weights == "tokens" else 1.0)
              for s, r in zip(mixture.datasets, rows)]
    for spec, row, w in zip(mixture.datasets, rows, weight):
        row.share = w / sum(weight) if sum(weight) else 0.0
        n_tok = row.tokens
        if tokens:
            want = row.share * tokens
            row.epochs = want / n_tok if n_tok else float("inf")
            if not spec.allow_repeat and row.epochs > 1:
                warnings.append(f"{spec.dataset_name}: allow_repeat is false and it holds "
                                f"{n_tok:,.0f} tokens but its share of the budget is {want:,.0f}: it runs "
                                f"out after {100 / row.epochs:.0f}% of the budget and the others' "
                                "shares grow")
            elif row.epochs > REPEAT_WARN:
                warnings.append(f"{spec.dataset_name}: repeats {row.epochs:.1f} times over the budget")
    if memo:
        memo.save()  # fingerprints and unit plans: the next plan/build does not read the bytes again
    return rows, warnings


def print_plan(rows, warnings, tokens: float | None) -> None:
    from rich.console import Console
    from rich.table import Table
    title = "tokenmill plan" + (f" for {tokens:,.0f} tokens" if tokens else "")
    legend = "~ = estimated from a sample of records (not built yet)"
    table = Table(title=title, caption=legend if any(r.estimated for r in rows) else None)
    for c in ("dataset", "status", "tokens", "samples", "share", "epochs", "repeat"):
        table.add_column(c, justify="left" if c in ("dataset", "status") else "right")
    for r in rows:
        mark = "~" if r.estimated else ""
        table.add_row(r.dataset, r.status, f"{mark}{r.tokens:,.0f}", f"{mark}{r.samples:,.0f}",
                      f"{r.share:.3f}", "-" if r.epochs is None else f"{r.epochs:.2f}",
                      "yes" if r.allow_repeat else "no")
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    from rich.markup import escape
    for w in warnings:
        console.print(escape(w) if w.startswith("note: ") else f"[yellow]warning:[/yellow] {escape(w)}",
                      highlight=False)
