"""Fused attention over branches against the unfused reference."""
import itertools

import pytest
import torch

from helpers import assert_close_to_truth
from mtl_kernels import BranchAttention, branch_attention
from mtl_kernels._ops import ops
from mtl_kernels.reference import branch_attention_reference

SHAPES = [(1, 5, 3), (3, 7, 1), (4, 2, 3, 33), (2, 1, 1), (5, 13, 64), (3, 4, 100), (8, 3, 257),
          (2, 9, 600), (3, 5)]  # (G, *, H); the last has no row dims


def _inputs(shape, device, dtype, bias=True, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()
    # nn.Linear-like scale (scores O(1)), so fp32 comparisons measure the kernel, not conditioning
    w = (torch.randn(shape[-1], generator=g, dtype=torch.float64) / shape[-1] ** 0.5).to(device, dtype).requires_grad_()
    b = torch.randn(1, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() if bias else None
    return x, w, b


def _tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_parity_with_reference(device, shape, bias, dtype):
    x, w, b = _inputs(shape, device, dtype, bias)
    out, weights = branch_attention(x, w, b, return_weights=True)
    # the oracle runs in float64 on the same values
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    ref_out, ref_w = branch_attention_reference(x64, w64, b64, return_weights=True)
    torch.testing.assert_close(out.double(), ref_out, **_tol(dtype))
    torch.testing.assert_close(weights.double(), ref_w, **_tol(dtype))
    # gradients reach branches, weight and bias, also through the returned weights
    g_out, g_w = torch.randn_like(ref_out), torch.randn_like(ref_w)
    inputs = [x, w] + ([b] if bias else [])
    mine = torch.autograd.grad((out * g_out.to(dtype)).sum() + (weights * g_w.to(dtype)).sum(), inputs)
    ref = torch.autograd.grad((ref_out * g_out).sum() + (ref_w * g_w).sum(),
                              [x64, w64] + ([b64] if bias else []))
    for a, r in zip(mine, ref):
        if dtype == torch.float64:
            torch.testing.assert_close(a, r, **_tol(dtype))
        else:  # fp32: error relative to the gradient's size (dw sums G*M terms of either sign;
            # db is zero up to rounding, so it is measured against the branches' gradient)
            scale = torch.maximum(r.norm(), ref[0].norm())
            assert (a.double() - r).norm() / scale < 1e-5


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 3, 2), (4, 2, 3, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(device, shape, bias):
    x, w, b = _inputs(shape, device, torch.float64, bias)

    def f(x, w, *b):
        out, weights = branch_attention(x, w, b[0] if b else None, return_weights=True)
        return out, weights

    assert torch.autograd.gradcheck(f, (x, w) + ((b,) if bias else ()))


@pytest.mark.parametrize("bias,return_weights", [(True, True), (False, True), (True, False)])
def test_gradgradcheck(device, bias, return_weights):
    x, w, b = _inputs((3, 4, 5), device, torch.float64, bias)

    def f(x, w, *b):
        return branch_attention(x, w, b[0] if b else None, return_weights=return_weights)

    assert torch.autograd.gradgradcheck(f, (x, w) + ((b,) if bias else ()))


def test_differentiable_backward_equals_the_kernel_backward(device):
    """backward(create_graph=True) runs a composite backward (so it can be differentiated
    again); it must give the kernel's gradients."""
    x, w, b = _inputs((4, 6, 7), device, torch.float64)
    out, weights = branch_attention(x, w, b, return_weights=True)
    cot = (torch.randn_like(out), torch.randn_like(weights))
    kernel = torch.autograd.grad((out, weights), (x, w, b), cot, retain_graph=True)
    composite = torch.autograd.grad((out, weights), (x, w, b), cot, create_graph=True)
    assert all(g.requires_grad for g in composite)
    for a, r in zip(composite, kernel):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_bias_gradient_is_zero(device):
    # softmax ignores a shift shared by all branches, so the bias gradient vanishes; computed,
    # not special-cased: it is the sum of the score gradients.
    x, w, b = _inputs((6, 50, 32), device, torch.float64)
    out, weights = branch_attention(x, w, b, return_weights=True)
    (gb,) = torch.autograd.grad((out * torch.randn_like(out)).sum() + weights.pow(2).sum(), b)
    assert gb.abs().item() < 1e-12
    x, w, b = _inputs((6, 50, 32), device, torch.float32)
    (gb,) = torch.autograd.grad(branch_attention(x, w, b).pow(2).sum(), b)
    assert gb.abs().item() < 1e-4


def test_stable_for_large_scores_and_one_branch(device):
    x, w, b = _inputs((4, 16, 8), device, torch.float32, scale=1e3)
    out, weights = branch_attention(x, w, b, return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(0), torch.ones_like(weights[0]))
    torch.testing.assert_close(out, branch_attention_reference(x, w, b), rtol=1e-4, atol=1e-2)
    x1, w1, b1 = _inputs((1, 16, 8), device, torch.float32)
    out1, weights1 = branch_attention(x1, w1, b1, return_weights=True)
    assert torch.equal(weights1, torch.ones_like(weights1))
    torch.testing.assert_close(out1, x1[0])


def test_non_contiguous_input(device):
    x, w, b = _inputs((5, 3, 4, 6), device, torch.float64)
    xt = x.transpose(1, 2)  # (G, 4, 3, H), not contiguous
    torch.testing.assert_close(branch_attention(xt, w, b), branch_attention_reference(xt, w, b))
    w2 = torch.randn(12, dtype=torch.float64, device=device)[::2]  # strided weight
    torch.testing.assert_close(branch_attention(x, w2, b), branch_attention_reference(x, w2, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(device, dtype):
    """Against fp64 on the same rounded inputs, by norm-relative error (helpers)."""
    x, w, b = (t.to(dtype) for t in _inputs((4, 64, 48), device, torch.float32))
    ref = branch_attention_reference(x.double(), w.double(), b.double())
    out = branch_attention(x, w, b)
    assert out.dtype == dtype
    assert_close_to_truth([out], [ref], 1e-2)


@pytest.mark.parametrize("shape,bias", list(itertools.product([(3, 5, 4), (1, 2, 7)], [True, False])))
def test_opcheck(device, shape, bias):
    x, w, b = _inputs(shape, device, torch.float64, bias)
    torch.library.opcheck(ops.branch_attention_forward, (x, w, b))
    with torch.no_grad():
        out, weights, lse = ops.branch_attention_forward(x, w, b)
    torch.library.opcheck(ops.branch_attention_backward,
                          (torch.randn_like(out), torch.randn_like(weights), x.detach(), w.detach(),
                           None if b is None else b.detach(), lse))
    torch.library.opcheck(ops.branch_attention_backward,
                          (torch.randn_like(out), None, x.detach(), w.detach(), None, lse))


def test_module_matches_linear_scorer(device):
    torch.manual_seed(0)
    att = BranchAttention(6).to(device)
    lin = torch.nn.Linear(6, 1).to(device)
    lin.load_state_dict(att.state_dict())  # same parameter names and shapes as nn.Linear(H, 1)
    x = torch.randn(3, 2, 5, 6, device=device)
    out, weights = att(x, return_weights=True)
    ref_w = torch.softmax(lin(x).squeeze(-1), 0)
    torch.testing.assert_close(weights, ref_w)
    torch.testing.assert_close(out, (ref_w.unsqueeze(-1) * x).sum(0))
    assert "hidden_size=6" in repr(att)


def test_errors():
    x = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match=r"weight must be \(5,\)"):
        branch_attention(x, torch.randn(4))
    with pytest.raises(ValueError, match="bias must have one element"):
        branch_attention(x, torch.randn(5), torch.randn(2))
    with pytest.raises(ValueError, match="must match branches"):
        branch_attention(x, torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(G, \*, H\)"):
        branch_attention(torch.randn(5), torch.randn(5))
    # any strides: the op makes its own contiguous copy (same values, same answer)
    xt = torch.randn(4, 3, 5).transpose(0, 1)
    w = torch.randn(5)
    for a, r in zip(ops.branch_attention_forward(xt, w, None),
                    ops.branch_attention_forward(xt.contiguous(), w, None)):
        torch.testing.assert_close(a, r)


def test_torch_compile_aot_eager_through_the_cpp_autograd():
    """The op's autograd is a C++ Function at the Autograd key; AOTAutograd traces through it
    (with the Python fake implementations) and gives the eager results and gradients."""
    x, w, b = _inputs((3, 6, 5), "cpu", torch.float32)

    def f(x, w, b):
        out, weights = branch_attention(x, w, b, return_weights=True)
        return out * 2, weights

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got, want = compiled(x, w, b), f(x, w, b)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r)
    cot = [torch.randn_like(t) for t in want]
    g_got = torch.autograd.grad(got, (x, w, b), cot)
    g_want = torch.autograd.grad(want, (x, w, b), cot)
    for a, r in zip(g_got, g_want):
        torch.testing.assert_close(a, r)
