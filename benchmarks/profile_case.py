"""Where a small forward+backward spends its time (torch.profiler), for the configs whose
speed-up is bounded by fixed per-call costs rather than arithmetic. Prints the top ops by self CPU
time and by self CUDA time, per recurrence path.

  python benchmarks/profile_case.py [--config seed-branches] [--device cuda]
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mtl_kernels  # noqa: E402
from bench_grouped_lstm import CONFIGS  # noqa: E402
from mtl_kernels import GroupedLSTM  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="seed-branches", choices=list(CONFIGS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    device = torch.device(args.device)
    G, B, T, C, H, kind = CONFIGS[args.config]
    torch.manual_seed(0)
    m = GroupedLSTM(G, C, H).to(device)
    x = torch.randn((T, B, C) if kind == "shared" else (G, T, B, C), device=device)
    grad = torch.randn(G, T, B, H, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for path in ("sequence", "per_step") if device.type == "cuda" else ("per_step",):
        with mtl_kernels.recurrence_path(path):
            for _ in range(3):  # warm-up
                m(x)[0].backward(grad)
            if device.type == "cuda":
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                for _ in range(5):
                    m(x)[0].backward(grad)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        print(f"\n# {args.config} f+b x5, {device.type}, path {path}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if device.type == "cuda":
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
