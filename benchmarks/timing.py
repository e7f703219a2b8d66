"""Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU; warm-up first,
then at least `repeats` runs, more (up to `max_runs`) until `min_time` seconds have passed.
`interleaved_medians` times several callables in alternating rounds, so that a slow spell of a
noisy machine falls on all of them alike rather than on whichever was being timed then."""
import random
import statistics
import time

import torch


def _time_once(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn, device, warmup=3, repeats=15, min_time=0.5, max_runs=None):
    return interleaved_medians([fn], device, warmup, repeats, min_time, max_runs)[0]


def interleaved_medians(fns, device, warmup=3, repeats=15, min_time=0.5, max_runs=None):
    """The median time of each of `fns`, timed in rounds (each callable once per round, in an order
    shuffled afresh every round), at least `repeats` rounds, more (up to `max_runs`) until the
    rounds have taken `min_time` seconds.

    Why shuffled rather than rotated: on the CPU a callable's time depends on what ran just before
    it (what the previous one left in the caches and the allocator; benchmarks/NOTES.md). A rotation
    keeps the cyclic order, so every callable but the round's first always follows the same one
    and carries that neighbour's effect in every round; a fresh random order (seeded: the same
    sequence of orders every run) gives each callable every predecessor alike."""
    max_runs = max_runs or 10 * repeats
    for fn in fns:
        for _ in range(warmup):
            fn()
    order_rng = random.Random(0)
    order = list(range(len(fns)))
    times, t_start, rounds = [[] for _ in fns], time.perf_counter(), 0
    while rounds < repeats or (time.perf_counter() - t_start < min_time and rounds < max_runs):
        order_rng.shuffle(order)
        for j in order:
            times[j].append(_time_once(fns[j], device))
        rounds += 1
    return [statistics.median(t) for t in times]
