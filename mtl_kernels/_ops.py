"""Thin Python layer over torch.ops.mtl_kernels.*: fake (meta) implementations for torch.compile and
opcheck, autograd registration, and the two differentiable entry points the modules use."""
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


def _grouped_lstm_setup_context(ctx, inputs, output):
    input, weight_ih, weight_hh, bias, h0, c0, lengths, reverse = inputs
    _, _, _, gates, h_states, c_states = output
    # bias, h0, c0 only for a double backward (the composite recompute below): references, no copies
    ctx.save_for_backward(input, weight_ih, weight_hh, gates, h_states, c_states, lengths, bias, h0, c0)
    ctx.reverse = reverse
    ctx.mark_non_differentiable(gates, h_states, c_states)
    ctx.set_materialize_grads(False)  # no zero tensors for outputs nobody used (gates is large)


def _grouped_lstm_backward(ctx, grad_output, grad_h_n, grad_c_n, *_unused):
    input, weight_ih, weight_hh, gates, h_states, c_states, lengths, bias, h0, c0 = ctx.saved_tensors
    if torch.is_grad_enabled():  # backward(create_graph=True): differentiable, for double backward
        return _grouped_lstm_backward_composite(ctx, grad_output, grad_h_n, grad_c_n)
    G, H4, _ = weight_ih.shape
    zeros = lambda *shape: input.new_zeros(shape)  # noqa: E731
    B, H = h_states.shape[2], H4 // 4
    if grad_output is None:
        grad_output = zeros(G, h_states.shape[1] - 1, B, H)
    grad_h_n = zeros(G, B, H) if grad_h_n is None else grad_h_n
    grad_c_n = zeros(G, B, H) if grad_c_n is None else grad_c_n
    d_input, d_w_ih, d_w_hh, d_bias, d_h0, d_c0 = ops.grouped_lstm_backward(
        grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, gates, h_states, c_states,
        lengths, ctx.reverse)
    return d_input, d_w_ih, d_w_hh, (d_bias if bias is not None else None), d_h0, d_c0, None, None


def grouped_lstm_composite(input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                           bias: Optional[Tensor], h0: Tensor, c0: Tensor,
                           lengths: Optional[Tensor] = None, reverse: bool = False):
    """The op's forward in plain differentiable torch ops (same arguments, output, h_n, c_n)."""
    if input.dim() == 3:  # (T, B, C) shared -> (G, T, B, 4H)
        xp = torch.einsum("tbc,gnc->gtbn", input, weight_ih)
    else:
        xp = torch.einsum("gtbc,gnc->gtbn", input, weight_ih)
    if bias is not None:
        xp = xp + bias[:, None, None, :]
    T = xp.shape[1]
    h, c, outs = h0, c0, [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        i, f, g, o = (xp[:, t] + torch.bmm(h, weight_hh.transpose(1, 2))).chunk(4, dim=-1)
        c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_t = torch.sigmoid(o) * torch.tanh(c_t)
        if lengths is not None:  # padding steps hold the state and emit zeros
            valid = (t < lengths.to(xp.device)).to(xp.dtype)[None, :, None]  # (1, B, 1)
            c_t = valid * c_t + (1 - valid) * c
            h_t, out_t = valid * h_t + (1 - valid) * h, valid * h_t
        else:
            out_t = h_t
        outs[t], h, c = out_t, h_t, c_t
    return torch.stack(outs, dim=1), h, c


def _grouped_lstm_backward_composite(ctx, grad_output, grad_h_n, grad_c_n):
    """A backward that autograd can differentiate again: recompute the forward from the saved
    inputs with torch ops and take its vector-Jacobian product with create_graph=True."""
    input, weight_ih, weight_hh, _, _, _, lengths, bias, h0, c0 = ctx.saved_tensors
    candidates = (input, weight_ih, weight_hh, bias, h0, c0)
    wanted = [t is not None and t.requires_grad and need
              for t, need in zip(candidates, ctx.needs_input_grad[:6])]
    if not any(wanted):
        return (None,) * 8
    outs = grouped_lstm_composite(input, weight_ih, weight_hh, bias, h0, c0, lengths, ctx.reverse)
    pairs = [(o, g) for o, g in zip(outs, (grad_output, grad_h_n, grad_c_n)) if g is not None]
    inputs = [t for t, w in zip(candidates, wanted) if w]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                     create_graph=True, allow_unused=True))
    result = [next(grads) if w else None for w in wanted]
    return (*result, None, None)


torch.library.register_autograd("mtl_kernels::grouped_lstm_forward", _grouped_lstm_backward,
                                setup_context=_grouped_lstm_setup_context)


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
