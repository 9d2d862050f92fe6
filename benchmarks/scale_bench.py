"""Scale benchmark of the training stream (issue 13): cost per sample, shard, dataset and rank.

    python benchmarks/scale_bench.py [--out /tmp/scale_bench] [--big] [--batches 40]

Synthesises built dirs with the project's own writers (stages.shard.write_shard,
stages.built_dataset.describe_shard / write_meta; short chat samples of 4-28 uint16 tokens with
one loss span each) and a lock, then measures, each in a fresh process (rank 0, packed,
seq_len 256, batch 8, pack_window 1024): construct CPU, first batch CPU, steady CPU ms/batch,
memory from /proc/self/smaps_rollup (private = Pss_Anon + Pss_Shmem, i.e. PSS minus file pages
shared through the page cache; PSS), open files and memory maps; for 2 DataLoader workers the
same memory figures of each worker. Sweeps: samples 10^6, 10^7 (10^8 with --big: ~5 GB of
disk), shards 10^2/10^3/10^4 (10^5 with --shards-1e5), datasets 10/100/1000, world size 1/8/64/512; then prints the
fitted per-sample / per-shard / per-dataset / per-rank costs (least squares slopes). `limits`
(issue 27): 10^4 shards and 1000 datasets with 2 workers at `ulimit -n 1024`, the validation
split's private memory per sample up to 10^10, `verify`'s peak RSS on a 2^30-token shard
(`--verify-tokens` for a smaller one).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

VOCAB, EOS, PAD = 32000, 2, 0


def synth(root: Path, n_samples: int, n_shards: int, n_datasets: int, seed: int = 0) -> Path:
    """A lock over n_datasets built dirs holding n_samples in n_shards (reused when present)."""
    from stages.built_dataset import SCHEMA_VERSION, describe_shard, write_meta
    from stages.shard import ShardArrays, write_shard
    root = root / f"s{n_samples}-h{n_shards}-d{n_datasets}"
    lock_path = root / "mixture.lock.json"
    if lock_path.exists():
        return lock_path
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_ds = np.diff(np.linspace(0, n_samples, n_datasets + 1).astype(np.int64))
    sh_ds = np.diff(np.linspace(0, max(n_shards, n_datasets), n_datasets + 1).astype(np.int64))
    entries = []
    for k in range(n_datasets):
        key = hashlib.sha256(f"scale/{seed}/{n_samples}/{n_shards}/{n_datasets}/{k}".encode()).hexdigest()
        d = root / f"ds{k}-{key[:16]}"
        d.mkdir(exist_ok=True)
        shards, tot = [], 0
        for s, n in enumerate(np.diff(np.linspace(0, per_ds[k], sh_ds[k] + 1).astype(np.int64))):
            n = int(n)
            lens = rng.integers(4, 29, n)
            off = np.zeros(n + 1, np.int64)
            np.cumsum(lens, out=off[1:])
            a = rng.integers(0, lens // 2 + 1)
            spans = np.stack([a, lens], 1).astype(np.int32)
            arr = ShardArrays(tokens=rng.integers(3, VOCAB, int(off[-1]), dtype=np.uint16),
                              offsets=off, source_record=np.arange(n, dtype=np.int64),
                              loss_spans=spans, loss_span_offsets=np.arange(n + 1, dtype=np.int64))
            f = d / f"shard-{s:05d}.h5"
            write_shard(f, arr, "synthetic.jsonl")
            shards.append(describe_shard(f))
            tot += int(off[-1])
        n = int(per_ds[k])
        write_meta(d, {"schema_version": SCHEMA_VERSION, "dataset_name": f"ds{k}", "key": key,
                       "nlines": n, "records_read": n, "skipped": {}, "n_samples": n,
                       "n_tokens": tot, "avg_token_per_line": tot / max(n, 1),
                       "tokenizer": {"path": None, "vocab_size": VOCAB, "sha256": "synthetic",
                                     "bos_id": None, "eos_id": EOS, "pad_id": PAD},
                       "build": {"format": "messages", "max_length": 4096, "overflow": "segment"},
                       "shards": shards})
        entries.append({"dataset_name": f"ds{k}", "task_name": f"ds{k}", "abs_weight": 1.0,
                        "token_share": 1 / n_datasets, "sample_probability": 1 / n_datasets,
                        "path": str(d), "key": key, "allow_repeat": True, "nlines": n,
                        "ave_tokens_per_line": tot / max(n, 1), "total_tokens": tot / 1e9})
    lock = {"schema_version": 1, "manifest_sha256": "0" * 64, "seed": 1234, "max_length": 4096,
            "tokenizer": {"path": None, "vocab_size": VOCAB, "sha256": "synthetic",
                          "bos_id": None, "eos_id": EOS, "pad_id": PAD}, "datasets": entries}
    lock_path.write_text(json.dumps(lock))
    return lock_path


def smaps(pid="self") -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, v = line.split(":", 1)
        out[k] = int(v.split()[0]) * 1024
    return out


def mem(pid="self") -> dict:
    m = smaps(pid)
    return {"private_MB": (m.get("Pss_Anon", 0) + m.get("Pss_Shmem", 0)) / 2**20,
            "pss_MB": m["Pss"] / 2**20, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "maps": len(Path(f"/proc/{pid}/maps").read_text().splitlines())}


def measure(lock: str, ws: int, workers: int, batches: int) -> dict:
    """In this (fresh) process: construct, first batch, steady batches, memory.
    SCALE_BENCH_NOFILE=N: the open-file limit (soft and hard) is N first, as `ulimit -n N`."""
    nofile = os.environ.get("SCALE_BENCH_NOFILE")
    if nofile:
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(nofile), int(nofile)))
    import torch  # noqa: F401  (imported before the baseline figure)
    from train.stream import MixtureStream
    from train.kernels import warm_up
    warm_up()
    base = mem()
    c0 = time.process_time()
    s = MixtureStream(lock, 256, batch_size=8, world_size=ws, rank=0, pack_window=1024)
    c1 = time.process_time()
    it = iter(s.loader(num_workers=workers))
    w1 = time.perf_counter()
    next(it)
    c2, w2 = time.process_time(), time.perf_counter()
    for _ in range(24):  # past the first windows, which map and check most shards
        next(it)
    c3, w3 = time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(it)
    c4, w4 = time.process_time(), time.perf_counter()
    r = {"construct_cpu_s": c1 - c0, "first_batch_cpu_s": c2 - c1, "first_batch_wall_s": w2 - w1,
         "ms_per_batch_cpu": 1e3 * (c4 - c3) / batches, "ms_per_batch_wall": 1e3 * (w4 - w3) / batches,
         "import_private_MB": base["private_MB"], **mem()}
    if workers:
        kids = []
        for t in os.listdir("/proc/self/task"):
            kids += Path(f"/proc/self/task/{t}/children").read_text().split()
        r["workers"] = [mem(k) for k in kids]
    return r


def run(lock: Path, ws: int = 1, workers: int = 0, batches: int = 40, nofile: int | None = None) -> dict:
    env = dict(os.environ, **({"SCALE_BENCH_NOFILE": str(nofile)} if nofile else {}))
    p = subprocess.run([sys.executable, __file__, "--measure", str(lock), str(ws), str(workers),
                        str(batches)], capture_output=True, text=True, timeout=900, env=env)
    if p.returncode:
        raise SystemExit(f"measure failed: {p.stderr[-3000:]}")
    return json.loads(p.stdout.splitlines()[-1])


def line(label: str, r: dict) -> str:
    s = (f"{label:<34} construct {r['construct_cpu_s']:7.3f}s  first {r['first_batch_cpu_s']:6.3f}s"
         f"  {r['ms_per_batch_cpu']:8.2f} ms/batch  private {r['private_MB']:7.1f} MB"
         f" (after imports {r['import_private_MB']:6.1f})  pss {r['pss_MB']:7.1f} MB"
         f"  fds {r['fds']:5d}  maps {r['maps']:6d}")
    for k, w in enumerate(r.get("workers", [])):
        s += (f"\n{'':<34} worker {k}: private {w['private_MB']:7.1f} MB  pss {w['pss_MB']:7.1f} MB"
              f"  fds {w['fds']}  maps {w['maps']}")
    return s


HELDOUT = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from benchmarks.scale_bench import mem
from train.kernels import warm_up
from train.sampling import HeldOut
warm_up()
out = []
for n in map(int, sys.argv[2:]):
    base = mem()["private_MB"]
    t = time.process_time()
    h = HeldOut([12345], [n], 1.0)
    build = time.process_time() - t
    rng = np.random.default_rng(0)
    t = time.process_time()
    ids = h.train_ids(np.zeros(1024, np.int64), rng.integers(0, h.n_train[0], 1024))
    per = (time.process_time() - t) / 1024
    out.append({"n": n, "held": int(h.n_held[0]), "private_B": (mem()["private_MB"] - base) * 2**20,
                "build_s": build, "us_per_draw": per * 1e6})
print(json.dumps(out))
"""


