"""`sample_records`: the one way to take a sample of a dataset's records as the workers see them.

Records are read from the dataset's work units in file order, adapted and transformed exactly as
a build does (`worker.canonical_records`), so everything computed from a sample — the encoder
check (pipeline/encoders.py), `--check-template` (pipeline/check.py) and plan's estimates —
sees the transform's output, not the raw file. Records that fail to adapt or that the
transform skips are counted in `passed` (the build itself reports them); a transform that
raises propagates its TransformError.
"""
from __future__ import annotations

from collections import Counter
from contextlib import closing
from dataclasses import dataclass, field

import orjson

from stages.errors import RecordError

from .worker import DatasetJob, canonical_records


@dataclass
class Sample:
    records: list = field(default_factory=list)  # canonical records, in the order taken
    where: list = field(default_factory=list)  # (file, 0-based record number) of each
    passed: Counter = field(default_factory=Counter)  # {reason: n} records read but not taken
    read: int = 0  # raw records read (taken + passed over)
    raw_bytes: int = 0  # bytes of those raw records (a JSON record: its compact JSON + newline)

    def __len__(self) -> int:
        return len(self.records)


def _raw_size(raw) -> int:
    if isinstance(raw, str):
        return len(raw.encode()) + 1
    if isinstance(raw, RecordError):
        return 0
    try:
        return len(orjson.dumps(raw)) + 1
    except TypeError:
        return 0


def sample_records(job: DatasetJob, units, n: int, *, spread: bool = False, max_units: int | None = None,
                   chars: int | None = None, scan: int | None = None) -> Sample:
    """Up to `n` canonical records of the dataset `job` from `units` (its WorkUnits, in order).

    spread=False: the first n records that adapt, in source order, reading at most `scan` raw
      records (None: no limit) and stopping once `chars` characters are taken (None: no limit).
    spread=True: an equal share from each of the first `max_units` units — n // units records
      read per unit (at least one) and chars // units characters per unit — so a sample is not
      just the head of the first file.
    Sizes count `repr(record)` of the canonical record."""
    units = list(units)[:max_units] if max_units else list(units)
    out = Sample()
    if spread:
        quota = max(1, n // max(len(units), 1))
        unit_chars = None if chars is None else chars // max(len(units), 1)
    for unit in units:
        taken_chars = 0
        read_here = 0
        with closing(canonical_records(job, unit)) as it:
            for rec, raw, canonical in it:
                if spread:
                    if read_here >= quota:
                        break
                elif len(out.records) >= n or (scan is not None and out.read >= scan) or \
                        (chars is not None and taken_chars > chars):
                    return out
                read_here += 1
                out.read += 1
                out.raw_bytes += _raw_size(raw)
                if isinstance(canonical, RecordError):
                    out.passed[canonical.reason] += 1
                    continue
                out.records.append(canonical)
                out.where.append((unit.file, rec))
                if chars is not None:
                    taken_chars += len(repr(canonical))
                    if spread and taken_chars > unit_chars:
                        break
        if not spread:
            chars = None if chars is None else chars - taken_chars
            if chars is not None and chars < 0:
                return out
    return out
