"""GroupedGRU and GroupedRNN (tanh, relu) against loops of nn.GRU / nn.RNN: outputs, states and
every gradient over the LSTM tests' option grid; conversions, state dicts, ops, gradcheck,
compile, half precision, and the seed blocks with GRU branches."""
import itertools
import random

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from helpers import (CELLS, assert_close_to_truth, backward_args, recurrence_args, recurrence_grads,
                     rounded_fp64)
from mtl_kernels import GroupedGRU, GroupedLSTM, GroupedRNN, GroupedRNNBase, ParallelLSTM
from mtl_kernels._cells import CELL_GATES, CELL_HAS_AUX, CELL_HAS_STATE, CELL_KEEPS_BIAS_HH
from mtl_kernels._ops import ops, recurrence_layer
from mtl_kernels.reference import ParallelLSTMBlockRef, RNNLoop, recurrence_composite

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}
KINDS = ["gru", "rnn_tanh", "rnn_relu"]


def torch_modules(kind, G, C, H, **kw):
    if kind == "gru":
        return nn.ModuleList([nn.GRU(C, H, **kw) for _ in range(G)])
    return nn.ModuleList([nn.RNN(C, H, nonlinearity=kind[4:], **kw) for _ in range(G)])


def make_case(kind, G, T, B, C, H, L=1, bi=False, bias=True, batch_first=False, shared=True,
              with_lengths=False, with_hx=False, device="cpu", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    mods = torch_modules(kind, G, C, H, num_layers=L, bias=bias, batch_first=batch_first,
                         bidirectional=bi).to(device, dtype)
    grouped = GroupedRNNBase.from_modules(mods)
    shape = (B, T, C) if batch_first else (T, B, C)
    x = torch.randn(shape if shared else (G, *shape), device=device, dtype=dtype, requires_grad=True)
    hx = None
    if with_hx:
        hx = torch.randn(G, L * (2 if bi else 1), B, H, device=device, dtype=dtype, requires_grad=True)
    lengths = None
    if with_lengths:
        lengths = torch.randint(1, T + 1, (B,))
        lengths[random.Random(seed).randrange(B)] = T
    return mods, grouped, x, hx, lengths


def run_and_grads(module, params, x, hx, lengths, seed):
    out, h_n = module(x, hx, lengths) if lengths is not None else module(x, hx)
    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in (out, h_n)]
    loss = (out * cot[0]).sum() + (h_n * cot[1]).sum()
    inputs = [x] + ([] if hx is None else [hx]) + list(params)
    return (out, h_n), torch.autograd.grad(loss, inputs)


def check_parity(mods, grouped, x, hx, lengths, dtype):
    names = [n for n, _ in mods[0].named_parameters()]
    ref_params = [getattr(m, n) for n in names for m in mods]
    (ro, rh), rgrads = run_and_grads(RNNLoop(mods), ref_params, x, hx, lengths, 1)
    (mo, mh), mgrads = run_and_grads(grouped, [getattr(grouped, n) for n in names], x, hx, lengths, 1)
    tol = TOL[dtype]
    for a, b in ((mo, ro), (mh, rh)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)
    n_in = len(rgrads) - len(ref_params)
    for a, b in zip(mgrads[:n_in], rgrads[:n_in]):
        torch.testing.assert_close(a, b, **tol)
    G = len(mods)
    for k, n in enumerate(names):
        ref_stack = torch.stack(rgrads[n_in + k * G:n_in + (k + 1) * G])
        torch.testing.assert_close(mgrads[n_in + k], ref_stack, **tol, msg=lambda m: f"{n}: {m}")


SIZES = [(1, 1, 1, 1, 1), (3, 5, 4, 7, 6), (2, 7, 1, 3, 5), (5, 3, 3, 1, 2), (2, 1, 6, 5, 7)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("shared", [True, False])
def test_parity_basic(device, kind, size, shared):
    mods, grouped, x, hx, lengths = make_case(kind, *size, shared=shared, device=device)
    check_parity(mods, grouped, x, hx, lengths, torch.float64)


def _option_grid():
    rng = random.Random(4321)
    combos = list(itertools.product([1, 2], [False, True], [False, True], [False, True],
                                    [False, True], [False, True], [False, True]))
    for i, (L, bi, bias, bf, shared, with_len, with_hx) in enumerate(combos):
        size = (rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 5), rng.randint(1, 6),
                rng.randint(1, 5))
        kind = KINDS[i % 3]
        yield pytest.param(kind, size, L, bi, bias, bf, shared, with_len, with_hx,
                           id=f"{kind}-L{L}-bi{int(bi)}-b{int(bias)}-bf{int(bf)}-sh{int(shared)}"
                              f"-len{int(with_len)}-hx{int(with_hx)}-{size}")