def heldout_memory(sizes) -> list[dict]:
    """The validation split (1 %) of one dataset of n samples: private memory it adds, its
    construction CPU and CPU per train draw, in a fresh process."""
    p = subprocess.run([sys.executable, "-c", HELDOUT, str(ROOT)] + [str(n) for n in sizes],
                       capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise SystemExit(f"heldout failed: {p.stderr[-3000:]}")
    return json.loads(p.stdout.splitlines()[-1])


VERIFY = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from stages.built_dataset import open_built
faults = open_built(sys.argv[2]).faults("full", block=int(sys.argv[3]), jobs=1)
# VmHWM: this exec's own peak (ru_maxrss would also carry the forking parent's)
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1]
print(json.dumps({"faults": faults, "peak_rss_MB": int(hwm) / 1024}))
"""


def verify_rss(root: Path, n_tokens: int) -> list[tuple[str, dict]]:
    """Peak RSS of a full check (`pipeline verify`'s) of one shard of n_tokens uint32 tokens
    (samples of 512 tokens, one loss span each): in blocks (the default) and as one block
    (what reading whole arrays cost)."""
    from stages.built_dataset import SCHEMA_VERSION, describe_shard, write_meta
    from stages.shard import BLOCK, ShardArrays, write_shard
    d = root / f"verify-{n_tokens}"
    if not (d / "meta.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        n = n_tokens // 512
        off = np.arange(n + 1, dtype=np.int64) * 512
        arr = ShardArrays(tokens=np.arange(n_tokens, dtype=np.uint32) % 100000, offsets=off,
                          source_record=np.arange(n, dtype=np.int64),
                          loss_spans=np.tile(np.array([[1, 512]], np.int32), (n, 1)),
                          loss_span_offsets=np.arange(n + 1, dtype=np.int64))
        write_shard(d / "shard-00000.h5", arr, "synthetic.jsonl")
        del arr
        write_meta(d, {"schema_version": SCHEMA_VERSION, "dataset_name": "big", "key": "big",
                       "n_samples": n, "n_tokens": n_tokens,
                       "tokenizer": {"vocab_size": 100000}, "shards": [describe_shard(d / "shard-00000.h5")]})
    out = []
    for label, block in (("blocks", BLOCK), ("one block", 1 << 40)):
        p = subprocess.run([sys.executable, "-c", VERIFY, str(ROOT), str(d), str(block)],
                           capture_output=True, text=True, timeout=1800)
        if p.returncode:
            raise SystemExit(f"verify failed: {p.stderr[-3000:]}")
        out.append((label, json.loads(p.stdout.splitlines()[-1])))
    return out


def limits(out: Path, a) -> None:
    """Issue 27's cases: open files, the validation split's memory, verify's peak RSS."""
    print("== open-file limit 1024 (soft = hard), 2 DataLoader workers")
    for label, lock in (("10^4 shards", synth(out, 10**6, 10**4, 10)),
                        ("1000 datasets", synth(out, 10**6, 1000, 1000))):
        r = run(lock, workers=2, batches=a.batches, nofile=1024)
        print(line(f"{label}, ulimit -n 1024", r) +
              f"\n{'':<34} {1e3 / r['ms_per_batch_wall']:.1f} batches/s (wall)", flush=True)
    print("== validation split (1 %): private memory per sample")
    for r in heldout_memory([10**6, 10**8, 10**10]):
        print(f"n {r['n']:.0e}: held {r['held']:,}  private {r['private_B']:10.0f} B "
              f"({r['private_B'] / r['n']:.2e} B/sample)  construct {r['build_s'] * 1e3:.2f} ms CPU  "
              f"{r['us_per_draw']:.2f} µs CPU per train draw", flush=True)
    print(f"== verify peak RSS, one shard of {a.verify_tokens} uint32 tokens "
          f"({a.verify_tokens * 4 / 2**20:.0f} MiB of tokens)")
    for label, r in verify_rss(out, a.verify_tokens):
        print(f"{label:<10} peak RSS {r['peak_rss_MB']:8.1f} MB  faults {len(r['faults'])}", flush=True)


def slope(x, y) -> float:
    return float(np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("--out", default="/tmp/scale_bench")
    ap.add_argument("--big", action="store_true", help="also 10^8 samples (~7 GB disk)")
    ap.add_argument("--only", type=int, help="measure one sample count only (100 shards, 10 datasets,"
                    " world 1, then 2 workers)")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--shards-1e5", action="store_true", help="also 10^5 shards (~1 GB disk, minutes)")
    ap.add_argument("--sections", default="samples,shards,datasets,world,limits",
                    help="comma-separated subset of samples,shards,datasets,world,limits")
    ap.add_argument("--verify-tokens", type=int, default=2**30,
                    help="tokens of the shard whose verify peak RSS is measured (limits)")
    ap.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        lock, ws, workers, batches = a.measure
        print(json.dumps(measure(lock, int(ws), int(workers), int(batches))))
        return
    out = Path(a.out)
    t0 = time.perf_counter()
    if a.only:
        lock = synth(out, a.only, 100, 10)
        print(f"synthesised in {time.perf_counter() - t0:.0f} s", flush=True)
        print(line(f"{a.only:.0e} samples", run(lock, batches=a.batches)), flush=True)
        print(line(f"{a.only:.0e} samples, 2 workers", run(lock, workers=2, batches=a.batches)))
        return
    sec = set(a.sections.split(","))
    if "limits" in sec:
        limits(out, a)
    xs, priv, hs, cpu, ds, dms, wss, wms = ([] for _ in range(8))
    for n in ([10**6, 10**7] + ([10**8] if a.big else [])) * ("samples" in sec):
        if n == 10**6:
            print("== samples (100 shards, 10 datasets, world 1)")
        r = run(synth(out, n, 100, 10), batches=a.batches)
        print(line(f"{n:.0e} samples", r), flush=True)
        xs.append(n), priv.append(r["private_MB"] - r["import_private_MB"])  # the stream's own
    if xs:
        r = run(synth(out, xs[-1], 100, 10), workers=2, batches=a.batches)
        print(line(f"{xs[-1]:.0e} samples, 2 workers", r), flush=True)
    for h in ((100, 1000, 10000) + ((100000,) if a.shards_1e5 else ())) * ("shards" in sec):
        if h == 100:
            print("== shards (10^6 samples, 10 datasets, world 1)")
        r = run(synth(out, 10**6, h, 10), batches=a.batches)
        print(line(f"{h} shards", r), flush=True)
        hs.append(h), cpu.append(r["construct_cpu_s"] + r["first_batch_cpu_s"])
    for d in (10, 100, 1000) * ("datasets" in sec):
        if d == 10:
            print("== datasets (10^6 samples, max(100, datasets) shards, world 1)")
        r = run(synth(out, 10**6, max(100, d), d), batches=a.batches)
        print(line(f"{d} datasets", r), flush=True)
        ds.append(d), dms.append(r["ms_per_batch_cpu"])
    for ws in (1, 8, 64, 512) * ("world" in sec):
        if ws == 1:
            print("== world size (10^6 samples, 100 shards, 10 datasets, rank 0)")
        r = run(synth(out, 10**6, 100, 10), ws=ws, batches=a.batches)
        print(line(f"world {ws}", r), flush=True)
        wss.append(ws), wms.append(r["ms_per_batch_cpu"])
    print("== fitted costs")
    if xs:
        print(f"per sample : {slope(xs, priv) * 2**20:8.3f} B private memory per sample (beyond imports)")
    if hs:
        print(f"per shard  : {slope(hs, cpu) * 1e3:8.3f} ms CPU (construct + first batch) per shard")
    if ds:
        print(f"per dataset: {slope(ds, dms) * 1e3:8.3f} µs CPU per batch per dataset")
    if wss:
        print(f"per rank   : {slope(wss, wms):8.3f} ms CPU per batch per rank "
              f"(world 512 / world 1: {wms[-1] / wms[0]:.2f}x)")
    print(f"total bench wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
