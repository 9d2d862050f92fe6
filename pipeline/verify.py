"""`pipeline verify`: structure and checksums of built dirs; every fault is named.

The checks are `stages.built_dataset.BuiltDataset.check("full")` (the one validator of the
built-dir contract); this module only finds the dirs (a dir, or every dir a lock names, with
the lock's entry so a path pointing at another dataset's dir is refused) and lists faults.
"""
from __future__ import annotations

from pathlib import Path

from mixtures.lock import load_lock
from stages.built_dataset import DatasetError, open_built


def built_dirs_with_entries(path: str) -> list[tuple[Path, dict | None, dict | None]]:
    """(dir, lock entry, lock tokenizer) for a built dataset dir, or for every dir a lock names."""
    p = Path(path)
    if p.is_dir():
        return [(p, None, None)]
    if not p.is_file():
        raise FileNotFoundError(f"{path}: not a built dataset dir or a lock file")
    lock = load_lock(p)  # validated against the lock schema; LockError names file and field
    out = []
    for entry, raw in zip(lock.datasets, lock.raw["datasets"]):
        d = Path(entry.path)
        out.append((d if d.is_absolute() else p.parent / d, raw, lock.tokenizer))
    return out


def built_dirs(path: str) -> list[Path]:
    """A built dataset dir, or every dir a lock names."""
    return [d for d, _, _ in built_dirs_with_entries(path)]


def verify_dir(d: Path, lock_entry: dict | None = None, lock_tokenizer: dict | None = None,
               level: str = "full") -> list[str]:
    """Every fault of one built dir (empty: sound). An unreadable or invalid meta.json is one
    fault, never a traceback."""
    try:
        return open_built(d).faults(level, lock_entry, lock_tokenizer)
    except DatasetError as e:
        return [str(e)]


def verify_path(path: str, level: str = "full") -> list[str]:
    """Faults of a dir or of every dir of a lock (the lock's key and tokenizer included)."""
    return [f for d, e, tok in built_dirs_with_entries(path) for f in verify_dir(d, e, tok, level)]
