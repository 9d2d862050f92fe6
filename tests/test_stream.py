"""MixtureStream: sampling, packing, state and resume (fixtures built with write_shard)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from stream_fixtures import (EOS, make_dataset, make_lock, read_sample,  # noqa: E402
                             standard_mixture)

from train.kernels import permuted_positions  # noqa: E402
from train.packing import pack_rows  # noqa: E402
from train.sampling import MixtureSchedule, feistel_permute, mix64  # noqa: E402
from train.stream import MixtureStream, StreamError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lock(tmp_path_factory):
    return standard_mixture(tmp_path_factory.mktemp("mix"))


def take(it, n):
    out = []
    for b in it:
        out.append(b)
        if len(out) == n:
            break
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if torch.is_tensor(x[k]):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


def expected(dirs, d, i, a=0, b=None):
    toks, spans = read_sample(dirs[d], i)
    b = len(toks) if b is None else b
    mask = np.zeros(len(toks), bool) if spans is not None else np.ones(len(toks), bool)
    if spans is not None:
        for s, e in spans:
            mask[s:e] = True
    ids = toks[a:b]
    lab = np.where(mask[a:b], ids, -100)
    lab[0] = -100
    return ids, lab


def lock_dirs(lock):
    return [d["path"] for d in json.loads(Path(lock).read_text())["datasets"]]


# ------------------------------------------------------------------ primitives
def test_feistel_is_a_bijection_and_keyed():
    for n in (1, 2, 3, 7, 16, 17, 1000, 4097):
        p = feistel_permute(np.arange(n), n, 99)
        assert sorted(p.tolist()) == list(range(n))
    a, b = feistel_permute(np.arange(500), 500, 1), feistel_permute(np.arange(500), 500, 2)
    assert not np.array_equal(a, b)


def test_compiled_sampler_permutation_equals_numpy_feistel():
    """The sampler's compiled draw-by-draw permutation against feistel_permute (numpy, all
    draws at once): dataset d's draws are its positions pos, pos+1, ... across epochs."""
    rng = np.random.default_rng(3)
    n = np.array([1, 2, 5, 17, 1000, 70000], np.int64)
    bases = rng.integers(0, 2**63, len(n)).astype(np.uint64)
    for _ in range(20):
        choice = rng.integers(0, len(n), 3000)
        pos = rng.integers(0, n)
        epoch = rng.integers(0, 5, len(n))
        got = permuted_positions(choice, pos, epoch, n, bases)
        rank = np.zeros(len(choice), np.int64)
        for d in range(len(n)):
            sel = np.flatnonzero(choice == d)
            rank[sel] = np.arange(len(sel))
        q = pos[choice] + rank
        ep = epoch[choice] + q // n[choice]
        keys = mix64(mix64(ep.astype(np.uint64)) ^ bases[choice])
        want = feistel_permute(q % n[choice], n[choice], keys)
        assert np.array_equal(got, want)


