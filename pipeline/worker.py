"""One work unit: read → adapt (+ transform) → encode (render + tokenize) → overflow →
collect → shard file. The chain is `STEPS`, one generator per step, in one place.

Runs in a worker process (or in-process with --workers 1). Everything it needs travels in a
small picklable `DatasetJob`; the tokenizer and template are loaded once per process.
A finished unit is renamed into place atomically, so a killed build keeps it.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import orjson

from mixtures.transforms import TransformError, apply_transform, load_transform
from stages import stats
from stages.errors import POLICY_REASONS, RecordError
from stages.columns import DatasetFormat
from stages.formats import ADAPTERS
from stages.overflow import apply_overflow
from stages.readers import WorkUnit, iter_unit
from stages.render import Renderer, resolve_template
from stages.shard import ShardArrays, token_dtype, write_shard
from stages.tokenizer import load_tokenizer

BATCH = 512  # records tokenized per encode_batch call: bounds memory, amortises the call


@dataclass(frozen=True)
class DatasetJob:
    dataset_name: str
    format: DatasetFormat  # resolved, never "auto" (its string form is read back)
    tokenizer: str
    template: str
    max_length: int
    overflow: str
    loss: str
    transform: str | None
    seed: int
    on_error: str  # fail | skip
    work_dir: str  # the dataset's partial dir
    trust_remote_code: bool = False  # run the tokenizer dir's own loader (not in the cache key)
    encoder: str = "default"  # "fastokens" | "tiktoken": a fast engine for an HF byte-level BPE (pipeline/encoders.py)
    template_kwargs: str | None = None  # the dataset's template switches (JSON), in the cache key

    def __post_init__(self):
        object.__setattr__(self, "format", DatasetFormat.parse(self.format))  # meta.json's string form too


@lru_cache(maxsize=4)
def _renderer(tokenizer: str, template: str, loss: str, trust_remote_code: bool = False,
              encoder: str = "default", template_kwargs: str | None = None) -> Renderer:
    tok = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    if encoder != "default" and tok.kind == "hf":
        tok = tok.with_engine(encoder)
    return Renderer(tok, resolve_template(template, tok), loss,
                    template_kwargs=json.loads(template_kwargs) if template_kwargs else None)


def job_renderer(job: DatasetJob) -> Renderer:
    return _renderer(job.tokenizer, job.template, job.loss, job.trust_remote_code, job.encoder, job.template_kwargs)


def canonicalize(job: DatasetJob, rec: int, raw, source: str):
    """One raw record → its canonical form (adapted, then the dataset's transform), or the
    RecordError that refused it."""
    try:
        if isinstance(raw, RecordError):
            raise raw
        canonical = ADAPTERS[job.format](raw)
        if job.transform:
            canonical = _call_transform(job, canonical, rec, source)
            if canonical is None:
                raise RecordError("transform_skipped", "the transform returned None")
        return canonical
    except RecordError as e:
        return e


def canonical_records(job: DatasetJob, unit: WorkUnit):
    """(record number, raw record, `canonicalize` of it), in file order: every record of the
    unit as every build of this dataset sees it."""
    for rec, raw in iter_unit(unit):
        yield rec, raw, canonicalize(job, rec, raw, unit.file)


def _call_transform(job: DatasetJob, canonical, rec: int, source: str):
    """apply_transform, with a transform's sys.exit() (or other BaseException short of Ctrl-C)
    turned into the TransformError a raise gives: in a pool worker it would end the process."""
    try:
        return apply_transform(_transform(job.transform), canonical, seed=job.seed,
                               dataset_name=job.dataset_name, record_index=rec, source=source)
    except (TransformError, RecordError, KeyboardInterrupt):
        raise
    except BaseException as e:  # SystemExit (older transforms.py), GeneratorExit: the script's bug
        import traceback
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip("\n")
        what = f"it called sys.exit({e.code!r})" if isinstance(e, SystemExit) else type(e).__name__
        raise TransformError(f"transform {job.transform} failed on dataset {job.dataset_name!r}, "
                             f"record {source}:{rec + 1}: {what}", tb) from None


@lru_cache(maxsize=16)
def _transform(path: str):
    return load_transform(path)


def faults(skipped: dict) -> int:
    """Set-aside records that --on-error fail would have stopped on."""
    return sum(n for reason, n in skipped.items() if reason not in POLICY_REASONS)


def unit_paths(work_dir: str, index: int) -> tuple[Path, Path]:
    base = Path(work_dir)
    return base / f"unit-{index:05d}.h5", base / f"unit-{index:05d}.json"


@dataclass
class _Unit:
    """What the steps of one unit share: the job, the unit, the renderer and the counts."""
    job: DatasetJob
    unit: WorkUnit
    renderer: Renderer
    acc: "_Accumulator"


def read(u: _Unit, _):
    """→ (record number, raw record or the RecordError that refused its bytes)."""
    yield from iter_unit(u.unit)


def adapt(u: _Unit, records):
    """→ (record, raw, canonical): the format's adapter, then the dataset's transform."""
    for rec, raw in records:
        u.acc.records_read += 1
        canonical = canonicalize(u.job, rec, raw, u.unit.file)
        if isinstance(canonical, RecordError):
            u.acc.reject(canonical, rec)
            continue
        yield rec, raw, canonical


def encode(u: _Unit, records):
    """→ (record, raw, encoded): rendered through the template and tokenized, BATCH records
    per encoder call."""
    batch = []
    for item in records:
        batch.append(item)
        if len(batch) >= BATCH:
            yield from _encoded(u, batch)
            batch = []
    yield from _encoded(u, batch)


def _encoded(u: _Unit, batch):
    for (rec, raw, _), enc in zip(batch, u.renderer.encode_batch([c for _, _, c in batch])):
        if isinstance(enc, RecordError):
            u.acc.reject(enc, rec)
            continue
        yield rec, raw, enc


def overflow(u: _Unit, records):
    """→ (record, raw, encoded, samples, tokens lost): the overflow policy at max_length."""
    for rec, raw, enc in records:
        try:
            samples, lost = [], 0
            for part in enc.parts or [enc]:  # loss per_turn: each turn its own sample
                got, cut = apply_overflow(part, u.job.max_length, u.job.overflow)
                samples, lost = samples + got, lost + cut
        except RecordError as e:  # overflow left nothing: the record's tokens are dropped
            u.acc.reject(e, rec)
            u.acc.dropped_tokens += len(enc.ids)
            continue
        yield rec, raw, enc, samples, lost


STEPS = (read, adapt, encode, overflow)  # each a generator over the one before; then collect, write


def process_unit(job: DatasetJob, unit: WorkUnit) -> dict:
    """Build one unit's shard through STEPS; return its summary (also saved beside the shard).
    Every record read is either a sample or a reject counted with its reason."""
    shard_path, summary_path = unit_paths(job.work_dir, unit.index)
    if shard_path.exists() and summary_path.exists():  # finished by an earlier, killed run
        done = orjson.loads(summary_path.read_bytes())
        if not (job.on_error == "fail" and faults(done["skipped"])):  # else redo: fail with file:line
            return done
    u = _Unit(job, unit, job_renderer(job), _Accumulator(job, unit))
    stream = None
    for step in STEPS:
        stream = step(u, stream)
    for rec, raw, enc, samples, lost in stream:  # collect
        u.acc.accept(rec, raw, len(enc.ids), samples, lost)
        u.acc.render_notes.update(getattr(enc, "notes", ()))  # what the layout rules decided
    return u.acc.finish(shard_path, summary_path, u.renderer)  # write


class _Accumulator:
    """Samples and counts of one unit, in record order."""

    def __init__(self, job: DatasetJob, unit: WorkUnit):
        self.job, self.unit = job, unit
        self.records_read = self.accepted = 0
        self.tokens: list[np.ndarray] = []
        self.spans: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.n_spans: list[int] = []
        self.source_record: list[int] = []
        self.skipped: Counter = Counter()
        self.rejects: list[dict] = []
        self.record_lengths: list[int] = []  # full token length of each accepted record, pre-overflow
        self.truncated_samples = self.truncated_tokens = self.n_loss_tokens = 0
        self.dropped_tokens = 0  # tokens of records the overflow policy set aside whole
        self.render_notes: Counter = Counter()  # stages.layouts.NOTES name -> accepted records
        self.first_record = None

    def reject(self, e: RecordError, rec: int):
        e.located(self.unit.file, rec)
        if self.job.on_error == "fail" and e.reason not in POLICY_REASONS:
            raise e
        self.skipped[e.reason] += 1
        # "line": 1-based record number, the N of fail mode's `file:N` (docs/formats.md)
        self.rejects.append({"source": self.unit.file, "line": rec + 1, "reason": e.reason,
                             "field": e.field, "detail": e.detail})

    def accept(self, rec: int, raw, record_length: int, samples, lost: int):
        self.accepted += 1
        self.record_lengths.append(record_length)
        if self.first_record is None:
            self.first_record = raw
        if lost or len(samples) > 1:
            self.truncated_samples += lost > 0
            self.truncated_tokens += lost
        for s in samples:
            self.tokens.append(s.ids)
            self.lengths.append(len(s.ids))
            self.source_record.append(rec)
            self.n_loss_tokens += s.n_trained
            if s.spans is not None:
                self.spans.append(s.spans)
                self.n_spans.append(len(s.spans))
            else:
                full = np.array([[0, len(s.ids)]], dtype=np.int32)
                self.spans.append(full)
                self.n_spans.append(1)

    def finish(self, shard_path: Path, summary_path: Path, renderer: Renderer) -> dict:
        dtype = token_dtype(renderer.tok.vocab_size)
        tokens = np.concatenate(self.tokens).astype(dtype) if self.tokens else np.zeros(0, dtype)
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        with_spans = not self.job.format.is_text
        arrays = ShardArrays(tokens, offsets, np.array(self.source_record, dtype=np.int64))
        if with_spans:
            arrays.loss_spans = (np.concatenate(self.spans) if self.spans
                                 else np.zeros((0, 2), np.int32))
            lso = np.zeros(len(self.n_spans) + 1, dtype=np.int64)
            np.cumsum(self.n_spans, out=lso[1:])
            arrays.loss_span_offsets = lso
        tmp = shard_path.with_suffix(".h5.tmp")
        sha = write_shard(tmp, arrays, self.unit.file)
        os.replace(tmp, shard_path)
        summary = {
            "unit": self.unit.index, "source": self.unit.file, "sha256": sha,
            "records_read": self.records_read, "accepted": self.accepted,
            "n_samples": len(self.lengths), "n_tokens": int(len(tokens)),
            "n_loss_tokens": int(self.n_loss_tokens), "skipped": dict(sorted(self.skipped.items())),
            "truncated_samples": int(self.truncated_samples),
            "truncated_tokens": int(self.truncated_tokens),
            "dropped_tokens": int(self.dropped_tokens),
            "render_notes": dict(sorted(self.render_notes.items())),
            "record_tokens": int(sum(self.record_lengths)),
            "record_lengths": stats.length_counts(self.record_lengths),
            "sample_lengths": stats.length_counts(self.lengths),
            "rejects": self.rejects, "first_record": self.first_record,
        }
        tmp = summary_path.with_suffix(".json.tmp")
        tmp.write_bytes(orjson.dumps(summary, option=orjson.OPT_SORT_KEYS))
        os.replace(tmp, summary_path)
        return summary