@pytest.mark.parametrize("kind,size,L,bi,bias,bf,shared,with_len,with_hx", list(_option_grid()))
def test_parity_all_options(device, kind, size, L, bi, bias, bf, shared, with_len, with_hx):
    mods, grouped, x, hx, lengths = make_case(kind, *size, L=L, bi=bi, bias=bias, batch_first=bf,
                                              shared=shared, with_lengths=with_len, with_hx=with_hx,
                                              device=device, seed=hash(size) % 97)
    check_parity(mods, grouped, x, hx, lengths, torch.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shared", [True, False])
def test_parity_float32_realistic(device, kind, shared):
    mods, grouped, x, hx, lengths = make_case(kind, 3, 17, 9, 33, 29, L=2, bi=True, shared=shared,
                                              with_lengths=True, with_hx=True, device=device,
                                              dtype=torch.float32)
    check_parity(mods, grouped, x, hx, lengths, torch.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_sequence_parity(device, kind):
    torch.manual_seed(3)
    G, T, B, C, H = 3, 7, 5, 4, 6
    mods = torch_modules(kind, G, C, H, num_layers=2, bidirectional=True).double().to(device)
    grouped = GroupedRNNBase.from_modules(mods)
    x = torch.randn(T, B, C, dtype=torch.float64, device=device)
    lengths = torch.tensor([3, 7, 1, 5, 7])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, h_n = grouped(packed)
    assert out.data.shape == (int(lengths.sum()), G, 2 * H)
    for g, m in enumerate(mods):
        r_out, r_h = m(packed)
        torch.testing.assert_close(out.data[:, g], r_out.data)
        torch.testing.assert_close(h_n[g], r_h)


def test_conversions_state_dicts_and_repr():
    torch.manual_seed(0)
    grus = nn.ModuleList([nn.GRU(3, 4, 2, bidirectional=True) for _ in range(3)])
    grouped = GroupedGRU.from_grus(grus)
    assert isinstance(GroupedRNNBase.from_modules(grus), GroupedGRU)
    for a, b in zip(grus, grouped.to_grus()):
        assert isinstance(b, nn.GRU)
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert na == nb and torch.equal(pa, pb)
    fresh = GroupedGRU(3, 3, 4, 2, bidirectional=True)
    fresh.load_state_dict(grus.state_dict())
    for name, p in grouped.named_parameters():
        assert torch.equal(p, getattr(fresh, name))
    rnns = nn.ModuleList([nn.RNN(3, 4, nonlinearity="relu") for _ in range(2)])
    grouped_rnn = GroupedRNN.from_rnns(rnns)
    assert grouped_rnn.nonlinearity == "relu" and grouped_rnn.cell == "rnn_relu"
    back = grouped_rnn.to_rnns()
    assert back[0].nonlinearity == "relu" and torch.equal(back[1].weight_hh_l0, rnns[1].weight_hh_l0)
    fresh_rnn = GroupedRNN(2, 3, 4, nonlinearity="relu")
    fresh_rnn.load_state_dict(rnns.state_dict())
    assert torch.equal(fresh_rnn.weight_ih_l0, grouped_rnn.weight_ih_l0)
    with pytest.raises(TypeError, match="not GRU"):
        GroupedGRU.from_grus([nn.GRU(3, 4), nn.LSTM(3, 4)])
    with pytest.raises(ValueError, match="differs"):
        GroupedRNN.from_rnns([nn.RNN(3, 4), nn.RNN(3, 4, nonlinearity="relu")])
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        GroupedRNN(2, 3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        GroupedGRU(2, 3, 4, proj_size=2)  # nn.GRU's type and message
    assert "num_groups=3, 3, 4, num_layers=2, bidirectional=True" in repr(grouped)
    assert "nonlinearity=relu" in repr(grouped_rnn)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shared,with_len,reverse", [(True, True, False), (False, True, True),
                                                      (False, False, False)])
def test_gradcheck_op(device, cell, shared, with_len, reverse):
    args = list(recurrence_args(cell, 2, 3, 3, 2, 2, shared=shared, lengths=with_len, device=device))
    inputs = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    diff = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*ts):
        full = list(inputs)
        for i, t in zip(diff, ts):
            full[i] = t
        out, h_n, c_n, *_ = ops.grouped_recurrence_forward(cell, *full, reverse)
        return (out, h_n, c_n) if cell == "lstm" else (out, h_n)

    assert torch.autograd.gradcheck(f, [inputs[i] for i in diff])
    assert torch.autograd.gradgradcheck(f, [inputs[i] for i in diff])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shared,with_len,reverse", [(True, True, True), (False, False, False)])
