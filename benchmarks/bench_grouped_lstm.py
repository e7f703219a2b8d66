"""GroupedLSTM (or GroupedGRU, GroupedRNN: --cell) against what users run today.

For each config (DESIGN.md): forward and forward+backward medians of
  loop     - the nn.ModuleList of G nn.LSTM (nn.GRU, nn.RNN) called in a Python loop (the baseline),
  grouped  - GroupedLSTM (GroupedGRU, GroupedRNN; one grouped op),
  batched  - one nn.LSTM (nn.GRU, nn.RNN) over batch G*B (same arithmetic, shared weights: what
             grouping should cost at most),
and the speed-ups loop/grouped and grouped/batched, all measured in the same run. With --json,
the file is rewritten after every row ("complete": false until the last), so a run stopped by a
time limit keeps the rows done so far.

`grouped` is measured on both recurrence paths: the "sequence" path (--grouped-path, the default:
the whole sequence in one kernel call wherever it can run: the persistent kernel on a GPU where its
plan fits, rows in parallel on the CPU; the `path` column says what ran forward/backward: Q
whole-sequence, S per-step) and, in the `per-step` column, the per-step path. On CUDA, a second
table puts the persistent forward's time per step next to its floor: FLOPs over the card's FP32 FMA
peak, or the per-step overhead measured on a minimal case (G=1, B=1; H=64 runs as one block per
group, H=256 as several slices with a barrier each step: 8 for the LSTM in fp32), whichever is
larger. The W_hh bytes per step over the measured copy bandwidth are listed as what the per-step
path re-reads each step and the persistent kernel does not.

  python benchmarks/bench_grouped_lstm.py [--cell lstm|gru|rnn_tanh|rnn_relu] [--device cpu|cuda]
                                          [--dtype float32|bfloat16|float16] [--configs a,b]
                                          [--grouped-path sequence|per_step] [--json FILE]
"""
import argparse
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mtl_kernels  # noqa: E402
from mtl_kernels import GroupedRNNBase, _C  # noqa: E402
from envinfo import describe  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from timing import median_time  # noqa: E402

# name: (G, B, T, C, H, input kind)  -- per-task models feed each LSTM its own input, parallel
# branches feed them one shared input.
CONFIGS = {
    "seed-tasks": (2, 32, 10, 100, 50, "per-group"),
    "seed-branches": (3, 32, 20, 10, 20, "shared"),
    "many-small": (32, 16, 64, 64, 64, "per-group"),
    "multitask": (8, 64, 128, 128, 256, "per-group"),
    "wide": (4, 128, 256, 512, 512, "shared"),
}


CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def torch_module(cell, C, H):
    """The torch module a loop of this cell runs: nn.LSTM, nn.GRU or nn.RNN (tanh or relu)."""
    if cell == "lstm":
        return nn.LSTM(C, H)
    if cell == "gru":
        return nn.GRU(C, H)
    return nn.RNN(C, H, nonlinearity=cell[len("rnn_"):])


def bench_config(name, device, dtype, warmup, repeats, min_time, grouped_path="sequence", cell="lstm"):
    G, B, T, C, H, kind = CONFIGS[name]
    torch.manual_seed(0)
    loop_modules = nn.ModuleList([torch_module(cell, C, H) for _ in range(G)]).to(device, dtype)
    grouped = GroupedRNNBase.from_modules(loop_modules)
    batched = torch_module(cell, C, H).to(device, dtype)
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
        return [m(xg)[0] for m, xg in zip(loop_modules, x_loop)]

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

    row = {"config": name, "cell": cell, "G": G, "B": B, "T": T, "C": C, "H": H, "input": kind}
    before = mtl_kernels.path_counts()
    with mtl_kernels.recurrence_path(grouped_path):
        grouped_fwd_bwd()
    if device.type == "cuda":
        torch.cuda.synchronize()
    after = mtl_kernels.path_counts()
    row["path"] = ("Q" if after["forward_sequence"] > before["forward_sequence"] else "S") + "/" + \
                  ("Q" if after["backward_sequence"] > before["backward_sequence"] else "S")
    for label, fns in (("fwd", (loop_fwd, grouped_fwd, batched_fwd)),
                       ("fwd+bwd", (loop_fwd_bwd, grouped_fwd_bwd, batched_fwd_bwd))):
        ctx = torch.no_grad() if label == "fwd" else torch.enable_grad()
        with ctx:
            t_loop, t_batched = (median_time(f, device, warmup, repeats, min_time) for f in fns[::2])
            with mtl_kernels.recurrence_path(grouped_path):
                t_grouped = median_time(fns[1], device, warmup, repeats, min_time)
            if grouped_path == "per_step":
                t_step = t_grouped
            else:
                with mtl_kernels.recurrence_path("per_step"):
                    t_step = median_time(fns[1], device, warmup, repeats, min_time)
        row[label] = {"loop_ms": t_loop * 1e3, "grouped_ms": t_grouped * 1e3,
                      "batched_ms": t_batched * 1e3, "speedup_vs_loop": t_loop / t_grouped,
                      "grouped_over_batched": t_grouped / t_batched}
        row[label].update({"per_step_ms": t_step * 1e3, "per_step_speedup_vs_loop": t_loop / t_step})
    return row


