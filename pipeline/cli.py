"""Command line (DESIGN §2). Thin: parse, call, map faults to exit codes (1 data, 2 usage).

Usage errors go through argparse (exit 2). Only the faults a user can fix — bad data, a bad
manifest, a missing file, a full disk — become one `error:` line (exit 1); anything else is
a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from stages.strict_cli import StrictParser  # no abbreviations; an unknown flag names the closest


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _positive(text: str) -> int:
    """An integer >= 1; `1e9`-style spellings of an integer accepted."""
    try:
        n = int(text)
    except ValueError:
        f = float(text)  # ValueError here: argparse says "invalid _positive value"
        if not f.is_integer():
            raise argparse.ArgumentTypeError(f"must be an integer, got {text}") from None
        n = int(f)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _days(text: str) -> float:
    """A finite number of days >= 0: `--older-than -1` (or nan) would match every dir."""
    import math
    days = float(text)  # ValueError: argparse says "invalid _days value"
    if not math.isfinite(days) or days < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of days >= 0, got {text}")
    return days


def _parents() -> dict[str, argparse.ArgumentParser]:
    """Flags shared by several commands, defined once."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--out", help="output dir of the lock (default: build/ beside the manifest)")
    where.add_argument("--cache", help="cache dir of built datasets (default: $TOKENMILL_CACHE, "
                                       "else <out>/cache)")
    settings = argparse.ArgumentParser(add_help=False)
    settings.add_argument("--tokenizer", help="tokenizer dir or file, overriding the manifest's "
                                              "(required for the FM9G list form)")
    settings.add_argument("--template", help="chat template, overriding the manifest's: tokenizer, "
                                             "chatml, none, hunyuan, hy3, a LLaMA-Factory name "
                                             "(qwen3, llama3, hy_v3, ...) or a .jinja file")
    settings.add_argument("--max-length", type=_positive, metavar="N",
                          help="tokens per sample, overriding the manifest's")
    settings.add_argument("--shard-tokens", type=_positive, default=None, metavar="N",
                          help="target tokens per shard file, consecutive units joined up to it; "
                               "part of the cache key (default: the manifest's shard_tokens, else 2^30)")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--trust-remote-code", action="store_true", default=None,
                        help="let transformers run a loader shipped in the tokenizer dir (auto_map); "
                             "off unless given")
    return {"where": where, "settings": settings, "remote": remote}


