"""torch.func support (grad, vjp, jacrev, vmap, ...) for the ops.

torch.func transforms refuse C++ autograd Functions, which is what the ops' eager autograd is
(csrc/*/autograd.cpp, kept for its speed). When a transform is active, the Python API
(recurrence_layer, branch_attention, and so every module) applies the autograd.Functions below
instead: functorch supports them (setup_context). Their forward and backward run the same kernels
below autograd; vmap batches the ops with a rule per op (`register_vmap`): one call per batch entry,
stacked (correct for any in_dims; a fused batched kernel is future work). Under
backward(create_graph=True) the backward is the differentiable composite, as in C++.
"""
import torch
from torch import Tensor

from . import _C  # noqa: F401  (the ops must be registered before their vmap rules)
from ._cells import CELL_KEEPS_BIAS_HH
from .reference import branch_attention_composite, recurrence_composite

ops = torch.ops.mtl_kernels


def _differentiable_backward() -> bool:
    """Whether a backward running now may itself be differentiated: under two or more grad-type
    torch.func levels (the backward of one runs inside it), or under backward(create_graph=True)
    outside torch.func. Then the backward is the composite's vjp; else the kernels'."""
    if not torch._C._are_functorch_transforms_active():
        return torch.is_grad_enabled()
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
        grad_levels = sum(i.key() in (TransformType.Grad, TransformType.Jvp)
                          for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):  # an older torch: take the differentiable path
        return True
    return grad_levels >= 2


def _zeros_if_none(g, like):
    return like.new_zeros(like.shape) if g is None else g


class _RecurrenceFunction(torch.autograd.Function):
    generate_vmap_rule = True  # vmap goes through the ops' own vmap rules (below)

    @staticmethod
    def forward(cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths,
                reverse):
        with torch._C._AutoDispatchBelowAutograd():
            return ops.grouped_recurrence_forward(cell, input, weight_ih, weight_hh, bias, bias_hh,
                                                  weight_hr, h0, c0, lengths, reverse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths, reverse = inputs
        _, _, _, gates, h_states, aux = output
        ctx.cell, ctx.reverse = cell, reverse
        ctx.has = (bias is not None, bias_hh is not None, c0 is not None, weight_hr is not None)
        ctx.save_for_backward(input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths,
                              gates, h_states, aux)
        ctx.output_shape = output[0].shape
        ctx.mark_non_differentiable(gates, h_states, aux)
        if c0 is None:
            ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, g_out, g_h, g_c, _g_gates, _g_hs, _g_aux):
        (input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths, gates, h_states,
         aux) = ctx.saved_tensors
        has_bias, has_bias_hh, has_c, has_proj = ctx.has
        args = (input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0)
        if _differentiable_backward():  # the composite's vjp, itself differentiable
            present = [i for i, t in enumerate(args) if t is not None]

            def forward(*ts):
                full = list(args)
                for i, t in zip(present, ts):
                    full[i] = t
                outs = recurrence_composite(ctx.cell, *full[:5], full[6], full[7], lengths,
                                            ctx.reverse, full[5])
                return tuple(o for o in outs if o is not None)

            outs, vjp_fn = torch.func.vjp(forward, *[args[i] for i in present])
            cot = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, (g_out, g_h, g_c)))
            grads = dict(zip(present, vjp_fn(cot)))
            d = [grads.get(i) for i in range(len(args))]
        else:
            g_out = g_out if g_out is not None else input.new_zeros(ctx.output_shape)
            g_h = _zeros_if_none(g_h, h0)
            g_c = _zeros_if_none(g_c, c0) if has_c else None
            input_grad = ctx.needs_input_grad[1]  # else its product is skipped
            # below autograd, as the C++ autograd runs it: torch.func's vjp differentiates with
            # grad mode on, and the projected LSTM's kernels write GEMM results with out= ops,
            # which refuse arguments that require grad (jacrev of a GroupedLSTM with proj_size)
            with torch._C._AutoDispatchBelowAutograd():
                dx, dw_ih, dw_hh, db, db_hh, dw_hr, dh0, dc0 = ops.grouped_recurrence_backward(
                    ctx.cell, g_out, g_h, g_c, input, weight_ih, weight_hh, weight_hr, gates,
                    h_states, aux, lengths, ctx.reverse, input_grad)
            if not CELL_KEEPS_BIAS_HH[ctx.cell]:  # the op added b_hh to the bias: the same gradient
                db_hh = db
            d = [dx if input_grad else None, dw_ih, dw_hh, db if has_bias else None,
                 db_hh if has_bias_hh else None, dw_hr if has_proj else None, dh0,
                 dc0 if has_c else None]
        return (None, *d, None, None)


class _BranchAttentionFunction(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(branches, weight, bias):
        with torch._C._AutoDispatchBelowAutograd():
            return ops.branch_attention_forward(branches, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        branches, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(branches, weight, bias, output[2])
        ctx.mark_non_differentiable(output[2])

    @staticmethod
    def backward(ctx, g_out, g_weights, _g_lse):
        branches, weight, bias, lse = ctx.saved_tensors
        if _differentiable_backward():
            present = [t for t in (branches, weight, bias) if t is not None]
            outs, vjp_fn = torch.func.vjp(lambda *ts: branch_attention_composite(*ts), *present)
            cot = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, (g_out, g_weights)))
            d = list(vjp_fn(cot)) + [None]
            return d[0], d[1], (d[2] if bias is not None else None)
        g_out = _zeros_if_none(g_out, branches[0])
        d_x, d_w, d_b = ops.branch_attention_backward(g_out, g_weights, branches, weight, bias, lse)
        return d_x, d_w, (d_b if ctx.has_bias else None)


def forward_ad_active(tensors) -> bool:
    """Whether forward-mode AD must see through the recurrence: a torch.func jvp level (jvp, jacfwd,
    hessian) is active, or one of `tensors` is an eager forward-AD dual tensor."""
    if torch._C._are_functorch_transforms_active():
        try:
            from torch._C._functorch import TransformType
            from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
            if any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters()):
                return True
        except (ImportError, AttributeError):
            pass
    fwd = torch.autograd.forward_ad
    if getattr(fwd, "_current_level", -1) < 0:
        return False
    return any(isinstance(t, Tensor) and fwd.unpack_dual(t).tangent is not None for t in tensors)


def transforms_active() -> bool:
    """Whether a torch.func transform is active (then the Functions above must run the ops)."""
    return torch._C._are_functorch_transforms_active()


recurrence_forward = _RecurrenceFunction.apply
branch_attention_forward = _BranchAttentionFunction.apply


# ---- vmap: one op call per batch entry --------------------------------------------------------
def _loop_vmap(op):
    n_out = len(op._schema.returns)

    def rule(info, in_dims, *args):
        outs = []
        for i in range(info.batch_size):
            sliced = [a.select(d, i) if d is not None and isinstance(a, Tensor) else a
                      for a, d in zip(args, in_dims)]
            outs.append(op(*sliced))
        return tuple(torch.stack([o[k] for o in outs]) for k in range(n_out)), (0,) * n_out
    return rule


if hasattr(torch.library, "register_vmap"):  # torch >= 2.5
    for _name in ("grouped_recurrence_forward", "grouped_recurrence", "grouped_recurrence_backward",
                  "branch_attention_forward", "branch_attention_backward"):
        _op = getattr(ops, _name).default
        torch.library.register_vmap(_op, _loop_vmap(_op))