def test_opcheck_generic_ops(device, cell, shared, with_len, reverse):
    args = recurrence_args(cell, 3, 4, 3, 5, 2, shared=shared, lengths=with_len, device=device)
    torch.library.opcheck(ops.grouped_recurrence_forward, (cell, *args, reverse))
    fwd = ops.grouped_recurrence_forward(cell, *args, reverse)
    grads = recurrence_grads(cell, 3, 4, 3, 2, device=device)
    torch.library.opcheck(ops.grouped_recurrence_backward,
                          (cell, *backward_args(cell, grads, args, fwd, reverse)))


def test_per_cell_ops_match_the_generic_op(device):
    """grouped_gru_* and grouped_rnn_* are the generic op with each cell's own arguments."""
    x, w_ih, w_hh, b, b_hh, _, h0, _, L = recurrence_args("gru", 2, 4, 3, 5, 3, lengths=True,
                                                          device=device)
    gen = ops.grouped_recurrence_forward("gru", x, w_ih, w_hh, b, b_hh, None, h0, None, L, True)
    mine = ops.grouped_gru_forward(x, w_ih, w_hh, b, b_hh, h0, L, True)
    for a, r in zip(mine, (gen[0], gen[1], gen[3], gen[4], gen[5])):
        assert torch.equal(a, r)
    g_out, g_h, _ = recurrence_grads("gru", 2, 4, 3, 3, device=device)
    bwd = ops.grouped_gru_backward(g_out, g_h, x, w_ih, w_hh, mine[2], mine[3], mine[4], L, True)
    gen_b = ops.grouped_recurrence_backward("gru", g_out, g_h, None, x, w_ih, w_hh, None, gen[3],
                                            gen[4], gen[5], L, True)
    for a, r in zip(bwd, (gen_b[0], gen_b[1], gen_b[2], gen_b[3], gen_b[4], gen_b[6])):
        assert torch.equal(a, r)
    torch.library.opcheck(ops.grouped_gru_forward, (x, w_ih, w_hh, b, b_hh, h0, L, True))
    xr, wr_ih, wr_hh, br, _, _, hr0, _, _ = recurrence_args("rnn_relu", 2, 4, 3, 5, 3, device=device)
    gen = ops.grouped_recurrence_forward("rnn_relu", xr, wr_ih, wr_hh, br, None, None, hr0, None,
                                         None, False)
    mine = ops.grouped_rnn_forward(xr, wr_ih, wr_hh, br, hr0, None, False, "relu")
    for a, r in zip(mine, (gen[0], gen[1], gen[3], gen[4])):
        assert torch.equal(a, r)
    torch.library.opcheck(ops.grouped_rnn_forward, (xr, wr_ih, wr_hh, br, hr0, None, False, "relu"))
    with pytest.raises(RuntimeError, match="nonlinearity must be 'tanh' or 'relu'"):
        ops.grouped_rnn_forward(xr, wr_ih, wr_hh, br, hr0, None, False, "sigmoid")