def _parser() -> argparse.ArgumentParser:
    p = StrictParser(prog="python -m pipeline", description="tokenmill data pipeline")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    par = _parents()
    manifest = "mixture manifest (.json/.yaml, object or FM9G list form)"

    b = sub.add_parser("build", help="build (or reuse) every dataset of a mixture and write the lock",
                       parents=[par["where"], par["settings"], par["remote"]])
    b.add_argument("manifest", help=manifest)
    b.add_argument("--workers", type=_positive, default=None, metavar="N",
                   help="worker processes (default: all cores)")
    b.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where units run: local processes, or Ray tasks (sources and cache on a "
                        "shared path) (default: local)")
    b.add_argument("--ray-address", help="Ray cluster address (default: start or attach a local one)")
    b.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="bad records: stop naming file:line (fail), or count and set them aside in "
                        "rejects.jsonl (skip) (default: fail)")
    b.add_argument("--force", action="store_true",
                   help="rebuild even when a valid build exists, and redo the units a killed build left")
    b.add_argument("--check-template", type=_count, default=0, metavar="N",
                   help="first compare N samples per chat dataset with tokenizer.apply_chat_template; "
                        "any difference in ids or trained positions stops the build (default: 0, off)")
    b.add_argument("--check-against", choices=("tokenizer", "template"), default="tokenizer",
                   help="--check-template reference: the tokenizer's own chat template or the "
                        "build's template (default: tokenizer)")

    pl = sub.add_parser("plan", help="dry run: built / reusable / to build, tokens, shares, epochs",
                        parents=[par["where"], par["settings"], par["remote"]])
    pl.add_argument("manifest", help=manifest)
    pl.add_argument("--tokens", type=float, metavar="N", help="token budget of the run (default: none)")
    pl.add_argument("--steps", type=_positive, metavar="S",
                    help="with --global-batch-tokens: budget = S × T tokens")
    pl.add_argument("--global-batch-tokens", type=_positive, metavar="T",
                    help="tokens per optimizer step, with --steps")

    i = sub.add_parser("inspect", help="statistics table and length histograms")
    i.add_argument("path", help="built dataset dir or mixture lock")
    i.add_argument("--plot", metavar="FILE.png", help="also write the length histograms as a PNG")
    i.add_argument("--json", action="store_true", help="print the meta.json of each dir instead")

    v = sub.add_parser("verify", help="structure + checksums; exit 1 on any fault")
    v.add_argument("path", help="built dataset dir or mixture lock")

    s = sub.add_parser("show", help="one sample decoded with trained spans marked", parents=[par["remote"]])
    s.add_argument("path", help="built dataset dir or mixture lock")
    s.add_argument("--index", type=_count, default=0, help="sample number (default: 0)")
    s.add_argument("--dataset", help="dataset name when PATH is a lock (default: the first)")
    s.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="mark spans with colours (default: auto, when stdout is a terminal)")
    s.add_argument("--template", help="the .jinja file the dataset was built with, to label spans "
                                      "(meta.json keeps only its name and sha256)")
    s.add_argument("--transform", metavar="FILE.py",
                   help="the transform script the dataset was built with, to label its spans (run only "
                        "when named here; its sha256 must match meta.json)")

    c = sub.add_parser("cache", help="list or garbage-collect built datasets", parents=[par["where"]])
    c.add_argument("action", choices=("list", "gc"), help="list the cache, or remove unused dirs")
    c.add_argument("manifest", nargs="?", default=None,
                   help="use the cache a build of this manifest uses (default: $TOKENMILL_CACHE, "
                        "else build/cache)")
    c.add_argument("--keep", nargs="+", default=None, metavar="LOCK",
                   help="gc: keep dirs that these mixture locks reference (at least one lock)")
    c.add_argument("--older-than", type=_days, default=None, metavar="DAYS",
                   help="gc: remove dirs unused for longer than this (>= 0)")
    c.add_argument("--dry-run", action="store_true", help="gc: only print what would be removed")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "plan" and (args.steps is not None or args.global_batch_tokens is not None):
        if args.steps is None or args.global_batch_tokens is None or args.tokens is not None:
            parser.error("plan: give --tokens N, or --steps S with --global-batch-tokens T")
    if args.cmd == "cache" and args.action == "gc" and args.keep is None and args.older_than is None:
        parser.error("cache gc needs --keep LOCK… and/or --older-than DAYS")
    if args.cmd == "cache" and args.action == "gc" and args.keep is not None:
        args.keep_keys = _keep_keys(parser, args.keep)
    from .executors import handle_sigterm_as_interrupt
    handle_sigterm_as_interrupt()
    try:
        with warnings.catch_warnings():  # restored after: main() called in-process (tests)
            warnings.showwarning = _show_warning  # forked build workers inherit it
            return _run(args)
    except BrokenPipeError:  # `… | head` closed the pipe: not an error (Python docs' recipe)
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: finished work units are kept; run the same command again to resume",
              file=sys.stderr)
        return 130
    except Exception as e:
        message = user_fault(e, args.cmd)
        if message is None:
            raise  # a bug: keep the traceback
        print(f"error: {message}", file=sys.stderr)
        return 1


def _keep_keys(parser: argparse.ArgumentParser, locks: list[str]) -> set[str]:
    """The dataset keys the `--keep` locks reference. A lock that is empty text (an unset
    shell variable) or not a valid mixture lock is a usage error: gc must never read it as
    "keep nothing" and empty the cache."""
    from mixtures.lock import LockError, load_lock
    keys: set[str] = set()
    for path in locks:
        if not path.strip():
            parser.error("cache gc --keep: an empty lock path (an unset shell variable?); "
                         "nothing was removed")
        try:
            lock = load_lock(path)
        except LockError as e:
            first = str(e).splitlines()[0]
            parser.error(f"cache gc --keep {path}: not a mixture lock ({first}); nothing was removed")
        keys.update(entry.key for entry in lock.datasets)
    return keys


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """tokenmill's own warnings (a category defined in stages/ or pipeline/, e.g. the legacy
    FM9G index notice) are notices for the user: one `warning: ...` line, as the build summary
    prints its warnings. Any other keeps Python's format (file:line and the source line: a
    library's warning is for a developer)."""
    if category.__module__.split(".")[0] in ("stages", "pipeline"):
        text = f"warning: {message}\n"
    else:
        text = warnings.formatwarning(message, category, filename, lineno, line)
    try:
        (file or sys.stderr).write(text)
    except OSError:  # stderr gone: as Python's own showwarning, drop the notice
        pass


def user_fault(e: BaseException, cmd: str) -> str | None:
    """The one-line message of a fault the user can fix, or None for a bug."""
    from mixtures.lock import LockError
    from mixtures.manifest import ManifestError
    from mixtures.transforms import TransformError
    from stages.errors import BuildError, RecordError
    if isinstance(e, (BuildError, RecordError, ManifestError, LockError, TransformError)):
        return str(e)  # a TransformError's second part is the script's own traceback
    if isinstance(e, OSError):  # missing file, full disk, permissions
        return os_fault(e)
    return None


