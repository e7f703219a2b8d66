"""Thin Python layer over torch.ops.mtl_kernels.*: fake (meta) implementations for torch.compile and
opcheck, and the entry point the modules use. Autograd is registered in C++ (csrc/*_autograd.cpp)."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the extension registers the ops)

ops = torch.ops.mtl_kernels


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------------------------------
# grouped LSTM: one layer, one direction, all groups
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("mtl_kernels::grouped_lstm_forward")
def _grouped_lstm_forward_fake(input, weight_ih, weight_hh, bias, h0, c0, lengths, reverse):
    G, H4, _ = weight_ih.shape
    H = H4 // 4
    shared = input.dim() == 3
    T, B = (input.shape[0], input.shape[1]) if shared else (input.shape[1], input.shape[2])
    output = input.new_empty(G, T, B, H)
    h_n, c_n = input.new_empty(G, B, H), input.new_empty(G, B, H)
    gates = input.new_empty(T, B, G, H4) if shared else input.new_empty(G, T, B, H4)
    h_states = input.new_empty(G, T + 1, B, H)
    c_states = input.new_empty(G, T + 1, B, H, dtype=_opmath(input.dtype))
    return output, h_n, c_n, gates, h_states, c_states


@torch.library.register_fake("mtl_kernels::grouped_lstm_backward")
def _grouped_lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh,
                                gates, h_states, c_states, lengths, reverse):
    G, H4, _ = weight_ih.shape
    return (torch.empty_like(input), torch.empty_like(weight_ih), torch.empty_like(weight_hh),
            weight_ih.new_empty(G, H4), torch.empty_like(grad_h_n), torch.empty_like(grad_c_n))


# Test hooks (the persistent kernel's work run on the CPU): same results as the ops above.
@torch.library.register_fake("mtl_kernels::_grouped_lstm_forward_emulated")
def _grouped_lstm_forward_emulated_fake(input, weight_ih, weight_hh, bias, h0, c0, lengths, reverse,
                                        units, tile_rows, threads_y):
    return _grouped_lstm_forward_fake(input, weight_ih, weight_hh, bias, h0, c0, lengths, reverse)


@torch.library.register_fake("mtl_kernels::_grouped_lstm_backward_emulated")
def _grouped_lstm_backward_emulated_fake(grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                         weight_hh, gates, h_states, c_states, lengths, reverse,
                                         units, tile_rows, threads_y, chunk):
    return _grouped_lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh,
                                       gates, h_states, c_states, lengths, reverse)


# Autograd for grouped_lstm_forward is registered in C++ (csrc/grouped_lstm_autograd.cpp): the
# Python path's fixed cost was a fifth of a small forward+backward on the CPU.


def grouped_lstm_layer(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Optional[Tensor],
                       h0: Tensor, c0: Tensor, lengths: Optional[Tensor] = None,
                       reverse: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction, all G groups.

    input (T, B, C) shared or (G, T, B, C) per group; weight_ih (G, 4H, C); weight_hh (G, 4H, H);
    bias (G, 4H) or None; h0, c0 (G, B, H); lengths (B,) int64 on input's device or None.
    Returns output (G, T, B, H), h_n (G, B, H), c_n (G, B, H).
    """
    output, h_n, c_n, _, _, _ = ops.grouped_lstm_forward(input, weight_ih, weight_hh, bias, h0, c0,
                                                         lengths, reverse)
    return output, h_n, c_n


# ---------------------------------------------------------------------------------------------
# attention over branches
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("mtl_kernels::branch_attention_forward")
def _branch_attention_forward_fake(branches, weight, bias):
    G, M, H = branches.shape
    return (branches.new_empty(M, H), branches.new_empty(G, M),
            branches.new_empty(M, dtype=_opmath(branches.dtype)))


@torch.library.register_fake("mtl_kernels::branch_attention_backward")
def _branch_attention_backward_fake(grad_out, grad_weights, branches, weight, bias, lse):
    return (torch.empty_like(branches), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else branches.new_empty(1))


# Autograd for branch_attention_forward is registered in C++ (csrc/branch_attention_autograd.cpp):
# at the seed models' sizes the Python autograd path cost more than the kernels themselves.
