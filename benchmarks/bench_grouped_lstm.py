"""GroupedLSTM (or GroupedGRU, GroupedRNN: --cell) against what users run today.

For each config (DESIGN.md): forward and forward+backward medians of
  loop     - the nn.ModuleList of G nn.LSTM (nn.GRU, nn.RNN) called in a Python loop (the baseline),
  grouped  - GroupedLSTM (GroupedGRU, GroupedRNN; one grouped op),
  batched  - one nn.LSTM (nn.GRU, nn.RNN) over batch G*B (same arithmetic, shared weights: what
             grouping should cost at most),
and the speed-ups loop/grouped and grouped/batched, all measured in the same run, in interleaved
rounds (each column once per round), so that a slow spell of a shared machine hits every column. With --json,
the file is rewritten after every row ("complete": false until the last), so a run stopped by a
time limit keeps the rows done so far.

`grouped` runs the recurrence path --grouped-path names, by default "auto": what users get (on the
CPU the path chosen per shape by measurement, see mtl_kernels.tuned_paths(); on a GPU the per-step
path until a GPU run verifies the persistent kernels, see mtl_kernels.auto_paths()); "sequence" forces the whole sequence in one kernel call wherever it
can run (the persistent kernel on a GPU where its plan fits, rows in parallel on the CPU) and
"per_step" the per-step path. The `path` column says what ran forward/backward in the fwd+bwd
call: T the persistent kernel's tensor-core variant, Q the whole sequence without tensor cores (the
persistent kernel's FMA variant, or the CPU's sequence path), S per step. The `per-step` column times the per-step path. On CUDA, where the
tensor-core variant ran (bf16 / fp16; fp32 with --tf32), the `FMA` column times the sequence path
with it switched off (mtl_kernels.tensor_cores("off")), so that each variant has its column; on a
CPU with AVX2 in fp32 that column is `untiled`: the grouped path with the register-tiled fp32
products (csrc/recurrence/cpu_tiles.h) switched off, i.e. on MKL and the generic loops, and on a
CPU with AVX-512 the `avx2` column times the grouped path on the tiles' AVX2 variant. A
second table puts the persistent forward's time per step next to its floor: FLOPs (K gates: 4 for
the LSTM, 3 for the GRU, 1 for the RNN) over the peak of the units that ran it (the tensor cores'
dense bf16 / fp16 / TF32 peak where the tensor-core variant ran, computed from the SM count and
clock; else the FP32 FMA peak), or the per-step overhead measured on a minimal case of the same
cell (G=1, B=1; H=64 runs as one block per group, H=256 as several slices with a barrier each step),
whichever is larger; and the same for the FMA variant where both ran. The W_hh bytes per step over
the measured copy bandwidth are listed as what the per-step path re-reads each step and the
persistent kernel does not.

  python benchmarks/bench_grouped_lstm.py [--cell lstm|gru|rnn_tanh|rnn_relu] [--device cpu|cuda]
                                          [--dtype float32|bfloat16|float16] [--configs a,b]
                                          [--grouped-path auto|sequence|per_step] [--tf32]
                                          [--input-grad] [--json FILE]

--input-grad makes the inputs require grad, so that fwd+bwd also computes the input gradient: the
case of every layer above the first, and of a model whose embedding is trained.
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
from timing import interleaved_medians, median_time  # noqa: E402

# name: (G, B, T, C, H, input kind)  -- per-task models feed each LSTM its own input, parallel
# branches feed them one shared input.
CONFIGS = {
    "seed-tasks": (2, 32, 10, 100, 50, "per-group"),
    "seed-branches": (3, 32, 20, 10, 20, "shared"),
    "many-small": (32, 16, 64, 64, 64, "per-group"),
    "multitask": (8, 64, 128, 128, 256, "per-group"),
    "multitask-t32": (8, 64, 32, 128, 256, "per-group"),  # the same at a quarter of the length
    "wide": (4, 128, 256, 512, 512, "shared"),
}

# Ragged multi-task batches (issue 28): every task its own (T_k, B_k), batch_first, C, H; against an
# equal-shape call of about the same work (three tasks of T = 35, B = 43: 4,515 row-steps against
# the ragged 4,480), to show whether the time follows the real rows and steps.
RAGGED = {"ragged": dict(tasks=((50, 64), (30, 32), (20, 16)), C=64, H=128, equal=(35, 43))}


CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def torch_module(cell, C, H):
    """The torch module a loop of this cell runs: nn.LSTM, nn.GRU or nn.RNN (tanh or relu)."""
    if cell == "lstm":
        return nn.LSTM(C, H)
    if cell == "gru":
        return nn.GRU(C, H)
    return nn.RNN(C, H, nonlinearity=cell[len("rnn_"):])


def ran_path(fn, device):
    """Runs fn once; "F/B": T tensor-core persistent kernel, Q whole sequence without tensor cores
    (FMA persistent kernel, CPU sequence path), S per step, for the forward and the backward."""
    before, tc_before = mtl_kernels.path_counts(), mtl_kernels.tensor_core_counts()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    after, tc_after = mtl_kernels.path_counts(), mtl_kernels.tensor_core_counts()

    def code(kind):
        if tc_after[kind] > tc_before[kind]:
            return "T"
        return "Q" if after[f"{kind}_sequence"] > before[f"{kind}_sequence"] else "S"
    return code("forward") + "/" + code("backward")


def untiled_column(device, dtype):
    """On a CPU with AVX2 in fp32 the `FMA` column times the grouped path with its register-tiled
    products switched off (MKL and the generic loops: what ran before them)."""
    return device.type == "cpu" and dtype == torch.float32 and _C._cpu_tiles_supported()


def avx2_column(device, dtype):
    """On a CPU with AVX-512 in fp32 the tiles run their AVX-512 variant, and the `avx2` column
    times the grouped path with the AVX2 variant instead (mtl_kernels.cpu_tiles("avx2"))."""
    return untiled_column(device, dtype) and _C._cpu_tiles_avx512_supported()


def bench_config(name, device, dtype, warmup, repeats, min_time, grouped_path="auto", cell="lstm",
                 input_grad=False):
    """input_grad: the inputs require grad, so fwd+bwd also computes the input gradient (a layer
    above the first, or a model whose embedding is trained)."""
    G, B, T, C, H, kind = CONFIGS[name]
    torch.manual_seed(0)
    loop_modules = nn.ModuleList([torch_module(cell, C, H) for _ in range(G)]).to(device, dtype)
    grouped = GroupedRNNBase.from_modules(loop_modules)
    batched = torch_module(cell, C, H).to(device, dtype)
    if kind == "shared":
        x = torch.randn(T, B, C, device=device, dtype=dtype).requires_grad_(input_grad)
        x_loop = [x] * G
    else:
        x = torch.randn(G, T, B, C, device=device, dtype=dtype).requires_grad_(input_grad)
        x_loop = list(x.unbind(0))  # views of x: the loop's input gradients reach x.grad too
    x_batched = torch.randn(T, G * B, C, device=device, dtype=dtype).requires_grad_(input_grad)
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

    row = {"config": name, "cell": cell, "G": G, "B": B, "T": T, "C": C, "H": H, "input": kind,
           "input_grad": input_grad}
    with mtl_kernels.recurrence_path(grouped_path):
        row["path"] = ran_path(grouped_fwd_bwd, device)
    # the FMA variant's own column (the sequence path, tensor cores off), where the tensor-core
    # variant ran
    row["path_fma"] = None
    if "T" in row["path"]:
        with mtl_kernels.recurrence_path("sequence"), mtl_kernels.tensor_cores("off"):
            row["path_fma"] = ran_path(grouped_fwd_bwd, device)
    def on(path, fn, tc_mode="auto", cpu_tiles="auto"):  # fn on a recurrence path (process-wide switches)
        def run():
            with mtl_kernels.recurrence_path(path), mtl_kernels.tensor_cores(tc_mode), \
                    mtl_kernels.cpu_tiles(cpu_tiles):
                return fn()
        return run

    for label, fns in (("fwd", (loop_fwd, grouped_fwd, batched_fwd)),
                       ("fwd+bwd", (loop_fwd_bwd, grouped_fwd_bwd, batched_fwd_bwd))):
        ctx = torch.no_grad() if label == "fwd" else torch.enable_grad()
        # every column in the same interleaved rounds: the CPU machine's speed drifts by tens of
        # percent within a run, and the ratios should not depend on which column it hit
        timed = {"loop": fns[0], "batched": fns[2], "grouped": on(grouped_path, fns[1])}
        if row["path_fma"] is not None:
            timed["fma"] = on("sequence", fns[1], "off")
        if untiled_column(device, dtype):
            timed["untiled"] = on(grouped_path, fns[1], cpu_tiles="off")
        if avx2_column(device, dtype):
            timed["avx2"] = on(grouped_path, fns[1], cpu_tiles="avx2")
        if grouped_path != "per_step":
            timed["per_step"] = on("per_step", fns[1])
        with ctx:
            medians = dict(zip(timed, interleaved_medians(list(timed.values()), device, warmup,
                                                          repeats, min_time)))
        t_loop, t_batched, t_grouped = medians["loop"], medians["batched"], medians["grouped"]
        t_fma = medians.get("fma")
        t_step = medians.get("per_step", t_grouped)
        row[label] = {"loop_ms": t_loop * 1e3, "grouped_ms": t_grouped * 1e3,
                      "batched_ms": t_batched * 1e3, "speedup_vs_loop": t_loop / t_grouped,
                      "grouped_over_batched": t_grouped / t_batched}
        row[label].update({"per_step_ms": t_step * 1e3, "per_step_speedup_vs_loop": t_loop / t_step})
        row[label]["fma_ms"] = t_fma * 1e3 if t_fma is not None else None
        row[label]["untiled_ms"] = medians["untiled"] * 1e3 if "untiled" in medians else None
        row[label]["avx2_ms"] = medians["avx2"] * 1e3 if "avx2" in medians else None
    return row


def bench_ragged(name, device, dtype, warmup, repeats, min_time, cell="lstm"):
    """A list of per-task batches (x_k (B_k, T_k, C), batch_first), the last step of each task's
    output feeding a loss: the loop of torch modules, the grouped list call, and the grouped call on
    equal shapes of about the same work; fwd (no grad) and fwd+bwd (the weights' gradients)."""
    cfg = RAGGED[name]
    tasks, C, H = cfg["tasks"], cfg["C"], cfg["H"]
    G = len(tasks)
    T_eq, B_eq = cfg["equal"]
    torch.manual_seed(0)
    loop_modules = nn.ModuleList([torch_module(cell, C, H) for _ in range(G)]).to(device, dtype)
    for m in loop_modules:
        m.batch_first = True
    grouped = GroupedRNNBase.from_modules(loop_modules)  # batch_first, as the modules
    xs = [torch.randn(B, T, C, device=device, dtype=dtype) for T, B in tasks]  # x_k (B_k, T_k, C)
    x_eq = torch.randn(G, B_eq, T_eq, C, device=device, dtype=dtype)  # (G, B, T, C)
    w_loss = torch.randn(H, device=device, dtype=dtype)  # loss_k = sum(out_k[:, -1] @ w_loss)

    def loop_fwd():
        return [m(x)[0][:, -1] for m, x in zip(loop_modules, xs)]

    def grouped_fwd():
        return [out[:, -1] for out, _ in grouped(xs)]

    def equal_fwd():
        return list(grouped(x_eq)[0][:, :, -1].unbind(0))

    def fwd_bwd(fwd):
        def run():
            sum((last @ w_loss).sum() for last in fwd()).backward()
        return run

    with torch.no_grad():  # the list call is the loop's answer
        for a, b in zip(grouped_fwd(), loop_fwd()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    row = {"config": name, "cell": cell, "tasks": [list(t) for t in tasks], "C": C, "H": H,
           "equal": [T_eq, B_eq], "row_steps": sum(T * B for T, B in tasks),
           "equal_row_steps": G * T_eq * B_eq}
    for label, fns in (("fwd", (loop_fwd, grouped_fwd, equal_fwd)),
                       ("fwd+bwd", tuple(fwd_bwd(f) for f in (loop_fwd, grouped_fwd, equal_fwd)))):
        ctx = torch.no_grad() if label == "fwd" else torch.enable_grad()
        with ctx:
            t_loop, t_grouped, t_equal = interleaved_medians(list(fns), device, warmup, repeats, min_time)
        per_real = (t_grouped / row["row_steps"]) / (t_equal / row["equal_row_steps"])
        row[label] = {"loop_ms": t_loop * 1e3, "grouped_ms": t_grouped * 1e3, "equal_ms": t_equal * 1e3,
                      "speedup_vs_loop": t_loop / t_grouped, "per_row_step_vs_equal": per_real}
    return row


def print_ragged_row(r):
    tasks = " ".join(f"{T}x{B}" for T, B in r["tasks"])
    print(f"\n# ragged multi-task batches: tasks (T_k x B_k) {tasks}, C={r['C']}, H={r['H']}, batch_first, "
          f"{r['row_steps']} real row-steps; equal = the grouped call on {len(r['tasks'])} tasks of "
          f"{r['equal'][0]}x{r['equal'][1]} ({r['equal_row_steps']} row-steps); per-row-step = (grouped / "
          f"its row-steps) / (equal / its row-steps), 1.00 = time follows the real work")
    hdr = f"{'pass':<8}{'loop':>9}{'grouped':>9}{'equal':>9}{'speedup':>9}{'per-row-step':>14}"
    print(hdr)
    print("-" * len(hdr))
    for label in ("fwd", "fwd+bwd"):
        d = r[label]
        print(f"{label:<8}{d['loop_ms']:>9.3f}{d['grouped_ms']:>9.3f}{d['equal_ms']:>9.3f}"
              f"{d['speedup_vs_loop']:>8.2f}x{d['per_row_step_vs_equal']:>13.2f}x", flush=True)


def copy_bandwidth(device):
    """Measured device-to-device copy bandwidth in bytes/s (read + write), 256 MiB."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, 3, 20, 0.2)
    return 2 * src.numel() * 4 / t


def _clock_hz(p):
    return getattr(p, "clock_rate", 0) * 1e3 or 1.98e9  # clock_rate is in kHz where torch has it


def fp32_fma_peak(device):
    """FP32 FLOP/s of the CUDA cores: SMs x 128 lanes x 2 x the SM clock (sm_80+: 128 FP32 lanes per SM)."""
    p = torch.cuda.get_device_properties(device)
    return p.multi_processor_count * 128 * 2 * _clock_hz(p)


# Dense tensor-core FLOPs per clock per SM (mma: 2 per multiply-add), by compute capability:
# H100 (sm_90): 989 TFLOP/s bf16/fp16 and 495 TF32 at 1.83 GHz over 132 SMs; A100 (sm_80): 312 and
# 156 at 1.41 GHz over 108 SMs; the other sm_8x parts have half of the A100's.
TC_FLOPS_PER_CLK_SM = {(9, 0): {"16": 4096, "tf32": 2048}, (8, 0): {"16": 2048, "tf32": 1024}}


def tensor_core_peak(device, dtype):
    """Dense tensor-core FLOP/s for dtype's mma (bf16 / fp16; TF32 for fp32): SMs x clock x the
    per-SM rate of the compute capability (mma.sync reaches part of it on Hopper, whose full rate
    needs wgmma)."""
    p = torch.cuda.get_device_properties(device)
    rates = TC_FLOPS_PER_CLK_SM.get((p.major, p.minor)) or \
        ({"16": 1024, "tf32": 512} if p.major == 8 else TC_FLOPS_PER_CLK_SM[(9, 0)])
    rate = rates["tf32" if dtype == torch.float32 else "16"]
    return p.multi_processor_count * rate * _clock_hz(p)


def step_overhead_seconds(device, dtype, H, warmup, repeats, min_time, cell="lstm", tc_mode="auto"):
    """Per-step cost of the persistent forward at minimal work (G=1, B=1): (time at T=513 - time
    at T=1) / 512, with tensor cores `tc_mode`, and the variant that ran it (ran_path's forward
    code: T, Q or S). H=64 runs as one block (no inter-block barrier); H=256 as several slices where
    W_hh does not fit one block (on FMAs in fp32: 8 of 32 units for the LSTM, 4 for the GRU, 2 for
    the RNN; on tensor cores 4 of 64 units for every cell: one barrier per step among them)."""
    m = GroupedRNNBase.from_modules([torch_module(cell, 1, H)]).to(device, dtype)
    times = []
    with torch.no_grad(), mtl_kernels.recurrence_path("sequence"), mtl_kernels.tensor_cores(tc_mode):
        variant = ran_path(lambda: m(torch.randn(2, 1, 1, device=device, dtype=dtype)), device)[0]
        for T in (1, 513):
            x = torch.randn(T, 1, 1, device=device, dtype=dtype)
            times.append(median_time(lambda: m(x), device, warmup, repeats, min_time))
    return (times[1] - times[0]) / 512, variant


def print_floor_table(rows, device, dtype, args):
    bw, peak = copy_bandwidth(device), fp32_fma_peak(device)
    cell, K = args.cell, GATES[args.cell]
    tc_peak = tensor_core_peak(device, dtype) if dtype != torch.float64 else None
    elem = torch.empty((), dtype=dtype).element_size()
    limits = device_limits(device)

    def slices_of(tc, G, B, H):
        if tc:
            mk = 8 if dtype == torch.float32 else 16
            return _C.persistent_mma_plan(G, B, H, elem, False, *limits, K, mk)["slices"]
        return _C.persistent_plan(G, B, H, elem, False, *limits, K)["slices"]

    overhead = {}  # (tensor-core mode, H) -> (seconds per step at minimal work, variant that ran)
    modes = ["auto"] + (["off"] if any(r.get("path_fma") for r in rows) else [])
    for mode in modes:
        for H in (64, 256):
            overhead[mode, H] = step_overhead_seconds(device, dtype, H, args.warmup, args.repeats,
                                                      args.min_time, cell, mode)

    def describe_overhead(mode):
        (solo, v64), (barrier, v256) = overhead[mode, 64], overhead[mode, 256]
        n = slices_of(v256 == "T", 1, 1, 256)
        return (f"tensor cores {mode}: {solo * 1e6:.2f} us ({v64}, H=64: one block per group), "
                f"{barrier * 1e6:.2f} us ({v256}, H=256: " + (f"{n} slices + barrier)" if n > 1 else "one block)"))
    print(f"\n# persistent forward per step vs its floor ({cell}): copy bw {bw / 1e9:.0f} GB/s, FP32 FMA "
          f"peak {peak / 1e12:.1f} TFLOP/s, tensor-core peak {(tc_peak or 0) / 1e12:.0f} TFLOP/s "
          f"({'TF32' if dtype == torch.float32 else dtype}); step overhead "
          + "; ".join(describe_overhead(m) for m in modes))
    hdr = (f"{'config':<14}{'path':>5}{'slices':>7} | {'fwd us/step':>11}{'flops floor':>12}{'overhd':>9}"
           f"{'floor':>8}{'x floor':>8} | {'FMA us/step':>11}{'floor':>8}{'x floor':>8} | "
           f"{'W_hh us/step @bw':>16}")
    print(hdr)
    print("-" * len(hdr))
    result = {"copy_bw_Bps": bw, "fp32_peak_flops": peak, "tensor_core_peak_flops": tc_peak,
              "step_overhead_s": overhead["auto", 64][0],
              "step_overhead_barrier_s": overhead["auto", 256][0],
              "step_overhead_variants": [overhead["auto", 64][1], overhead["auto", 256][1]]}
    if "off" in modes:
        result.update({"fma_step_overhead_s": overhead["off", 64][0],
                       "fma_step_overhead_barrier_s": overhead["off", 256][0]})

    def floor_of(tc, G, B, H):
        flops = 2 * G * B * K * H * H / (tc_peak if tc else peak)
        slices = slices_of(tc, G, B, H)
        Hx = 64 if slices == 1 else 256
        # the overhead measured on the same variant where there is one
        same = [m for m in modes if (overhead[m, Hx][1] == "T") == tc]
        over = overhead[same[0] if same else "auto", Hx][0]
        return flops, over, max(flops, over), slices

    for r in rows:
        G, B, T, H = r["G"], r["B"], r["T"], r["H"]
        step = r["fwd"]["grouped_ms"] * 1e-3 / T
        tc = r.get("path", "").startswith("T")
        flops, over, floor, slices = floor_of(tc, G, B, H)
        w_bytes = G * K * H * H * elem / bw
        r["floor"] = {"fwd_step_us": step * 1e6, "flops_floor_us": flops * 1e6, "overhead_us": over * 1e6,
                      "slices": slices, "peak": "tensor cores" if tc else "fp32 fma",
                      "floor_us": floor * 1e6, "w_hh_us_at_bw": w_bytes * 1e6}
        fma_cols = f"{'-':>11}{'-':>8}{'-':>8}"
        if r["fwd"].get("fma_ms") is not None:
            fma_step = r["fwd"]["fma_ms"] * 1e-3 / T
            _, _, fma_floor, _ = floor_of(False, G, B, H)
            r["floor"].update({"fma_fwd_step_us": fma_step * 1e6, "fma_floor_us": fma_floor * 1e6})
            fma_cols = f"{fma_step * 1e6:>11.2f}{fma_floor * 1e6:>8.2f}{fma_step / fma_floor:>7.1f}x"
        print(f"{r['config']:<14}{r.get('path', '-'):>5}{slices:>7} | {step * 1e6:>11.2f}"
              f"{flops * 1e6:>12.2f}{over * 1e6:>9.2f}{floor * 1e6:>8.2f}{step / floor:>7.1f}x | "
              f"{fma_cols} | {w_bytes * 1e6:>16.2f}")
    return result


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
    ap.add_argument("--grouped-path", default="auto", choices=["auto", "sequence", "per_step"],
                    help="the path of the 'grouped' column (auto: the default users get; sequence: the "
                         "whole-sequence kernels wherever they run; per_step: skip them)")
    ap.add_argument("--input-grad", action="store_true",
                    help="the inputs require grad: fwd+bwd also computes the input gradient")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    if args.configs is None:
        args.configs = ",".join([c for c in CONFIGS if device.type == "cuda" or c != "wide"] + list(RAGGED))
    names = [c for c in args.configs.split(",") if c]
    for n in names:
        if n not in CONFIGS and n not in RAGGED:
            sys.exit(f"unknown config {n!r}; choose from {', '.join(list(CONFIGS) + list(RAGGED))}")
    ragged_names = [n for n in names if n in RAGGED]
    names = [n for n in names if n in CONFIGS]

    env = describe(device)
    env.update({"cell": args.cell, "dtype": args.dtype,
                "tf32": bool(args.tf32) if device.type == "cuda" else None, "grouped_path": args.grouped_path,
                "input_grad": args.input_grad})
    grouped_name = type(GroupedRNNBase.from_modules([torch_module(args.cell, 1, 1)])).__name__
    torch_name = type(torch_module(args.cell, 1, 1)).__name__
    print(f"# {grouped_name} benchmark: {env}")
    cuda = device.type == "cuda"
    print(f"# times are medians in ms; speedup = loop / grouped; cost = grouped / batched (1 nn.{torch_name} over G*B); "
          f"grouped = the {args.grouped_path} path (path fwd/bwd: T tensor cores, Q whole sequence without them, "
          "S per step), FMA = the sequence path with tensor cores off (where they ran), untiled = the grouped path "
          "with the CPU's register-tiled fp32 products off (MKL and the generic loops), per-step = the per-step path"
          + (", avx2 = the grouped path with the tiles' AVX2 variant (grouped: AVX-512)"
             if avx2_column(device, dtype) else ""))
    alt_name = "untiled" if untiled_column(device, dtype) else "FMA"
    avx2_hdr = f"{'avx2':>9}" if avx2_column(device, dtype) else ""
    step_hdr = f"{alt_name:>9}{avx2_hdr}{'per-step':>9}{'spd':>7}"
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
        alt = d.get("fma_ms") if d.get("fma_ms") is not None else d.get("untiled_ms")
        fma = f"{alt:>9.3f}" if alt is not None else f"{'-':>9}"
        avx2 = f"{d['avx2_ms']:>9.3f}" if d.get("avx2_ms") is not None else ""
        return f"{fma}{avx2}{d['per_step_ms']:>9.3f}{d['per_step_speedup_vs_loop']:>6.2f}x"

    for n in names:
        r = bench_config(n, device, dtype, args.warmup, args.repeats, args.min_time, args.grouped_path,
                         args.cell, args.input_grad)
        rows.append(r)
        f, fb = r["fwd"], r["fwd+bwd"]
        print(f"{n:<14}{r['G']:>4}{r['B']:>5}{r['T']:>5}{r['C']:>5}{r['H']:>5}{r['path']:>5} | "
              f"{f['loop_ms']:>9.3f}{f['grouped_ms']:>9.3f}{f['batched_ms']:>9.3f}"
              f"{f['speedup_vs_loop']:>7.2f}x{f['grouped_over_batched']:>6.2f}{step_cols(f)} | "
              f"{fb['loop_ms']:>9.3f}{fb['grouped_ms']:>9.3f}{fb['batched_ms']:>9.3f}"
              f"{fb['speedup_vs_loop']:>7.2f}x{fb['grouped_over_batched']:>6.2f}{step_cols(fb)}", flush=True)
        write_json(False)
    if cuda and args.grouped_path != "per_step" and names:
        env["floor"] = print_floor_table(rows, device, dtype, args)
    for n in ragged_names:  # its own table: per-task shapes do not fit the columns above
        with mtl_kernels.recurrence_path(args.grouped_path):
            r = bench_ragged(n, device, dtype, args.warmup, args.repeats, args.min_time, args.cell)
        rows.append(r)
        print_ragged_row(r)
        write_json(False)
    write_json(True)


if __name__ == "__main__":
    main()
