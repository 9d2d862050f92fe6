"""`pipeline build`: manifest → built (or reused) dataset dirs → mixture lock.

The steps, each one function here, in `build_mixture`'s order:
  plan_datasets   a key and work units per dataset (the tokenizer loads only if work is left)
  claim           lock the datasets to build, choose each one's encoder (pipeline/encoders.py)
  run_units       every unit on the executor (pipeline/worker.py: read → adapt → encode →
                  overflow → collect → write, its `STEPS`)
  publish         sources re-hashed, units joined into shards and hashed in workers
                  (pipeline/assemble.py), meta.json, the dir renamed into place
  reuse           the cached dirs' meta.json, validated
  write_mixture_lock
Units depend only on the data, so the result is byte-identical for any worker count or executor.
"""
from __future__ import annotations

import errno
import functools
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from mixtures.lock import LockError, make_lock, write_lock
from mixtures.manifest import DatasetSpec, Mixture, default_overflow, load_manifest
from mixtures.transforms import load_transform, transform_cache_id
from stages.built_dataset import read_meta
from stages.column_scan import check_mapped_keys
from stages.columns import DatasetFormat
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
from .executors import map_calls, run_local, run_ray
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


def shard_tokens_of(spec: DatasetSpec) -> int:
    """Target shard size of a dataset: as the manifest resolved it (a dataset's own
    shard_tokens, then --shard-tokens, then the top level; default ~1 GiB of tokens)."""
    value = spec.shard_tokens
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


def _fingerprint(f: str, memo) -> str:
    return dir_fingerprint(f, memo) if os.path.isdir(f) else file_fingerprint(f, memo)


def source_entries(files: list[str], memo, run=None) -> list[dict]:
    """Each source file's path, size and content hash (the memo skips unchanged files).
    `run(fn, calls)` (no memo): hash the files in parallel (pipeline.executors.map_calls)."""
    digests = (run(_fingerprint, [(f, None) for f in files]) if run is not None and memo is None
               else [_fingerprint(f, memo) for f in files])
    sources = []
    for f, digest in zip(files, digests):
        size = (os.path.getsize(os.path.join(f, "data.jsonl")) if os.path.isdir(f)
                else os.path.getsize(f))
        sources.append({"path": f, "name": os.path.basename(f), "bytes": size, "hash": digest})
    return sources


