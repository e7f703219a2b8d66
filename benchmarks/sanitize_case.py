"""Small cases for compute-sanitizer (device_check.sh).

Modes (default: per_step persistent):
  per_step, persistent  a forward+backward through every CUDA kernel on that recurrence path: the
                        persistent kernel with one block per group and tile (H=6) and with 10
                        slices per group and the inter-block barrier (H=300), lengths, both
                        directions, 2 layers, fp32 and bf16; then branch attention.
  persistent-min        one small persistent case per direction of the pass: the persistent
                        forward kernel, then the persistent backward kernel, G=2, T=5, B=3, H=300
                        fp32 (10 slices per group: the barrier), lengths; exits 2 if either ran
                        per step (then the sanitizer checked the wrong kernel). Then the same in
                        bf16 on the tensor-core variant (B=19, H=300: 5 slices, a narrower last
                        one, k padding; two tiles); exits 3 if it did not run there (in builds
                        that have it).

  python benchmarks/sanitize_case.py [per_step] [persistent] [persistent-min] [--device cuda|cpu]

On a machine without a GPU, --device cpu runs the same calls (a logic check of this script only).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mtl_kernels  # noqa: E402
from mtl_kernels import GroupedLSTM, branch_attention  # noqa: E402
from mtl_kernels._ops import ops  # noqa: E402
from bench_grouped_lstm import sequence_path  # noqa: E402  (benchmarks/ is on sys.path)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def every_kernel(path, device):
    if path != "per_step":
        path = sequence_path()  # "persistent" before the rename to "sequence"
    before = mtl_kernels.path_counts()
    with mtl_kernels.recurrence_path(path):
        for dtype in (torch.float32, torch.bfloat16):
            for H in (6, 300):  # 300: W_hh does not fit one block, several slices per group
                m = GroupedLSTM(3, 7, H, num_layers=2, bidirectional=True).to(device, dtype)
                for x in (torch.randn(5, 4, 7), torch.randn(3, 5, 4, 7)):  # shared, per group
                    x = x.to(device, dtype).requires_grad_()
                    out, (h, c) = m(x, lengths=torch.tensor([5, 2, 4, 1]))
                    (out.float().sum() + h.float().sum() + c.float().sum()).backward()
    _sync(device)
    after = mtl_kernels.path_counts()
    print(path, {k: after[k] - before[k] for k in after}, flush=True)


def persistent_min(device, dtype=torch.float32, B=3):
    """The persistent forward kernel, then the persistent backward kernel, on one small case with
    several slices per group. Returns the path counts."""
    G, T, C, H = 2, 5, 4, 300
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    x, w_ih, w_hh, b = r(G, T, B, C), r(G, 4 * H, C) * 0.1, r(G, 4 * H, H) * H ** -0.5, r(G, 4 * H)
    h0, c0 = r(G, B, H), r(G, B, H)
    lengths = torch.tensor(([5, 2, 4] * B)[:B], device=device)
    grads = r(G, T, B, H), r(G, B, H), r(G, B, H)
    before = mtl_kernels.path_counts()
    generic = not hasattr(ops, "grouped_lstm_forward")  # the cell-generic op that replaces it
    with mtl_kernels.recurrence_path(sequence_path()):
        if generic:
            fwd = ops.grouped_recurrence_forward("lstm", x, w_ih, w_hh, b, None, h0, c0, lengths, False)
        else:
            fwd = ops.grouped_lstm_forward(x, w_ih, w_hh, b, h0, c0, lengths, False)
        _sync(device)
        print("persistent forward ran", flush=True)
        if generic:
            bwd = ops.grouped_recurrence_backward("lstm", *grads, x, w_ih, w_hh, *fwd[3:], lengths, False)
        else:
            bwd = ops.grouped_lstm_backward(*grads, x, w_ih, w_hh, *fwd[3:], lengths, False)
        _sync(device)
        print("persistent backward ran", flush=True)
    after = mtl_kernels.path_counts()
    ran = {k: after[k] - before[k] for k in after}
    finite = all(bool(torch.isfinite(t).all()) for t in (*fwd, *bwd) if t is not None)
    print("persistent-min", dtype, ran, "all finite" if finite else "NON-FINITE RESULTS", flush=True)
    return ran, finite


def branch_attention_case(device):
    for dtype in (torch.float32, torch.bfloat16):
        xb = torch.randn(4, 37, 100, device=device, dtype=dtype, requires_grad=True)
        wb = torch.randn(100, device=device, dtype=dtype, requires_grad=True)
        out, weights = branch_attention(xb, wb, return_weights=True)
        (out.float().sum() + weights.float().pow(2).sum()).backward()
    _sync(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("modes", nargs="*", help="per_step, persistent, persistent-min (default: the first two)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    args.modes = args.modes or ["per_step", "persistent"]
    for m in args.modes:
        if m not in ("per_step", "persistent", "persistent-min"):
            ap.error(f"unknown mode {m!r}")
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"sanitize_case: running on {device} (no GPU): a logic check of this script only")
    torch.manual_seed(0)
    status = 0
    paths = [m for m in args.modes if m != "persistent-min"]
    for path in paths:
        every_kernel(path, device)
    if paths:
        branch_attention_case(device)
    if "persistent-min" in args.modes:
        ran, finite = persistent_min(device)
        if not finite:
            status = 1
        if device.type == "cuda" and (ran["forward_sequence"] != 1 or ran["backward_sequence"] != 1):
            print("persistent-min: a direction ran per step, so the sanitizer did not check the "
                  "persistent kernel there")
            status = 2
        if hasattr(mtl_kernels, "tensor_core_counts"):  # the tensor-core variant, bf16
            before = mtl_kernels.tensor_core_counts()
            ran, finite = persistent_min(device, torch.bfloat16, B=19)
            after = mtl_kernels.tensor_core_counts()
            tc = (after["forward"] - before["forward"], after["backward"] - before["backward"])
            print("persistent-min bf16: tensor-core launches (forward, backward)", tc, flush=True)
            if not finite:
                status = 1
            if device.type == "cuda" and tc != (1, 1):
                print("persistent-min: bf16 did not run on the tensor-core variant, so the sanitizer "
                      "did not check it")
                status = status or 3
    print("sanitize case ran")
    sys.exit(status)


if __name__ == "__main__":
    main()
