"""A small forward+backward through every CUDA kernel, for compute-sanitizer (device_check.sh):
both grouped-LSTM recurrence paths (the persistent kernel with one block per group and tile, H=6,
and with 5-10 slices per group and the inter-block barrier, H=300), lengths, both directions, and
branch attention.

  python benchmarks/sanitize_case.py [per_step] [persistent]     (default: both)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import mtl_kernels  # noqa: E402
from mtl_kernels import GroupedLSTM, branch_attention  # noqa: E402

torch.manual_seed(0)
for path in sys.argv[1:] or ("per_step", "persistent"):
    before = mtl_kernels.path_counts()
    with mtl_kernels.recurrence_path(path):
        for dtype in (torch.float32, torch.bfloat16):
            for H in (6, 300):  # 300: W_hh does not fit one block, several slices per group
                m = GroupedLSTM(3, 7, H, num_layers=2, bidirectional=True).cuda().to(dtype)
                for x in (torch.randn(5, 4, 7), torch.randn(3, 5, 4, 7)):  # shared, per group
                    x = x.cuda().to(dtype).requires_grad_()
                    out, (h, c) = m(x, lengths=torch.tensor([5, 2, 4, 1]))
                    (out.float().sum() + h.float().sum() + c.float().sum()).backward()
    torch.cuda.synchronize()
    after = mtl_kernels.path_counts()
    print(path, {k: after[k] - before[k] for k in after})
for dtype in (torch.float32, torch.bfloat16):
    xb = torch.randn(4, 37, 100, device="cuda", dtype=dtype, requires_grad=True)
    wb = torch.randn(100, device="cuda", dtype=dtype, requires_grad=True)
    out, weights = branch_attention(xb, wb, return_weights=True)
    (out.float().sum() + weights.float().pow(2).sum()).backward()
torch.cuda.synchronize()
print("sanitize case ran")