def plan_dataset(spec: DatasetSpec, mixture: Mixture, tok, template, cache: Path, memo,
                 on_error: str) -> DatasetPlan:
    files = expand_source(spec.path)
    sources = source_entries(files, memo)
    paragraphs = spec.text_unit == "paragraph"
    units = plan_units(files, txt_paragraphs=paragraphs, memo=memo)
    fmt = spec.format if spec.format.base != "auto" else DatasetFormat(_detect(units, spec))
    check_mapped_keys(spec.dataset_name, fmt.column_map, units)  # stages/column_scan.py
    transform_sha = load_transform(spec.transforms).sha256 if spec.transforms else None
    loss = spec.loss
    overflow = spec.overflow or default_overflow(fmt.base)
    target = shard_tokens_of(spec)
    key = dataset_key(sources=sources, format=str(fmt), transform_sha256=transform_cache_id(transform_sha),
                      seed=mixture.seed, template_sha256=template.sha256,
                      tokenizer_sha256=tok.sha256, max_length=mixture.max_length,
                      overflow=overflow, loss=loss, txt_paragraphs=paragraphs,
                      shard_tokens=target, template_kwargs=spec.template_kwargs)
    check_name(spec.dataset_name, cache)
    entry = CacheEntry(cache, spec.dataset_name, key)
    job = DatasetJob(spec.dataset_name, fmt, tok.path, mixture.template, mixture.max_length,
                     overflow, loss, spec.transforms, mixture.seed, on_error, str(entry.partial),
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


def check_sources_unchanged(plan: DatasetPlan, run=None) -> None:
    """Issue 16: a source edited while its units were built must not be published under the
    hash of its old bytes. Re-hash every source now, bypassing the memo (stat + full read;
    in parallel with `run`), and refuse on any change; the partial dir is dropped so the next
    run starts clean."""
    files = [s["path"] for s in plan.sources]
    try:
        now = source_entries(files, None, run)
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


def plan_datasets(mixture: Mixture, tok: LazyTokenizer, template, cache_dir: Path, memo: dict,
                  on_error: str, force: bool = False):
    """A plan (key, units, job) per dataset. Keys need only the tokenizer's hash and the
    template's sha256, so a fully reused build never loads the tokenizer (pipeline/reuse.py);
    when a dataset has work to do the real template is resolved and, if a stale memo gave
    another sha256, every dataset is planned again with it. → (plans, template)"""
    def plan_all(tmpl):
        return [plan_dataset(s, mixture, tok, tmpl, cache_dir, memo, on_error) for s in mixture.datasets]
    plans = plan_all(template)
    if (force or not all(p.entry.is_valid() for p in plans)) and not tok.loaded:
        real = resolve(cache_dir, mixture.template, tok, real=True)
        if real.sha256 != template.sha256:
            plans = plan_all(real)
        template = real
    return plans, template


def claim(plans: list[DatasetPlan], force: bool, locks: ExitStack, run=None) -> list[DatasetPlan]:
    """Lock the datasets to build in key order (no deadlock between builds of different
    manifests), then re-check validity: a concurrent build may have finished one while we
    waited. Each one left gets a fresh partial dir and its encoder (pipeline/encoders.py)."""
    for plan in sorted(plans, key=lambda p: p.entry.final.name):
        if force or not plan.entry.is_valid():
            try:
                locks.enter_context(plan.entry.lock)
            except OSError as e:
                raise _fs_error(plan, e) from None
    todo = []
    for plan in plans:
        if force or not plan.entry.is_valid():
            plan.status = "build"
            _prepare(plan, force)
            plan.job, plan.encoder_note = choose_encoder(plan.job, plan.units, run)
            todo.append(plan)
    return todo


def run_units(plans, executor, workers, ray_address, progress, cache_dir) -> None:
    """Run every unit of the plans to build; the summaries stay on disk beside the units
    (assemble reads them back one at a time), so nothing per unit is kept here."""
    tasks = ((p, u) for p in plans for u in p.units)
    if executor == "ray":  # every node must see the sources and the cache (checked up front)
        shared = sorted({s["path"] for p in plans for s in p.sources} | {str(cache_dir.resolve())})
        nodes: dict = {}
        run_ray(tasks, ray_address, progress, shared, units_per_node=nodes)
        for p in plans:
            p.ray_nodes = nodes
    else:
        run_local(tasks, workers, progress)


PARALLEL_BYTES = 1 << 28  # a smaller dataset is published in the driver: a pool's start costs more


def publish(plan: DatasetPlan, tok, template, mixture: Mixture, run, force: bool) -> None:
    """A built plan's units → its dir in the cache: the sources re-hashed (unchanged while
    built), the shards joined and hashed by `run` (in parallel), meta.json written, the dir
    renamed into place."""
    if sum(s["bytes"] for s in plan.sources) < PARALLEL_BYTES:
        run = None
    check_sources_unchanged(plan, run)
    try:
        plan.meta = assemble(plan, tok, template, mixture, job_renderer(plan.job).tok.encoder,
                             plan.shard_tokens, *([run] if run else []))
        plan.entry.publish(replace=force)
    except OSError as e:
        raise _fs_error(plan, e) from None


def reuse(plan: DatasetPlan, on_error: str) -> None:
    """A cached plan's meta.json, validated (a crafted dir is one clear error)."""
    plan.meta = read_meta(plan.entry.final)
    if on_error == "fail" and faults(plan.meta["skipped"]):
        raise BuildError(
            f"{plan.spec.dataset_name}: the cached build {plan.entry.final} set aside "
            f"{faults(plan.meta['skipped'])} bad records under --on-error skip "
            f"({plan.entry.final / 'rejects.jsonl'}); use --on-error skip or --force")


def write_mixture_lock(mixture: Mixture, plans: list[DatasetPlan], out_dir: Path) -> tuple[Path, list[str]]:
    try:
        lock, warnings = make_lock(mixture, [(p.spec, str(p.entry.final), p.meta) for p in plans])
    except LockError as e:
        if all(p.meta["n_samples"] == 0 for p in plans if p.spec.abs_weight > 0):
            raise EmptyMixtureError(f"no lock written: {e}", plans) from None
        raise BuildError(str(e)) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / "mixture.lock.json"
    write_lock(lock, lock_path)
    return lock_path, warnings


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
    shard_tokens: target tokens per shard (a dataset's own wins; default: the manifest's, else ~1 GiB).

    The steps, in order: plan (keys, units) → check the template (optional) → claim (lock,
    choose the encoder) → run the units → publish each built dir → reuse the cached ones →
    write the lock."""
    mixture = load_manifest(manifest, shard_tokens=shard_tokens, tokenizer=tokenizer, template=template,
                            max_length=max_length, trust_remote_code=trust_remote_code)
    out_dir = Path(out) if out else default_out(manifest)
    cache_dir = ensure_cache_dir(Path(cache or default_cache(out_dir)))
    workers = workers or os.cpu_count() or 1
    progress = progress or Progress()
    if executor not in ("local", "ray"):
        raise BuildError(f"unknown executor {executor!r}: local or ray")
    run = functools.partial(map_calls, executor=executor, workers=workers)

    tok = LazyTokenizer(mixture.tokenizer, mixture.trust_remote_code)
    memo = FingerprintMemo(cache_dir)
    plans, tmpl = plan_datasets(mixture, tok, resolve(cache_dir, mixture.template, tok, real=bool(check_template)),
                                cache_dir, memo.data, on_error, force)
    memo.save()
    notes = list(mixture.notes) + ([memo.note] if memo.note else [])  # manifest keys ignored on purpose
    if check_template:  # before any work: a difference stops the build here
        from .check import check_datasets
        check_datasets(plans, mixture, tok.real, tmpl, check_template, check_against)

    with ExitStack() as locks:
        todo = claim(plans, force, locks, functools.partial(map_calls, workers=workers))  # probe: local
        progress.start(plans)
        t0 = time.perf_counter()
        run_units(todo, executor, workers, ray_address, progress, cache_dir)
        for plan in todo:
            publish(plan, tok.real, tmpl, mixture, run, force)
            plan.seconds = time.perf_counter() - t0
        progress.close()
    for plan in plans:
        if plan.meta is None:
            reuse(plan, on_error)
        if not plan.entry.touch() and not any("not writable" in n for n in notes):
            notes.append(f"{cache_dir} is not writable: last-use times (for cache gc) not updated")
    lock_path, warnings = write_mixture_lock(mixture, plans, out_dir)
    return lock_path, plans, [f"note: {n}" for n in notes] + warnings


def default_out(manifest: str) -> Path:
    return Path(manifest).resolve().parent / "build"


def default_cache(out_dir: Path) -> Path:
    """The cache a build uses: $TOKENMILL_CACHE, else <out>/cache (`cache list/gc` agree)."""
    return Path(os.environ.get("TOKENMILL_CACHE") or Path(out_dir) / "cache")
