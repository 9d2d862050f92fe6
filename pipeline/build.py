"""`pipeline build`: manifest → built (or reused) dataset dirs → mixture lock.

The driver plans work units for every dataset that is not already in the cache, runs them
on a process pool (or in-process with one worker), then assembles each dataset's dir in unit
order. Units depend only on the data, so the result is byte-identical for any worker count.
"""
from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from mixtures.lock import make_lock, write_lock
from mixtures.manifest import DatasetSpec, Mixture, load_manifest
from mixtures.transforms import load_transform
from stages.errors import BuildError, RecordError
from stages.formats import detect_format
from stages.readers import expand_source, iter_unit, plan_units
from stages.render import resolve_template
from stages.shard import read_shard, token_dtype
from stages import stats
from stages.tokenizer import load_tokenizer

from .cache import CacheEntry, FingerprintMemo, dataset_key, dir_fingerprint, file_fingerprint
from .progress import Progress
from .encoders import choose_encoder
from .executors import run_local, run_ray
from .worker import DatasetJob, faults, job_renderer

SCHEMA_VERSION = 1


@dataclass
class DatasetPlan:
    spec: DatasetSpec
    entry: CacheEntry
    job: DatasetJob
    sources: list[dict]
    units: list = field(default_factory=list)
    status: str = "reuse"  # reuse | build
    meta: dict | None = None
    seconds: float = 0.0
    template_check: object = None  # pipeline.check.DatasetCheck under --check-template
    encoder_note: str = ""  # which encoder built it, and why (pipeline/encoders.py)


def _detect(units, spec: DatasetSpec) -> str:
    for unit in units:
        for rec, raw in iter_unit(unit):
            if isinstance(raw, RecordError):
                continue
            try:
                return detect_format(raw)
            except RecordError as e:
                raise BuildError(f"{spec.dataset_name}: {unit.file}:{rec + 1}: {e.detail}") from None
    raise BuildError(f"{spec.dataset_name}: no readable record to detect the format from")


def plan_dataset(spec: DatasetSpec, mixture: Mixture, tok, template, cache: Path, memo,
                 on_error: str) -> DatasetPlan:
    files = expand_source(spec.path)
    sources = []
    for f in files:
        digest = dir_fingerprint(f, memo) if os.path.isdir(f) else file_fingerprint(f, memo)
        size = (os.path.getsize(os.path.join(f, "data.jsonl")) if os.path.isdir(f)
                else os.path.getsize(f))
        sources.append({"path": f, "name": os.path.basename(f), "bytes": size, "hash": digest})
    paragraphs = spec.text_unit == "paragraph"
    units = plan_units(files, txt_paragraphs=paragraphs)
    fmt = spec.format if spec.format != "auto" else _detect(units, spec)
    transform_sha = load_transform(spec.transforms).sha256 if spec.transforms else None
    loss = spec.loss
    key = dataset_key(sources=sources, format=fmt, transform_sha256=transform_sha,
                      seed=mixture.seed, template_sha256=template.sha256,
                      tokenizer_sha256=tok.sha256, max_length=mixture.max_length,
                      overflow=spec.overflow, loss=loss, txt_paragraphs=paragraphs)
    entry = CacheEntry(cache, spec.dataset_name, key)
    job = DatasetJob(spec.dataset_name, fmt, tok.path, mixture.template, mixture.max_length,
                     spec.overflow, loss, spec.transforms, mixture.seed, on_error, str(entry.partial),
                     trust_remote_code=mixture.trust_remote_code)
    return DatasetPlan(spec, entry, job, sources, units)


