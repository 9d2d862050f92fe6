"""Lanes: windows dealt to ranks, and re-dealt on a world-size change without repeat or loss.
Checked on a model of the stream (windows of random unit counts, lanes consuming random
amounts), independent of MixtureStream."""
import numpy as np
import pytest

from train.lanes import LanePos, fresh, replan


def consume(pos: LanePos, k: int, sizes, log: list) -> LanePos:
    """Take k units along the lane (as stream._Cursor does), logging (window, unit)."""
    while k > 0:
        w = pos.current()
        if w >= len(sizes):
            break
        if pos.offset >= sizes[w]:
            pos.finish_item()
            continue
        m = min(k, sizes[w] - pos.offset)
        log += [(w, u) for u in range(pos.offset, pos.offset + m)]
        pos.offset += m
        k -= m
    return pos


@pytest.mark.parametrize("seed", range(12))
def test_replan_chain_consumes_every_unit_once(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(0, 9, size=400).tolist()  # empty windows too
    ws0 = int(rng.integers(1, 6))
    lanes = [fresh(j, ws0) for j in range(ws0)]
    log: list = []
    for _ in range(4):  # several world-size changes in a row
        for p in lanes:
            consume(p, int(rng.integers(0, 40)), sizes, log)
        ws = int(rng.integers(1, 7))
        lanes = replan(lanes, ws, n_windows=len(sizes))
        assert [p.lane for p in lanes] == list(range(ws)) and all(p.lanes == ws for p in lanes)
    for p in lanes:  # to the end
        consume(p, 10**9, sizes, log)
    want = [(w, u) for w, n in enumerate(sizes) for u in range(n)]
    assert sorted(log) == want  # every unit once: nothing repeated, nothing lost


def test_fresh_lanes_partition_the_windows():
    ws = 4
    lanes = [fresh(j, ws) for j in range(ws)]
    seen = []
    for p in lanes:
        for _ in range(25):
            seen.append(p.current())
            p.finish_item()
    assert sorted(seen) == list(range(100))


def test_replan_needs_every_lane():
    lanes = [fresh(j, 3) for j in range(3)]
    with pytest.raises(ValueError, match="every lane"):
        replan(lanes[:2], 2)


def test_same_lanes_replan_continues_in_place():
    """Re-planning for the same count keeps each lane's partly consumed window and offset."""
    sizes = [5] * 50
    lanes = [fresh(j, 2) for j in range(2)]
    consume(lanes[0], 7, sizes, [])
    consume(lanes[1], 3, sizes, [])
    new = replan([p.copy() for p in lanes], 2, len(sizes))
    a, b = [], []
    for p in new:
        consume(p, 10**6, sizes, a)
    for p in lanes:
        consume(p, 10**6, sizes, b)
    assert sorted(a) == sorted(b)