@pytest.mark.parametrize("cell", CELLS)
def test_composite_matches_the_kernels(device, cell):
    """The composite that double backward differentiates is the op's function."""
    args = recurrence_args(cell, 3, 5, 3, 3, 5, lengths=True, device=device)
    inputs = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    x, w_ih, w_hh, b, b_hh, w_hr, h0, c0, L = inputs
    kernel = recurrence_layer(cell, x, w_ih, w_hh, b, b_hh, h0, c0, L, True)
    composite = recurrence_composite(cell, x, w_ih, w_hh, b, b_hh, h0, c0, L, True)
    for a, r in zip(composite, kernel):
        if r is not None:
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_aot_eager(kind):
    torch.manual_seed(0)
    m = GroupedRNNBase.from_modules(torch_modules(kind, 2, 3, 4, num_layers=2))
    x = torch.randn(5, 2, 3, requires_grad=True)
    lengths = torch.tensor([5, 3])
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    out_c = compiled(x, lengths=lengths)[0]
    out_e = m(x, lengths=lengths)[0]
    torch.testing.assert_close(out_c, out_e)
    (gc,) = torch.autograd.grad(out_c.sum(), x)
    (ge,) = torch.autograd.grad(out_e.sum(), x)
    torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu_close_to_fp64(kind, dtype):
    """bf16 / fp16 against fp64 on the same rounded weights and input, by norm-relative error."""
    torch.manual_seed(0)
    m = GroupedRNNBase.from_modules(torch_modules(kind, 3, 8, 16, num_layers=2))
    x = torch.randn(6, 4, 8).to(dtype)
    truth = rounded_fp64(m, dtype)(x.double())
    out = m.to(dtype)(x)
    assert out[0].dtype == dtype
    flat = lambda r: [r[0], *(r[1] if isinstance(r[1], tuple) else (r[1],))]  # noqa: E731
    assert_close_to_truth(flat(out), flat(truth), 2e-2)


@pytest.mark.parametrize("combine", ["concat", "attention", "mean", None])
def test_parallel_block_with_gru_branches_matches_seed(combine):
    """Seed 003's parallel GRUs: ParallelLSTM(cell="gru") loads the seed block's state dict and
    gives its results."""
    torch.manual_seed(0)
    ref = ParallelLSTMBlockRef(3, 10, 20, combine=combine, module=nn.GRU)
    block = ParallelLSTM(3, 10, 20, combine=combine, cell="gru")
    state = {("lstm." + k[len("lstms."):] if k.startswith("lstms.") else k): v
             for k, v in ref.state_dict().items()}
    if combine == "attention":
        state = {k.replace("attention.", "attention."): v for k, v in state.items()}
    block.load_state_dict(state)
    x = torch.randn(4, 7, 10)
    torch.testing.assert_close(block(x), ref(x), rtol=1e-5, atol=1e-6)


def test_multitask_with_gru_cells():
    from mtl_kernels import MultiTaskLSTM
    torch.manual_seed(0)
    m = MultiTaskLSTM(6, 8, [2, 3], cell="gru")
    assert isinstance(m.lstm, GroupedGRU)
    x = torch.randn(4, 5, 6)
    outs = m(x, lengths=torch.tensor([5, 2, 4, 1]))
    assert [o.shape for o in outs] == [(4, 2), (4, 3)]
    assert torch.equal(m(x, lengths=torch.tensor([5, 2, 4, 1]), task=1), outs[1])
    with pytest.raises(ValueError, match="cell must be"):
        MultiTaskLSTM(6, 8, [2], cell="transformer")


# ---- regressions: interface gaps versus nn.GRU / nn.RNN -------------------------------------------
@pytest.mark.parametrize("cls,torch_cls", [(GroupedGRU, nn.GRU), (GroupedRNN, nn.RNN)])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_proj_size_keyword_raises_like_torch(cls, torch_cls, proj_size):
    # nn.GRU / nn.RNN raise ValueError for any proj_size keyword, 0 included
    with pytest.raises(ValueError) as want:
        torch_cls(3, 4, proj_size=proj_size)
    with pytest.raises(ValueError) as got:
        cls(2, 3, 4, proj_size=proj_size)
    assert str(got.value) == str(want.value)
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        cls(2, 3, 4, foo=1)


def test_from_modules_rejects_what_it_cannot_represent():
    torch.manual_seed(0)
    with pytest.raises(TypeError, match="element 0 is GRU, not RNN"):
        GroupedRNN.from_rnns([nn.GRU(3, 4)])
    with pytest.raises(TypeError, match="element 0 is LSTM, not RNN"):
        GroupedRNN.from_rnns([nn.LSTM(3, 4)])
    # mixed dtypes: no silent cast of group 1's float64 weights to float32
    with pytest.raises(ValueError, match="float64"):
        GroupedGRU.from_grus([nn.GRU(3, 4), nn.GRU(3, 4).double()])
    # frozen weights stay frozen both ways; mixed freezing cannot be represented
    grus = [nn.GRU(3, 4, 2) for _ in range(2)]
    for m in grus:
        m.weight_hh_l1.requires_grad_(False)
    grouped = GroupedGRU.from_grus(grus)
    assert not grouped.weight_hh_l1.requires_grad and grouped.weight_ih_l0.requires_grad
    back = grouped.to_grus()
    assert not back[1].weight_hh_l1.requires_grad and back[1].weight_ih_l0.requires_grad
    grus[0].weight_hh_l1.requires_grad_(True)
    with pytest.raises(ValueError, match="weight_hh_l1 requires grad in some modules"):
        GroupedGRU.from_grus(grus)


