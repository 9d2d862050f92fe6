"""Cold build vs. warm rebuild of a mixture (default: sample_data/mixture.json).

    python benchmarks/rebuild_bench.py [MIXTURE.json] [--workers N]

The warm run must tokenize nothing: it only fingerprints sources and rewrites the lock.
"""
import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.build import build_mixture  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest", nargs="?", default=str(Path(__file__).resolve().parents[1] / "sample_data/mixture.json"))
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
