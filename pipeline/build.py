"""`pipeline build`: manifest → built (or reused) dataset dirs → mixture lock.

The driver plans work units for every dataset that is not already in the cache, runs them
on a process pool (or in-process with one worker), then assembles each dataset's dir in unit
order. Units depend only on the data, so the result is byte-identical for any worker count.
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from mixtures.lock import LockError, make_lock, write_lock
from mixtures.manifest import DatasetSpec, Mixture, load_manifest
from mixtures.transforms import load_transform
from stages.built_dataset import read_meta
from stages.constants import DEFAULT_SHARD_TOKENS
from stages.errors import BuildError, RecordError
from stages.formats import detect_format
from stages.readers import expand_source, iter_unit, plan_units

from .assemble import assemble
from .cache import (CacheEntry, FingerprintMemo, dataset_key, dir_fingerprint, ensure_cache_dir,
                    file_fingerprint)
from .progress import Progress
from .reuse import LazyTokenizer, resolve
from .encoders import choose_encoder
from .executors import run_local, run_ray
from .worker import DatasetJob, faults, job_renderer


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
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # target tokens per shard (part of the key)
    transform_sha256: str | None = None
    ray_nodes: dict = field(default_factory=dict)  # Ray node id -> units it ran (the whole build)


class EmptyMixtureError(BuildError):
    """Every dataset was built but no record was kept: the lock cannot be written. Carries the
    plans so the CLI prints the summary table and the skip reasons above the error line."""

    def __init__(self, message: str, plans: list):
        super().__init__(message)
        self.plans = plans


def load_mixture(manifest: str, shard_tokens: int | None, **settings) -> tuple[Mixture, None]:
    """The manifest, with --shard-tokens applied by the manifest loader (a dataset's own
    shard_tokens wins, then --shard-tokens, then the top level). → (mixture, None: no override
    is left for the driver to apply)."""
    return load_manifest(manifest, shard_tokens=shard_tokens, **settings), None


def shard_tokens_of(spec: DatasetSpec, override: int | None) -> int:
    """Target shard size of a dataset: as the manifest resolved it (default ~1 GiB of tokens)."""
    value = override if override is not None else spec.shard_tokens
    if int(value) < 1:
        raise BuildError(f"{spec.dataset_name}: shard_tokens must be >= 1, got {value}")
    return int(value)


def _detect(units, spec: DatasetSpec) -> str:
    first_fault = None
    for unit in units:
        for rec, raw in iter_unit(unit):
            if isinstance(raw, RecordError):
                first_fault = first_fault or raw.located(unit.file, rec)
                continue
            try:
                return detect_format(raw)
            except RecordError as e:
                raise BuildError(f"{spec.dataset_name}: {unit.file}:{rec + 1}: {e.detail}") from None
    cause = f" (first fault: {first_fault})" if first_fault else ""
    raise BuildError(f"{spec.dataset_name}: no readable record to detect the format from{cause}")


def source_entries(files: list[str], memo) -> list[dict]:
    """Each source file's path, size and content hash (the memo skips unchanged files)."""
    sources = []
    for f in files:
        digest = dir_fingerprint(f, memo) if os.path.isdir(f) else file_fingerprint(f, memo)
        size = (os.path.getsize(os.path.join(f, "data.jsonl")) if os.path.isdir(f)
                else os.path.getsize(f))
        sources.append({"path": f, "name": os.path.basename(f), "bytes": size, "hash": digest})
    return sources


def plan_dataset(spec: DatasetSpec, mixture: Mixture, tok, template, cache: Path, memo,
                 on_error: str, shard_tokens: int | None = None) -> DatasetPlan:
    files = expand_source(spec.path)
    sources = source_entries(files, memo)
    paragraphs = spec.text_unit == "paragraph"
    units = plan_units(files, txt_paragraphs=paragraphs, memo=memo)
    fmt = spec.format if spec.format != "auto" else _detect(units, spec)
    transform_sha = load_transform(spec.transforms).sha256 if spec.transforms else None
    loss = spec.loss
    target = shard_tokens_of(spec, shard_tokens)
    key = dataset_key(sources=sources, format=fmt, transform_sha256=transform_sha,
                      seed=mixture.seed, template_sha256=template.sha256,
                      tokenizer_sha256=tok.sha256, max_length=mixture.max_length,
                      overflow=spec.overflow, loss=loss, txt_paragraphs=paragraphs,
                      shard_tokens=target, template_kwargs=spec.template_kwargs)
    check_name(spec.dataset_name, cache)
    entry = CacheEntry(cache, spec.dataset_name, key)
    job = DatasetJob(spec.dataset_name, fmt, tok.path, mixture.template, mixture.max_length,
                     spec.overflow, loss, spec.transforms, mixture.seed, on_error, str(entry.partial),
                     trust_remote_code=mixture.trust_remote_code, template_kwargs=spec.template_kwargs)
    return DatasetPlan(spec, entry, job, sources, units, shard_tokens=target,
                       transform_sha256=transform_sha)


