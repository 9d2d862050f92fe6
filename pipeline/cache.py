"""The content-addressed cache of built datasets (DESIGN §4).

`<cache>/<dataset_name>-<key16>/` is valid only once its meta.json exists; work in progress
lives in `<…>.partial/` beside it, and `<…>.lock` serialises builds of one key across
processes (two builds sharing a cache build each dataset once).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import xxhash
from filelock import FileLock

from stages.readers import UNIT_BYTES
from stages.render import RENDER_VERSION
from stages.shard import FORMAT_VERSION

KEY_VERSION = 1  # bump when the pipeline's output for the same inputs changes
_FINGERPRINTS = ".fingerprints.json"
_TRUST_AFTER_S = 2.0  # a file modified this recently may change again within one mtime tick


def file_fingerprint(path: str, memo: dict | None = None) -> str:
    """xxh3-128 of a file's bytes. A memo skips re-reading a file whose size, inode, mtime and
    ctime are all unchanged: ctime moves on every write and cannot be set back (unlike mtime,
    which `touch -d`, `cp -p` or rsync restore), so an edited file is never missed."""
    st = os.stat(path)
    real = os.path.realpath(path)
    stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    if memo is not None:
        hit = memo.get(real)
        if hit and hit[:-1] == stamp and time.time() - st.st_ctime > _TRUST_AFTER_S:
            return hit[-1]
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if memo is not None:
        memo[real] = [*stamp, digest]
    return digest


def dir_fingerprint(path: str, memo: dict | None = None) -> str:
    """FM9G index dirs: the files that define the records."""
    names = [n for n in ("data.jsonl", "index", "index.h5") if os.path.exists(os.path.join(path, n))]
    return xxhash.xxh3_128("|".join(
        f"{n}:{file_fingerprint(os.path.join(path, n), memo)}" for n in names).encode()).hexdigest()


class FingerprintMemo:
    def __init__(self, cache_dir: Path):
        self.path = cache_dir / _FINGERPRINTS
        try:
            self.data = orjson.loads(self.path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            self.data = {}

    def save(self):
        with FileLock(str(self.path) + ".lock"):
            try:
                merged = orjson.loads(self.path.read_bytes())
            except (FileNotFoundError, orjson.JSONDecodeError):
                merged = {}
            merged.update(self.data)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(orjson.dumps(merged, option=orjson.OPT_SORT_KEYS))
            os.replace(tmp, self.path)


def dataset_key(*, sources: list[dict], format: str, transform_sha256: str | None, seed: int,
                template_sha256: str, tokenizer_sha256: str, max_length: int, overflow: str,
                loss: str, txt_paragraphs: bool, shard_tokens: int | None = None) -> str:
    """sha256 over everything that decides the shards' bytes — and nothing else
    (not output paths, not worker counts). `shard_tokens` (the assemble step's target shard
    size) is part of the key whenever given."""
    parts = {
        "key_version": KEY_VERSION, "format_version": FORMAT_VERSION,
        "sources": [[s["name"], s["bytes"], s["hash"]] for s in sources],
        "format": format, "transform": transform_sha256,
        "seed": seed if transform_sha256 else None,  # only a transform's `r` uses the seed
        "template": template_sha256, "tokenizer": tokenizer_sha256,
        "max_length": max_length, "overflow": overflow, "loss": loss,
        "txt_paragraphs": txt_paragraphs, "unit_bytes": UNIT_BYTES, "render_version": RENDER_VERSION,
    }
    if shard_tokens is not None:
        parts["shard_tokens"] = int(shard_tokens)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    cache: Path
    dataset_name: str
    key: str

    @property
    def final(self) -> Path:
        return self.cache / f"{self.dataset_name}-{self.key[:16]}"

    @property
    def partial(self) -> Path:
        return self.final.with_name(self.final.name + ".partial")

    @property
    def lock(self) -> FileLock:
        return FileLock(str(self.final) + ".lock")

    def is_valid(self) -> bool:
        return (self.final / "meta.json").is_file()

    def touch(self):
        """Record last use (for `cache list` / `cache gc --older-than`)."""
        (self.final / ".last_used").write_text(str(int(time.time())))

    def publish(self, replace: bool):
        """Move a finished partial dir into place (meta.json already written inside)."""
        if self.final.exists():
            if not replace:
                shutil.rmtree(self.partial)
                return
            old = self.final.with_name(self.final.name + f".old-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.partial, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, self.final)


def list_entries(cache: Path) -> list[dict]:
    rows = []
    for d in sorted(p for p in cache.iterdir() if p.is_dir() and (p / "meta.json").is_file()):
        meta = orjson.loads((d / "meta.json").read_bytes())
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        used = d / ".last_used"
        last = int(used.read_text()) if used.exists() else int((d / "meta.json").stat().st_mtime)
        rows.append({"dir": str(d), "dataset": meta.get("dataset_name", d.name), "key": meta.get("key", ""),
                     "bytes": size, "last_used": last})
    return rows


def gc(cache: Path, keep_keys: set[str] | None, older_than_s: float | None, dry_run: bool) -> list[str]:
    """Remove built dirs not referenced by the kept locks and/or unused for a while."""
    removed, now = [], time.time()
    for row in list_entries(cache):
        unreferenced = keep_keys is not None and row["key"] not in keep_keys
        stale = older_than_s is not None and now - row["last_used"] > older_than_s
        # Both given: remove only what is unreferenced AND stale; one given: that one decides.
        if (unreferenced or keep_keys is None) and (stale or older_than_s is None):
            removed.append(row["dir"])
            if not dry_run:
                with FileLock(row["dir"] + ".lock"):
                    shutil.rmtree(row["dir"], ignore_errors=True)
    return removed
