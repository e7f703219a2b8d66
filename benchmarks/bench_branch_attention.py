"""Fused attention over branches against the unfused stack + Linear + softmax + mul + sum.

  python benchmarks/bench_branch_attention.py [--device cpu|cuda] [--dtype float32|bfloat16] [--json FILE]

Prints forward and forward+backward medians, the speed-up (unfused / fused, same run), and on
CUDA the forward's achieved bandwidth: bytes that must move (read G*M*H, write M*H and the G*M
weights) over time.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mtl_kernels import branch_attention  # noqa: E402
from envinfo import describe  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from timing import median_time  # noqa: E402

SHAPES = [(3, 640, 20), (8, 8192, 256), (4, 8192, 512), (4, 65536, 512)]


def unfused(branches_list, linear):
    stacked = torch.stack(branches_list)  # what the seed block does: (G, M, H)
    weights = torch.softmax(linear(stacked).squeeze(-1), dim=0)
    return (weights.unsqueeze(-1) * stacked).sum(0)


def timeit(fn, device, repeats=30):
    return median_time(fn, device, warmup=5, repeats=repeats, min_time=0.3, max_runs=2000)


def copy_bandwidth(device, nbytes=1 << 30):
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = timeit(lambda: b.copy_(a), device, repeats=20)
    return 2 * nbytes / t  # read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = SHAPES if device.type == "cuda" else SHAPES[:3]
    copy_bw = copy_bandwidth(device) if device.type == "cuda" else None
    print(f"# branch attention, {device}, {args.dtype}" +
          (f", {torch.cuda.get_device_name(device)}, measured copy bandwidth {copy_bw / 1e9:.0f} GB/s"
           if copy_bw else f", {torch.get_num_threads()} threads"))
    env = describe(device)
    print(f"# env: {env}")
    hdr = (f"{'G':>3}{'M':>7}{'H':>5} | {'fwd unfused':>12}{'fused':>9}{'speedup':>8}"
           f"{'GB/s':>7}{'%copy':>6} | {'f+b unfused':>12}{'fused':>9}{'speedup':>8}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for G, M, H in shapes:
        torch.manual_seed(0)
        xs = [torch.randn(M, H, device=device, dtype=dtype, requires_grad=True) for _ in range(G)]
        lin = torch.nn.Linear(H, 1).to(device, dtype)
        x = torch.stack(xs).detach().requires_grad_()  # the fused op takes the stacked branches
        g = torch.randn(M, H, device=device, dtype=dtype)
        with torch.no_grad():
            t_uf = timeit(lambda: unfused(xs, lin), device)
            t_f = timeit(lambda: branch_attention(x, lin.weight, lin.bias), device)
        t_ufb = timeit(lambda: unfused(xs, lin).backward(g), device)
        t_fb = timeit(lambda: branch_attention(x, lin.weight, lin.bias).backward(g), device)
        nbytes = (G * M * H + M * H + G * M) * x.element_size()
        gbs = nbytes / t_f / 1e9
        row = dict(G=G, M=M, H=H, fwd_unfused_ms=t_uf * 1e3, fwd_fused_ms=t_f * 1e3,
                   fwd_speedup=t_uf / t_f, fwd_GBps=gbs, fwdbwd_unfused_ms=t_ufb * 1e3,
                   fwdbwd_fused_ms=t_fb * 1e3, fwdbwd_speedup=t_ufb / t_fb,
                   fwd_fraction_of_copy=(gbs * 1e9 / copy_bw) if copy_bw else None)
        rows.append(row)
        pct = f"{100 * row['fwd_fraction_of_copy']:>5.0f}%" if copy_bw else f"{'-':>6}"
        print(f"{G:>3}{M:>7}{H:>5} | {t_uf * 1e3:>12.3f}{t_f * 1e3:>9.3f}{t_uf / t_f:>7.2f}x"
              f"{gbs:>7.0f}{pct} | {t_ufb * 1e3:>12.3f}{t_fb * 1e3:>9.3f}{t_ufb / t_fb:>7.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "device": str(device), "dtype": args.dtype, "copy_GBps": copy_bw and copy_bw / 1e9,
                       "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