def test_modulelist_state_dict_size_mismatch_is_a_load_error():
    rnns = nn.ModuleList([nn.RNN(3, 4), nn.RNN(3, 5)])  # group 1 has another hidden size
    grouped = GroupedRNN(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"size mismatch for 1\.weight_ih_l0"):
        grouped.load_state_dict(rnns.state_dict())


@pytest.mark.parametrize("kind", KINDS + ["lstm"])
def test_forward_mode_ad_like_torch(kind):
    """torch.func.jvp / jacfwd and eager forward-mode AD see through the grouped recurrence (as
    through nn.GRU / nn.RNN / nn.LSTM): the ops have no jvp, the composite runs instead."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(1)
    G, T, B, C, H = 2, 4, 3, 3, 4
    if kind == "lstm":
        mods = nn.ModuleList([nn.LSTM(C, H, 2, bidirectional=True) for _ in range(G)]).double()
    else:
        mods = torch_modules(kind, G, C, H, num_layers=2, bidirectional=True).double()
    grouped = GroupedRNNBase.from_modules(mods)
    x, v = torch.randn(T, B, C, dtype=torch.float64), torch.randn(T, B, C, dtype=torch.float64)

    def ref(inp):
        return torch.stack([m(inp)[0] for m in mods])

    want = torch.func.jvp(ref, (x,), (v,))[1]
    got = torch.func.jvp(lambda inp: grouped(inp)[0], (x,), (v,))[1]
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    with fwAD.dual_level():
        out, _ = grouped(fwAD.make_dual(x, v))
        tangent = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, want, **TOL[torch.float64])
    small = x[:2, :1]
    hess = torch.func.hessian(lambda inp: grouped(inp)[0].pow(2).sum())(small)
    hess_ref = torch.func.hessian(lambda inp: ref(inp).pow(2).sum())(small)
    torch.testing.assert_close(hess, hess_ref, **TOL[torch.float64])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_cell_traits_match_torch_modules(cell):
    """The traits the Python side reads from the C++ cells (_C.cell_traits) describe torch's own
    modules: the gate blocks of weight_ih_l0, whether there is a cell state c_n."""
    C, H = 3, 7
    module = {"lstm": nn.LSTM(C, H), "gru": nn.GRU(C, H), "rnn_tanh": nn.RNN(C, H),
              "rnn_relu": nn.RNN(C, H, nonlinearity="relu")}[cell]
    assert CELL_GATES[cell] * H == module.weight_ih_l0.shape[0]
    _, state = module(torch.randn(2, 1, C))
    assert CELL_HAS_STATE[cell] == isinstance(state, tuple)
    assert CELL_HAS_AUX[cell] == (cell in ("lstm", "gru"))  # the LSTM's c, the GRU's W_hn h + b_hn
    assert CELL_KEEPS_BIAS_HH[cell] == (cell == "gru")
    # the op's outputs follow them: c_n only for a cell state, aux only where the cell saves one
    G, T, B = 2, 3, 2
    x = torch.randn(T, B, C, dtype=torch.float64)
    w_ih = torch.randn(G, CELL_GATES[cell] * H, C, dtype=torch.float64)
    w_hh = torch.randn(G, CELL_GATES[cell] * H, H, dtype=torch.float64)
    h0 = torch.randn(G, B, H, dtype=torch.float64)
    c0 = torch.randn(G, B, H, dtype=torch.float64) if CELL_HAS_STATE[cell] else None
    out, h_n, c_n, gates, h_states, aux = ops.grouped_recurrence_forward(
        cell, x, w_ih, w_hh, None, None, None, h0, c0, None, False)
    assert c_n.numel() == (G * B * H if CELL_HAS_STATE[cell] else 0)
    assert aux.numel() == (G * (T + 1) * B * H if CELL_HAS_AUX[cell] else 0)


def test_groups_must_be_a_sequence_not_an_int():
    with pytest.raises(TypeError, match="groups must be a list or 1-D integer tensor"):
        GroupedGRU(2, 3, 4)(torch.randn(5, 2, 3), groups=1)
