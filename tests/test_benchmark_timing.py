"""benchmarks/timing.py: interleaved rounds give every callable every predecessor (a callable's time
on the CPU depends on what ran just before it), and the medians are each callable's own."""
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import timing  # noqa: E402


def test_interleaved_rounds_vary_predecessors():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(4)]
    timing.interleaved_medians(fns, torch.device("cpu"), warmup=0, repeats=60, min_time=0)
    assert len(calls) == 4 * 60
    rounds = [calls[r * 4:(r + 1) * 4] for r in range(60)]
    assert all(sorted(r) == [0, 1, 2, 3] for r in rounds)  # each callable once per round
    within = Counter((a, b) for r in rounds for a, b in zip(r, r[1:]))
    # a rotation would give each callable one predecessor only (its cyclic neighbour)
    for b in range(4):
        assert {a for (a, bb) in within if bb == b} == set(range(4)) - {b}
    assert len({tuple(r) for r in rounds}) > 4  # more orders than the rotations


def test_interleaved_medians_are_each_callables_own(monkeypatch):
    durations = {0: 3.0, 1: 1.0, 2: 2.0}
    current = {}

    def fake_time_once(fn, device):  # each callable's own duration, whatever the order
        fn()
        return durations[current["i"]]

    fns = [lambda i=i: current.update(i=i) for i in range(3)]
    monkeypatch.setattr(timing, "_time_once", fake_time_once)
    assert timing.interleaved_medians(fns, torch.device("cpu"), warmup=1, repeats=9,
                                      min_time=0) == [3.0, 1.0, 2.0]
