"""Assemble a dataset's dir from its finished work units: join consecutive units into shards
of about the target size, merge the units' statistics streaming, write meta.json last.
The driver reads only the unit summaries; each shard is joined and hashed by `join_shard` in
a worker (every shard byte is read there, not in the driver).

Units are kept one by one until then (crash-safe resume); the shard grouping is a pure
function of the units' token counts and the target size, so the dir is
byte-identical for any worker count or executor. Memory: one unit summary at a time plus
O(distinct lengths) for the statistics — independent of the number of samples or units.
"""
from __future__ import annotations

import os
from pathlib import Path

import orjson

from stages import stats
from stages.built_dataset import SCHEMA_VERSION, describe_shard, write_meta
from stages.shard import concat_shards, token_dtype

from .worker import unit_paths

FM9G_KEYS = ("language", "nlines", "nbytes", "length_distribute", "avg_token_per_line",
             "hdfs_path", "data_sample")  # first in meta.json, in FM9G's order


def _summaries(work: Path, units):
    for u in units:
        yield orjson.loads(unit_paths(str(work), u.index)[1].read_bytes())


def shard_groups(summaries, shard_tokens: int):
    """Consecutive unit summaries grouped into shards: a shard takes consecutive units, of
    any source files, while it stays within `shard_tokens` (a unit larger than the target is
    a shard alone). Provenance stays exact across files: a shard lists its files' sample runs
    (stages/shard.py), so 10^5 small files make few shards, not 10^5."""
    group, tokens = [], 0
    for s in summaries:
        if group and tokens + s["n_tokens"] > shard_tokens:
            yield group
            group, tokens = [], 0
        group.append(s)
        tokens += s["n_tokens"]
    if group:
        yield group


class _Totals:
    """The streaming sums over a dataset's units."""
    SUMS = ("records_read", "accepted", "n_tokens", "n_loss_tokens", "truncated_samples",
            "truncated_tokens", "dropped_tokens", "record_tokens")

    def __init__(self):
        self.sums = dict.fromkeys(self.SUMS, 0)
        self.records, self.samples = stats.LengthCounts(), stats.LengthCounts()
        self.skipped: dict[str, int] = {}
        self.notes: dict[str, int] = {}
        self.first = None

    def add(self, s: dict):
        for k in self.SUMS:
            self.sums[k] += s.get(k, 0)
        self.records.add(s["record_lengths"])
        self.samples.add(s["sample_lengths"])
        for k, v in s["skipped"].items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        for k, v in s.get("render_notes", {}).items():
            self.notes[k] = self.notes.get(k, 0) + v
        if self.first is None and s["first_record"] is not None:
            self.first = s["first_record"]


def join_shard(work: str, units: list[int], k: int) -> dict:
    """Shard k of a dataset from its finished units (run in a worker: it reads and hashes the
    shard's bytes); the unit files are consumed. → its meta.json entry."""
    name = Path(work) / f"shard-{k:05d}.h5"
    inputs = [unit_paths(work, u)[0] for u in units]
    if len(inputs) == 1:
        os.replace(inputs[0], name)  # the bytes concat_shards would write for one input
    else:
        tmp = name.with_suffix(".h5.tmp")
        concat_shards(inputs, tmp)
        os.replace(tmp, name)
        for p in inputs:
            p.unlink()
    return describe_shard(name)


def plan_shards(work: Path, units, shard_tokens: int, totals: _Totals) -> list[tuple[str, list[int], int]]:
    """The driver's part, O(units) and no shard bytes: the unit summaries merged into `totals`,
    rejects.jsonl written; → one `join_shard` call (work, unit indices, k) per shard."""
    calls, rejects = [], None
    try:
        for k, group in enumerate(shard_groups(_summaries(work, units), shard_tokens)):
            for s in group:
                totals.add(s)
                if s["rejects"]:
                    if rejects is None:
                        rejects = open(work / "rejects.jsonl", "wb")
                    rejects.write(b"".join(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) + b"\n"
                                           for r in s["rejects"]))
            calls.append((str(work), [s["unit"] for s in group], k))
    finally:
        if rejects is not None:
            rejects.close()
    return calls


def _serial(fn, calls):
    return [fn(*args) for args in calls]


def make_meta(plan, totals: _Totals, shards: list[dict], tok, template, mixture, encoder: str,
              shard_tokens: int) -> dict:
    """meta.json: FM9G's keys first in FM9G's order, then ours (docs/formats.md)."""
    spec, t = plan.spec, totals.sums
    nlines = t["accepted"]
    meta = {
        # FM9G: per source record, lengths before the overflow policy
        "language": spec.language, "nlines": nlines,
        "nbytes": sum(s["bytes"] for s in plan.sources),
        "length_distribute": totals.records.distribute(),
        "avg_token_per_line": t["n_tokens"] / nlines if nlines else 0.0,
        "hdfs_path": None, "data_sample": stats.truncate_sample(totals.first),
        # ours
        "schema_version": SCHEMA_VERSION, "dataset_name": spec.dataset_name, "key": plan.entry.key,
        "length_unit": "tokens",
        "records_read": t["records_read"],
        "record_tokens": t["record_tokens"],
        "record_length_percentiles": totals.records.percentiles(),
        "record_length_histogram": totals.records.histogram(),
        "n_samples": totals.samples.n, "n_tokens": t["n_tokens"], "n_loss_tokens": t["n_loss_tokens"],
        "sample_length_percentiles": totals.samples.percentiles(),
        "sample_length_histogram": totals.samples.histogram(),
        "tokenizer": tok.info(), "dtype": str(token_dtype(tok.vocab_size)),
        "template": {"name": template.name, "sha256": template.sha256},
        "sources": [{"path": s["path"], "bytes": s["bytes"], "hash": s["hash"]} for s in plan.sources],
        "transform": ({"path": spec.transforms, "sha256": plan.transform_sha256}
                      if spec.transforms else None),
        "build": {"format": str(plan.job.format), "max_length": mixture.max_length,
                  "overflow": plan.job.overflow, "loss": plan.job.loss, "seed": plan.job.seed,
                  "encoder": encoder, "shard_tokens": shard_tokens},
        "skipped": dict(sorted(totals.skipped.items())),
        "rejects": "rejects.jsonl" if sum(totals.skipped.values()) else None,
        "truncated_samples": t["truncated_samples"],
        "truncated_tokens": t["truncated_tokens"],
        "dropped_tokens": t["dropped_tokens"],
        "render_notes": dict(sorted(totals.notes.items())),  # records a layout rule decided for
        "shards": shards,
    }
    assert list(meta)[:len(FM9G_KEYS)] == list(FM9G_KEYS)
    return meta


def assemble(plan, tok, template, mixture, encoder: str, shard_tokens: int, run=_serial) -> dict:
    """Join the units of a built plan into shards and write meta.json (last: the dir is valid
    from then on). `run(fn, calls)`: runs the per-shard joins, in parallel
    (pipeline.executors.map_calls), results in order."""
    work = plan.entry.partial
    totals = _Totals()
    shards = run(join_shard, plan_shards(work, plan.units, shard_tokens, totals))
    meta = make_meta(plan, totals, shards, tok, template, mixture, encoder, shard_tokens)
    for u in plan.units:
        unit_paths(str(work), u.index)[1].unlink()
    write_meta(work, meta, sort_keys=False)
    return meta