_ENTRY_SUFFIX = "-0123456789abcdef.partial.lock"  # the longest name a key adds (also ".old-<pid>")


def check_name(name: str, cache: Path) -> None:
    """A dataset_name the manifest schema accepts but the filesystem cannot hold as a dir name
    (too long, a character with no file-name encoding) → one line naming the dataset."""
    try:
        encoded = os.fsencode(name)
    except UnicodeEncodeError as e:
        raise BuildError(f"dataset {name!r}: dataset_name cannot be a file name here "
                         f"({e.reason}: {name[e.start:e.end]!r}); rename it in the manifest") from None
    try:
        limit = os.pathconf(cache, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(encoded) + len(_ENTRY_SUFFIX) > limit:
        raise BuildError(f"dataset {name!r}: dataset_name too long for the filesystem "
                         f"({len(encoded)} bytes; at most {limit - len(_ENTRY_SUFFIX)} under {cache})")


def check_sources_unchanged(plan: DatasetPlan) -> None:
    """Issue 16: a source edited while its units were built must not be published under the
    hash of its old bytes. Re-hash every source now, bypassing the memo (stat + full read),
    and refuse on any change; the partial dir is dropped so the next run starts clean."""
    files = [s["path"] for s in plan.sources]
    try:
        now = source_entries(files, None)
    except (BuildError, OSError) as e:
        now, why = None, str(e)
    for before, after in zip(plan.sources, now or plan.sources):
        if now is None or (before["bytes"], before["hash"]) != (after["bytes"], after["hash"]):
            shutil.rmtree(plan.entry.partial, ignore_errors=True)
            what = why if now is None else (f"{before['bytes']} -> {after['bytes']} bytes, "
                                           f"hash {before['hash'][:12]} -> {after['hash'][:12]}")
            raise BuildError(f"{plan.spec.dataset_name}: source {before['path']} changed while it was "
                             f"being built ({what}); nothing was published: run the build again "
                             "once the file is final")


def _fs_error(plan: DatasetPlan, e: OSError) -> BuildError:
    """A dataset name the schema accepts but the filesystem refuses (too long, odd bytes), a
    full disk, … → one line naming the dataset and the path."""
    where = e.filename or plan.entry.partial
    return BuildError(f"dataset {plan.spec.dataset_name!r}: cannot write {where}: "
                      f"{e.strerror or e}" + (" (dataset_name too long for the filesystem)"
                                              if e.errno == errno.ENAMETOOLONG else ""))


def _prepare(plan: DatasetPlan, force: bool) -> None:
    try:
        plan.entry.make_partial(fresh=force)  # exclusive, never follows a planted link
    except OSError as e:
        raise _fs_error(plan, e) from None


def _run_units(plans, executor, workers, ray_address, progress, cache_dir) -> None:
    """Run every unit of the plans being built; the summaries stay on disk beside the units
    (assemble reads them back one at a time), so nothing per unit is kept here."""
    tasks = ((p, u) for p in plans if p.status == "build" for u in p.units)
    run = run_local if executor == "local" else run_ray
    def keep_nothing(plan, unit, summary):  # the executors stream; summaries are read back from disk
        return None
    if executor == "ray":  # every node must see the sources and the cache (checked up front)
        shared = sorted({s["path"] for p in plans if p.status == "build" for s in p.sources}
                        | {str(cache_dir.resolve())})
        nodes: dict = {}
        run(tasks, ray_address, progress, shared, on_result=keep_nothing, units_per_node=nodes)
        for p in plans:
            if p.status == "build":
                p.ray_nodes = nodes
    else:
        run(tasks, workers, progress, on_result=keep_nothing)


def build_mixture(manifest: str, *, out: str | None = None, cache: str | None = None,
                  workers: int | None = None, on_error: str = "fail", force: bool = False,
                  tokenizer: str | None = None, template: str | None = None,
                  max_length: int | None = None, executor: str = "local", ray_address: str | None = None,
                  progress: Progress | None = None, trust_remote_code: bool | None = None,
                  check_template: int = 0, check_against: str = "tokenizer",
                  shard_tokens: int | None = None,
                  ) -> tuple[Path, list[DatasetPlan], list[str]]:
    """Build or reuse every dataset of a manifest and write the lock. → (lock path, plans, warnings)
    check_template N: first compare N samples per dataset with the reference (pipeline/check.py).
    shard_tokens: target tokens per shard (default: the manifest's, else ~1 GiB)."""
    mixture, shard_tokens = load_mixture(manifest, shard_tokens, tokenizer=tokenizer, template=template,
                                         max_length=max_length, trust_remote_code=trust_remote_code)
    out_dir = Path(out) if out else default_out(manifest)
    cache_dir = ensure_cache_dir(Path(cache or default_cache(out_dir)))
    workers = workers or os.cpu_count() or 1
    progress = progress or Progress()
    if executor not in ("local", "ray"):
        raise BuildError(f"unknown executor {executor!r}: local or ray")

    # Keys need only the tokenizer's hash and the template's sha256: a fully reused build
    # never loads the tokenizer (pipeline/reuse.py).
    tok = LazyTokenizer(mixture.tokenizer, mixture.trust_remote_code)
    tmpl = resolve(cache_dir, mixture.template, tok, real=bool(check_template))
    memo = FingerprintMemo(cache_dir)

    def plan_all():
        return [plan_dataset(s, mixture, tok, tmpl, cache_dir, memo.data, on_error, shard_tokens)
                for s in mixture.datasets]

    plans = plan_all()
    if (force or not all(p.entry.is_valid() for p in plans)) and not tok.loaded:
        real = resolve(cache_dir, mixture.template, tok, real=True)  # work to do: the real one
        if real.sha256 != tmpl.sha256:
            tmpl = real
            plans = plan_all()
        tmpl = real
    memo.save()
    notes = list(mixture.notes)  # manifest keys ignored on purpose
    if memo.note:
        notes.append(memo.note)
    if check_template:  # before any work: a difference stops the build here
        from .check import check_datasets
        check_datasets(plans, mixture, tok.real, tmpl, check_template, check_against)

    with ExitStack() as locks:
        # Lock in key order (no deadlock between builds of different manifests), then re-check
        # validity: a concurrent build may have finished the dataset while we waited.
        for plan in sorted(plans, key=lambda p: p.entry.final.name):
            if force or not plan.entry.is_valid():
                try:
                    locks.enter_context(plan.entry.lock)
                except OSError as e:
                    raise _fs_error(plan, e) from None
        for plan in plans:
            if force or not plan.entry.is_valid():
                plan.status = "build"
                _prepare(plan, force)
                plan.job, plan.encoder_note = choose_encoder(plan.job, plan.units)
        progress.start(plans)
        t0 = time.perf_counter()
        _run_units(plans, executor, workers, ray_address, progress, cache_dir)
        for plan in plans:
            if plan.status == "build":
                check_sources_unchanged(plan)
                try:
                    plan.meta = assemble(plan, tok.real, tmpl, mixture,
                                         job_renderer(plan.job).tok.encoder, plan.shard_tokens)
                    plan.entry.publish(replace=force)
                except OSError as e:
                    raise _fs_error(plan, e) from None
                plan.seconds = time.perf_counter() - t0
        progress.close()
    for plan in plans:
        if plan.meta is None:
            plan.meta = read_meta(plan.entry.final)  # validated: a crafted dir is one clear error
            if on_error == "fail" and faults(plan.meta["skipped"]):
                raise BuildError(
                    f"{plan.spec.dataset_name}: the cached build {plan.entry.final} set aside "
                    f"{faults(plan.meta['skipped'])} bad records under --on-error skip "
                    f"({plan.entry.final / 'rejects.jsonl'}); use --on-error skip or --force")
        if not plan.entry.touch() and not any("not writable" in n for n in notes):
            notes.append(f"{cache_dir} is not writable: last-use times (for cache gc) not updated")
    try:
        lock, warnings = make_lock(mixture, [(p.spec, str(p.entry.final), p.meta) for p in plans])
    except LockError as e:
        if all(p.meta["n_samples"] == 0 for p in plans if p.spec.abs_weight > 0):
            raise EmptyMixtureError(f"no lock written: {e}", plans) from None
        raise BuildError(str(e)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / "mixture.lock.json"
    write_lock(lock, lock_path)
    return lock_path, plans, [f"note: {n}" for n in notes] + warnings


def default_out(manifest: str) -> Path:
    return Path(manifest).resolve().parent / "build"


def default_cache(out_dir: Path) -> Path:
    """The cache a build uses: $TOKENMILL_CACHE, else <out>/cache (`cache list/gc` agree)."""
    return Path(os.environ.get("TOKENMILL_CACHE") or Path(out_dir) / "cache")
