"""Limits that grow with the corpus (issue 27): `pipeline verify` reads a shard in blocks (a
fault in a late block is still found, whatever the block size), and the stream keeps file
descriptors O(1) per process (a lock with more shards than the open-file limit runs with
DataLoader workers; a worker's failure is one error line in the parent, never a hang)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from stream_fixtures import VOCAB, make_dataset  # noqa: E402

from stages.built_dataset import describe_shard, open_built, write_meta  # noqa: E402
from stages.shard import read_shard, write_shard  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 200  # samples; block sizes below make the last one sit in a late block


def rewrite(d: Path, mutate) -> Path:
    """Rewrite shard 0 of a built dir with mutate(arrays) applied, meta.json kept consistent
    (sha256 and layout of the new file): only the structure check can see the fault."""
    meta = json.loads((d / "meta.json").read_text())
    p = d / meta["shards"][0]["file"]
    arr = read_shard(p, mmap=False)
    mutate(arr)
    write_shard(p, arr)
    meta["shards"][0] = describe_shard(p)
    write_meta(d, meta)
    return d


def last_sample_span_end(arr, value):
    arr.loss_spans[-1, 1] = value


CASES = {
    "sound": (lambda a: None, None),
    "late token id": (lambda a: a.tokens.__setitem__(-1, VOCAB + 5),
                      f"token id {VOCAB + 5} >= vocab size {VOCAB}"),
    "late offsets step back": (lambda a: a.offsets.__setitem__(-2, a.offsets[-1] + 1),
                               "offsets are not a non-decreasing index"),
    "late span past its sample": (lambda a: a.loss_spans.__setitem__((-1, 1), 10**6),
                                  f"of sample {N - 1} lies outside the sample"),
    "late span overlaps the one before": (
        lambda a: a.loss_spans.__setitem__((-1, 0), a.loss_spans[-2, 0]),
        f"of sample {N - 1} lies outside the sample"),
    "late negative record": (lambda a: a.source_record.__setitem__(-1, -7),
                             "source_record has a negative record number -7"),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    lengths = [6] * N
    out = {}
    for k, (name, (mutate, _)) in enumerate(CASES.items()):
        d = make_dataset(root / f"c{k}", "ds", lengths, spans="sft", seed=3)
        if name == "late span overlaps the one before":
            def two_spans(a):  # the last sample gets spans [1, 3) [2, 5): overlapping
                a.loss_spans = np.concatenate([a.loss_spans[:a.loss_span_offsets[-2]],
                                               [[1, 3], [2, 5]]]).astype(np.int32)
                a.loss_span_offsets[-1] = len(a.loss_spans)
            rewrite(d, two_spans)
            mutate = (lambda a: None)
        out[name] = rewrite(d, mutate)
    return out


@pytest.mark.parametrize("block", [1, 3, 16, 64, 1 << 20])
@pytest.mark.parametrize("case", list(CASES))
def test_verify_finds_a_fault_in_a_late_block(dirs, case, block):
    faults = open_built(dirs[case]).faults("full", block=block, jobs=1)
    want = CASES[case][1]
    if want is None:
        assert faults == []
    else:
        assert len(faults) == 1 and want in faults[0] and "shard-00000.h5" in faults[0], faults


def test_verify_in_parallel_lists_faults_in_shard_order(tmp_path):
    d = make_dataset(tmp_path, "ds", [5] * 60, n_shards=4, seed=1)
    meta = json.loads((d / "meta.json").read_text())
    for j in (1, 3):  # corrupt two shards' bytes after meta.json was written
        p = d / meta["shards"][j]["file"]
        b = bytearray(p.read_bytes())
        b[-1] ^= 0xFF
        p.write_bytes(bytes(b))
    faults = open_built(d).faults("full", jobs=3, block=4)
    shas = [f for f in faults if "sha256 differs" in f]
    assert [f.split(": ")[0].rsplit("/", 1)[1] for f in shas] == \
        [meta["shards"][1]["file"], meta["shards"][3]["file"]]


# Every fd case in one subprocess: a hard open-file limit below the number of shards, and a
# hang is a timeout failure instead of a stuck pytest.
FDS = r"""
import json, os, resource, sys
sys.path.insert(0, sys.argv[2])
LIMIT = 160
resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
from benchmarks.scale_bench import synth
from pathlib import Path
lock = synth(Path(sys.argv[1]), 300 * 8, 300, 300)   # 300 datasets, one shard each
import train.store
from train.stream import MixtureStream, StreamError
out = {}
s = MixtureStream(lock, 64, batch_size=4, pack_window=1024)
it = iter(s.loader(0))
for _ in range(20):
    next(it)
out["mapped"] = int(s._tokens()._is_mapped.sum())
out["fds"] = len(os.listdir("/proc/self/fd"))
n = 0
for b in MixtureStream(lock, 64, batch_size=4, pack_window=1024).loader(num_workers=2):
    n += 1
    if n == 40:
        break
out["worker_batches"] = n
# a fault met inside a worker (a token id >= vocab, checked batch by batch): one line
d = sorted(Path(lock).parent.glob("ds0-*"))[0]
meta = json.loads((d / "meta.json").read_text())
sh = meta["shards"][0]
p = d / sh["file"]
with open(p, "r+b") as f:
    f.seek(sh["arrays"]["tokens"]["offset"])
    f.write((40000).to_bytes(2, "little") * sh["n_tokens"])
train.store.FULL_CHECK_ON_MAP = -1  # inherited by the forked workers
try:
    for b in MixtureStream(lock, 64, batch_size=4, pack_window=1024, verify="none").loader(num_workers=2):
        pass
    out["error"] = None
except StreamError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def test_more_shards_than_open_files_with_workers_and_one_line_worker_error(tmp_path):
    r = subprocess.run([sys.executable, "-c", FDS, str(tmp_path), str(ROOT)], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    # more shards mapped than the process may open files: a map holds no descriptor
    assert out["mapped"] > 160 and out["fds"] < 100, out
    assert out["worker_batches"] == 40
    err = out["error"]
    assert err is not None and "\n" not in err and "token id 40000 >= vocab size 32000" in err, err
    assert r.stderr.count("Traceback") == 0, r.stderr[-3000:]
