"""Command line (DESIGN §2). Thin: parse, call, map faults to exit codes (1 data, 2 usage)."""
from __future__ import annotations

import argparse
import sys


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description="tokenmill data pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build", help="build (or reuse) every dataset of a mixture and write the lock")
    b.add_argument("manifest")
    b.add_argument("--out", help="output dir (default: build/ beside the manifest)")
    b.add_argument("--cache", help="cache dir (default: $TOKENMILL_CACHE or <out>/cache)")
    b.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
    b.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="ray: run work units as Ray tasks (sources and cache on a shared path)")
    b.add_argument("--ray-address", help="Ray cluster address (default: start/attach a local one)")
    b.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="bad records: stop naming file:record (fail) or count and set aside (skip)")
    b.add_argument("--force", action="store_true",
                   help="rebuild even when a valid build exists (and redo the units a killed build left)")
    b.add_argument("--tokenizer", help="tokenizer (required for the FM9G list form)")
    b.add_argument("--template", help="chat template: tokenizer, chatml, none, hunyuan, hy3 or a .jinja file")
    b.add_argument("--max-length", type=int)
    b.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="let transformers run a loader shipped in the tokenizer dir (auto_map)")
    b.add_argument("--check-template", type=_count, default=0, metavar="N",
                   help="first compare N samples per chat dataset with tokenizer.apply_chat_template; "
                        "any difference in ids or trained positions stops the build (exit 1)")
    b.add_argument("--check-against", choices=("tokenizer", "template"), default="tokenizer",
                   help="--check-template reference: the tokenizer's own chat template (default) "
                        "or the build's template")

    pl = sub.add_parser("plan", help="dry run: built / reusable / to build, tokens, shares, epochs")
    pl.add_argument("manifest")
    pl.add_argument("--out")
    pl.add_argument("--cache")
    pl.add_argument("--tokens", type=float, help="token budget of the run")
    pl.add_argument("--steps", type=int, help="with --global-batch-tokens: budget = steps × tokens")
    pl.add_argument("--global-batch-tokens", type=int)
    pl.add_argument("--tokenizer")
    pl.add_argument("--template")
    pl.add_argument("--max-length", type=int)
    pl.add_argument("--trust-remote-code", action="store_true", default=None,
                    help="let transformers run a loader shipped in the tokenizer dir (auto_map)")

    i = sub.add_parser("inspect", help="statistics table and length histogram")
    i.add_argument("path", help="built dataset dir or mixture lock")
    i.add_argument("--plot", metavar="FILE.png")
    i.add_argument("--json", action="store_true")

    v = sub.add_parser("verify", help="structure + checksums; exit 1 on any fault")
    v.add_argument("path")

    s = sub.add_parser("show", help="one sample decoded with trained spans marked")
    s.add_argument("path")
    s.add_argument("--index", type=int, default=0)
    s.add_argument("--dataset", help="dataset name when PATH is a lock")
    s.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    s.add_argument("--template", help="the .jinja file the dataset was built with, to label spans "
                                      "(meta.json keeps only its name and sha256)")
    s.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run a loader shipped in the tokenizer dir (auto_map)")

    c = sub.add_parser("cache", help="list or garbage-collect built datasets")
    c.add_argument("action", choices=("list", "gc"))
    c.add_argument("--cache", help="cache dir (default: $TOKENMILL_CACHE or build/cache)")
    c.add_argument("--keep", nargs="*", default=None, metavar="LOCK",
                   help="gc: keep dirs that these locks reference")
    c.add_argument("--older-than", type=float, default=None, metavar="DAYS",
                   help="gc: remove dirs unused for longer than this")
    c.add_argument("--dry-run", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mixtures.manifest import ManifestError
    from stages.errors import BuildError, RecordError
    try:
        return _run(args)
    except (BuildError, RecordError, ManifestError, FileNotFoundError, IndexError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `… | head` closed the pipe: not an error (Python docs' recipe)
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: finished work units are kept; run the same command again to resume",
              file=sys.stderr)
        return 130


def _run(args) -> int:
    if args.cmd == "build":
        from .build import build_mixture
        from .summary import print_summary
        lock, plans, warnings = build_mixture(
            args.manifest, out=args.out, cache=args.cache, workers=args.workers,
            on_error=args.on_error, force=args.force, tokenizer=args.tokenizer,
            template=args.template, max_length=args.max_length, executor=args.executor,
            ray_address=args.ray_address, trust_remote_code=args.trust_remote_code,
            check_template=args.check_template, check_against=args.check_against)
        print_summary(lock, plans, warnings)
        return 0
    if args.cmd == "plan":
        from .plan import make_plan, print_plan
        tokens = args.tokens
        if args.steps is not None or args.global_batch_tokens is not None:
            if args.steps is None or args.global_batch_tokens is None or tokens is not None:
                raise SystemExit("plan: give --tokens N, or --steps S with --global-batch-tokens T")
            tokens = float(args.steps) * args.global_batch_tokens
        rows, warnings = make_plan(args.manifest, out=args.out, cache=args.cache, tokens=tokens,
                                   tokenizer=args.tokenizer, template=args.template,
                                   max_length=args.max_length,
                                   trust_remote_code=args.trust_remote_code)
        print_plan(rows, warnings, tokens)
        return 0
    if args.cmd == "inspect":
        from .inspect import inspect
        return inspect(args.path, plot=args.plot, as_json=args.json)
    if args.cmd == "verify":
        from .verify import built_dirs, verify_dir
        faults = [f for d in built_dirs(args.path) for f in verify_dir(d)]
        for f in faults:
            print(f"FAULT {f}")
        if not faults:
            print(f"ok: {args.path}")
        return 1 if faults else 0
    if args.cmd == "show":
        from .show import show
        color = {"auto": None, "always": True, "never": False}[args.color]
        return show(args.path, args.index, args.dataset, color, template=args.template,
                    trust_remote_code=args.trust_remote_code)
    if args.cmd == "cache":
        return _cache(args)
    return 2


def _cache(args) -> int:
    import os
    import time
    from pathlib import Path

    from .cache import gc, list_entries
    cache = Path(args.cache or os.environ.get("TOKENMILL_CACHE") or "build/cache")
    if not cache.is_dir():
        raise FileNotFoundError(f"{cache}: no such cache dir")
    if args.action == "list":
        for r in list_entries(cache):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
            print(f"{r['dataset']:<24} {r['key'][:16]}  {r['bytes'] / 1e6:9.2f} MB  last used {when}")
        return 0
    keep = None
    if args.keep is not None:
        import orjson
        keep = {d["key"] for lock in args.keep for d in orjson.loads(Path(lock).read_bytes())["datasets"]}
    older = args.older_than * 86400 if args.older_than is not None else None
    if keep is None and older is None:
        raise FileNotFoundError("cache gc needs --keep LOCK… and/or --older-than DAYS")
    for d in gc(cache, keep, older, args.dry_run):
        print(("would remove " if args.dry_run else "removed ") + d)
    return 0
