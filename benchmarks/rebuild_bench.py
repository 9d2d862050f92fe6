"""Cold build vs. warm rebuild of a mixture (default: sample_data/mixture.json).

    python benchmarks/rebuild_bench.py [MIXTURE.json] [--workers N]
    python benchmarks/rebuild_bench.py --source-mb 1000 [--source FILE] [--code DIR] [--workers N]

The warm run must tokenize nothing: it only fingerprints sources and rewrites the lock.

`--source-mb` (issue 13): one JSONL source of that size (generated in a temp dir like
build_bench's corpus, or `--source FILE`) is built once, then a no-op `pipeline build` and a
`pipeline plan` each run in a fresh process under /usr/bin/time; start-up is the same
commands on a 1-record source, so "beyond start-up" = CPU(big) − CPU(tiny). `--code DIR` runs
the pipeline of another checkout (e.g. /work/baseline) for a before/after comparison.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def warm_vs_cold(args):
    from pipeline.build import build_mixture
    out = Path(tempfile.mkdtemp(prefix="tokenmill-bench-"))
    try:
        t0 = time.perf_counter()
        _, plans, _ = build_mixture(args.manifest, out=str(out), workers=args.workers)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, again, _ = build_mixture(args.manifest, out=str(out), workers=args.workers)
        warm = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    tokens = sum(p.meta["n_tokens"] for p in plans)
    print(f"manifest: {args.manifest}  workers: {args.workers}  datasets: {len(plans)}  tokens: {tokens:,}")
    print(f"cold build : {cold:8.3f} s  ({', '.join(p.status for p in plans)})")
    print(f"warm build : {warm:8.3f} s  ({', '.join(p.status for p in again)})")
    print(f"speed-up   : {cold / warm:8.1f}x")


def _timed(cmd: list[str], code: Path, tmp: Path) -> tuple[float, float, float]:
    """(user+sys CPU s, wall s, peak RSS MB) of one fresh process, from /usr/bin/time."""
    report = tmp / "time.txt"
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(["/usr/bin/time", "-o", str(report), "-f", "%U %S %e %M", sys.executable, "-m", "pipeline",
                        *cmd], cwd=code, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    user, sys_, wall, rss = report.read_text().split()[-4:]
    return float(user) + float(sys_), float(wall), int(rss) / 1024


def _manifest(tmp: Path, name: str, source: Path, tokenizer: str) -> Path:
    m = {"tokenizer": tokenizer, "template": "chatml", "max_length": 4096, "seed": 1, "datasets": [
        {"dataset_name": name, "task_name": "pt", "abs_weight": 1.0, "path": str(source), "format": "text"}]}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(m))
    return path


def noop_at_scale(args):
    code = Path(args.code).resolve()
    tmp = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tokenmill-rebuild-", dir=args.tmp))
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = str(ROOT / "sample_data/tokenizer")
    try:
        if args.source:
            big = Path(args.source).resolve()
        else:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from build_bench import make_corpus
            big = tmp / "big.jsonl"
            t0 = time.perf_counter()
            make_corpus(big, args.source_mb)
            print(f"generated {big} ({big.stat().st_size / 1e9:.3f} GB) in {time.perf_counter() - t0:.0f} s")
        tiny = tmp / "tiny.jsonl"
        tiny.write_text('{"text": "one short document"}\n')
        cmds = {}
        for name, src in (("tiny", tiny), ("big", big)):
            mix, out = _manifest(tmp, name, src, tokenizer), ["--out", str(tmp / f"out-{name}")]
            cmds[name] = (["build", str(mix), "--workers", str(args.workers), *out], ["plan", str(mix), *out])
            cpu, wall, _ = _timed(cmds[name][0], code, tmp)
            if name == "big":
                print(f"first build of {src.stat().st_size / 1e9:.3f} GB: {wall:.0f} s wall, "
                      f"{cpu:.0f} s CPU (driver + workers; a no-op if --work already held it)")
        time.sleep(2.5)  # past the fingerprint memo's trust window (2 s after the last write)
        best = {}
        for _ in range(args.repeat):  # interleaved, so both sizes see the same machine load
            for name in ("tiny", "big"):
                for i in (0, 1):
                    r = _timed(cmds[name][i], code, tmp)
                    best[name, i] = min(best.get((name, i), r), r)
        print(f"code: {code}  source: {big.stat().st_size / 1e9:.3f} GB  (best of {args.repeat}; CPU = user+sys)")
        for i, what in enumerate(("no-op build", "plan")):
            (c_big, w_big, m_big), (c_tiny, w_tiny, _) = best["big", i], best["tiny", i]
            print(f"{what:12s}: 1-record source {c_tiny:6.2f} s CPU ({w_tiny:5.2f} s wall) | "
                  f"{big.stat().st_size / 1e9:.2f} GB source {c_big:6.2f} s CPU ({w_big:5.2f} s wall, "
                  f"{m_big:.0f} MB peak RSS) | beyond start-up {c_big - c_tiny:+6.2f} s CPU")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False)
    ap.add_argument("manifest", nargs="?", default=str(ROOT / "sample_data/mixture.json"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--source-mb", type=float, help="measure a no-op build and plan of one source this large")
    ap.add_argument("--source", help="with --source-mb: use this JSONL file instead of generating one")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose pipeline runs (e.g. /work/baseline)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="where the temp dir goes (default: $TMPDIR or /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (corpus, builds)")
    ap.add_argument("--work", help="a kept work dir (builds reused between runs; not deleted)")
    args = ap.parse_args()
    if args.source_mb or args.source:
        noop_at_scale(args)
    else:
        warm_vs_cold(args)


if __name__ == "__main__":
    main()
