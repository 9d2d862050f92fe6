"""`pipeline show`: one sample decoded, trained spans marked (green on a terminal,
⟦brackets⟧ otherwise), each trained span preceded by the role and message it trains
(`[assistant#3]`: message 3 of the record, counted from 0 after the format is adapted).

The roles are not stored in the shards: the sample's source record (its provenance, from
stages.built_dataset `BuiltDataset.provenance`: file, record and piece, whichever shard format) is read
again and re-rendered with what meta.json names — format, transform, template, tokenizer,
loss mode, max_length and overflow — and the result must give exactly the stored ids and
spans. When it does not (the source, transform, template or tokenizer changed since the
build), the sample is shown as stored, without labels, and a note says why. A segmented
sample (overflow: segment) is matched to its piece of the record.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from mixtures.lock import load_lock
from mixtures.manifest import DEFAULT_SEED
from stages.built_dataset import BuiltMeta, Provenance, open_built
from stages.errors import BuildError, RecordError
from stages.columns import DatasetFormat
from stages.jinja_env import available_templates
from stages.overflow import stored_piece_starts
from stages.render import Encoded, Explained

from .verify import built_dirs


def locate_sample(d: Path, index: int):
    """Global sample index → (meta.json, shard arrays, index within shard, provenance)."""
    ds = open_built(d)
    if not 0 <= index < ds.n_samples:
        raise BuildError(f"{d.name}: index {index} out of range (0 … {ds.n_samples - 1})")
    j, i = ds.locate(index)
    return ds.meta, ds.shard_arrays(j), i, ds.provenance(index)


class _NoLabels(Exception):
    """Why the trained spans cannot be labelled (shown as a note)."""


# -- the terminal display ------------------------------------------------------------
GREEN, DIM, RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def marked_text(tok, ids, spans, color: bool = False, labels: list[str] | None = None) -> str:
    """The decoded sample with trained spans marked: green on a terminal (`color`), else
    ⟦…⟧. `labels[k]` (e.g. "assistant#3") is written in front of trained span k."""
    ids = np.asarray(ids)
    spans = [(0, len(ids))] if spans is None else [tuple(map(int, s)) for s in spans]
    out, pos = [], 0
    for k, (s, e) in enumerate(spans):
        if pos < s:
            text = tok.decode(ids[pos:s].tolist())
            out.append(f"{DIM}{text}{RESET}" if color else text)
        label = f"[{labels[k]}]" if labels and k < len(labels) and labels[k] else ""
        text = tok.decode(ids[s:e].tolist())
        out.append(f"{DIM}{label}{RESET}{GREEN}{text}{RESET}" if color else f"{label}⟦{text}⟧")
        pos = e
    if pos < len(ids):
        text = tok.decode(ids[pos:].tolist())
        out.append(f"{DIM}{text}{RESET}" if color else text)
    return "".join(out)


def span_labels(explained: Explained, messages: list[dict] | None = None) -> list[str]:
    """For each trained span of an explained sample, the role and turn it trains
    ("assistant#3"; "all" under loss: all; "text" for documents)."""
    out = []
    for s, e in (explained.encoded.spans if explained.encoded.spans is not None
                 else [(0, len(explained.encoded.ids))]):
        names = [f"{role}#{msg}" if msg >= 0 else role for rs, re_, msg, role in explained.regions
                 if rs < e and re_ > s]
        out.append("+".join(dict.fromkeys(names)))
    return out


def _read_record(source: str, rec: int):
    from stages.readers import iter_unit, plan_units
    if not os.path.exists(source):
        raise _NoLabels(f"its source {source} no longer exists")
    units = [u for u in plan_units([source]) if u.first_record <= rec]
    if units:
        for r, raw in iter_unit(units[-1]):
            if r == rec:
                return raw
            if r > rec:
                break
    raise _NoLabels(f"{source} has no record {rec + 1} any more")


def _template(meta: dict, tok, template: str | None):
    from stages.render import resolve_template
    name, sha = meta["template"]["name"], meta["template"]["sha256"]
    if template is None:
        if name != "tokenizer" and name not in available_templates():
            raise _NoLabels(f"it was built with the template file {name}.jinja, whose path meta.json "
                            "does not keep; pass --template FILE.jinja")
        template = name
    tmpl = resolve_template(template, tok)
    if tmpl.sha256 != sha:
        raise _NoLabels(f"template {template!r} is not the one the dataset was built with (sha256 differs)")
    return tmpl


def _piece(full: Encoded, k: int, max_length: int, overflow: str) -> int:
    """Start, in the whole record's ids, of its k-th stored sample (pieces with nothing to
    train are not stored under overflow: segment)."""
    starts = stored_piece_starts(len(full.ids), max_length, overflow, full.spans)
    if k >= len(starts):
        raise _NoLabels("the record re-rendered now gives fewer pieces than were stored")
    return starts[k]


def _trusted_transform(transform: dict, named: str | None):
    """Raise _NoLabels unless the build's transform may run here: the file's hash is compared
    before anything is imported, and a path read from meta.json (a data dir may be crafted or
    shared) is imported only when the user names that same file (`--transform FILE`)."""
    import hashlib
    path = transform["path"]
    if named is None:
        raise _NoLabels(f"it was built with the transform {path}, which show runs only when you name it "
                        "(--transform FILE): a path read from a data dir is never imported on its own")
    if Path(named).resolve() != Path(path).resolve():
        raise _NoLabels(f"--transform {named} is not the file the dataset was built with ({path})")
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise _NoLabels(f"its transform {path} cannot be read ({e.strerror})") from None
    if digest != transform["sha256"]:
        raise _NoLabels(f"the transform {path} changed since the build (sha256 differs)")


def explain_sample(meta: dict, prov: Provenance, arrays, i: int, tok, *, seed: int,
                   template: str | None = None, named_transform: str | None = None) -> tuple[list[str], str]:
    """Labels of the trained spans of sample i of a shard (see module doc) whose provenance
    is `prov`, and a line on which piece of its record it is ("" when the record gave one
    sample). Raises _NoLabels."""
    from mixtures.transforms import TransformError
    from stages.render import Renderer

    from .worker import DatasetJob, canonicalize

    source, rec, k = prov.file, prov.record, prov.piece
    if tok.sha256 != meta["tokenizer"]["sha256"]:
        raise _NoLabels(f"the tokenizer {tok.path} changed since the build")
    tmpl = _template(meta, tok, template)
    build, transform = meta["build"], meta.get("transform")
    job = DatasetJob(meta["dataset_name"], build["format"], tok.path, tmpl.name, build["max_length"],
                     build["overflow"], build.get("loss", "assistant"), transform and transform["path"],
                     seed, on_error="skip", work_dir="")
    try:
        if transform:
            _trusted_transform(transform, named_transform)
        canonical = canonicalize(job, rec, _read_record(source, rec), source)
    except TransformError as e:
        raise _NoLabels(f"its record now fails: {e}") from None
    if isinstance(canonical, RecordError):
        why = "the transform now skips its record" if canonical.reason == "transform_skipped" else \
            f"its record now fails: {canonical}"
        raise _NoLabels(why)
    explained = Renderer(tok, tmpl, meta["build"].get("loss", "assistant")).explain(canonical)
    if isinstance(explained, RecordError):
        raise _NoLabels(f"its record now fails: {explained.located(source, rec)}")
    full = explained.encoded
    start = _piece(full, k, meta["build"]["max_length"], meta["build"]["overflow"])
    ids = np.asarray(arrays.sample(i), dtype=np.int64)
    stored = arrays.spans(i)
    end = start + len(ids)
    spans = None if full.spans is None else np.clip(full.spans.astype(np.int64) - start, 0, len(ids))
    if spans is not None:
        spans = spans[spans[:, 1] > spans[:, 0]]
    if not np.array_equal(full.ids[start:end], ids) or (
            stored is not None and spans is not None and not np.array_equal(spans, stored)):
        raise _NoLabels(f"its record {rec} ({source}:{rec + 1}) re-rendered now gives other tokens than "
                        "the stored sample: the source was edited since the build")
    regions = [(max(rs - start, 0), min(re_ - start, len(ids)), msg, role)
               for rs, re_, msg, role in explained.regions if rs < end and re_ > start]
    piece = Explained(Encoded(ids, stored), regions, [], "")
    n_pieces = len(ids) != len(full.ids)
    where = (f"tokens {start}…{end - 1} of the record's {len(full.ids)} (stored piece {k + 1} of the record, "
             f"overflow: {meta['build']['overflow']})") if n_pieces else ""
    return span_labels(piece), where


def show(path: str, index: int = 0, dataset: str | None = None, color: bool | None = None,
         template: str | None = None, trust_remote_code: bool = False, transform: str | None = None) -> int:
    """Print sample `index` of a built dir (or of `dataset` of a lock). `template`: the .jinja
    file it was built with; `transform`: the transform script it was built with, named by the
    user (never imported from meta.json alone; its sha256 must match)."""
    dirs = built_dirs(path)
    if dataset:
        dirs = [d for d in dirs if BuiltMeta.read(d).dataset_name == dataset]
        if not dirs:
            raise BuildError(f"no dataset named {dataset!r} in {path}")
    d = dirs[0]
    meta, arrays, i, prov = locate_sample(d, index)
    ids = np.asarray(arrays.sample(i), dtype=np.int64)
    spans = arrays.spans(i)
    from stages.tokenizer import load_tokenizer
    tok = load_tokenizer(meta["tokenizer"]["path"], trust_remote_code=trust_remote_code)
    color = sys.stdout.isatty() if color is None else color
    n_trained = len(ids) if spans is None else int((spans[:, 1] - spans[:, 0]).sum())
    print(f"{meta['dataset_name']} sample {index}: {len(ids)} tokens, {n_trained} trained "
          f"({len(spans) if spans is not None else 1} span(s)), source record "
          f"{prov.record} of {prov.file or 'its source file'}")
    labels = None
    if DatasetFormat.parse(meta["build"]["format"]).is_text or spans is None:
        print("a document: every token trains")
    else:
        seed = meta["build"].get("seed")  # the seed the transform ran with (older builds: the lock's)
        if seed is None:
            seed = load_lock(path).seed if Path(path).is_file() else DEFAULT_SEED
        try:
            labels, where = explain_sample(meta, prov, arrays, i, tok, seed=seed, template=template,
                                           named_transform=transform)
            if where:
                print(f"this sample is {where}")
        except _NoLabels as e:
            print(f"note: trained spans are not labelled with their roles: {e}")
    how = "green" if color else "inside ⟦ ⟧"
    if labels:
        how += ", after [role#message] (message index in the record, from 0)"
    print(f"trained text is {how}:\n")
    print(marked_text(tok, ids, spans, color=color, labels=labels))
    return 0