def assemble(plan: DatasetPlan, summaries: list[dict], tok, template, mixture: Mixture) -> dict:
    """Rename unit files into shards, compute statistics from the shards, write meta.json."""
    work = plan.entry.partial
    shards, lengths, skipped, rejects = [], [], {}, []
    for s in summaries:
        name = f"shard-{s['unit']:05d}.h5"
        os.replace(work / f"unit-{s['unit']:05d}.h5", work / name)
        arr = read_shard(work / name)  # offsets only; tokens stay on disk
        lengths.append(np.diff(arr.offsets))
        shards.append({"file": name, "n_samples": s["n_samples"], "n_tokens": s["n_tokens"],
                       "sha256": s["sha256"]})
        for k, v in s["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        rejects.extend(s["rejects"])
    for s in summaries:
        (work / f"unit-{s['unit']:05d}.json").unlink()
    lengths_a = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    n_tokens = int(lengths_a.sum())
    nlines = sum(s["accepted"] for s in summaries)
    first = next((s["first_record"] for s in summaries if s["first_record"] is not None), None)
    if rejects:
        (work / "rejects.jsonl").write_bytes(b"".join(
            orjson.dumps(r, option=orjson.OPT_SORT_KEYS) + b"\n" for r in rejects))
    spec = plan.spec
    meta = {
        # FM9G keys, from real token counts
        "language": spec.language, "nlines": nlines,
        "nbytes": sum(s["bytes"] for s in plan.sources),
        "length_distribute": stats.length_distribute(lengths_a),
        "avg_token_per_line": n_tokens / nlines if nlines else 0.0,
        "hdfs_path": None, "data_sample": stats.truncate_sample(first),
        # ours
        "schema_version": SCHEMA_VERSION, "dataset_name": spec.dataset_name, "key": plan.entry.key,
        "length_unit": "tokens", "n_samples": int(len(lengths_a)), "n_tokens": n_tokens,
        "n_loss_tokens": sum(s["n_loss_tokens"] for s in summaries),
        "records_read": sum(s["records_read"] for s in summaries),
        "length_percentiles": stats.length_percentiles(lengths_a),
        "length_histogram": stats.length_histogram(lengths_a),
        "tokenizer": tok.info(), "dtype": str(token_dtype(tok.vocab_size)),
        "template": {"name": template.name, "sha256": template.sha256},
        "sources": [{"path": s["path"], "bytes": s["bytes"], "hash": s["hash"]} for s in plan.sources],
        "transform": ({"path": spec.transforms, "sha256": load_transform(spec.transforms).sha256}
                      if spec.transforms else None),
        "build": {"format": plan.job.format, "max_length": mixture.max_length,
                  "overflow": spec.overflow, "loss": plan.job.loss, "seed": plan.job.seed,
                  "encoder": job_renderer(plan.job).tok.encoder},
        "skipped": dict(sorted(skipped.items())),
        "rejects": "rejects.jsonl" if rejects else None,
        "truncated_samples": sum(s["truncated_samples"] for s in summaries),
        "truncated_tokens": sum(s["truncated_tokens"] for s in summaries),
        "shards": shards,
    }
    tmp = work / "meta.json.tmp"
    tmp.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    os.replace(tmp, work / "meta.json")  # written last: the dir is valid from here on
    return meta


def build_mixture(manifest: str, *, out: str | None = None, cache: str | None = None,
                  workers: int | None = None, on_error: str = "fail", force: bool = False,
                  tokenizer: str | None = None, template: str | None = None,
                  max_length: int | None = None, executor: str = "local", ray_address: str | None = None,
                  progress: Progress | None = None, trust_remote_code: bool | None = None,
                  check_template: int = 0, check_against: str = "tokenizer",
                  ) -> tuple[Path, list[DatasetPlan], list[str]]:
    """Build or reuse every dataset of a manifest and write the lock. → (lock path, plans, warnings)
    check_template N: first compare N samples per dataset with the reference (pipeline/check.py)."""
    mixture = load_manifest(manifest, tokenizer=tokenizer, template=template, max_length=max_length,
                            trust_remote_code=trust_remote_code)
    out_dir = Path(out) if out else Path(manifest).resolve().parent / "build"
    cache_dir = Path(cache or os.environ.get("TOKENMILL_CACHE") or out_dir / "cache")
    cache_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    progress = progress or Progress()
    if executor not in ("local", "ray"):
        raise BuildError(f"unknown executor {executor!r}: local or ray")

    tok = load_tokenizer(mixture.tokenizer, trust_remote_code=mixture.trust_remote_code)
    tmpl = resolve_template(mixture.template, tok)
    memo = FingerprintMemo(cache_dir)
    plans = [plan_dataset(s, mixture, tok, tmpl, cache_dir, memo.data, on_error) for s in mixture.datasets]
    memo.save()
    if check_template:  # before any work: a difference stops the build here
        from .check import check_datasets
        check_datasets(plans, mixture, tok, tmpl, check_template, check_against)

    with ExitStack() as locks:
        # Lock in key order (no deadlock between builds of different manifests), then re-check
        # validity: a concurrent build may have finished the dataset while we waited.
        for plan in sorted(plans, key=lambda p: p.entry.final.name):
            if force or not plan.entry.is_valid():
                locks.enter_context(plan.entry.lock)
        for plan in plans:
            if force or not plan.entry.is_valid():
                plan.status = "build"
                if force and plan.entry.partial.exists():  # --force: no unit of a killed run either
                    shutil.rmtree(plan.entry.partial)
                plan.entry.partial.mkdir(parents=True, exist_ok=True)
                plan.job, plan.encoder_note = choose_encoder(plan.job, plan.units)
        tasks = [(p, u) for p in plans if p.status == "build" for u in p.units]
        progress.start(plans)
        t0 = time.perf_counter()
        if executor == "ray":
            shared = sorted({u.file for _, u in tasks} | {str(cache_dir.resolve())})
            results = run_ray(tasks, ray_address, progress, shared)
        else:
            results = run_local(tasks, workers, progress)
        for plan in plans:
            if plan.status == "build":
                summaries = [results[(plan.spec.dataset_name, u.index)] for u in plan.units]
                plan.meta = assemble(plan, summaries, tok, tmpl, mixture)
                plan.entry.publish(replace=force)
                plan.seconds = time.perf_counter() - t0
        progress.close()
    for plan in plans:
        if plan.meta is None:
            plan.meta = orjson.loads((plan.entry.final / "meta.json").read_bytes())
            if on_error == "fail" and faults(plan.meta["skipped"]):
                raise BuildError(
                    f"{plan.spec.dataset_name}: the cached build {plan.entry.final} set aside "
                    f"{faults(plan.meta['skipped'])} bad records under --on-error skip "
                    f"({plan.entry.final / 'rejects.jsonl'}); use --on-error skip or --force")
        plan.entry.touch()
    lock, warnings = make_lock(mixture, [(p.spec, str(p.entry.final), p.meta) for p in plans])
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / "mixture.lock.json"
    write_lock(lock, lock_path)
    return lock_path, plans, warnings
