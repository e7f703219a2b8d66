"""PyTorch's ensembling of nn.LSTM / nn.GRU / nn.RNN (stack_module_state + vmap(functional_call))
through the grouped op (mtl_kernels/_vmap_rnn.py), checked in float64 against the loop over the
members; and batched gradients (vmap over the backward) of the grouped modules."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import mtl_kernels
from mtl_kernels import _vmap_rnn

DT = torch.float64
TORCH_CLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}


def _members(cell, G, C, H, seed=0, **kw):
    """G independently initialised torch modules (fp64), a meta copy to call them through, and
    their stacked parameters (detached: the vmapped forward's own leaves)."""
    torch.manual_seed(seed)
    if cell.startswith("rnn"):
        kw["nonlinearity"] = cell[4:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer
        ms = [TORCH_CLS[cell](C, H, **kw).to(DT) for _ in range(G)]
    params, _ = stack_module_state(ms)
    base = copy.deepcopy(ms[0]).to("meta")
    return ms, base, {k: v.detach().clone() for k, v in params.items()}


def _flat(result):
    """(output, h_n) / (output, (h_n, c_n)) -> [output, h_n(, c_n)]."""
    out, h = result
    if isinstance(out, PackedSequence):
        out = out.data
    return [out] + (list(h) if isinstance(h, tuple) else [h])


def _stack(results):
    return [torch.stack(ts) for ts in zip(*[_flat(r) for r in results])]


def _close(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, msg=lambda m: f"result {i}: {m}")


def _counts():
    return _vmap_rnn.rule_counts(), mtl_kernels.path_counts()


def _recurrences(before, after):
    """Grouped forward recurrences run between two path_counts()."""
    return sum(after[k] - before[k] for k in ("forward_sequence", "forward_per_step"))


# ---- parity with the loop over the members -------------------------------------------------------
CASES = [  # cell, G, T, B, C, H, module kwargs, per-member input, hx: None | "shared" | "member"
    ("lstm", 3, 5, 2, 3, 4, {}, False, None),
    ("lstm", 1, 1, 1, 1, 1, {}, True, "member"),  # every size one
    ("lstm", 4, 6, 3, 5, 7, dict(num_layers=2, bidirectional=True), True, "member"),
    ("lstm", 2, 4, 3, 3, 5, dict(proj_size=2, num_layers=2, batch_first=True), False, "shared"),
    ("lstm", 3, 3, 1, 2, 3, dict(bias=False, bidirectional=True, batch_first=True), True, None),
    ("gru", 5, 7, 2, 3, 1, dict(num_layers=3), False, "member"),
    ("gru", 2, 4, 5, 4, 3, dict(bidirectional=True, batch_first=True), True, "shared"),
    ("rnn_tanh", 3, 5, 3, 2, 6, dict(num_layers=2, bias=False), True, None),
    ("rnn_relu", 4, 3, 2, 3, 5, dict(bidirectional=True, num_layers=2), False, "member"),
]


def _case_inputs(cell, G, T, B, C, H, kw, per_member, hx_kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    bf = kw.get("batch_first", False)
    shape = (B, T, C) if bf else (T, B, C)
    x = torch.randn(*((G,) if per_member else ()), *shape, generator=g, dtype=DT)
    LD = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    R = kw.get("proj_size", 0) or H
    hx = None
    if hx_kind is not None:
        lead = (G,) if hx_kind == "member" else ()
        h = torch.randn(*lead, LD, B, R, generator=g, dtype=DT)
        hx = (h, torch.randn(*lead, LD, B, H, generator=g, dtype=DT)) if cell == "lstm" else h
    return x, hx


def _member_hx(hx, hx_kind, i):
    if hx is None or hx_kind == "shared":
        return hx
    return tuple(t[i] for t in hx) if isinstance(hx, tuple) else hx[i]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-G{c[1]}-{len(c[6])}kw")
def test_ensemble_forward_and_gradients_match_the_loop(case):
    cell, G, T, B, C, H, kw, per_member, hx_kind = case
    ms, base, params = _members(cell, G, C, H, **kw)
    x, hx = _case_inputs(cell, G, T, B, C, H, kw, per_member, hx_kind)
    in_dims = (0, 0 if per_member else None, None if hx_kind != "member" else 0)

    def run(p, x, hx):
        return functional_call(base, p, (x, hx))

    # leaves for the gradients: parameters, input, states
    p_req = {k: v.clone().requires_grad_() for k, v in params.items()}
    x_req = x.clone().requires_grad_()
    hx_req = None if hx is None else (tuple(t.clone().requires_grad_() for t in hx)
                                      if isinstance(hx, tuple) else hx.clone().requires_grad_())
    rules0, paths0 = _counts()
    got = _flat(vmap(run, in_dims=in_dims)(p_req, x_req, hx_req))
    rules1, paths1 = _counts()
    assert rules1["grouped"] == rules0["grouped"] + 1
    L, D = kw.get("num_layers", 1), 2 if kw.get("bidirectional") else 1
    assert _recurrences(paths0, paths1) == L * D  # one grouped recurrence per layer and direction

    # the loop: each member's own module on its own slice, autograd through all of them
    for m in ms:
        m.zero_grad()
    x_ref = x.clone().requires_grad_()
    hx_ref = None if hx is None else (tuple(t.clone().requires_grad_() for t in hx)
                                      if isinstance(hx, tuple) else hx.clone().requires_grad_())
    want = _stack([m(x_ref[i] if per_member else x_ref, _member_hx(hx_ref, hx_kind, i))
                   for i, m in enumerate(ms)])
    _close(got, want)

    g = torch.Generator().manual_seed(2)
    cots = [torch.randn(t.shape, generator=g, dtype=DT) for t in got]
    leaves = [x_req] + ([] if hx is None else list(hx_req if isinstance(hx_req, tuple) else [hx_req]))
    ref_leaves = [x_ref] + ([] if hx is None else list(hx_ref if isinstance(hx_ref, tuple) else [hx_ref]))
    d_got = torch.autograd.grad(got, list(p_req.values()) + leaves, cots)
    d_want = torch.autograd.grad(want, [p for m in ms for p in m.parameters()] + ref_leaves, cots)
    n = len(p_req)
    per_param = d_want[:len(ms) * n]
    for j, name in enumerate(p_req):  # each stacked parameter's gradient: the members', stacked
        torch.testing.assert_close(d_got[j], torch.stack(per_param[j::n]), msg=name)
    _close(d_got[n:], d_want[len(ms) * n:])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_vmap_of_grad_and_grad_of_vmap_per_member(cell):
    # vmap(grad(loss)): one member's loss per vmapped call (grad innermost: torch's own
    # decomposition, unchanged by this package); grad(vmap(...)): the grouped rule under grad
    ms, base, params = _members(cell, 3, 4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 4, dtype=DT)

    def loss(p, x):
        out, _ = functional_call(base, p, (x,))
        return out.sin().sum()

    per_member = vmap(grad(loss), in_dims=(0, None))(params, x)
    rules0, _ = _counts()
    total = grad(lambda p, x: vmap(loss, in_dims=(0, None))(p, x).sum())(params, x)
    assert _counts()[0]["grouped"] == rules0["grouped"] + 1
    for i, m in enumerate(ms):
        m.zero_grad()
        loss(dict(m.named_parameters()), x).backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(per_member[k][i], p.grad, msg=k)
            torch.testing.assert_close(total[k][i], p.grad, msg=k)


def test_jacrev_of_the_vmapped_ensemble_over_its_input():
    ms, base, params = _members("lstm", 2, 3, 3, proj_size=2)
    x = torch.randn(2, 4, 1, 3, dtype=DT)  # per member
    J = jacrev(lambda x: vmap(lambda p, x: functional_call(base, p, (x,))[0])(params, x))(x)
    for i, m in enumerate(ms):  # member i's output depends on its own input only
        Ji = torch.autograd.functional.jacobian(lambda xi: m(xi)[0], x[i])
        torch.testing.assert_close(J[i, ..., i, :, :, :], Ji)
        torch.testing.assert_close(J[i, ..., 1 - i, :, :, :], torch.zeros_like(Ji))


def test_unbatched_2d_input_per_member_and_shared():
    ms, base, params = _members("gru", 3, 2, 4, num_layers=2)
    x = torch.randn(5, 2, dtype=DT)  # (T, C): nn.GRU's unbatched input
    xs = torch.randn(3, 5, 2, dtype=DT)
    run = lambda p, x: functional_call(base, p, (x,))  # noqa: E731
    _close(_flat(vmap(run, in_dims=(0, None))(params, x)), _stack([m(x) for m in ms]))
    _close(_flat(vmap(run)(params, xs)), _stack([m(xs[i]) for i, m in enumerate(ms)]))


@pytest.mark.parametrize("cell,kw", [("lstm", dict(num_layers=2, bidirectional=True)),
                                     ("gru", dict(batch_first=True)),
                                     ("rnn_relu", dict(num_layers=2))])
def test_packed_input_shared_and_per_member(cell, kw):
    G, T, B, C, H = 3, 6, 4, 3, 5
    ms, base, params = _members(cell, G, C, H, **kw)
    bf = kw.get("batch_first", False)
    lengths = torch.tensor([3, 6, 1, 4])  # unsorted: the packed input's sorted_indices matter
    xs = torch.randn(G, *((B, T) if bf else (T, B)), C, dtype=DT)
    pack = lambda x: pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)  # noqa
    shared = pack(xs[0])

    def run_shared(p):
        out, h = functional_call(base, p, (shared,))
        return out.data, h  # vmap returns tensors (a PackedSequence's batch_sizes is not batched)

    rules0, _ = _counts()
    got = _flat(vmap(run_shared)(params))
    assert _counts()[0]["grouped"] == rules0["grouped"] + 1
    _close(got, _stack([m(shared) for m in ms]))

    datas = torch.stack([pack(xs[i]).data for i in range(G)])  # (G, sum_len, C)

    def run_member(p, data):
        packed = PackedSequence(data, shared.batch_sizes, shared.sorted_indices,
                                shared.unsorted_indices)
        out, h = functional_call(base, p, (packed,))
        return out.data, h

    got = _flat(vmap(run_member)(params, datas))
    _close(got, _stack([m(pack(xs[i])) for i, m in enumerate(ms)]))


# ---- other rule paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("bf", [False, True])
def test_vmap_over_inputs_only_folds_members_into_the_batch(bf):
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, num_layers=2, batch_first=bf).to(DT)
    xs = torch.randn(5, *((2, 7) if bf else (7, 2)), 3, dtype=DT)
    hs = (torch.randn(5, 2, 2, 4, dtype=DT), torch.randn(5, 2, 2, 4, dtype=DT))
    rules0, _ = _counts()
    got = _flat(vmap(m)(xs, hs))
    assert _counts()[0]["folded"] == rules0["folded"] + 1
    _close(got, _stack([m(xs[i], (hs[0][i], hs[1][i])) for i in range(5)]))
    got = _flat(vmap(lambda x: m(x))(xs))  # hx None
    _close(got, _stack([m(xs[i]) for i in range(5)]))


def test_nested_vmap_is_one_grouped_call():
    ms, base, params = _members("lstm", 3, 2, 3, num_layers=2)
    outer = {k: torch.stack([v, v.flip(0) * 0.7]) for k, v in params.items()}  # (2, 3, ...)
    x = torch.randn(4, 2, 2, dtype=DT)
    run = lambda p, x: functional_call(base, p, (x,))  # noqa: E731
    _, paths0 = _counts()
    got = _flat(vmap(vmap(run, in_dims=(0, None)), in_dims=(0, None))(outer, x))
    _, paths1 = _counts()
    assert _recurrences(paths0, paths1) == 2  # 2 x 3 members, one grouped call per layer
    for a in range(2):
        for i in range(3):
            p = {k: v[a, i] for k, v in outer.items()}
            _close([t[a, i] for t in got], _flat(functional_call(base, p, (x,))))


def test_fallback_loop_gives_torchs_results_and_errors():
    ms, base, params = _members("lstm", 3, 3, 4)
    x = torch.randn(5, 2, 3, dtype=DT)
    # autocast: torch's op's business, so the loop (per member, torch's autocast kernels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rules0, _ = _counts()
        got = _flat(vmap(lambda p: functional_call(base, p, (x.float(),)),
                         in_dims=0)({k: v.float() for k, v in params.items()}))
        assert _counts()[0]["loop"] == rules0["loop"] + 1
        want = _stack([copy.deepcopy(m).float()(x.float()) for m in ms])
    _close(got, want)
    # a shape torch's op refuses: its own error, from the loop, not a wrong answer
    w_ih = params["weight_ih_l0"][:, :, :2]  # input size 2, input has 3
    h = torch.zeros(1, 2, 4, dtype=DT)
    with pytest.raises(RuntimeError) as ours:
        vmap(lambda w: torch.lstm(x, (h, h), [w, params["weight_hh_l0"][0]], False, 1, 0.0,
                                  False, False, False))(w_ih)
    with pytest.raises(RuntimeError) as torchs:
        torch.lstm(x, (h, h), [w_ih[0], params["weight_hh_l0"][0]], False, 1, 0.0, False, False,
                   False)
    assert str(ours.value) == str(torchs.value)


def test_dropout_follows_vmaps_randomness():
    ms, base, params = _members("lstm", 3, 3, 4, num_layers=3, dropout=0.5)
    same = {k: v[:1].expand(3, *v.shape[1:]).clone() for k, v in params.items()}  # equal members
    x = torch.randn(6, 2, 3, dtype=DT)
    run = lambda p: functional_call(base, p, (x,))[0]  # noqa: E731
    base.train()
    with pytest.raises(RuntimeError, match="randomness error mode"):
        vmap(run)(params)  # vmap's default: randomness="error", as for any random op
    out = vmap(run, randomness="same")(same)
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[0], out[2])
    out = vmap(run, randomness="different")(same)
    assert not torch.allclose(out[0], out[1])
    base.eval()  # no dropout in eval: no randomness, torch's eval results
    _close([vmap(run)(params)], [torch.stack([m.eval()(x)[0] for m in ms])])
    # dropout 1: every layer after the first sees zeros, deterministic under either randomness
    ms, base, params = _members("gru", 2, 3, 4, num_layers=2, dropout=1.0)
    got = vmap(lambda p: functional_call(base, p, (x,))[0], randomness="different")(params)
    _close([got], [torch.stack([m(x)[0] for m in ms])])