def copy_bandwidth(device):
    """Measured device-to-device copy bandwidth in bytes/s (read + write), 256 MiB."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, 3, 20, 0.2)
    return 2 * src.numel() * 4 / t


def fp32_fma_peak(device):
    """FP32 FLOP/s of the CUDA cores: SMs x 128 lanes x 2 x the SM clock (sm_80+: 128 FP32 lanes per SM)."""
    p = torch.cuda.get_device_properties(device)
    clock_hz = getattr(p, "clock_rate", 0) * 1e3 or 1.98e9  # clock_rate is in kHz where torch has it
    return p.multi_processor_count * 128 * 2 * clock_hz


def step_overhead_seconds(device, dtype, H, warmup, repeats, min_time, cell="lstm"):
    """Per-step cost of the persistent forward at minimal work (G=1, B=1): (time at T=513 - time
    at T=1) / 512. H=64 runs as one block (no inter-block barrier); H=256 as several slices (8 of
    32 units for the LSTM in fp32, 4 for the GRU, 2 for the RNN: one barrier per step among them)."""
    m = GroupedRNNBase.from_modules([torch_module(cell, 1, H)]).to(device, dtype)
    times = []
    with torch.no_grad(), mtl_kernels.recurrence_path("sequence"):
        for T in (1, 513):
            x = torch.randn(T, 1, 1, device=device, dtype=dtype)
            times.append(median_time(lambda: m(x), device, warmup, repeats, min_time))
    return (times[1] - times[0]) / 512


def print_floor_table(rows, device, dtype, args):
    bw, peak = copy_bandwidth(device), fp32_fma_peak(device)
    cell, K = args.cell, GATES[args.cell]
    solo = step_overhead_seconds(device, dtype, 64, args.warmup, args.repeats, args.min_time, cell)
    barrier = step_overhead_seconds(device, dtype, 256, args.warmup, args.repeats, args.min_time, cell)
    elem = torch.empty((), dtype=dtype).element_size()
    barrier_slices = _C.persistent_plan(1, 1, 256, elem, False, *device_limits(device), K)["slices"]
    print(f"\n# persistent forward per step vs its floor ({cell}): copy bw {bw / 1e9:.0f} GB/s, FP32 FMA "
          f"peak {peak / 1e12:.1f} TFLOP/s, step overhead {solo * 1e6:.2f} us (one block per group), "
          f"{barrier * 1e6:.2f} us ({barrier_slices} slices + barrier)")
    hdr = (f"{'config':<14}{'path':>5}{'slices':>7} | {'fwd us/step':>11}{'flops floor':>12}{'overhd':>9}"
           f"{'floor':>8}{'x floor':>8} | {'W_hh us/step @bw':>16}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        G, B, T, H = r["G"], r["B"], r["T"], r["H"]
        step = r["fwd"]["grouped_ms"] * 1e-3 / T
        flops = 2 * G * B * K * H * H / peak
        plan = _C.persistent_plan(G, B, H, elem, False, *device_limits(device), K)
        overhead = solo if plan["slices"] == 1 else barrier
        floor = max(flops, overhead)
        w_bytes = G * K * H * H * elem / bw
        r["floor"] = {"fwd_step_us": step * 1e6, "flops_floor_us": flops * 1e6, "overhead_us": overhead * 1e6,
                      "slices": plan["slices"],
                      "floor_us": floor * 1e6, "w_hh_us_at_bw": w_bytes * 1e6}
        print(f"{r['config']:<14}{r.get('path', '-'):>5}{plan['slices']:>7} | {step * 1e6:>11.2f}"
              f"{flops * 1e6:>12.2f}{overhead * 1e6:>9.2f}{floor * 1e6:>8.2f}{step / floor:>7.1f}x | "
              f"{w_bytes * 1e6:>16.2f}")
    return {"copy_bw_Bps": bw, "fp32_peak_flops": peak, "step_overhead_s": solo,
            "step_overhead_barrier_s": barrier}


def device_limits(device):
    """The persistent planner's limits for this GPU (see mtl_kernels._C.persistent_plan)."""
    p = torch.cuda.get_device_properties(device)
    return (p.multi_processor_count, p.shared_memory_per_block_optin, p.shared_memory_per_multiprocessor,
            p.max_threads_per_multi_processor, p.max_threads_per_block)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell", default="lstm", choices=CELLS,
                    help="the recurrent net: nn.LSTM, nn.GRU or nn.RNN (tanh, relu) against GroupedLSTM, "
                         "GroupedGRU or GroupedRNN")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--configs", default=None,
                    help="comma-separated names (default: all on cuda; all but 'wide', minutes per row, on cpu)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds to keep timing small cases")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 (cuDNN and cuBLAS) on CUDA")
    ap.add_argument("--grouped-path", default="sequence", choices=["sequence", "per_step"],
                    help="the path of the 'grouped' column (per_step: skip the whole-sequence kernels)")
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

    env = describe(device)
    env.update({"cell": args.cell, "dtype": args.dtype,
                "tf32": bool(args.tf32) if device.type == "cuda" else None, "grouped_path": args.grouped_path})
    grouped_name = type(GroupedRNNBase.from_modules([torch_module(args.cell, 1, 1)])).__name__
    torch_name = type(torch_module(args.cell, 1, 1)).__name__
    print(f"# {grouped_name} benchmark: {env}")
    cuda = device.type == "cuda"
    print(f"# times are medians in ms; speedup = loop / grouped; cost = grouped / batched (1 nn.{torch_name} over G*B); "
          "grouped = whole-sequence kernel where it applies (path Q/S fwd/bwd), per-step = the per-step path")
    step_hdr = f"{'per-step':>9}{'spd':>7}"
    hdr = (f"{'config':<14}{'G':>4}{'B':>5}{'T':>5}{'C':>5}{'H':>5}{'path':>5} | "
           f"{'fwd loop':>9}{'grouped':>9}{'batched':>9}{'speedup':>8}{'cost':>6}{step_hdr} | "
           f"{'f+b loop':>9}{'grouped':>9}{'batched':>9}{'speedup':>8}{'cost':>6}{step_hdr}")
    print(hdr)
    print("-" * len(hdr))
    rows = []

    def write_json(complete):
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"env": env, "results": rows, "complete": complete}, fh, indent=2)
            os.replace(tmp, args.json)

    def step_cols(d):
        return f"{d['per_step_ms']:>9.3f}{d['per_step_speedup_vs_loop']:>6.2f}x"

    for n in names:
        r = bench_config(n, device, dtype, args.warmup, args.repeats, args.min_time, args.grouped_path,
                         args.cell)
        rows.append(r)
        f, fb = r["fwd"], r["fwd+bwd"]
        print(f"{n:<14}{r['G']:>4}{r['B']:>5}{r['T']:>5}{r['C']:>5}{r['H']:>5}{r['path']:>5} | "
              f"{f['loop_ms']:>9.3f}{f['grouped_ms']:>9.3f}{f['batched_ms']:>9.3f}"
              f"{f['speedup_vs_loop']:>7.2f}x{f['grouped_over_batched']:>6.2f}{step_cols(f)} | "
              f"{fb['loop_ms']:>9.3f}{fb['grouped_ms']:>9.3f}{fb['batched_ms']:>9.3f}"
              f"{fb['speedup_vs_loop']:>7.2f}x{fb['grouped_over_batched']:>6.2f}{step_cols(fb)}", flush=True)
        write_json(False)
    if cuda and args.grouped_path != "per_step":
        env["floor"] = print_floor_table(rows, device, dtype, args)
    write_json(True)


if __name__ == "__main__":
    main()
