"""GroupedLSTM against a loop of nn.LSTM: outputs, states and every gradient, for every option."""
import itertools
import random

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from helpers import assert_close_to_truth, rounded_fp64
from mtl_kernels import GroupedLSTM
from mtl_kernels._ops import grouped_lstm_layer, ops
from mtl_kernels.reference import LSTMLoop, grouped_lstm_composite

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}


def make_case(G, T, B, C, H, L=1, bi=False, bias=True, batch_first=False, shared=True,
              with_lengths=False, with_hx=False, device="cpu", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    lstms = nn.ModuleList([nn.LSTM(C, H, L, bias=bias, batch_first=batch_first, bidirectional=bi)
                           for _ in range(G)]).to(device, dtype)
    grouped = GroupedLSTM.from_lstms(lstms)
    shape = (B, T, C) if batch_first else (T, B, C)
    x = torch.randn(shape if shared else (G, *shape), device=device, dtype=dtype, requires_grad=True)
    hx = None
    if with_hx:
        D = 2 if bi else 1
        hx = tuple(torch.randn(G, L * D, B, H, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(2))
    lengths = None
    if with_lengths:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[random.Random(seed).randrange(B)] = T  # the longest is often T, not always
    return lstms, grouped, x, hx, lengths


def run_and_grads(module, params, x, hx, lengths, grad_seed):
    out, (h_n, c_n) = module(x, hx, lengths) if lengths is not None else module(x, hx)
    g = torch.Generator(device="cpu").manual_seed(grad_seed)
    cot = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in (out, h_n, c_n)]
    loss = sum((t * c).sum() for t, c in zip((out, h_n, c_n), cot))
    inputs = [x] + ([] if hx is None else list(hx)) + list(params)
    grads = torch.autograd.grad(loss, inputs)
    return (out, h_n, c_n), grads


def stacked_params(lstms):
    names = [n for n, _ in lstms[0].named_parameters()]
    return names, [p for n in names for p in (getattr(m, n) for m in lstms)]


def check_parity(lstms, grouped, x, hx, lengths, dtype):
    ref = LSTMLoop(lstms)
    names, ref_params = stacked_params(lstms)
    (ro, rh, rc), rgrads = run_and_grads(ref, ref_params, x, hx, lengths, 1)
    my_params = [getattr(grouped, n) for n in names]
    (mo, mh, mc), mgrads = run_and_grads(grouped, my_params, x, hx, lengths, 1)
    tol = TOL[dtype]
    for a, b in ((mo, ro), (mh, rh), (mc, rc)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)
    n_in = len(rgrads) - len(ref_params)
    for a, b in zip(mgrads[:n_in], rgrads[:n_in]):
        torch.testing.assert_close(a, b, **tol)
    # weight grads: grouped params are (G, ...) stacks of the per-LSTM ones
    G = len(lstms)
    for k, n in enumerate(names):
        ref_stack = torch.stack(rgrads[n_in + k * G:n_in + (k + 1) * G])
        torch.testing.assert_close(mgrads[n_in + k], ref_stack, **tol, msg=lambda m: f"{n}: {m}")


# Odd sizes on purpose: 1s, primes, nothing a multiple of anything.
SIZES = [  # G, T, B, C, H
    (1, 1, 1, 1, 1), (3, 5, 4, 7, 6), (2, 7, 1, 3, 5), (5, 3, 3, 1, 2), (1, 11, 2, 13, 3),
    (4, 2, 5, 2, 1), (2, 1, 6, 5, 7),
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shared", [True, False])
def test_parity_basic(device, size, shared):
    lstms, grouped, x, hx, lengths = make_case(*size, shared=shared, device=device)
    check_parity(lstms, grouped, x, hx, lengths, torch.float64)


def _option_grid():
    rng = random.Random(1234)
    combos = list(itertools.product([1, 2], [False, True], [False, True], [False, True],
                                    [False, True], [False, True], [False, True]))
    for i, (L, bi, bias, bf, shared, with_len, with_hx) in enumerate(combos):
        size = (rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 6),
                rng.randint(1, 5))
        yield pytest.param(size, L, bi, bias, bf, shared, with_len, with_hx,
                           id=f"L{L}-bi{int(bi)}-b{int(bias)}-bf{int(bf)}-sh{int(shared)}"
                              f"-len{int(with_len)}-hx{int(with_hx)}-{size}")


@pytest.mark.parametrize("size,L,bi,bias,bf,shared,with_len,with_hx", list(_option_grid()))
def test_parity_all_options(device, size, L, bi, bias, bf, shared, with_len, with_hx):
    lstms, grouped, x, hx, lengths = make_case(*size, L=L, bi=bi, bias=bias, batch_first=bf,
                                               shared=shared, with_lengths=with_len,
                                               with_hx=with_hx, device=device, seed=hash(size) % 97)
    check_parity(lstms, grouped, x, hx, lengths, torch.float64)


@pytest.mark.parametrize("shared", [True, False])
def test_parity_float32_realistic(device, shared):
    lstms, grouped, x, hx, lengths = make_case(3, 17, 9, 33, 29, L=2, bi=True, shared=shared,
                                               with_lengths=True, with_hx=True, device=device,
                                               dtype=torch.float32)
    check_parity(lstms, grouped, x, hx, lengths, torch.float32)


def test_padding_outputs_are_zero_and_states_are_last_valid(device):
    lstms, grouped, x, _, _ = make_case(2, 6, 3, 4, 5, bi=True, device=device)
    lengths = torch.tensor([6, 2, 4])
    out, (h_n, c_n) = grouped(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        assert (out[:, n:, b] == 0).all()
        assert (out[:, :n, b] != 0).all()
    # forward direction's h_n is the output at the last valid step
    last = torch.stack([out[:, n - 1, b, :5] for b, n in enumerate(lengths.tolist())], 1)
    torch.testing.assert_close(h_n[:, 0], last)


def test_packed_sequence_parity(device):
    torch.manual_seed(3)
    G, T, B, C, H = 3, 7, 5, 4, 6
    lstms = nn.ModuleList([nn.LSTM(C, H, 2, bidirectional=True) for _ in range(G)]).double().to(device)
    grouped = GroupedLSTM.from_lstms(lstms)
    x = torch.randn(T, B, C, dtype=torch.float64, device=device)
    lengths = torch.tensor([3, 7, 1, 5, 7])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (h_n, c_n) = grouped(packed)
    assert out.data.shape == (int(lengths.sum()), G, 2 * H)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    for g, lstm in enumerate(lstms):
        r_out, (r_h, r_c) = lstm(packed)
        torch.testing.assert_close(out.data[:, g], r_out.data)
        torch.testing.assert_close(h_n[g], r_h)
        torch.testing.assert_close(c_n[g], r_c)
    padded, lens = pad_packed_sequence(out)
    assert padded.shape == (T, B, G, 2 * H) and torch.equal(lens, lengths)


def test_groups_subset_matches_full_run(device):
    lstms, grouped, x, hx, lengths = make_case(5, 4, 3, 2, 3, L=2, shared=False, with_hx=True,
                                               device=device)
    full, (h_full, c_full) = grouped(x, hx)
    sel = [3, 0]
    part, (h_part, c_part) = grouped(x[sel], tuple(t[sel] for t in hx), groups=sel)
    torch.testing.assert_close(part, full[sel])
    torch.testing.assert_close(h_part, h_full[sel])
    part.sum().backward()
    untouched = [g for g in range(5) if g not in sel]
    assert (grouped.weight_hh_l0.grad[untouched] == 0).all()
    assert (grouped.weight_hh_l0.grad[sel] != 0).any()


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(0)
    m = GroupedLSTM(2, 3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(5, 2, 3)
    m.eval()
    eval_out = m(x)[0]
    no_dropout = GroupedLSTM(2, 3, 4, num_layers=2)
    no_dropout.load_state_dict(m.state_dict())
    torch.testing.assert_close(eval_out, no_dropout(x)[0])
    m.train()
    torch.manual_seed(1)
    a = m(x)[0]
    torch.manual_seed(1)
    b = m(x)[0]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, eval_out)
    with pytest.warns(UserWarning, match="dropout"):
        GroupedLSTM(2, 3, 4, num_layers=1, dropout=0.3)


def test_to_lstms_and_state_dicts_round_trip():
    torch.manual_seed(0)
    lstms = nn.ModuleList([nn.LSTM(3, 4, 2, bidirectional=True) for _ in range(3)])
    grouped = GroupedLSTM.from_lstms(lstms)
    back = grouped.to_lstms()
    for a, b in zip(lstms, back):
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb and torch.equal(pa, pb)
    # a ModuleList-of-nn.LSTM state dict loads into a GroupedLSTM, also nested in a model
    fresh = GroupedLSTM(3, 3, 4, 2, bidirectional=True)
    fresh.load_state_dict(lstms.state_dict())
    for name, p in grouped.named_parameters():
        assert torch.equal(p, getattr(fresh, name))
    outer_old = nn.Sequential(lstms)
    outer_new = nn.Sequential(GroupedLSTM(3, 3, 4, 2, bidirectional=True))
    outer_new.load_state_dict(outer_old.state_dict())
    assert torch.equal(outer_new[0].weight_ih_l1_reverse, grouped.weight_ih_l1_reverse)
    # its own state dict round-trips too
    again = GroupedLSTM(3, 3, 4, 2, bidirectional=True)
    again.load_state_dict(grouped.state_dict())
    assert torch.equal(again.weight_hh_l0, grouped.weight_hh_l0)
    with pytest.raises(RuntimeError, match="expected 0..3"):
        GroupedLSTM(4, 3, 4, 2, bidirectional=True).load_state_dict(lstms.state_dict())
    with pytest.raises(ValueError, match="differs"):
        GroupedLSTM.from_lstms([nn.LSTM(3, 4), nn.LSTM(3, 5)])
    assert "num_groups=3, 3, 4, num_layers=2, bidirectional=True" in repr(grouped)


def test_bfloat16_cpu_close_to_fp64():
    """bf16 against fp64 on the same rounded weights and input, by norm-relative error (helpers:
    assert_close_to_truth)."""
    torch.manual_seed(0)
    m = GroupedLSTM(3, 8, 16, num_layers=2)
    x = torch.randn(6, 4, 8).bfloat16()
    truth = rounded_fp64(m, torch.bfloat16)(x.double())
    out = m.to(torch.bfloat16)(x)
    assert out[0].dtype == torch.bfloat16
    assert_close_to_truth([out[0], *out[1]], [truth[0], *truth[1]], 2e-2)


def _op_args(shared, with_len, reverse, device, G=3, T=4, B=3, C=5, H=2, dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn((T, B, C) if shared else (G, T, B, C), dtype=dtype, device=device, requires_grad=True)
    w_ih = torch.randn(G, 4 * H, C, dtype=dtype, device=device, requires_grad=True)
    w_hh = torch.randn(G, 4 * H, H, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(G, 4 * H, dtype=dtype, device=device, requires_grad=True)
    h0 = torch.randn(G, B, H, dtype=dtype, device=device, requires_grad=True)
    c0 = torch.randn(G, B, H, dtype=dtype, device=device, requires_grad=True)
    lengths = torch.tensor([T, 1, max(1, T - 1)][:B], device=device) if with_len else None
    return x, w_ih, w_hh, b, h0, c0, lengths, reverse


@pytest.mark.parametrize("shared,with_len,reverse", list(itertools.product([True, False], repeat=3)))
def test_opcheck_forward(device, shared, with_len, reverse):
    args = _op_args(shared, with_len, reverse, device)
    torch.library.opcheck(ops.grouped_lstm_forward, args)


def test_opcheck_backward(device):
    args = _op_args(False, True, True, device)
    with torch.no_grad():
        out, h_n, c_n, gates, hs, cs = ops.grouped_lstm_forward(*args)
    x, w_ih, w_hh, *_ = args
    grads = (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(ops.grouped_lstm_backward,
                          (*grads, x.detach(), w_ih.detach(), w_hh.detach(), gates, hs, cs, args[6], True))


@pytest.mark.parametrize("shared,with_len,reverse", [(True, True, False), (False, True, True),
                                                      (True, False, True), (False, False, False)])
def test_gradcheck_op(device, shared, with_len, reverse):
    args = _op_args(shared, with_len, reverse, device, G=2, T=3, B=3, C=2, H=2)

    def f(x, w_ih, w_hh, b, h0, c0):
        out, h_n, c_n, *_ = ops.grouped_lstm_forward(x, w_ih, w_hh, b, h0, c0, args[6], reverse)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(f, args[:6])


@pytest.mark.parametrize("shared,with_len,reverse", [(True, True, False), (False, True, True),
                                                      (False, False, False)])
def test_gradgradcheck_op(device, shared, with_len, reverse):
    """Double backward: under create_graph the backward is a composite of torch ops."""
    args = _op_args(shared, with_len, reverse, device, G=2, T=3, B=2, C=2, H=2)

    def f(x, w_ih, w_hh, b, h0, c0):
        return grouped_lstm_layer(x, w_ih, w_hh, b, h0, c0, args[6], reverse)

    assert torch.autograd.gradgradcheck(f, args[:6])


@pytest.mark.parametrize("shared,with_len,reverse", [(True, True, True), (False, True, False)])
def test_composite_matches_the_kernels(device, shared, with_len, reverse):
    """The composite that double backward differentiates is the op's function: same forward,
    and backward(create_graph=True) gives the kernels' gradients."""
    args = _op_args(shared, with_len, reverse, device, G=3, T=5, B=3, C=3, H=5)
    kernel_out = grouped_lstm_layer(*args[:6], args[6], reverse)
    for a, r in zip(grouped_lstm_composite(*args[:6], args[6], reverse), kernel_out):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    cot = [torch.randn_like(o) for o in kernel_out]
    kernel = torch.autograd.grad(kernel_out, args[:6], cot, retain_graph=True)
    composite = torch.autograd.grad(kernel_out, args[:6], cot, create_graph=True)
    for a, r in zip(composite, kernel):
        assert a.requires_grad
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


def test_gradcheck_module_bidirectional_two_layers_lengths_hx(device):
    torch.manual_seed(0)
    m = GroupedLSTM(2, 3, 2, num_layers=2, bidirectional=True).double().to(device)
    x = torch.randn(4, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    h0 = torch.randn(2, 4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    c0 = torch.randn(2, 4, 3, 2, dtype=torch.float64, device=device, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])
    params = list(m.parameters())

    def f(x, h0, c0, *ps):
        with torch.nn.utils.stateless._reparametrize_module(m, dict(zip([n for n, _ in m.named_parameters()], ps))):
            out, (h, c) = m(x, (h0, c0), lengths)
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


def test_torch_compile_aot_eager():
    torch.manual_seed(0)
    m = GroupedLSTM(2, 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, requires_grad=True)
    lengths = torch.tensor([5, 3])
    compiled = torch.compile(m, backend="aot_eager", fullgraph=False)
    out_c = compiled(x, lengths=lengths)[0]
    out_e = m(x, lengths=lengths)[0]
    torch.testing.assert_close(out_c, out_e)
    (gc,) = torch.autograd.grad(out_c.sum(), x)
    (ge,) = torch.autograd.grad(out_e.sum(), x)
    torch.testing.assert_close(gc, ge)


# ------------------------------------------------------------------ bad input -----------------
def test_errors():
    """Module-level errors: nn.LSTM's exception types where nn.LSTM has the same error
    (test_dropin.py compares them one by one)."""
    m = GroupedLSTM(2, 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="2D .*3D .*4D"):
        m(torch.randn(1, 1, 5, 2, 3))
    with pytest.raises(RuntimeError, match="input_size"):
        m(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match="per-group input has 3 groups"):
        m(torch.randn(3, 5, 2, 3))
    with pytest.raises(ValueError, match="dtype"):
        m(x.double())
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        m(x, lengths=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 5\]"):
        m(x, lengths=torch.tensor([6, 5]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        m(x, lengths=torch.tensor([5, 5, 5]))
    with pytest.raises(ValueError, match="integer"):
        m(x, lengths=torch.tensor([5.0, 5.0]))
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 2, 2, 4\)"):
        m(x, (torch.zeros(2, 1, 2, 4), torch.zeros(2, 2, 2, 4)))
    with pytest.raises(ValueError, match="tuple"):
        m(x, torch.zeros(2, 2, 2, 4))
    with pytest.raises(ValueError, match=r"groups must lie in \[0, 2\)"):
        m(x, groups=[2])
    with pytest.raises(RuntimeError, match="sequence length to be larger than 0"):
        m(torch.randn(0, 2, 3))
    packed = pack_padded_sequence(x, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="lengths must be None"):
        m(packed, lengths=torch.tensor([5, 3]))
    for bad in (0, -1):
        with pytest.raises(ValueError, match="hidden_size"):
            GroupedLSTM(2, 3, bad)
    with pytest.raises(TypeError, match="hidden_size"):
        GroupedLSTM(2, 3, 2.5)
    with pytest.raises(ValueError, match="dropout"):
        GroupedLSTM(2, 3, 4, dropout=1.5)


def test_op_errors_name_the_argument():
    x, w_ih, w_hh, b, h0, c0, lengths, _ = _op_args(True, True, False, "cpu")
    with pytest.raises(RuntimeError, match="weight_hh must have shape"):
        ops.grouped_lstm_forward(x, w_ih, w_hh[:, :, :1], b, h0, c0, lengths, False)
    with pytest.raises(RuntimeError, match="h0 must have shape"):
        ops.grouped_lstm_forward(x, w_ih, w_hh, b, h0[:, :2], c0, lengths, False)
    with pytest.raises(RuntimeError, match="bias must have dtype"):
        ops.grouped_lstm_forward(x, w_ih, w_hh, b.float(), h0, c0, lengths, False)
    with pytest.raises(RuntimeError, match=r"lengths must lie in \[1, 4\]"):
        ops.grouped_lstm_forward(x, w_ih, w_hh, b, h0, c0, torch.tensor([0, 1, 2]), False)
    with pytest.raises(RuntimeError, match="lengths must have dtype torch.int64"):
        ops.grouped_lstm_forward(x, w_ih, w_hh, b, h0, c0, torch.tensor([1, 1, 2], dtype=torch.int32), False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_mismatch_errors():
    m = GroupedLSTM(2, 3, 4).cuda()
    with pytest.raises(ValueError, match="is on cpu"):
        m(torch.randn(5, 2, 3))
    x, w_ih, w_hh, b, h0, c0, lengths, _ = _op_args(True, False, False, "cuda")
    with pytest.raises(RuntimeError, match="h0 is on"):
        ops.grouped_lstm_forward(x, w_ih, w_hh, b, h0.cpu(), c0, None, False)
