"""Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU; warm-up first,
then at least `repeats` runs, more (up to `max_runs`) until `min_time` seconds have passed."""
import statistics
import time

import torch


def median_time(fn, device, warmup=3, repeats=15, min_time=0.5, max_runs=None):
    max_runs = max_runs or 10 * repeats
    for _ in range(warmup):
        fn()
    times, t_start = [], time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - t_start < min_time and len(times) < max_runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
