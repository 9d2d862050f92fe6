"""train.kernels' on-disk cache. `python -m train.kernels` (the install step) compiles every
specialisation the stream uses, so a later process - a training run, each rank of it - loads
them all from numba's cache and compiles none. Counted by numba's own per-kernel cache hit /
miss counters (`dispatcher.stats`), in fresh subprocesses sharing one NUMBA_CACHE_DIR."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from stream_fixtures import make_dataset, make_lock, standard_mixture  # noqa: E402

# The real stream over the given locks, in every mode, with and without a validation split;
# then each kernel's cache counters.
PROBE = r"""
import json, sys
from train import kernels
from train.stream import MixtureStream
for lock in sys.argv[1:]:
    for mode in ("packed", "padded", "concat"):
        for vp, split in ((0.0, "train"), (10.0, "train"), (10.0, "validation")):
            s = MixtureStream(lock, 64, batch_size=4, mode=mode, validation_percentage=vp, split=split)
            for k, _ in zip(range(3), s.loader()):
                pass
print(json.dumps({n: {"hits": sum(k.stats.cache_hits.values()),
                      "misses": [str(sig) for sig in k.stats.cache_misses]}
                  for n, k in kernels.kernels().items()}))
"""


def _run(args: list[str], cache: Path) -> str:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout


def _install_step(cache: Path) -> tuple[int, int]:
    out = _run(["-m", "train.kernels"], cache)
    m = re.search(r"\((\d+) specialisations compiled, (\d+) loaded\)", out)
    assert m, out
    return int(m[1]), int(m[2])


@pytest.mark.slow
def test_precompiled_kernels_load_from_cache_in_a_fresh_process(tmp_path):
    cache = tmp_path / "numba"
    lock16 = standard_mixture(tmp_path / "u16")  # uint16 tokens, a dataset over 2 shards
    d32 = make_dataset(tmp_path / "u32", "wide", [50, 70, 30, 90] * 10, vocab=70000, dtype=np.uint32)
    lock32 = make_lock(tmp_path / "u32" / "lock.json", [{"dir": d32, "abs_weight": 1.0}], vocab=70000)

    compiled, loaded = _install_step(cache)
    assert compiled > 0 and loaded == 0  # an empty cache: everything compiled (the counters count)
    assert _install_step(cache)[0] == 0  # a second process: nothing compiled

    stats = json.loads(_run(["-c", PROBE, str(lock16), str(lock32)], cache).splitlines()[-1])
    assert {n: s["misses"] for n, s in stats.items() if s["misses"]} == {}  # nothing compiled
    used = {n: s["hits"] for n, s in stats.items() if s["hits"]}
    # the probe did run the stream's kernels, from the cache: fill_packed for uint16 and uint32
    # tokens, gather_samples for one shard (contiguous addresses) and several (strided)
    want = {"bfd_rows": 1, "packed_layout": 1, "fill_packed": 2, "gather_samples": 2,
            "permuted_positions": 1, "select_ids": 1}
    assert {n: used.get(n) for n in want} == want, used
