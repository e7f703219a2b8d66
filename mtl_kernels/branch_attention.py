"""Attention over branches, fused: out = sum_g softmax_g(branches[g] . w + b) * branches[g]."""
from typing import Optional

import torch
from torch import Tensor, nn

from . import _functorch
from ._ops import ops


def branch_attention(branches: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     return_weights: bool = False):
    """Fused attention over the leading (branch) dim.

    branches (G, *, H); weight (H,) or (1, H); bias None, a scalar or (1,).
    Returns out (*, H) [, weights (G, *) — the softmax over branches].
    Equal to ``softmax(Linear(H, 1)(branches), dim=0)``-weighted sum of the branches, in one pass
    forward and one backward (the softmax is recomputed from a saved per-row log-normaliser).
    """
    if not isinstance(branches, Tensor) or branches.dim() < 2:
        raise ValueError("branch_attention: branches must be a tensor of shape (G, *, H)")
    G, H = branches.shape[0], branches.shape[-1]
    if G == 0 or H == 0:
        raise ValueError(f"branch_attention: need at least one branch and feature, got {tuple(branches.shape)}")
    if weight.numel() != H or weight.dim() > 2 or (weight.dim() == 2 and weight.shape[0] != 1):
        raise ValueError(f"branch_attention: weight must be ({H},) or (1, {H}), got {tuple(weight.shape)}")
    if bias is not None and bias.numel() != 1:
        raise ValueError(f"branch_attention: bias must have one element, got {tuple(bias.shape)}")
    autocast = torch._C._is_any_autocast_enabled()  # the op casts to the autocast dtype itself
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and ((t.dtype != branches.dtype and not autocast) or t.device != branches.device):
            raise ValueError(f"branch_attention: {name} ({t.dtype}, {t.device}) must match branches "
                             f"({branches.dtype}, {branches.device})")
    rows = branches.shape[1:-1]
    x = branches.reshape(G, -1, H).contiguous()  # (G, M, H); copies only oddly-strided input
    forward = _functorch.branch_attention_forward if _functorch.transforms_active() else \
        ops.branch_attention_forward
    out, weights, _ = forward(x, weight.reshape(H), None if bias is None else bias.reshape(1))
    out = out.view(*rows, H)
    return (out, weights.view(G, *rows)) if return_weights else out


class BranchAttention(nn.Module):
    """Scores every branch output with a Linear(H, 1), softmaxes over branches and returns the
    weighted sum: branches (G, *, H) -> (*, H). Parameters ``weight`` (1, H) and ``bias`` (1,)
    are named as in ``nn.Linear(H, 1)``, so the seed models' state dicts load directly."""

    def __init__(self, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        scorer = nn.Linear(hidden_size, 1, bias=bias, device=device, dtype=dtype)  # nn.Linear's init
        self.hidden_size = hidden_size
        self.weight = scorer.weight
        self.bias = scorer.bias

    def forward(self, branches: Tensor, return_weights: bool = False):
        return branch_attention(branches, self.weight, self.bias, return_weights)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}"
