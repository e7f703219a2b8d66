"""Thin Python layer over torch.ops.mtl_kernels.*: fake (meta) implementations for torch.compile
and opcheck, and the entry points the modules use. Autograd is registered in C++
(csrc/recurrence/autograd.cpp, csrc/branch_attention/autograd.cpp); under torch.func transforms
the entry points here use the Python autograd.Functions of _functorch.py instead."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loading the extension registers the ops)
from ._cells import CELL_GATES, CELL_HAS_AUX, CELL_HAS_STATE, CELL_KEEPS_BIAS_HH

ops = torch.ops.mtl_kernels


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# ---------------------------------------------------------------------------------------------
# the recurrence, any cell: one layer, one direction, all groups
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("mtl_kernels::grouped_recurrence_forward")
def _recurrence_forward_fake(cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0,
                             lengths, reverse):
    torch._check(cell in CELL_GATES, lambda: f"unknown cell {cell!r}")
    G, KH, _ = weight_ih.shape
    H = KH // CELL_GATES[cell]
    R = H if weight_hr is None else weight_hr.shape[1]  # the width of h (P with a projection)
    shared = input.dim() == 3
    T, B = (input.shape[0], input.shape[1]) if shared else (input.shape[1], input.shape[2])
    acc = _acc(input.dtype)
    output = input.new_empty(G, T, B, R)
    h_n = input.new_empty(G, B, R)
    c_n = input.new_empty(G, B, H) if CELL_HAS_STATE[cell] else input.new_empty(0)
    gates = input.new_empty(T, B, G, KH) if shared else input.new_empty(G, T, B, KH)
    h_states = input.new_empty(G, T + 1, B, R)
    aux = input.new_empty(G, T + 1, B, H, dtype=acc) if CELL_HAS_AUX[cell] else input.new_empty(0, dtype=acc)
    return output, h_n, c_n, gates, h_states, aux


@torch.library.register_fake("mtl_kernels::grouped_recurrence")
def _recurrence_fake(cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths,
                     reverse):
    output, h_n, c_n, _, _, _ = _recurrence_forward_fake(cell, input, weight_ih, weight_hh, bias,
                                                         bias_hh, weight_hr, h0, c0, lengths, reverse)
    return output, h_n, c_n


@torch.library.register_fake("mtl_kernels::_grouped_recurrence_backward_in_place")
def _recurrence_backward_in_place_fake(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                       weight_hh, weight_hr, gates, h_states, aux, lengths, reverse,
                                       input_grad=True):
    return _recurrence_backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                     weight_hh, weight_hr, gates, h_states, aux, lengths, reverse,
                                     input_grad)


@torch.library.register_fake("mtl_kernels::grouped_recurrence_backward")
def _recurrence_backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh,
                              weight_hr, gates, h_states, aux, lengths, reverse, input_grad=True):
    G, KH, _ = weight_ih.shape
    grad_input = torch.empty_like(input) if input_grad else input.new_empty(0)
    grad_bias_hh = weight_ih.new_empty(G, KH) if CELL_KEEPS_BIAS_HH[cell] else weight_ih.new_empty(0)
    grad_w_hr = torch.empty_like(weight_hr) if weight_hr is not None else weight_ih.new_empty(0)
    grad_c0 = torch.empty_like(grad_c_n) if CELL_HAS_STATE[cell] else grad_h_n.new_empty(0)
    return (grad_input, torch.empty_like(weight_ih), torch.empty_like(weight_hh),
            weight_ih.new_empty(G, KH), grad_bias_hh, grad_w_hr, torch.empty_like(grad_h_n),
            grad_c0)


# Test hooks (the persistent kernel's work run on the CPU): the same results as the ops above.
@torch.library.register_fake("mtl_kernels::_grouped_recurrence_forward_emulated")
def _recurrence_forward_emulated_fake(cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr,
                                      h0, c0, lengths, reverse, units, tile_rows, threads_y):
    return _recurrence_forward_fake(cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0,
                                    c0, lengths, reverse)


@torch.library.register_fake("mtl_kernels::_grouped_recurrence_backward_emulated")
def _recurrence_backward_emulated_fake(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                       weight_hh, weight_hr, gates, h_states, aux, lengths, reverse,
                                       units, tile_rows, threads_y, chunk):
    return _recurrence_backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                     weight_hh, weight_hr, gates, h_states, aux, lengths, reverse)


@torch.library.register_fake("mtl_kernels::_grouped_recurrence_forward_emulated_mma")
def _recurrence_forward_emulated_mma_fake(cell, input, weight_ih, weight_hh, bias, bias_hh,
                                          weight_hr, h0, c0, lengths, reverse, units, tile_rows,
                                          reg_ktiles, mma_k):
    return _recurrence_forward_fake(cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0,
                                    c0, lengths, reverse)


@torch.library.register_fake("mtl_kernels::_grouped_recurrence_backward_emulated_mma")
def _recurrence_backward_emulated_mma_fake(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                           weight_hh, weight_hr, gates, h_states, aux, lengths,
                                           reverse, units, tile_rows, reg_ktiles, mma_k, chunk=0):
    return _recurrence_backward_fake(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                     weight_hh, weight_hr, gates, h_states, aux, lengths, reverse)


def recurrence_layer(cell: str, input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                     bias: Optional[Tensor], bias_hh: Optional[Tensor], h0: Tensor,
                     c0: Optional[Tensor], lengths: Optional[Tensor] = None,
                     reverse: bool = False, weight_hr: Optional[Tensor] = None,
                     ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """One layer, one direction, all G groups of a cell ("lstm", "gru", "rnn_tanh", "rnn_relu").

    input (T, B, C) shared or (G, T, B, C) per group; weight_ih (G, KH, C); weight_hh (G, KH, R);
    bias (G, KH) (b_ih, or for lstm / rnn b_ih + b_hh summed) or None; bias_hh (G, KH) (b_hh: gru
    keeps it apart, lstm / rnn add it to bias in the op) or None;
    h0 (G, B, R); c0 (G, B, H) (lstm only); lengths (B,) int64 on input's device or None;
    weight_hr (G, P, H) (lstm only, a projection: R = P, else R = H).
    Returns output (G, T, B, R), h_n (G, B, R), c_n (G, B, H) or None.

    Runs grouped_recurrence: when nothing needs a gradient (no_grad, inference_mode, or no argument
    requiring grad) it keeps nothing for backward.
    """
    args = (cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths, reverse)
    if _functorch.forward_ad_active(args[1:10]):
        # forward-mode AD (torch.autograd.forward_ad, torch.func.jvp / jacfwd / hessian): the ops'
        # autograd has no jvp; the differentiable composite (the same recurrence) has one
        from .reference import recurrence_composite
        return recurrence_composite(cell, input, weight_ih, weight_hh, bias, bias_hh, h0, c0,
                                    lengths, reverse, weight_hr)
    if _functorch.transforms_active():
        output, h_n, c_n, _, _, _ = _functorch.recurrence_forward(*args)
    else:
        output, h_n, c_n = ops.grouped_recurrence(*args)
    return output, h_n, (c_n if CELL_HAS_STATE[cell] else None)


def grouped_lstm_layer(input: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Optional[Tensor],
                       h0: Tensor, c0: Tensor, lengths: Optional[Tensor] = None,
                       reverse: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction for all G groups: recurrence_layer("lstm", ...)."""
    return recurrence_layer("lstm", input, weight_ih, weight_hh, bias, None, h0, c0, lengths, reverse)


# ---------------------------------------------------------------------------------------------
# attention over branches
# ---------------------------------------------------------------------------------------------
@torch.library.register_fake("mtl_kernels::branch_attention_forward")
def _branch_attention_forward_fake(branches, weight, bias):
    G, M, H = branches.shape
    return (branches.new_empty(M, H), branches.new_empty(G, M),
            branches.new_empty(M, dtype=_acc(branches.dtype)))


@torch.library.register_fake("mtl_kernels::branch_attention_backward")
def _branch_attention_backward_fake(grad_out, grad_weights, branches, weight, bias, lse):
    return torch.empty_like(branches), torch.empty_like(weight), branches.new_empty(1)


from . import _functorch  # noqa: E402  (after the fakes: it registers the vmap rules)