def test_calls_outside_vmap_do_not_reach_the_rules():
    ms, base, params = _members("lstm", 2, 3, 4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=DT)
    before = _counts()[0]
    ms[0](x)[0].sum().backward()
    grad(lambda p: functional_call(base, p, (x,))[0].sum())({k: v[0] for k, v in params.items()})
    vmap(grad(lambda p: functional_call(base, p, (x,))[0].sum()))(params)  # grad innermost
    assert _counts()[0] == before


# ---- batched gradients of the grouped modules ------------------------------------------------------
GROUPED = [  # class, kwargs, per-group input
    (mtl_kernels.GroupedLSTM, dict(num_layers=2), False),
    (mtl_kernels.GroupedLSTM, dict(proj_size=1, bidirectional=True), True),
    (mtl_kernels.GroupedGRU, dict(bidirectional=True, batch_first=True), False),
    (mtl_kernels.GroupedRNN, dict(nonlinearity="relu", num_layers=2), True),
    (mtl_kernels.GroupedRNN, dict(bias=False), False),
]


def _grouped_case(cls, kw, per_group, G=2, T=3, B=2, C=3, H=2, seed=0):
    torch.manual_seed(seed)
    m = cls(G, C, H, **kw).to(DT)
    shape = (B, T, C) if kw.get("batch_first") else (T, B, C)
    x = torch.randn(*((G,) if per_group else ()), *shape, dtype=DT, requires_grad=True)
    names = [n for n, _ in m.named_parameters()]

    def f(x, *ps):  # every result, through the C++ autograd (no transform)
        out, h = functional_call(m, dict(zip(names, ps)), (x,))
        return (out,) + (tuple(h) if isinstance(h, tuple) else (h,))
    return m, x, f


