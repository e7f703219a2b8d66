"""GroupedLSTM against what users run today.

For each config (DESIGN.md): forward and forward+backward medians of
  loop     - the nn.ModuleList of G nn.LSTM called in a Python loop (the baseline),
  grouped  - GroupedLSTM (one grouped op),
  batched  - one nn.LSTM over batch G*B (same arithmetic, shared weights: what grouping should
             cost at most),
and the speed-ups loop/grouped and grouped/batched, all measured in the same run.

  python benchmarks/bench_grouped_lstm.py [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                          [--configs a,b] [--json FILE]
"""
import argparse
import json
import os
import platform
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mtl_kernels import GroupedLSTM  # noqa: E402
from timing import median_time  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)

# name: (G, B, T, C, H, input kind)  -- per-task models feed each LSTM its own input, parallel
# branches feed them one shared input.
CONFIGS = {
    "seed-tasks": (2, 32, 10, 100, 50, "per-group"),
    "seed-branches": (3, 32, 20, 10, 20, "shared"),
    "many-small": (32, 16, 64, 64, 64, "per-group"),
    "multitask": (8, 64, 128, 128, 256, "per-group"),
    "wide": (4, 128, 256, 512, 512, "shared"),
}


def bench_config(name, device, dtype, warmup, repeats, min_time):
    G, B, T, C, H, kind = CONFIGS[name]
    torch.manual_seed(0)
    lstms = nn.ModuleList([nn.LSTM(C, H) for _ in range(G)]).to(device, dtype)
    grouped = GroupedLSTM.from_lstms(lstms)
    batched = nn.LSTM(C, H).to(device, dtype)
    if kind == "shared":
        x = torch.randn(T, B, C, device=device, dtype=dtype)
        x_loop = [x] * G
    else:
        x = torch.randn(G, T, B, C, device=device, dtype=dtype)
        x_loop = list(x.unbind(0))
    x_batched = torch.randn(T, G * B, C, device=device, dtype=dtype)
    grad_loop = [torch.randn(T, B, H, device=device, dtype=dtype) for _ in range(G)]
    grad_grouped = torch.stack(grad_loop)
    grad_batched = torch.randn(T, G * B, H, device=device, dtype=dtype)

    def loop_fwd():
        return [lstm(xg)[0] for lstm, xg in zip(lstms, x_loop)]

    def loop_fwd_bwd():
        torch.autograd.backward(loop_fwd(), grad_loop)

    def grouped_fwd():
        return grouped(x)[0]

    def grouped_fwd_bwd():
        grouped_fwd().backward(grad_grouped)

    def batched_fwd():
        return batched(x_batched)[0]

    def batched_fwd_bwd():
        batched_fwd().backward(grad_batched)

    row = {"config": name, "G": G, "B": B, "T": T, "C": C, "H": H, "input": kind}
    for label, fns in (("fwd", (loop_fwd, grouped_fwd, batched_fwd)),
                       ("fwd+bwd", (loop_fwd_bwd, grouped_fwd_bwd, batched_fwd_bwd))):
        ctx = torch.no_grad() if label == "fwd" else torch.enable_grad()
        with ctx:
            t_loop, t_grouped, t_batched = (median_time(f, device, warmup, repeats, min_time) for f in fns)
        row[label] = {"loop_ms": t_loop * 1e3, "grouped_ms": t_grouped * 1e3,
                      "batched_ms": t_batched * 1e3, "speedup_vs_loop": t_loop / t_grouped,
                      "grouped_over_batched": t_grouped / t_batched}
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--configs", default=None,
                    help="comma-separated names (default: all on cuda; all but 'wide', minutes per row, on cpu)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds to keep timing small cases")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 (cuDNN and cuBLAS) on CUDA")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    if args.configs is None:
        args.configs = ",".join(c for c in CONFIGS if device.type == "cuda" or c != "wide")
    names = [c for c in args.configs.split(",") if c]
    for n in names:
        if n not in CONFIGS:
            sys.exit(f"unknown config {n!r}; choose from {', '.join(CONFIGS)}")

    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
           "tf32": bool(args.tf32) if device.type == "cuda" else None}
    print(f"# GroupedLSTM benchmark: {env}")
    print("# times are medians in ms; speedup = loop / grouped; cost = grouped / batched (1 nn.LSTM over G*B)")
    hdr = (f"{'config':<14}{'G':>4}{'B':>5}{'T':>5}{'C':>5}{'H':>5} | "
           f"{'fwd loop':>9}{'grouped':>9}{'batched':>9}{'speedup':>8}{'cost':>6} | "
           f"{'f+b loop':>9}{'grouped':>9}{'batched':>9}{'speedup':>8}{'cost':>6}")
    print(hdr)
    print("-" * len(hdr))
    rows = []
    for n in names:
        r = bench_config(n, device, dtype, args.warmup, args.repeats, args.min_time)
        rows.append(r)
        f, fb = r["fwd"], r["fwd+bwd"]
        print(f"{n:<14}{r['G']:>4}{r['B']:>5}{r['T']:>5}{r['C']:>5}{r['H']:>5} | "
              f"{f['loop_ms']:>9.3f}{f['grouped_ms']:>9.3f}{f['batched_ms']:>9.3f}"
              f"{f['speedup_vs_loop']:>7.2f}x{f['grouped_over_batched']:>6.2f} | "
              f"{fb['loop_ms']:>9.3f}{fb['grouped_ms']:>9.3f}{fb['batched_ms']:>9.3f}"
              f"{fb['speedup_vs_loop']:>7.2f}x{fb['grouped_over_batched']:>6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
