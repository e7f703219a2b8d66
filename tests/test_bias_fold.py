"""The recurrence ops take b_hh apart for every cell: the GRU keeps it inside r * (W_hn h + b_hn),
the other cells (lstm, rnn_tanh, rnn_relu) add it to the bias in the op, so that the modules pass
both parameters as they are (no add of their own, no autograd node for it). The op with both
biases must equal the op with their sum, in values and in every gradient, on every path: the C++
autograd, its double backward (the composite), the torch.func Function and autocast."""
import pytest
import torch
from torch import nn

from helpers import recurrence_args, recurrence_grads
from mtl_kernels import GroupedLSTM, GroupedRNN
from mtl_kernels._cells import CELL_KEEPS_BIAS_HH
from mtl_kernels._ops import ops, recurrence_layer

FOLDING = ["lstm", "rnn_tanh", "rnn_relu"]  # the cells without a recurrent bias of their own


def two_biases(cell, device, dtype=torch.float64, seed=0, shared=True):
    """recurrence_args with a separate b_hh: (input, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, lengths)."""
    x, w_ih, w_hh, b_ih, _, w_hr, h0, c0, L = recurrence_args(
        cell, 3, 5, 4, 3, 5, dtype=dtype, shared=shared, lengths=True, seed=seed, device=device)
    b_hh = torch.randn(b_ih.shape, generator=torch.Generator().manual_seed(seed + 7),
                       dtype=torch.float64).to(dtype).to(device)
    return x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L


@pytest.mark.parametrize("cell", FOLDING)
@pytest.mark.parametrize("shared", [True, False])
def test_two_biases_equal_their_sum_forward_and_backward(device, cell, shared):
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L = two_biases(cell, device, shared=shared)
    summed = b_ih + b_hh
    both = ops.grouped_recurrence_forward(cell, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L, True)
    one = ops.grouped_recurrence_forward(cell, x, w_ih, w_hh, summed, None, w_hr, h0, c0, L, True)
    for a, r in zip(both, one):
        assert torch.equal(a, r)  # the same add, then the same kernel

    # through the C++ autograd (what the modules run): both biases get the summed bias's gradient
    g_out, g_h, g_c = recurrence_grads(cell, 3, 5, 4, 5, device=device)
    params = [t.clone().requires_grad_() for t in (w_ih, w_hh, b_ih, b_hh, summed)]
    w_i, w_h, bi, bh, bs = params
    out2, h2, c2 = recurrence_layer(cell, x, w_i, w_h, bi, bh, h0, c0, L, True)
    out1, h1, c1 = recurrence_layer(cell, x, w_i, w_h, bs, None, h0, c0, L, True)
    for out, h, c, wrt in ((out2, h2, c2, [w_i, w_h, bi, bh]), (out1, h1, c1, [w_i, w_h, bs])):
        loss = (out * g_out).sum() + (h * g_h).sum() + ((c * g_c).sum() if c is not None else 0)
        grads = torch.autograd.grad(loss, wrt)
        if len(wrt) == 4:
            d_two = grads
        else:
            d_one = grads
    torch.testing.assert_close(d_two[0], d_one[0], rtol=0, atol=0)
    torch.testing.assert_close(d_two[1], d_one[1], rtol=0, atol=0)
    torch.testing.assert_close(d_two[2], d_one[2], rtol=0, atol=0)
    torch.testing.assert_close(d_two[3], d_one[2], rtol=0, atol=0)