@pytest.mark.parametrize("cls,kw,per_group", GROUPED, ids=lambda v: getattr(v, "__name__", str(v)))
def test_gradcheck_and_gradgradcheck_with_batched_grad(cls, kw, per_group):
    m, x, f = _grouped_case(cls, kw, per_group)
    ps = [p.detach().clone().requires_grad_() for p in m.parameters()]
    inputs = (x, ps[0], ps[1]) + tuple(p.detach() for p in ps[2:])  # input, w_ih, w_hh
    fn = lambda x, *ps: f(x, *ps)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, check_batched_grad=True)


@pytest.mark.parametrize("cls,kw,per_group", GROUPED, ids=lambda v: getattr(v, "__name__", str(v)))
def test_is_grads_batched_is_one_backward_and_matches_the_loop(cls, kw, per_group):
    m, x, f = _grouped_case(cls, kw, per_group)
    outs = f(x, *m.parameters())
    g = torch.Generator().manual_seed(3)
    N = 4
    cots = [torch.randn(N, *o.shape, generator=g, dtype=DT) for o in outs]
    leaves = [x] + list(m.parameters())
    _, paths0 = _counts()
    got = torch.autograd.grad(outs, leaves, cots, retain_graph=True, is_grads_batched=True)
    _, paths1 = _counts()
    L, D = kw.get("num_layers", 1), 2 if kw.get("bidirectional") else 1
    backwards = sum(paths1[k] - paths0[k] for k in ("backward_sequence", "backward_per_step"))
    assert backwards == L * D  # the N cotangents in one grouped backward per layer and direction
    for i in range(N):
        want = torch.autograd.grad(outs, leaves, [c[i] for c in cots], retain_graph=True)
        for j, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a[i], b, msg=f"member {i}, leaf {j}")


