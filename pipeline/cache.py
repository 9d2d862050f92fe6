"""The content-addressed cache of built datasets (DESIGN §4).

`<cache>/<dataset_name>-<key16>/` is valid only once its meta.json exists; work in progress
lives in `<…>.partial/` beside it, and `<…>.lock` serialises builds of one key across
processes (two builds sharing a cache build each dataset once).

A cache may be shared (a team's dir, another user's, a read-only mount): reusing a fully built
one writes nothing there (the fingerprint memo falls back to a per-user state dir, `.last_used`
is skipped), and no path in it is trusted to be what its name says — the partial and final
dirs and the lock files are never followed through a symlink.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import xxhash

from stages.built_dataset import BuiltMeta, DatasetError
from stages.errors import BuildError
from stages.fsutil import atomic_write_bytes
from stages.readers import UNIT_BYTES, file_stamp, memoised_digest
from stages.render import RENDER_VERSION
from stages.shard import FORMAT_VERSION

# 2: .txt sources lose a leading BOM, directory sources skip hidden entries, truncated
# containers are faults (issue 16) — the same inputs may give other shards than under 1.
# 3: shards span source files (format 2: source_files + source_file_offsets; issue 13).
KEY_VERSION = 3  # bump when the pipeline's output for the same inputs changes
_FINGERPRINTS = ".fingerprints.json"
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def state_dir() -> Path:
    """Per-user bookkeeping for caches this user cannot write (XDG base-dir spec)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "tokenmill"


def file_fingerprint(path: str, memo: dict | None = None) -> str:
    """xxh3-128 of a file's bytes. A memo skips re-reading a file whose size, inode, mtime and
    ctime are all unchanged (`stages.readers.file_stamp`)."""
    try:
        hit = memoised_digest(memo, path)
        if hit:
            return hit
        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except OSError as e:
        raise BuildError(f"{path}: cannot read: {e.strerror or e}") from None
    digest = h.hexdigest()
    if memo is not None and file_stamp(os.stat(path)) == file_stamp(st):  # unchanged while hashed
        memo[os.path.realpath(path)] = [*file_stamp(st), digest]
    return digest


def dir_fingerprint(path: str, memo: dict | None = None) -> str:
    """FM9G index dirs: the files that define the records."""
    names = [n for n in ("data.jsonl", "index", "index.h5") if os.path.exists(os.path.join(path, n))]
    return xxhash.xxh3_128("|".join(
        f"{n}:{file_fingerprint(os.path.join(path, n), memo)}" for n in names).encode()).hexdigest()


class _FileLock:
    """An exclusive flock on a lock file opened without following a symlink (a planted link
    would otherwise be created or truncated wherever it points)."""

    def __init__(self, path: str | Path):
        self.path, self.fd = str(path), None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _load_json(path: Path) -> dict:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


class FingerprintMemo:
    """Source digests and line-file unit plans by stat stamp (stages.readers.memoised_digest).
    Kept in the cache dir; where that is not writable, in the per-user state dir. Not saving it
    only costs the next build a re-read, so a failure to save is a `note`, not an error."""

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / _FINGERPRINTS
        tag = hashlib.sha256(os.path.realpath(cache_dir).encode()).hexdigest()[:16]
        self.fallback = state_dir() / "fingerprints" / f"{tag}.json"
        self.data = {**_load_json(self.fallback), **_load_json(self.path)}
        self._saved = dict(self.data)
        self.note: str | None = None

    def save(self) -> Path | None:
        """Merge our entries into the memo file (others' builds may have added theirs)."""
        if self.data == self._saved:
            return None  # nothing new: a no-op build writes nothing
        errors = []
        for target in (self.path, self.fallback):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with _FileLock(target.with_name(target.name + ".lock")):
                    merged = {**_load_json(target), **self.data}
                    atomic_write_bytes(target, orjson.dumps(merged, option=orjson.OPT_SORT_KEYS))
                self._saved = dict(self.data)
                return target
            except OSError as e:
                errors.append(f"{target.parent}: {e.strerror or e}")
        self.note = (f"source fingerprints not saved ({'; '.join(errors)}): the next build re-reads "
                     "the sources")
        return None