@pytest.mark.parametrize("cell", FOLDING)
def test_two_biases_gradcheck_and_gradgradcheck(cell):
    """Double backward goes through the composite, which adds b_hh to the recurrent side."""
    args = list(recurrence_args(cell, 2, 3, 2, 2, 2, lengths=True))
    x, w_ih, w_hh, b_ih, _, w_hr, h0, c0, L = args
    b_hh = torch.randn(b_ih.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    diff = [t.requires_grad_() for t in (x, w_ih, w_hh, b_ih, b_hh, h0)]

    def f(x, w_ih, w_hh, b_ih, b_hh, h0):
        out, h_n, c_n = ops.grouped_recurrence(cell, x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L,
                                               False)
        return (out, h_n, c_n) if cell == "lstm" else (out, h_n)

    assert torch.autograd.gradcheck(f, diff)
    assert torch.autograd.gradgradcheck(f, diff)


@pytest.mark.parametrize("cell", FOLDING)
def test_two_biases_opcheck(device, cell):
    args = two_biases(cell, device)
    torch.library.opcheck(ops.grouped_recurrence_forward, (cell, *args, False))
    torch.library.opcheck(ops.grouped_recurrence, (cell, *args, True))


@pytest.mark.parametrize("cell", FOLDING + ["gru"])
def test_two_biases_under_torch_func_grad(cell):
    """torch.func runs the Python autograd.Function (mtl_kernels/_functorch.py): the same gradients
    as the C++ autograd. A folding cell's b_hh gets the bias's gradient; the GRU's b_hn sits inside
    r * (W_hn h + b_hn), so its b_hh keeps a gradient of its own."""
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L = two_biases(cell, "cpu")
    g_out = torch.randn(3, 5, 4, 5, dtype=torch.float64)

    def loss(b_ih, b_hh):
        return (recurrence_layer(cell, x, w_ih, w_hh, b_ih, b_hh, h0, c0, L)[0] * g_out).sum()

    d_ih, d_hh = torch.func.grad(loss, argnums=(0, 1))(b_ih, b_hh)
    b_ih_, b_hh_ = b_ih.clone().requires_grad_(), b_hh.clone().requires_grad_()
    want = torch.autograd.grad(loss(b_ih_, b_hh_), [b_ih_, b_hh_])
    torch.testing.assert_close(d_ih, want[0], rtol=0, atol=0)
    torch.testing.assert_close(d_hh, want[1], rtol=0, atol=0)
    if cell in FOLDING:
        torch.testing.assert_close(d_hh, d_ih, rtol=0, atol=0)
    else:
        H = b_ih.shape[1] // 3
        # r's and z's blocks get the bias's gradient, n's (b_hn inside r * (...)) does not
        torch.testing.assert_close(d_hh[:, :2 * H], d_ih[:, :2 * H], rtol=0, atol=0)
        assert (d_hh[:, 2 * H:] - d_ih[:, 2 * H:]).abs().max() > 1e-3


def test_the_folding_cells_are_the_kernels_own():
    """The Python side (the fake kernels, the torch.func Function) reads which cells fold b_hh from
    the C++ cells (_C.cell_traits), and this file's FOLDING list agrees with them."""
    assert set(CELL_KEEPS_BIAS_HH) == {"lstm", "gru", "rnn_tanh", "rnn_relu"}
    assert sorted(c for c, keeps in CELL_KEEPS_BIAS_HH.items() if not keeps) == sorted(FOLDING)


@pytest.mark.parametrize("which", ["ih", "hh"])
def test_one_of_the_two_biases_requiring_grad(which):
    """Only b_ih, or only b_hh, requires grad: it gets the summed bias's gradient, the other none."""
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L = two_biases("lstm", "cpu")
    g_out = torch.randn(3, 5, 4, 5, dtype=torch.float64)
    summed = (b_ih + b_hh).requires_grad_()
    want = torch.autograd.grad((recurrence_layer("lstm", x, w_ih, w_hh, summed, None, h0, c0, L)[0]
                                * g_out).sum(), summed)[0]
    b_ih, b_hh = b_ih.clone(), b_hh.clone()
    leaf = (b_ih if which == "ih" else b_hh).requires_grad_()
    out = recurrence_layer("lstm", x, w_ih, w_hh, b_ih, b_hh, h0, c0, L)[0]
    (out * g_out).sum().backward()
    torch.testing.assert_close(leaf.grad, want, rtol=0, atol=0)
    assert (b_hh if which == "ih" else b_ih).grad is None


def test_two_biases_under_nested_torch_func():
    """A second-order torch.func transform runs the Function's differentiable (composite) backward:
    the two biases' mixed second derivative equals the summed bias's second derivative."""
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L = two_biases("lstm", "cpu")
    g_out = torch.randn(3, 5, 4, 5, dtype=torch.float64)

    def loss(b_ih, b_hh):
        return (recurrence_layer("lstm", x, w_ih, w_hh, b_ih, b_hh, h0, c0, L)[0] * g_out).sum()

    def grad_norm_ih(b_ih, b_hh):  # |d loss / d b_ih|^2
        return torch.func.grad(loss, argnums=0)(b_ih, b_hh).pow(2).sum()

    got = torch.func.grad(grad_norm_ih, argnums=1)(b_ih, b_hh)
    summed = (b_ih + b_hh).requires_grad_()
    d = torch.autograd.grad((recurrence_layer("lstm", x, w_ih, w_hh, summed, None, h0, c0, L)[0]
                             * g_out).sum(), summed, create_graph=True)[0]
    want = torch.autograd.grad(d.pow(2).sum(), summed)[0]
    torch.testing.assert_close(got, want)


def test_bias_hh_without_bias_is_an_error():
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L = two_biases("lstm", "cpu")
    with pytest.raises(RuntimeError, match="bias_hh is given without bias"):
        ops.grouped_recurrence_forward("lstm", x, w_ih, w_hh, None, b_hh, w_hr, h0, c0, L, False)
    with pytest.raises(RuntimeError, match="bias_hh"):  # a wrong shape is still caught
        ops.grouped_recurrence_forward("lstm", x, w_ih, w_hh, b_ih, b_hh[:, 1:], w_hr, h0, c0, L,
                                       False)


def test_autocast_sums_the_biases_before_the_cast():
    """Under CPU autocast (bf16) the op adds b_hh in the parameters' dtype and casts the sum once:
    the result equals the op given the fp32 sum, bit for bit."""
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L = two_biases("lstm", "cpu", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        both = ops.grouped_recurrence("lstm", x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L, False)
        one = ops.grouped_recurrence("lstm", x, w_ih, w_hh, b_ih + b_hh, None, w_hr, h0, c0, L,
                                     False)
    assert both[0].dtype == torch.bfloat16
    for a, r in zip(both, one):
        assert torch.equal(a, r)

    # gradients under autocast: both biases get the summed bias's
    g_out = torch.randn(3, 5, 4, 5)
    b_ih_, b_hh_ = b_ih.clone().requires_grad_(), b_hh.clone().requires_grad_()
    summed = (b_ih + b_hh).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2 = ops.grouped_recurrence("lstm", x, w_ih, w_hh, b_ih_, b_hh_, w_hr, h0, c0, L, False)[0]
        out1 = ops.grouped_recurrence("lstm", x, w_ih, w_hh, summed, None, w_hr, h0, c0, L, False)[0]
    d_ih, d_hh = torch.autograd.grad((out2.float() * g_out).sum(), [b_ih_, b_hh_])
    d_sum = torch.autograd.grad((out1.float() * g_out).sum(), summed)[0]
    assert torch.equal(d_ih, d_sum) and torch.equal(d_hh, d_sum)

    # the GRU keeps its two biases apart under autocast too (it runs in fp32 on the CPU there,
    # as torch's GRU): the same as the op outside autocast
    args = recurrence_args("gru", 3, 5, 4, 3, 5, dtype=torch.float32, lengths=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = ops.grouped_recurrence("gru", *args, False)
    plain = ops.grouped_recurrence("gru", *args, False)
    for a, r in zip(auto[:2], plain[:2]):
        assert torch.equal(a, r)


def test_autocast_does_not_broadcast_a_wrong_bias_hh():
    """Biases of different shapes are not added under autocast: the op rejects them as in eager."""
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0, L = two_biases("lstm", "cpu", dtype=torch.float32)
    for bad in (b_hh[0], b_hh[:, :1]):
        with pytest.raises(RuntimeError, match="bias_hh"):
            ops.grouped_recurrence("lstm", x, w_ih, w_hh, b_ih, bad, w_hr, h0, c0, L, False)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="bias_hh"):
            ops.grouped_recurrence("lstm", x, w_ih, w_hh, b_ih, bad, w_hr, h0, c0, L, False)


@pytest.mark.parametrize("cls,torch_cls,kw", [(GroupedLSTM, nn.LSTM, {}),
                                              (GroupedRNN, nn.RNN, {"nonlinearity": "tanh"})])
def test_modules_leave_no_bias_add_in_the_graph(cls, torch_cls, kw):
    """The modules pass b_ih and b_hh to the op: the autograd graph has no node for their sum, and
    both still get nn.LSTM's / nn.RNN's gradients."""
    torch.manual_seed(0)
    mods = nn.ModuleList([torch_cls(4, 3, **kw).double() for _ in range(2)])
    grouped = cls.from_modules(mods)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    out, _ = grouped(x)
    seen, stack = set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
    assert not any("AddBackward" in type(fn).__name__ for fn in seen)
    g = torch.randn_like(out)
    out.backward(g)
    for m, gg in zip(mods, g.unbind(0)):
        m(x)[0].backward(gg)
    for name in ("bias_ih_l0", "bias_hh_l0", "weight_hh_l0"):
        want = torch.stack([getattr(m, name).grad for m in mods])
        torch.testing.assert_close(getattr(grouped, name).grad, want)
