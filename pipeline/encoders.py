"""Which encoder builds a dataset: the tiktoken fast path, or the tokenizer's own library.

For an HF byte-level BPE tokenizer that tiktoken can express (stages/fast_bpe.py), the fast
path is used on a dataset only after it gives exactly the HF tokenizer's ids and trained spans
on a sample of that dataset's own records (read, adapted and transformed as the build does,
rendered through the dataset's template). Otherwise the build falls back to HF `tokenizers`
and says why. Tokens never depend on which encoder ran: the choice is not in the cache key.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from stages.errors import RecordError

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


def choose_encoder(job: DatasetJob, units) -> tuple[DatasetJob, str]:
    """→ (the job with its encoder set, a one-line reason)."""
    plain_job, fast_job = (dataclasses.replace(job, encoder=e) for e in ("default", "tiktoken"))
    plain = job_renderer(plain_job)
    if plain.tok.kind != "hf":
        return plain_job, f"{plain.tok.encoder} (the tokenizer's own)"
    try:
        plain.tok.fast_bpe()
    except Exception as e:
        return plain_job, f"tokenizers (tiktoken cannot express it: {e})"
    records = sample_records(job, units, SAMPLE_RECORDS, spread=True, max_units=SAMPLE_UNITS,
                             chars=SAMPLE_CHARS).records
    if not records:
        return plain_job, "tokenizers (no record to check tiktoken on)"
    ours, ref = job_renderer(fast_job).encode_batch(records), plain.encode_batch(records)
    bad = next((i for i, (a, b) in enumerate(zip(ours, ref)) if not _same(a, b)), None)
    if bad is not None:
        return plain_job, f"tokenizers (tiktoken's ids differ from HF on sampled record {bad})"
    return fast_job, f"tiktoken (equal to HF on {len(records)} sampled records)"