def schedule_draws(sch, upto):
    """Every window's draws up to window `upto`, concatenated."""
    parts = [sch.window(w) for w in range(upto)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.mark.parametrize("probs,n,rep,W", [
    ([0.5, 0.3, 0.2], [40, 7, 25], [True, True, False], 16),
    ([0.9, 0.1], [1000, 3], [True, True], 5),
    ([1e-4, 0.7, 0.3 - 1e-4], [50, 9, 11], [True, False, False], 64),
    (list(np.full(300, 1 / 300)), list(range(1, 301)), [True] * 300, 128)])
def test_schedule_is_stratified_and_each_epoch_a_permutation(probs, n, rep, W):
    """Counts are the lock share to within one draw while every dataset is active; a
    non-repeating dataset gives each sample once and retires, the others renormalise; the
    positions are feistel_permute (numpy) of the running count, epoch by epoch."""
    bases = [11 + k for k in range(len(n))]
    sch = MixtureSchedule(probs, n, rep, bases, 5, W)
    p, nn, rp = np.asarray(probs), np.asarray(n), np.asarray(rep)
    upto = sch.n_windows or 400
    prev = sch.counts(0)
    assert not prev.any()
    first_retire = None
    for w in range(1, upto + 1):
        c = sch.counts(w)
        assert (c >= prev).all() and c.sum() - prev.sum() == len(sch.window(w - 1)[0])
        if first_retire is None and ((c >= nn) & ~rp).any():
            first_retire = w
        if first_retire is None:  # every dataset active: stratified to one draw
            assert np.abs(c - w * W * p / p.sum()).max() < 1.0
        prev = c
    d, t = schedule_draws(sch, upto)
    for k in range(len(n)):  # window by window (a window's draws are in a seeded order)
        for w in range(0, upto, max(1, upto // 25)):
            q = np.arange(sch.counts(w)[k], sch.counts(w + 1)[k])
            keys = mix64(mix64((q // n[k]).astype(np.uint64)) ^ np.uint64(bases[k]))
            dw, tw = sch.window(w)
            assert sorted(tw[dw == k]) == sorted(feistel_permute(q % n[k], n[k], keys))
        if not rep[k]:
            assert sorted(t[d == k].tolist()) == list(range(n[k]))
    if sch.n_windows is not None:
        assert len(sch.window(sch.n_windows)[0]) == 0
        assert (sch.counts(sch.n_windows + 5) == nn).all()
    if first_retire is not None and rp.any():  # after every retirement: the repeating ones
        last = max(w for w in range(upto) if ((sch.counts(w) < nn) & ~rp).any()) + 1
        c0, c1 = sch.counts(last), sch.counts(last + 50)
        share = (c1 - c0)[rp] / (c1 - c0).sum()
        assert np.allclose(share, p[rp] / p[rp].sum(), atol=2 / (50 * W) + 1e-12)


def test_schedule_window_is_the_same_computed_alone():
    """Window w is a pure function of w: computed in any order, or alone, it is identical."""
    args = ([0.5, 0.3, 0.2], [40, 7, 25], [True, True, False], [1, 2, 3], 9, 16)
    a = MixtureSchedule(*args)
    seq = [a.window(w) for w in range(30)]
    b = MixtureSchedule(*args)
    for w in (29, 3, 17, 0):
        assert all(np.array_equal(x, y) for x, y in zip(b.window(w), seq[w]))


def check_packed(batch, dirs, L, pad_id):
    """A packed batch against the shards: documents, labels, positions, cu_seqlens."""
    ids, lab = batch["input_ids"].numpy(), batch["labels"].numpy()
    samples = batch["samples"].tolist()
    assert batch["n_trained"] == int((lab != -100).sum())
    pos = batch["position_ids"].numpy()
    cu = batch["cu_seqlens"].numpy()
    assert cu.dtype == np.int32 and cu[0] == 0 and cu[-1] == ids.size
    flat = pos.reshape(-1)
    # cu_seqlens boundaries are exactly where position ids restart
    assert np.array_equal(np.flatnonzero(flat == 0), cu[:-1])
    seg = np.diff(cu)
    assert batch["max_seqlen"] == seg.max()
    assert np.array_equal(flat, np.concatenate([np.arange(n) for n in seg]))
    k = 0
    for r in range(ids.shape[0]):
        starts = list(np.flatnonzero(pos[r] == 0)) + [L]
        for s0, s1 in zip(starts, starts[1:]):
            if ids[r, s0] == pad_id:  # a row's padding: its last segment only
                assert s1 == L and (ids[r, s0:] == pad_id).all()
                assert (lab[r, s0:] == -100).all()
                continue
            d, i = samples[k]
            k += 1
            e_ids, e_lab = expected(dirs, d, i)
            assert np.array_equal(ids[r, s0:s1], e_ids)
            assert np.array_equal(lab[r, s0:s1], e_lab)
    assert k == len(samples)
    return k


@pytest.mark.parametrize("case", ["messy_spans", "mixed_dtypes", "pad_not_a_token"])
def test_packed_rows_on_odd_inputs(tmp_path, case):
    """Overlapping / unsorted / empty loss spans (their union trains), shards of different
    token dtypes, a pad id the token dtype cannot hold: the same rows as the plain case."""
    rng = np.random.default_rng(9)
    a = make_dataset(tmp_path, "a", rng.integers(1, 60, 80), spans="messy", seed=1)
    b = make_dataset(tmp_path, "b", rng.integers(1, 60, 50), spans="none", seed=2,
                     dtype=np.uint32 if case == "mixed_dtypes" else None)
    lk = make_lock(tmp_path / "lock.json", [{"dir": a, "abs_weight": 0.6},
                                            {"dir": b, "abs_weight": 0.4}])
    pad = -1 if case == "pad_not_a_token" else None
    s = MixtureStream(lk, 64, batch_size=3, pack_window=30, pad_id=pad, verify="none")
    n = sum(check_packed(bt, [a, b], 64, s.pad_id) for bt in take(s.loader(), 20))
    assert n > 100


def naive_bfd(lengths, cap):
    """Item-by-item best-fit decreasing, written plainly: row of each item, rows opened."""
    rooms, row_of = [], [0] * len(lengths)
    for j in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        fits = [r for r in range(len(rooms)) if rooms[r] >= lengths[j]]
        r = min(fits, key=lambda r: (rooms[r], r)) if fits else len(rooms)
        if r == len(rooms):
            rooms.append(cap)
        rooms[r] -= lengths[j]
        row_of[j] = r
    return row_of, len(rooms)


def test_pack_rows_is_exactly_best_fit_decreasing():
    rng = np.random.default_rng(5)
    for it in range(400):
        cap = int(rng.integers(3, 200))
        n = int(rng.integers(0, 120))
        kind = it % 4
        lens = (rng.integers(1, cap + 1, n) if kind == 0 else
                rng.integers(1, max(2, cap // 6), n) if kind == 1 else
                rng.choice([1, max(1, cap // 3), max(1, cap // 2), cap], n) if kind == 2 else
                rng.integers(1, 4, n))
        if it % 50 == 0:  # beyond the counting sort's range
            cap = 200_000
            lens = rng.integers(1, cap + 1, n)
        row_of, nrows = naive_bfd(lens.tolist(), cap)
        key = int(rng.integers(0, 2**63)) if it % 2 else None
        order, row_ptr = pack_rows(lens, cap, key)
        assert len(row_ptr) - 1 == nrows and sorted(order.tolist()) == list(range(n))
        rows = [order[row_ptr[r]:row_ptr[r + 1]].tolist() for r in range(nrows)]
        # every row is one of BFD's rows, items in placement order (decreasing length)
        got = {tuple(sorted(r)) for r in rows}
        want = {tuple(j for j in range(n) if row_of[j] == r) for r in range(nrows)}
        assert got == want
        for r in rows:
            assert r == sorted(r, key=lambda j: (-lens[j], j))
        # rows in opening order, or in the seeded order
        opened = [row_of[r[0]] for r in rows]
        if key is None:
            assert opened == list(range(nrows))
        else:
            assert opened == np.argsort(mix64(np.arange(nrows, dtype=np.uint64)
                                              ^ np.uint64(key)), kind="stable").tolist()


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_rows_match_shards_and_loss_spans(lock, mode):
    dirs = lock_dirs(lock)
    L = 128  # >= every sample: no overflow here
    s = MixtureStream(lock, L, mode=mode, batch_size=3, pack_window=64)
    seen = 0
    for batch in take(s.loader(), 25):
        ids, lab = batch["input_ids"].numpy(), batch["labels"].numpy()
        assert ids.shape[1] <= L
        assert batch["n_trained"] == int((lab != -100).sum())
        samples = batch["samples"].tolist()
        if mode == "packed":
            check_packed(batch, dirs, L, s.pad_id)
        else:
            att = batch["attention_mask"].numpy()
            for r, (d, i) in enumerate(samples):
                e_ids, e_lab = expected(dirs, d, i)
                n = len(e_ids)
                assert att[r, :n].all() and not att[r, n:].any()
                assert np.array_equal(ids[r, :n], e_ids) and np.array_equal(lab[r, :n], e_lab)
                assert (lab[r, n:] == -100).all() and (ids[r, n:] == s.pad_id).all()
            assert ids.shape[1] == max(len(read_sample(dirs[d], i)[0]) for d, i in samples)
        seen += len(samples)
    assert seen >= 75


def test_batches_the_caller_holds_are_never_overwritten(lock):
    """Packed batches' memory is reused only once the caller has dropped them: keep every
    third batch, drop the rest, and the kept ones still hold what they held when yielded."""
    kept, copies = [], []
    for j, b in enumerate(MixtureStream(lock, 96, batch_size=2, pack_window=40).loader()):
        if j % 3 == 0:
            kept.append(b)
            copies.append({k: v.clone() for k, v in b.items() if torch.is_tensor(v)})
        if j == 60:
            break
    for b, c in zip(kept, copies):
        for k, v in c.items():
            assert torch.equal(b[k], v), k


def test_packing_fill_and_window_bound(lock):
    dirs = lock_dirs(lock)
    fill = []
    for b in take(MixtureStream(lock, 256, batch_size=4, pack_window=200).loader(), 30):
        assert b["input_ids"].shape == (4, 256)
        n_real = sum(len(read_cache(dirs[d], i)) for d, i in b["samples"].tolist())
        fill.append(n_real / b["input_ids"].numel())
    assert np.mean(fill) > 0.95, np.mean(fill)


@pytest.mark.parametrize("policy", ["segment", "truncate", "drop"])
def test_overflow_policy_is_applied_and_counted(tmp_path, policy):
    lens = [10, 50, 130, 30, 64, 65, 200]
    d = make_dataset(tmp_path, "long", lens, overflow=policy, max_length=256)
    lk = make_lock(tmp_path / "lock.json", [{"dir": d, "abs_weight": 1.0,
                                             "allow_repeat": False}])
    s = MixtureStream(lk, 64, mode="packed", batch_size=2, pack_window=4)
    ld = s.loader()
    got, toks = Counter(), Counter()
    for b in ld:
        ids, pos = b["input_ids"].numpy(), b["position_ids"].numpy()
        assert (np.diff(b["cu_seqlens"].numpy()) <= 64).all()
        pieces = []
        for r in range(ids.shape[0]):
            starts = list(np.flatnonzero(pos[r] == 0)) + [64]
            pieces += [s1 - s0 for s0, s1 in zip(starts, starts[1:]) if ids[r, s0] != s.pad_id]
        for (_, i), n in zip(b["samples"].tolist(), pieces, strict=True):
            got[i] += 1
            toks[i] += n
    over = [i for i, n in enumerate(lens) if n > 64]
    assert ld.stats()["overflow"] == {"long": len(over)}
    for i, n in enumerate(lens):
        if n <= 64:
            assert got[i] == 1
        elif policy == "segment":
            assert got[i] == -(-n // 64) and toks[i] == n
        elif policy == "truncate":
            assert got[i] == 1 and toks[i] == 64
        else:
            assert got[i] == 0


def test_concat_rows_are_the_eos_joined_document_stream(lock):
    dirs = lock_dirs(lock)
    L = 50
    s = MixtureStream(lock, L, mode="concat", batch_size=2, pack_window=30)
    batches = take(s.loader(), 20)
    flat = torch.cat([b["input_ids"].reshape(-1) for b in batches]).numpy()
    labs = torch.cat([b["labels"].reshape(-1) for b in batches]).numpy()
    docs = []
    for b in batches:
        for d, i in b["samples"].tolist():
            if not docs or docs[-1] != (d, i):
                docs.append((d, i))
    stream, mask = [], []
    for d, i in docs:
        toks, spans = read_sample(dirs[d], i)
        m = np.ones(len(toks), bool) if spans is None else np.zeros(len(toks), bool)
        if spans is not None:
            for a, e in spans:
                m[a:e] = True
        if toks[-1] != EOS:
            toks, m = np.append(toks, EOS), np.append(m, True)
        stream.append(toks)
        mask.append(m)
    stream, mask = np.concatenate(stream), np.concatenate(mask)
    assert np.array_equal(flat, stream[: len(flat)])
    want = np.where(mask[: len(flat)], flat, -100)
    want[::L] = -100
    assert np.array_equal(labs, want)


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("mode", ["packed", "padded", "concat"])
def test_exact_resume_across_worker_counts(lock, mode):
    N, k = 12, 5
    kw = dict(mode=mode, batch_size=2, pack_window=40)
    base = take(MixtureStream(lock, 96, **kw).loader(0), N)
    assert_same(base, take(MixtureStream(lock, 96, **kw).loader(2), N))
    for before, after in [(0, 2), (2, 1), (1, 0)]:
        ld = MixtureStream(lock, 96, **kw).loader(before)
        first = take(ld, k)
        state = json.loads(json.dumps(ld.state_dict()))  # plain JSON
        assert_same(first, base[:k])
        fresh = MixtureStream(lock, 96, **kw).loader(after)
        fresh.load_state_dict(state)
        assert_same(take(fresh, N - k), base[k:])


def test_loader_state_ignores_prefetch_and_reiteration(lock):
    kw = dict(mode="packed", batch_size=2, pack_window=40)
    base = take(MixtureStream(lock, 96, **kw).loader(0), 9)
    ld = MixtureStream(lock, 96, **kw).loader(2, prefetch_factor=4)
    got = take(ld, 3)  # workers have run ahead; the state must not have
    st = ld.state_dict()
    got += take(ld, 3)  # iterating again continues where the caller stopped
    fresh = MixtureStream(lock, 96, **kw).loader(0)
    fresh.load_state_dict(st)
    got2 = take(fresh, 6)
    assert_same(got, base[:6])
    assert_same(got2, base[3:9])


def rank_batches(lock, ws, steps, state=None, nw=0, **kw):
    """Each rank's first `steps` batches (None: to the end) and its state after them."""
    out, states = [], []
    for r in range(ws):
        ld = MixtureStream(lock, 96, rank=r, world_size=ws, **kw).loader(nw)
        if state is not None:
            ld.load_state_dict(state)
        out.append(take(ld, steps))
        states.append(json.loads(json.dumps(ld.state_dict())))
    return out, states


@pytest.mark.parametrize("mode,nw_from,nw_to", [("packed", 0, 2), ("padded", 1, 0), ("concat", 2, 1)])
def test_exact_resume_on_two_ranks(lock, mode, nw_from, nw_to):
    """Same world size: every rank continues with exactly the batches it would have had."""
    kw = dict(mode=mode, batch_size=2, pack_window=40)
    ref, _ = rank_batches(lock, 2, 9, **kw)
    first, states = rank_batches(lock, 2, 4, nw=nw_from, **kw)
    for r in range(2):
        assert_same(first[r], ref[r][:4])
        ld = MixtureStream(lock, 96, rank=r, world_size=2, **kw).loader(nw_to)
        ld.load_state_dict(states[r])
        assert_same(take(ld, 5), ref[r][4:])
    ranks_rows = [Counter(map(tuple, torch.cat([b["samples"] for b in bs]).tolist())) for bs in ref]
    assert not set(ranks_rows[0]) & set(ranks_rows[1]) or mode == "concat"  # disjoint windows


def piece_tokens(batches) -> Counter:
    """Tokens of each (dataset, sample) over the batches, from the pieces' segments."""
    c = Counter()
    for b in batches:
        for (d, i), (_, s, e) in zip(b["samples"].tolist(), b["segments"].tolist()):
            c[(d, i)] += e - s
    return c


@pytest.mark.parametrize("mode,ws_from,ws_to,nw_from,nw_to,k", [
    ("packed", 2, 1, 0, 0, 3), ("packed", 1, 2, 0, 0, 5), ("packed", 2, 3, 2, 1, 4),
    ("padded", 2, 1, 0, 0, 7), ("padded", 1, 2, 1, 2, 6), ("concat", 2, 1, 0, 0, 4),
    ("concat", 3, 2, 0, 0, 2)])
def test_world_size_change_repeats_and_loses_nothing(tmp_path, mode, ws_from, ws_to, nw_from, nw_to, k):
    """A finite mixture, k steps on ws_from ranks, then to the end on ws_to ranks from every
    old rank's state: every token of every sample is trained exactly once."""
    lk = standard_mixture(tmp_path, repeat=(False, False, False))
    kw = dict(mode=mode, batch_size=2, pack_window=40)
    a, states = rank_batches(lk, ws_from, k, nw=nw_from, **kw)
    b, _ = rank_batches(lk, ws_to, None, state=states, nw=nw_to, **kw)
    got = piece_tokens([x for bs in a + b for x in bs])
    want = Counter()
    for d, path in enumerate(lock_dirs(lk)):
        for i in range(json.loads(Path(lk).read_text())["datasets"][d]["nlines"]):
            toks = read_sample(path, i)[0]
            want[(d, i)] = len(toks) + (mode == "concat" and int(toks[-1]) != EOS)
    assert got == want
    if ws_from > 1:  # one rank's state alone cannot say what the others consumed
        with pytest.raises(StreamError, match="every old rank"):
            MixtureStream(lk, 96, world_size=ws_to, **kw).load_state_dict(states[-1])


def test_resume_in_a_new_process(lock, tmp_path):
    kw = dict(mode="packed", batch_size=2, pack_window=40)
    base = take(MixtureStream(lock, 96, **kw).loader(0), 10)
    ld = MixtureStream(lock, 96, **kw).loader(1)
    take(ld, 4)
    (tmp_path / "state.json").write_text(json.dumps(ld.state_dict()))
    out = tmp_path / "out.pt"
    code = (
        "import json,sys,torch; sys.path.insert(0, 'tests');"
        "from train.stream import MixtureStream;"
        f"ld = MixtureStream({str(lock)!r}, 96, mode='packed', batch_size=2,"
        " pack_window=40).loader(2);"
        f"ld.load_state_dict(json.load(open({str(tmp_path / 'state.json')!r})));"
        "bs=[];\n"
        "for b in ld:\n"
        "    bs.append(b)\n"
        "    if len(bs) == 6: break\n"
        f"torch.save(bs, {str(out)!r})")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_same(torch.load(out, weights_only=False), base[4:10])


def test_stream_pickles_without_data(lock):
    import pickle
    s = MixtureStream(lock, 96, pack_window=40)
    take(s.loader(0), 2)  # memmaps now open in this process
    assert s._store is not None
    blob = pickle.dumps(s)
    assert len(blob) < 20000 and pickle.loads(blob)._store is None


def test_restore_is_O1(lock, monkeypatch):
    """A state far into the stream is restored by regenerating one window, not by replay."""
    s = MixtureStream(lock, 96, mode="packed", batch_size=2, pack_window=40)
    from train import stream as sm
    from train.lanes import LaneCursor, fresh
    cur = LaneCursor(fresh(0, 1), np.zeros(3, np.int64), s._make_window, s._schedule.n_windows)
    cur.advance(20000)  # ~ 20000 rows on: hundreds of windows, many epochs
    far = s.public_state(s._position(cur))
    assert far["window"] > 300 and far["datasets"][0]["epoch"] > 10
    assert len(json.dumps(far)) < 2000
    calls = []
    orig = sm.MixtureStream._make_window
    monkeypatch.setattr(sm.MixtureStream, "_make_window",
                        lambda self, *a: calls.append(1) or orig(self, *a))
    fresh_stream = MixtureStream(lock, 96, mode="packed", batch_size=2, pack_window=40)
    ld = fresh_stream.loader(0)
    ld.load_state_dict(json.loads(json.dumps(far)))
    first = take(ld, 1)[0]
    assert len(calls) <= 2
    # and it is the batch the long run would give there
    monkeypatch.setattr(sm.MixtureStream, "_make_window", orig)
    segs = cur.advance(2, collect=True)
    assert torch.equal(first["input_ids"], s._collate(segs)["input_ids"])


# ------------------------------------------------------------------ mixing
def test_realised_token_shares_match_the_lock(tmp_path):
    rng = np.random.default_rng(3)
    dirs = [make_dataset(tmp_path, f"m{k}", rng.integers(lo, hi, size=n), spans="none", seed=k)
            for k, (lo, hi, n) in enumerate([(5, 20, 150), (40, 120, 80), (100, 200, 40)])]
    weights = [0.6, 0.3, 0.1]
    lk = make_lock(tmp_path / "lock.json", [{"dir": d, "abs_weight": w} for d, w in
                                            zip(dirs, weights)])
    s = MixtureStream(lk, 256, mode="packed", batch_size=8, pack_window=512)
    tok = np.zeros(3)
    for b in take(s.loader(), 400):  # ~800k tokens, ~13k samples, many epochs of each
        for d, i in b["samples"].tolist():
            tok[d] += len(read_cache(dirs[d], i))
    share = tok / tok.sum()
    assert np.allclose(share, weights, atol=0.02), share  # stated tolerance: 2 points
    # the global sample sequence itself over ~2M draws: within 0.3 points
    lens = [np.array([len(read_cache(d, i)) for i in range(ds.n)]) for d, ds in zip(dirs, s.datasets)]
    parts = [s._schedule.window(w) for w in range(2_000_000 // 512)]
    d, t = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    tok = np.array([lens[k][t[d == k]].sum() for k in range(3)], float)
    assert np.allclose(tok / tok.sum(), weights, atol=0.003), tok / tok.sum()


_CACHE: dict = {}


def read_cache(d, i):
    if (d, i) not in _CACHE:
        _CACHE[(d, i)] = read_sample(d, i)[0]
    return _CACHE[(d, i)]


def test_non_repeating_dataset_each_sample_once_then_stops(lock):
    s = MixtureStream(lock, 128, mode="packed", batch_size=4, pack_window=64)
    ids = []
    n2 = json.loads(Path(lock).read_text())["datasets"][2]["nlines"]
    for b in take(s.loader(), 400):
        ids += [tuple(x) for x in b["samples"].tolist()]
    d2 = [i for d, i in ids if d == 2]
    assert sorted(d2) == list(range(n2))  # each exactly once
    last = max(k for k, (d, _) in enumerate(ids) if d == 2)
    assert last < len(ids) * 0.6  # and then it stopped while the others went on
    assert {d for d, _ in ids[last + 1:]} == {0, 1}


@pytest.mark.parametrize("mode, batch", [("padded", 3), ("packed", 2)])
def test_finite_stream_ends_on_each_rank_with_every_sample_once(tmp_path, mode, batch):
    """Each rank packs its own windows and ends when they run out (the trainer keeps ranks in
    lockstep); over the ranks every sample comes once; rows missing at a rank's end are
    all padding, and the batches keep their shape."""
    dirs = [make_dataset(tmp_path, f"f{k}", np.full(n, 10 + k), seed=k) for k, n in enumerate((23, 14))]
    lk = make_lock(tmp_path / "lock.json", [{"dir": d, "abs_weight": 0.5, "allow_repeat": False}
                                            for d in dirs])
    per_rank = [list(MixtureStream(lk, 32, mode=mode, batch_size=batch, rank=r, world_size=2,
                                   pack_window=8).loader(0)) for r in range(2)]
    got = Counter(tuple(x) for bs in per_rank for b in bs for x in b["samples"].tolist())
    assert got == Counter([(0, i) for i in range(23)] + [(1, i) for i in range(14)])
    for bs in per_rank:
        assert bs, "each rank had windows"
        for b in bs:
            if mode == "packed":
                assert b["input_ids"].shape == (batch, 32)
                check_packed(b, dirs, 32, 0)
            else:
                assert b["input_ids"].shape[0] == batch
        last = bs[-1]  # the rank's last step ran out of rows: those rows are untrained padding
        rows_used = len({int(s) // 32 for s in last["segments"][:, 1].tolist()}) if mode == "packed" \
            else len(last["samples"])
        assert (last["labels"][rows_used:] == -100).all()


# ------------------------------------------------------------------ validation split
def test_validation_split_is_stable_and_disjoint(lock):
    kw = dict(mode="padded", batch_size=4, pack_window=64, validation_percentage=10.0)
    s = MixtureStream(lock, 128, **kw)
    ev = [tuple(x) for b in s.eval_batches() for x in b["samples"].tolist()]
    ev2 = [tuple(x) for b in MixtureStream(lock, 128, world_size=2, **kw).eval_batches()
           for x in b["samples"].tolist()]
    ev3 = [tuple(x) for b in MixtureStream(lock, 128, world_size=2, rank=1, **kw).eval_batches()
           for x in b["samples"].tolist()]
    assert len(ev) == len(set(ev)) and 20 < len(ev) < 110
    assert sorted(ev2 + ev3) == sorted(ev) and ev2 and ev3  # ranks split it, each once, both get some
    train = {tuple(x) for b in take(s.loader(), 200) for x in b["samples"].tolist()}
    assert not train & set(ev)
    assert len(train) > 400


# ------------------------------------------------------------------ checks at open
def test_state_refuses_a_changed_lock(lock, tmp_path):
    ld = MixtureStream(lock, 96, pack_window=40).loader(0)
    take(ld, 3)
    st = ld.state_dict()
    data = json.loads(Path(lock).read_text())
    data["datasets"][0]["abs_weight"] = 0.9
    rest = sum(d["sample_probability"] for d in data["datasets"][1:])
    for d in data["datasets"][1:]:  # a valid lock: probabilities still sum to 1
        d["sample_probability"] *= 0.1 / rest
    data["datasets"][0]["sample_probability"] = 0.9
    other = tmp_path / "changed.lock.json"
    other.write_text(json.dumps(data))
    with pytest.raises(StreamError, match="lock_sha256"):
        MixtureStream(other, 96, pack_window=40).load_state_dict(st)
    changed = MixtureStream(other, 96, pack_window=40, allow_lock_change=True)
    with pytest.warns(UserWarning, match="per-dataset draws"):
        changed.load_state_dict(st)
    # it goes on from each dataset's saved draws (the new weights from there on) ...
    saved = [x["draws"] for x in st["datasets"]]
    assert changed._schedule.counts(0).tolist() == saved
    ld2 = changed.loader(0)
    take(ld2, 2)
    st2 = json.loads(json.dumps(ld2.state_dict()))
    assert st2["origin"] == saved
    # ... and a state saved after that resumes exactly under the new lock (origin kept)
    want = take(ld2, 3)
    again = MixtureStream(other, 96, pack_window=40).loader(0)
    again.load_state_dict(st2)
    assert_same(take(again, 3), want)
    with pytest.raises(StreamError, match="seed"):
        MixtureStream(lock, 96, seed=7, pack_window=40).load_state_dict(st)
    # moving the built dirs does not change the content hash
    data = json.loads(Path(lock).read_text())
    data["datasets"][0]["path"] = os.path.relpath(data["datasets"][0]["path"], tmp_path)
    moved = tmp_path / "moved.lock.json"
    moved.write_text(json.dumps(data))
    MixtureStream(moved, 96, pack_window=40).load_state_dict(st)


def test_checks_at_open(tmp_path):
    d = make_dataset(tmp_path, "c", [5, 6, 7])
    lk = make_lock(tmp_path / "lock.json", [{"dir": d, "abs_weight": 1.0}])
    MixtureStream(lk, 16)
    bad = json.loads(lk.read_text())
    bad["datasets"][0]["key"] = "f" * 64
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(StreamError, match="key"):
        MixtureStream(tmp_path / "bad.json", 16)
    wide = make_dataset(tmp_path, "wide", [5, 6], vocab=100000, dtype=np.uint16)
    big = make_lock(tmp_path / "big.json", [{"dir": wide, "abs_weight": 1.0}], vocab=100000)
    with pytest.raises(StreamError, match="dtype uint16 does not match vocab_size 100000"):
        MixtureStream(big, 16)  # uint16 shards cannot hold a 100000-token vocabulary
    # flip one token byte: the cheap check passes, the full sha256 check does not
    shard = d / "shard-00000.h5"
    import h5py
    with h5py.File(shard, "r") as f:
        off = f["tokens"].id.get_offset()
    raw = bytearray(shard.read_bytes())
    raw[off] ^= 1
    shard.write_bytes(bytes(raw))
    MixtureStream(lk, 16)
    with pytest.raises(StreamError, match="sha256"):
        MixtureStream(lk, 16, verify="full")
    (d / "shard-00000.h5").unlink()
    with pytest.raises(StreamError, match="missing shard"):
        MixtureStream(lk, 16)


@pytest.mark.parametrize("field", ["offsets", "loss_span_offsets"])
def test_an_index_pointing_outside_its_array_is_refused(tmp_path, field):
    """Batches are filled by compiled code that does not bounds-check: an offset past the end
    (or going backwards) must stop the stream with the shard named, before any read."""
    import h5py
    d = make_dataset(tmp_path, "c", [5, 6, 7])
    lk = make_lock(tmp_path / "lock.json", [{"dir": d, "abs_weight": 1.0}])
    with h5py.File(d / "shard-00000.h5", "r+") as f:
        f[field][-1] = f[field][-1] + 1000
    s = MixtureStream(lk, 16, verify="none")
    with pytest.raises(ValueError, match=f"shard-00000.h5: {field} are not"):
        next(iter(s.loader()))


@pytest.mark.parametrize("mode", ["packed", "padded", "concat"])
def test_segments_place_every_piece_in_the_flat_batch(lock, mode):
    """batch["segments"] (dataset, flat start, flat end) per piece, aligned with "samples":
    disjoint, in bounds, and every trained label lies in one (per-dataset loss sums to the
    step's); packed: each starts a document (position 0) and positions count up inside it."""
    s = MixtureStream(lock, 96, mode=mode, batch_size=3, pack_window=40)
    for b in take(s.loader(), 30):
        seg, smp = b["segments"].numpy(), b["samples"].numpy()
        assert len(seg) == len(smp) and np.array_equal(seg[:, 0], smp[:, 0])
        n = b["input_ids"].numel()
        assert (seg[:, 1] < seg[:, 2]).all() and seg[:, 1].min() >= 0 and seg[:, 2].max() <= n
        o = np.argsort(seg[:, 1])
        assert (seg[o][1:, 1] >= seg[o][:-1, 2]).all()  # disjoint
        covered = np.zeros(n, bool)
        for _, a, e in seg.tolist():
            covered[a:e] = True
        assert not (b["labels"].numpy().reshape(-1)[~covered] != -100).any()
        if mode == "packed":
            pos = b["position_ids"].numpy().reshape(-1)
            for _, a, e in seg.tolist():
                assert np.array_equal(pos[a:e], np.arange(e - a))


def test_mapped_shards_are_bounded_and_batches_unchanged(tmp_path, monkeypatch):
    """At most TOKENMILL_MAX_MAPPED_SHARDS shard maps outside the window in use (least
    recently used unmapped first); the batches do not depend on the bound."""
    d = make_dataset(tmp_path, "many", np.random.default_rng(5).integers(1, 40, 300), n_shards=12)
    lk = make_lock(tmp_path / "lock.json", [{"dir": d, "abs_weight": 1.0}])
    free = take(MixtureStream(lk, 64, batch_size=2, pack_window=8).loader(), 40)
    monkeypatch.setenv("TOKENMILL_MAX_MAPPED_SHARDS", "2")
    s = MixtureStream(lk, 64, batch_size=2, pack_window=8)
    it = iter(s.loader())
    bounded = []
    for _ in range(40):
        bounded.append(next(it))
        assert len(s._tokens()._maps) <= 8  # a window of 8 samples touches at most 8 shards
    assert s._tokens().max_mapped == 2
    assert_same(free, bounded)


def test_running_out_of_file_descriptors_names_the_limit(tmp_path):
    """A worker without the descriptors torch needs to hand a batch over (maps hold none: the
    64 shards map fine under a limit of 40): one StreamError line naming `ulimit -n` in the
    parent, never a bare EOFError or a hang."""
    d = make_dataset(tmp_path, "many", [5] * 64, n_shards=64)
    lk = make_lock(tmp_path / "lock.json", [{"dir": d, "abs_weight": 1.0}])
    code = f"""
import resource, sys
from train.stream import MixtureStream, StreamError
s = MixtureStream({str(lk)!r}, 32, batch_size=2)
import torch  # the DataLoader's own descriptors first
resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
try:
    next(iter(s.loader(num_workers=1)))
except StreamError as e:
    print("REFUSED", e)
    sys.exit(3)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]),
               TOKENMILL_MAX_MAPPED_SHARDS="1000")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "ulimit -n" in r.stdout and r.stdout.count("\n") == 1, r.stdout


def test_heldout_split_equals_the_numpy_definition():
    """The validation split without any table (closed-form counts per 64-id block + a compiled
    search) picks exactly the ids its definition gives, written here in numpy: ids [0, i) hold
    floor(i * f + u) held-out samples at each block edge; in a block, the lowest keyed hashes."""
    from train.sampling import GOLDEN, HeldOut, mix64, stable_hash64
    bases = [stable_hash64("tokenmill-validation", k) for k in ("a", "b", "c", "d", "e")]
    ns = [1000, 7, 130, 0, 64 * 37]
    for pct in (10.0, 1.0, 0.1, 50.0):
        h = HeldOut(bases, ns, pct)
        f = pct / 100
        for k, (b, n) in enumerate(zip(bases, ns)):
            u = float(mix64(np.uint64(b) ^ GOLDEN)[0] >> np.uint64(11)) / 2.0**53
            mask = np.zeros(n, bool)
            for a in range(0, n, 64):
                e = min(a + 64, n)
                c = int(np.floor(e * f + u)) - int(np.floor(a * f + u))
                keys = mix64(mix64(np.arange(a, e, dtype=np.uint64)) ^ np.uint64(b))
                mask[a + np.argsort(keys)[:c]] = True
            kept, held = np.flatnonzero(~mask), np.flatnonzero(mask)
            assert abs(len(held) - n * f) < 1  # the share, to within one sample
            assert h.n_held[k] == len(held) and h.n_train[k] == len(kept)
            assert np.array_equal(h.train_ids(np.full(len(kept), k), np.arange(len(kept))), kept)
            assert np.array_equal(h.held_ids(np.full(len(held), k), np.arange(len(held))), held)