@pytest.mark.parametrize("cls,kw,per_group", GROUPED[:3], ids=lambda v: getattr(v, "__name__", str(v)))
def test_jacobian_vectorized_and_jacrev_match_the_unvectorized_jacobian(cls, kw, per_group):
    m, x, f = _grouped_case(cls, kw, per_group, B=1)
    first = lambda x: f(x, *m.parameters())[0]  # noqa: E731
    want = torch.autograd.functional.jacobian(first, x.detach())
    torch.testing.assert_close(torch.autograd.functional.jacobian(first, x.detach(), vectorize=True),
                               want)
    torch.testing.assert_close(jacrev(lambda x: m(x)[0])(x.detach()), want)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("what", ["grads", "saved"])
def test_backward_in_place_under_torch_func_vmap(shared, what):
    # the op itself under torch.func.vmap: vmapped incoming gradients (one merged call) or a
    # vmapped saved tensor too (the loop over members); against the op per member
    from helpers import backward_args, recurrence_args
    ops = torch.ops.mtl_kernels
    G, T, B, C, H, N = 2, 4, 3, 2, 3, 3
    args = recurrence_args("lstm", G, T, B, C, H, shared=shared, seed=5)
    fwd = ops.grouped_recurrence_forward("lstm", *args, False)
    g = torch.Generator().manual_seed(6)
    gout = torch.randn(N, G, T, B, H, generator=g, dtype=DT)
    gh = torch.randn(N, G, B, H, generator=g, dtype=DT)
    gc = torch.randn(G, B, H, generator=g, dtype=DT)
    base = list(backward_args("lstm", (gout[0], gh[0], gc), args, fwd, False))
    w_hh = torch.randn(N, *args[2].shape, generator=g, dtype=DT)  # a vmapped saved tensor

    def op(go, h, w):
        a = list(base)
        a[0], a[1] = go, h
        a[7] = fwd[3].clone()  # the gates it writes over: a fresh copy per call
        if w is not None:
            a[5] = w
        return ops._grouped_recurrence_backward_in_place("lstm", *a)

    w_in = (w_hh, 0) if what == "saved" else (None, None)
    got = vmap(op, in_dims=(0, 0, w_in[1]))(gout, gh, w_in[0])
    for i in range(N):
        a = list(base)
        a[0], a[1] = gout[i], gh[i]
        if what == "saved":
            a[5] = w_hh[i]
        want = ops.grouped_recurrence_backward("lstm", *a)
        for j, (x, y) in enumerate(zip(got, want)):
            torch.testing.assert_close(x[i] if x.dim() == y.dim() + 1 else x, y, msg=f"{i} {j}")
