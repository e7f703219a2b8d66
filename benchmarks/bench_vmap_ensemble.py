"""PyTorch's ensembling of nn.LSTMs (torch.func.stack_module_state + vmap(functional_call)) through
mtl_kernels' batching rule, against the loop over the members and GroupedLSTM called directly on
the same weights. Forward + backward (the loss's gradients w.r.t. every member's weights) and
forward alone; the median of interleaved rounds (benchmarks/timing.py), every column in the same
rounds, the ratios from this run.

    python benchmarks/bench_vmap_ensemble.py [--members 8] [--input 64] [--hidden 128] [--T 64]
                                             [--B 16] [--layers 1] [--threads N]

Issue 29's targets (CPU, 2 cores): f+b through vmap >= 2x the loop, and within 1.15x of
GroupedLSTM direct.
"""
import argparse
import copy
import os
import sys

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mtl_kernels  # noqa: E402  (registers the rules)
from timing import interleaved_medians  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--input", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    G, C, H, T, B, L = args.members, args.input, args.hidden, args.T, args.B, args.layers
    lstms = [nn.LSTM(C, H, num_layers=L) for _ in range(G)]
    x = torch.randn(T, B, C)  # shared by every member: x (T, B, C)

    # vmap: the tutorial's recipe; the stacked parameters are leaves (stack_module_state)
    params, buffers = stack_module_state(lstms)  # each (G, ...), requires_grad
    base = copy.deepcopy(lstms[0]).to("meta")

    def member(p, b, x):
        return functional_call(base, (p, b), (x,))[0]

    ensemble = torch.vmap(member, in_dims=(0, 0, None))
    grouped = mtl_kernels.GroupedLSTM.from_lstms(lstms)  # the same weights

    def loop_fwd():
        with torch.no_grad():
            return [m(x)[0] for m in lstms]

    def loop_fb():
        sum(m(x)[0].sum() for m in lstms).backward()

    def vmap_fwd():
        with torch.no_grad():
            return ensemble(params, buffers, x)

    def vmap_fb():
        ensemble(params, buffers, x).sum().backward()

    def grouped_fwd():
        with torch.no_grad():
            return grouped(x)[0]

    def grouped_fb():
        grouped(x)[0].sum().backward()

    # the three agree (fp32): the rule serves the call, on the grouped op
    with torch.no_grad():
        ref = torch.stack(loop_fwd())
        torch.testing.assert_close(vmap_fwd(), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grouped_fwd(), ref, rtol=1e-4, atol=1e-5)
    before = mtl_kernels._vmap_rnn.rule_counts()["grouped"]
    vmap_fwd()
    assert mtl_kernels._vmap_rnn.rule_counts()["grouped"] == before + 1

    # The machine's ceiling, measured in the same rounds: a square fp32 matmul's GFLOP/s. A ratio
    # against the loop is bounded by (ceiling / the loop's GFLOP/s), whatever the kernel.
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)

    def gemm():
        return a @ b

    fns = {"gemm": gemm, "loop f+b": loop_fb, "vmap f+b": vmap_fb, "grouped f+b": grouped_fb,
           "loop fwd": loop_fwd, "vmap fwd": vmap_fwd, "grouped fwd": grouped_fwd}
    cpu = torch.device("cpu")
    med = dict(zip(fns, interleaved_medians(list(fns.values()), cpu, warmup=3,
                                            repeats=args.repeats, min_time=2.0)))
    print(f"ensemble of {G} nn.LSTM({C}, {H}, num_layers={L}), shared input (T={T}, B={B}), fp32, "
          f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"| pass | loop over members (ms) | vmap, our rule (ms) | GroupedLSTM direct (ms) | "
          f"loop / vmap | vmap / grouped |")
    print("|---|---|---|---|---|---|")
    for kind in ("f+b", "fwd"):
        lp, vm, gr = (med[f"{w} {kind}"] for w in ("loop", "vmap", "grouped"))
        print(f"| {kind} | {lp * 1e3:.2f} | {vm * 1e3:.2f} | {gr * 1e3:.2f} | {lp / vm:.2f}x | "
              f"{vm / gr:.3f}x |")
    peak = 2 * 1024 ** 3 / med["gemm"]
    flops = ensemble_flops(G, C, H, T, B, L)
    print(f"\nceiling: a 1024x1024 fp32 matmul in the same rounds, {peak / 1e9:.0f} GFLOP/s; the products' "
          f"FLOPs of each pass, as GFLOP/s and a share of that ceiling:")
    print("| pass | GFLOP | loop | vmap | grouped | best ratio to the loop at the ceiling |")
    print("|---|---|---|---|---|---|")
    for kind in ("f+b", "fwd"):
        rates = [flops[kind] / med[f"{w} {kind}"] for w in ("loop", "vmap", "grouped")]
        cells = " | ".join(f"{r / 1e9:.0f} ({r / peak:.0%})" for r in rates)
        print(f"| {kind} | {flops[kind] / 1e9:.2f} | {cells} | {peak / rates[0]:.2f}x |")


def ensemble_flops(G, C, H, T, B, L):
    """The matrix products' FLOPs of an ensemble pass (gate nonlinearities left out): forward
    x W_ih^T + h W_hh^T per layer; the backward of a loss over the weights alone adds dh W_hh, dW_ih,
    dW_hh per layer and dx W_ih for the layers above the first (the input needs no gradient)."""
    fwd = bwd = 0
    for layer in range(L):
        c = C if layer == 0 else H
        fwd += 2 * T * B * 4 * H * (c + H)
        bwd += 2 * T * B * 4 * H * H + 2 * T * B * 4 * H * (c + H) + (2 * T * B * 4 * H * c if layer else 0)
    return {"fwd": G * fwd, "f+b": G * (fwd + bwd)}


if __name__ == "__main__":
    main()