def os_fault(e: OSError) -> str:
    """One line for an OSError, h5py's multi-line "file write failed … errno = 28" included."""
    import errno
    import re
    text = " ".join(str(e).split())
    name = e.filename or (re.search(r"filename = '([^']+)'", text) or [None, None])[1]
    code = e.errno or int((re.search(r"errno = (\d+)", text) or [None, 0])[1])
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"{name or 'disk'}: no space left on device: free space there or give --cache / --out "
                "another disk (the unfinished dataset dir is not valid; the next run resumes it)")
    if e.strerror:
        return f"{name}: {e.strerror}" if name else e.strerror
    return text


def _run(args) -> int:
    if args.cmd == "build":
        from .build import EmptyMixtureError, build_mixture
        from .summary import print_summary
        try:
            lock, plans, warnings = build_mixture(
                args.manifest, out=args.out, cache=args.cache, workers=args.workers,
                on_error=args.on_error, force=args.force, tokenizer=args.tokenizer,
                template=args.template, max_length=args.max_length, executor=args.executor,
                ray_address=args.ray_address, trust_remote_code=args.trust_remote_code,
                check_template=args.check_template, check_against=args.check_against,
                shard_tokens=args.shard_tokens)
        except EmptyMixtureError as e:  # every record set aside: the table and reasons, then the line
            print_summary(None, e.plans, [])
            raise
        print_summary(lock, plans, warnings)
        return 0
    if args.cmd == "plan":
        from .plan import make_plan, print_plan
        tokens = args.tokens
        if args.steps is not None:
            tokens = float(args.steps) * args.global_batch_tokens
        rows, warnings = make_plan(args.manifest, out=args.out, cache=args.cache, tokens=tokens,
                                   tokenizer=args.tokenizer, template=args.template,
                                   max_length=args.max_length, shard_tokens=args.shard_tokens,
                                   trust_remote_code=args.trust_remote_code)
        print_plan(rows, warnings, tokens)
        return 0
    if args.cmd == "inspect":
        from .inspect import inspect
        return inspect(args.path, plot=args.plot, as_json=args.json)
    if args.cmd == "verify":
        from .verify import verify_path
        faults = verify_path(args.path)
        for f in faults:
            print(f"FAULT {f}")
        if not faults:
            print(f"ok: {args.path}")
        return 1 if faults else 0
    if args.cmd == "show":
        from .show import show
        color = {"auto": None, "always": True, "never": False}[args.color]
        return show(args.path, args.index, args.dataset, color, template=args.template,
                    trust_remote_code=args.trust_remote_code, transform=args.transform)
    return _cache(args)


def cache_dir_for(args):
    """The cache `cache list/gc` act on: --cache, else the one a build of the same manifest
    (and --out) uses, else $TOKENMILL_CACHE or build/cache."""
    import os
    from pathlib import Path
    if args.cache:
        return Path(args.cache)
    if args.manifest or args.out:
        from .build import default_cache, default_out
        return default_cache(Path(args.out) if args.out else default_out(args.manifest))
    return Path(os.environ.get("TOKENMILL_CACHE") or "build/cache")


def _cache(args) -> int:
    import time

    from stages.errors import BuildError

    from .cache import gc, list_entries
    cache = cache_dir_for(args)
    if not cache.is_dir():
        raise BuildError(f"{cache}: no such cache dir (give --cache, or the manifest its build used)")
    print(f"cache: {cache}", file=sys.stderr)
    if args.action == "list":
        for r in list_entries(cache):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
            bad = f"  INVALID: {r['invalid']}" if r["invalid"] else ""
            print(f"{r['dataset']:<24} {r['key'][:16]:<16}  {r['bytes'] / 1e6:9.2f} MB  last used {when}{bad}")
        return 0
    keep = getattr(args, "keep_keys", None)
    entries = [r for r in list_entries(cache) if not r["invalid"]]
    if keep is not None and entries and not keep & {r["key"] for r in entries}:
        # A lock of another cache (a wrong --cache) would remove everything here.
        print(f"error: cache gc --keep: the locks reference none of the {len(entries)} built datasets "
              f"in {cache} (wrong --cache?); nothing was removed. To empty it, give --older-than 0 "
              "without --keep", file=sys.stderr)
        return 2
    older = args.older_than * 86400 if args.older_than is not None else None
    removed = gc(cache, keep, older, args.dry_run)
    for d in removed:
        print(("would remove " if args.dry_run else "removed ") + d)
    if not removed:
        print(f"nothing to remove: all {len(entries)} built datasets in {cache} are "
              + ("kept" if keep is not None and older is None else "kept or recent"))
    return 0
