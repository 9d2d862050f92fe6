"""Which encoder builds a dataset: a fast engine, or the tokenizer's own library.

For an HF byte-level BPE tokenizer the engines are tried fastest first: `fastokens`
(stages/fastokens_bpe.py, optional), then tiktoken (stages/fast_bpe.py). An engine is used on
a dataset only after (1) the exhaustive code-point probe passed for this tokenizer's files and
the engine's version (pipeline/encoder_probe.py, cached) and (2) it gives exactly the HF
tokenizer's ids and trained spans on a sample of that dataset's own records (read, adapted
and transformed as the build does, rendered through the dataset's template). Otherwise the
build falls back to HF `tokenizers` and says why. Tokens never depend on which encoder ran:
the choice is not in the cache key; meta.json's build.encoder and the summary name it.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from stages.errors import RecordError

from .encoder_probe import describe, probe
from .sampling import sample_records
from .worker import DatasetJob, job_renderer

SAMPLE_RECORDS = 256   # records checked per dataset, spread over its first units
SAMPLE_UNITS = 16
SAMPLE_CHARS = 1 << 17  # and at most this much text (HF encodes it: keep it quick)


def _same(a, b) -> bool:
    if isinstance(a, RecordError) or isinstance(b, RecordError):
        return isinstance(a, RecordError) and isinstance(b, RecordError) and a.reason == b.reason
    if not np.array_equal(a.ids, b.ids):
        return False
    return (a.spans is None and b.spans is None) or (
        a.spans is not None and b.spans is not None and np.array_equal(a.spans, b.spans))


def choose_encoder(job: DatasetJob, units, run=None) -> tuple[DatasetJob, str]:
    """→ (the job with its encoder set, a one-line reason). The fastest engine that can
    express the tokenizer, passes the code-point probe and equals HF on the sample wins.
    `run(fn, calls)`: where the probe's slices run, the first time (pipeline.executors.map_calls)."""
    plain_job = dataclasses.replace(job, encoder="default")
    plain = job_renderer(plain_job)
    if plain.tok.kind != "hf":
        return plain_job, f"{plain.tok.encoder} (the tokenizer's own)"
    why, records, ref = [], None, None
    for name in plain.tok.ENGINES:
        try:
            plain.tok.engine(name)
        except Exception as e:
            why.append(f"{name} cannot express it: {e}")
            continue
        verdict = probe(plain.tok, name, run, job.trust_remote_code)
        if not verdict["ok"]:
            why.append(f"{name} differs from HF on code points {describe(verdict['differs'])}")
            continue
        if records is None:
            records = sample_records(job, units, SAMPLE_RECORDS, spread=True, max_units=SAMPLE_UNITS,
                                     chars=SAMPLE_CHARS).records
            if not records:
                return plain_job, "tokenizers (no record to check a fast engine on)"
            ref = plain.encode_batch(records)
        fast_job = dataclasses.replace(job, encoder=name)
        ours = job_renderer(fast_job).encode_batch(records)
        bad = next((i for i, (a, b) in enumerate(zip(ours, ref)) if not _same(a, b)), None)
        if bad is not None:
            why.append(f"{name}'s ids differ from HF on sampled record {bad}")
            continue
        return fast_job, (f"{name} (all code points and {len(records)} sampled records equal to HF"
                          + (f"; {'; '.join(why)}" if why else "") + ")")
    return plain_job, f"tokenizers ({'; '.join(why)})"