def dataset_key(*, sources: list[dict], format: str, transform_sha256: str | None, seed: int,
                template_sha256: str, tokenizer_sha256: str, max_length: int, overflow: str,
                loss: str, txt_paragraphs: bool, shard_tokens: int | None = None,
                template_kwargs: str | None = None) -> str:
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
    if template_kwargs is not None:  # the dataset's template switches (manifest template_kwargs)
        parts["template_kwargs"] = template_kwargs
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a real dir tree."""
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _not_writable(cache: Path, what: str, e: OSError) -> BuildError:
    return BuildError(f"{cache}: the cache dir is not writable ({e.strerror or e}): cannot build {what} "
                      "there (a read-only cache can only reuse datasets already built in it); "
                      "give --cache (or TOKENMILL_CACHE) a writable dir")


def ensure_cache_dir(cache: Path) -> Path:
    """The cache dir, created if missing; a path that cannot be created is one clear line."""
    try:
        Path(cache).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"{cache}: cannot create the cache dir: {e.strerror or e}") from None
    return Path(cache)


class _EntryLock:
    """The per-key build lock; a cache we cannot write fails here with one clear line."""

    def __init__(self, entry: "CacheEntry"):
        self.entry, self.lock = entry, _FileLock(str(entry.final) + ".lock")

    def __enter__(self):
        try:
            self.lock.__enter__()
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise BuildError(f"{self.lock.path}: the lock file is a symlink; refusing to follow it "
                                 "(remove it if you did not plant it)") from None
            if e.errno in _NOT_WRITABLE:
                raise _not_writable(self.entry.cache, self.entry.dataset_name, e) from None
            raise
        partial = self.entry.partial
        st = _lstat(partial)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(partial)  # a planted link: gone before anyone writes "into" it
        return self

    def __exit__(self, *exc):
        self.lock.__exit__(*exc)


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
    def lock(self) -> _EntryLock:
        return _EntryLock(self)

    def is_valid(self) -> bool:
        """A real dir (not a link) holding a non-empty regular meta.json, which is written last
        and atomically: a killed or disk-full build never leaves one."""
        top, meta = _lstat(self.final), _lstat(self.final / "meta.json")
        return (top is not None and stat.S_ISDIR(top.st_mode) and meta is not None
                and stat.S_ISREG(meta.st_mode) and meta.st_size > 0)

    def make_partial(self, fresh: bool = False) -> Path:
        """Create the partial dir exclusively (call under `lock`). A real dir left by a killed
        run is kept for resume unless `fresh`; a planted link or file there is removed, never
        followed."""
        st = _lstat(self.partial)
        if st is not None and (fresh or not stat.S_ISDIR(st.st_mode)):
            _remove(self.partial)
        try:
            os.mkdir(self.partial)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(self.partial).st_mode):
                raise BuildError(f"{self.partial}: replaced by a link or file while being created") from None
        except OSError as e:
            if e.errno in _NOT_WRITABLE:
                raise _not_writable(self.cache, self.dataset_name, e) from None
            raise
        return self.partial

    def touch(self) -> bool:
        """Record last use (for `cache list` / `cache gc --older-than`). → False where the cache
        is not writable: the bookkeeping is skipped, the reuse goes on."""
        try:
            atomic_write_bytes(self.final / ".last_used", str(int(time.time())).encode())
            return True
        except OSError:
            return False

    def publish(self, replace: bool) -> bool:
        """Move a finished partial dir into place (meta.json already written inside).
        → False when a valid build of the same key was already there and is kept.
        Whatever fails (a full disk), no half-moved dir is left under the final name."""
        if not replace and self.is_valid():
            _remove(self.partial)  # a concurrent build of the same key finished first
            return False
        st = _lstat(self.final)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            os.unlink(self.final)  # a planted link: replaced, its target untouched
            st = None
        if st is None:
            os.rename(self.partial, self.final)
            return True
        old = self.final.with_name(self.final.name + f".old-{os.getpid()}")
        os.rename(self.final, old)
        try:
            os.rename(self.partial, self.final)
        except OSError:
            os.rename(old, self.final)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return True


def _built_dirs(cache: Path) -> list[Path]:
    out = []
    for p in sorted(cache.iterdir()):
        st = _lstat(p)
        if st is not None and stat.S_ISDIR(st.st_mode) and (p / "meta.json").is_file():
            out.append(p)
    return out


def list_entries(cache: Path) -> list[dict]:
    """A row per built dir; a dir whose meta.json is invalid gets `invalid` (its reason) and an
    empty key: gc never removes what it cannot identify."""
    rows = []
    for d in _built_dirs(cache):
        try:
            meta = BuiltMeta.read(d)
            name, key, invalid = meta.dataset_name, meta.key, None
        except DatasetError as e:
            name, key, invalid = d.name, "", str(e)
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        used = d / ".last_used"
        try:
            last = int(used.read_text())
        except (OSError, ValueError):  # none yet, or a damaged one: the build's own time
            last = int((d / "meta.json").stat().st_mtime)
        rows.append({"dir": str(d), "dataset": name, "key": key, "bytes": size, "last_used": last,
                     "invalid": invalid})
    return rows


def gc(cache: Path, keep_keys: set[str] | None, older_than_s: float | None, dry_run: bool) -> list[str]:
    """Remove built dirs not referenced by the kept locks and/or unused for a while."""
    removed, now = [], time.time()
    for row in list_entries(cache):
        if row["invalid"]:
            continue  # not identifiable: left for the user (`cache list` shows why)
        unreferenced = keep_keys is not None and row["key"] not in keep_keys
        stale = older_than_s is not None and now - row["last_used"] > older_than_s
        # Both given: remove only what is unreferenced AND stale; one given: that one decides.
        if (unreferenced or keep_keys is None) and (stale or older_than_s is None):
            removed.append(row["dir"])
            if not dry_run:
                try:
                    with _FileLock(row["dir"] + ".lock"):
                        shutil.rmtree(row["dir"], ignore_errors=True)
                except OSError as e:
                    raise BuildError(f"{row['dir']}: cannot remove: {e.strerror or e}") from None
    return removed
