"""Small cases for compute-sanitizer (device_check.sh).

Modes (default: per_step sequence):
  per_step, sequence    a forward+backward through every CUDA kernel on that recurrence path (the
                        sequence path on a GPU: the persistent kernel) for each cell (GroupedLSTM,
                        GroupedGRU, GroupedRNN tanh and relu): the persistent kernel with one block
                        per group and tile (H=6) and with several slices per group and the
                        inter-block barrier (H=300), lengths, both directions, 2 layers, fp32 and
                        bf16; then branch attention.
  sequence-min          one small case per cell (lstm, gru, rnn_tanh, rnn_relu) and per direction of
                        the pass: the persistent forward kernel, then the persistent backward
                        kernel, G=2, T=5, B=3, H=300 fp32 on the FMA variant (several slices per
                        group: the barrier; 10 for the LSTM), lengths; exits 2 if any ran per step
                        (then the sanitizer checked the wrong kernel). Then the same per cell in
                        bf16 on the tensor-core variant (B=19, H=300: 5 slices of 64 units on an
                        H100, a narrower last one, k padding; two tiles of rows); exits 3 if one
                        did not run there.

  python benchmarks/sanitize_case.py [per_step] [sequence] [sequence-min] [--device cuda|cpu]

On a machine without a GPU, --device cpu runs the same calls (a logic check of this script only).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mtl_kernels  # noqa: E402
from mtl_kernels import GroupedGRU, GroupedLSTM, GroupedRNN, branch_attention  # noqa: E402
from mtl_kernels._ops import ops  # noqa: E402

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def module(cell, H):
    kw = dict(num_layers=2, bidirectional=True)
    if cell == "lstm":
        return GroupedLSTM(3, 7, H, **kw)
    if cell == "gru":
        return GroupedGRU(3, 7, H, **kw)
    return GroupedRNN(3, 7, H, nonlinearity=cell[len("rnn_"):], **kw)


def every_kernel(path, device):
    before = mtl_kernels.path_counts()
    with mtl_kernels.recurrence_path(path):
        for cell in CELLS:
            for dtype in (torch.float32, torch.bfloat16):
                for H in (6, 300):  # 300: W_hh does not fit one block, several slices per group
                    m = module(cell, H).to(device, dtype)
                    for x in (torch.randn(5, 4, 7), torch.randn(3, 5, 4, 7)):  # shared, per group
                        x = x.to(device, dtype).requires_grad_()
                        out, h_n = m(x, lengths=torch.tensor([5, 2, 4, 1]))
                        states = h_n if cell != "lstm" else torch.cat(h_n, -1)
                        (out.float().sum() + states.float().sum()).backward()
    _sync(device)
    after = mtl_kernels.path_counts()
    print(path, {k: after[k] - before[k] for k in after}, flush=True)


def sequence_min(device, cell, dtype=torch.float32, B=3):
    """The persistent forward kernel, then the persistent backward kernel, on one small case of
    this cell with several slices per group (fp32: the FMA variant; bf16: the tensor-core variant
    where it runs). Returns the path counts, with the tensor-core launches as "forward_tensor_cores"
    and "backward_tensor_cores", and whether every result is finite."""
    G, T, C, H = 2, 5, 4, 300
    K = GATES[cell]
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    x, w_ih, w_hh, b = r(G, T, B, C), r(G, K * H, C) * 0.1, r(G, K * H, H) * H ** -0.5, r(G, K * H)
    b_hh = r(G, K * H) if cell == "gru" else None
    h0 = r(G, B, H)
    c0 = r(G, B, H) if cell == "lstm" else None
    lengths = torch.tensor(([5, 2, 4] * B)[:B], device=device)
    grads = r(G, T, B, H), r(G, B, H), (r(G, B, H) if cell == "lstm" else None)
    before, tc_before = mtl_kernels.path_counts(), mtl_kernels.tensor_core_counts()
    with mtl_kernels.recurrence_path("sequence"):
        fwd = ops.grouped_recurrence_forward(cell, x, w_ih, w_hh, b, b_hh, None, h0, c0, lengths, False)
        _sync(device)
        print(f"{cell}: persistent forward ran", flush=True)
        bwd = ops.grouped_recurrence_backward(cell, *grads, x, w_ih, w_hh, None, *fwd[3:], lengths, False)
        _sync(device)
        print(f"{cell}: persistent backward ran", flush=True)
    after, tc_after = mtl_kernels.path_counts(), mtl_kernels.tensor_core_counts()
    ran = {k: after[k] - before[k] for k in after}
    ran.update({f"{k}_tensor_cores": tc_after[k] - tc_before[k] for k in tc_after})
    finite = all(bool(torch.isfinite(t).all()) for t in (*fwd, *bwd) if t is not None)
    print(f"sequence-min {cell} {dtype}", ran, "all finite" if finite else "NON-FINITE RESULTS", flush=True)
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
    ap.add_argument("modes", nargs="*", help="per_step, sequence, sequence-min (default: the first two)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    args.modes = args.modes or ["per_step", "sequence"]
    for m in args.modes:
        if m not in ("per_step", "sequence", "sequence-min"):
            ap.error(f"unknown mode {m!r}")
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"sanitize_case: running on {device} (no GPU): a logic check of this script only")
    torch.manual_seed(0)
    status = 0
    paths = [m for m in args.modes if m != "sequence-min"]
    for path in paths:
        every_kernel(path, device)
    if paths:
        branch_attention_case(device)
    if "sequence-min" in args.modes:
        for cell in CELLS:
            ran, finite = sequence_min(device, cell)
            if not finite:
                status = max(status, 1)
            if device.type == "cuda" and (ran["forward_sequence"] != 1 or ran["backward_sequence"] != 1):
                print(f"sequence-min {cell}: a direction ran per step, so the sanitizer did not check "
                      "the persistent kernel there")
                status = 2
        with mtl_kernels.tensor_cores("auto"):  # the tensor-core variant, bf16
            for cell in CELLS:
                ran, finite = sequence_min(device, cell, torch.bfloat16, B=19)
                tc = (ran["forward_tensor_cores"], ran["backward_tensor_cores"])
                print(f"sequence-min {cell} bf16: tensor-core launches (forward, backward)", tc, flush=True)
                if not finite:
                    status = max(status, 1)
                if device.type == "cuda" and tc != (1, 1):
                    print(f"sequence-min {cell}: bf16 did not run on the tensor-core variant, so the "
                          "sanitizer did not check it")
                    status = status or 3
    print("sanitize case ran")
    sys.exit(status)


if __name__ == "__main__":
    main()
