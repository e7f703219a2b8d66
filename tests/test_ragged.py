"""Ragged multi-task calls: a list of per-group inputs, each group its own batch size B_k and length
T_k (or a PackedSequence), in one grouped op call per layer and direction, against the loop of the
torch modules that users run today ([m(x) for m, x in zip(modules, xs)]); and the ops' per-(group,
row) lengths (G, B) under them, rows of length 0 included."""
import copy
import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import mtl_kernels
from helpers import CELLS, HAS_C, assert_all_close, backward_args, recurrence_args, recurrence_grads
from mtl_kernels import GroupedGRU, GroupedLSTM, GroupedRNN, GroupedRNNBase
from mtl_kernels._ops import ops

TOL = dict(rtol=1e-9, atol=1e-10)
# (T_k, B_k) of three tasks: different lengths and batch sizes, a task of one step and one row
RAGGED = [(5, 4), (1, 1), (3, 6)]


def _modules(cell, G, C, H, **kw):
    if cell == "lstm":
        return nn.ModuleList([nn.LSTM(C, H, **kw) for _ in range(G)])
    if cell == "gru":
        return nn.ModuleList([nn.GRU(C, H, **kw) for _ in range(G)])
    return nn.ModuleList([nn.RNN(C, H, nonlinearity=cell[4:], **kw) for _ in range(G)])


def _states_list(hidden):
    return list(hidden) if isinstance(hidden, tuple) else [hidden]


def _inputs(sizes, C, batch_first, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*((B, T, C) if batch_first else (T, B, C)), generator=g,
                        dtype=torch.float64).requires_grad_() for T, B in sizes]


def _hx(cell, sizes, LD, H, R, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    if cell == "lstm":
        return [(r(LD, B, R), r(LD, B, H)) for _, B in sizes]
    return [r(LD, B, R) for _, B in sizes]


def _flat(results):
    """The loop's or the grouped call's list of (output, hidden) as a flat list of tensors."""
    flat = []
    for out, hidden in results:
        flat.append(out.data if isinstance(out, PackedSequence) else out)
        flat += _states_list(hidden)
    return flat


def _check_against_loop(cell, sizes, C=3, H=4, L=1, bi=False, batch_first=False, proj=0,
                        with_hx=False, packed=(), groups=None, G=None, seed=0):
    """Outputs, states and the gradients of every parameter, input and initial state of the
    grouped list call against the torch modules' loop, float64. packed: the entries given as a
    PackedSequence (lengths drawn per row, unsorted)."""
    G = G or len(sizes)
    torch.manual_seed(seed)
    kw = dict(num_layers=L, bidirectional=bi, batch_first=batch_first)
    if proj:
        kw["proj_size"] = proj
    mods = _modules(cell, G, C, H, **kw).double()
    grouped = GroupedRNNBase.from_modules(mods)
    chosen = list(range(G)) if groups is None else groups
    xs = _inputs(sizes, C, batch_first, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    entries = []
    for k, x in enumerate(xs):
        if k in packed:
            T, B = sizes[k]
            lengths = torch.randint(1, T + 1, (B,), generator=gen)
            lengths[torch.randint(0, B, (1,), generator=gen)] = T  # the padded length is T
            entries.append(pack_padded_sequence(x, lengths, batch_first=batch_first,
                                                enforce_sorted=False))
        else:
            entries.append(x)
    LD, R = L * (2 if bi else 1), proj or H
    hx = _hx(cell, sizes, LD, H, R, seed + 1) if with_hx else None
    ran_before = mtl_kernels.path_counts()
    got = grouped(entries, hx, groups=groups)
    ran = {k: v - ran_before[k] for k, v in mtl_kernels.path_counts().items()}
    assert ran["forward_sequence"] + ran["forward_per_step"] == LD  # one call per layer, direction
    want = [mods[g](e) if hx is None else mods[g](e, hx[k]) for k, (g, e) in enumerate(zip(chosen, entries))]
    assert isinstance(got, list) and len(got) == len(want)
    for (o, h), (wo, wh) in zip(got, want):
        assert type(o) is type(wo)
        if isinstance(o, PackedSequence):
            assert torch.equal(o.batch_sizes, wo.batch_sizes)
            for a, b in ((o.sorted_indices, wo.sorted_indices), (o.unsorted_indices, wo.unsorted_indices)):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
        else:
            assert o.shape == wo.shape
    got_flat, want_flat = _flat(got), _flat(want)
    assert_all_close(got_flat, want_flat, **TOL)
    # every gradient: of the grouped parameters (group g's slice against module g's), the inputs
    # and the initial states, for one random cotangent on every output and state
    cot = [torch.randn_like(t) for t in want_flat]
    leaves = xs + ([t for s in hx for t in _states_list(s)] if hx is not None else [])
    g_params = list(grouped.parameters())
    # retain_graph: the packed entries' pack_padded_sequence nodes are shared by both graphs
    d_got = torch.autograd.grad(sum((a * c).sum() for a, c in zip(got_flat, cot)), g_params + leaves,
                                allow_unused=True, retain_graph=True)
    m_params = [list(mods[g].parameters()) for g in chosen]
    d_want = torch.autograd.grad(sum((a * c).sum() for a, c in zip(want_flat, cot)),
                                 [p for ps in m_params for p in ps] + leaves, allow_unused=True)
    n = len(g_params)
    d_mods, d_leaves_want = d_want[:-len(leaves) or None], d_want[len(d_want) - len(leaves):]
    assert_all_close(d_got[n:], d_leaves_want, **TOL)
    names = [name for name, _ in grouped.named_parameters()]
    per_module = len(m_params[0])
    for i, name in enumerate(names):
        for j, g in enumerate(chosen):
            torch.testing.assert_close(d_got[i][g], d_mods[j * per_module + i], **TOL,
                                       msg=lambda m: f"{name}[{g}]: {m}")
        for g in set(range(G)) - set(chosen):  # groups not called get no gradient
            assert d_got[i] is None or not d_got[i][g].any()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("L,bi,batch_first,with_hx", [(1, False, False, False), (2, True, True, True),
                                                      (2, False, False, True), (1, True, False, False)])
def test_list_of_ragged_inputs_matches_the_loop(cell, L, bi, batch_first, with_hx):
    _check_against_loop(cell, RAGGED, L=L, bi=bi, batch_first=batch_first, with_hx=with_hx)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bi,batch_first", [(False, False), (True, True)])
def test_packed_entries_and_mixed_lists(cell, bi, batch_first):
    """PackedSequence entries (their own per-row lengths, unsorted) beside tensor entries, and a
    list of packed entries only."""
    _check_against_loop(cell, RAGGED, bi=bi, batch_first=batch_first, packed=(0,), with_hx=True)
    _check_against_loop(cell, RAGGED, L=2, bi=bi, batch_first=batch_first, packed=(0, 1, 2))


def test_projection_and_groups():
    """The LSTM's proj_size; groups= (the list holds those groups' inputs, in that order)."""
    _check_against_loop("lstm", RAGGED, L=2, bi=True, proj=2, with_hx=True)
    _check_against_loop("gru", RAGGED[:2], groups=[3, 1], G=4)
    _check_against_loop("lstm", RAGGED, groups=[2, 0, 1], with_hx=True, batch_first=True)


def test_random_ragged_shapes():
    """Random (T_k, B_k), G = 1 .. 4, odd sizes; H = 1 too."""
    rng = torch.Generator().manual_seed(3)
    for i in range(6):
        G = int(torch.randint(1, 5, (1,), generator=rng))
        sizes = [tuple(int(v) for v in torch.randint(1, 8, (2,), generator=rng)) for _ in range(G)]
        cell = CELLS[i % 4]
        _check_against_loop(cell, sizes, C=int(torch.randint(1, 6, (1,), generator=rng)),
                            H=1 if i == 0 else 5, L=1 + i % 2, bi=i % 3 == 0, with_hx=i % 2 == 0,
                            seed=i)


def test_unbatched_entries():
    """(T_k, C) entries (nn.LSTM's unbatched input) beside batched ones, hx entries (L*D, H)."""
    torch.manual_seed(0)
    mods = _modules("lstm", 2, 3, 4, num_layers=2).double()
    grouped = GroupedLSTM.from_lstms(mods)
    xs = [torch.randn(5, 3, dtype=torch.float64), torch.randn(2, 3, 3, dtype=torch.float64)]
    hx = [(torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)), None]
    got = grouped(xs, hx)
    want = [mods[0](xs[0], hx[0]), mods[1](xs[1])]
    assert got[0][0].shape == (5, 4) and got[0][1][0].shape == (2, 4)
    assert_all_close(_flat(got), _flat(want), **TOL)


def test_a_task_whose_rows_all_end_early_and_b_of_one():
    """A packed entry whose every row ends before the longest entry's T, and B_k = 1 / T_k = 1."""
    torch.manual_seed(0)
    mods = _modules("gru", 3, 2, 3, bidirectional=True).double()
    grouped = GroupedGRU.from_grus(mods)
    x0 = torch.randn(9, 2, 2, dtype=torch.float64, requires_grad=True)
    short = pack_padded_sequence(torch.randn(4, 3, 2, dtype=torch.float64), torch.tensor([2, 4, 1]),
                                 enforce_sorted=False)
    x2 = torch.randn(1, 1, 2, dtype=torch.float64)
    got = grouped([x0, short, x2])
    want = [mods[0](x0), mods[1](short), mods[2](x2)]
    assert_all_close(_flat(got), _flat(want), **TOL)


def test_gradcheck_through_a_list_call():
    """gradcheck / gradgradcheck over the entries and every parameter of a ragged list call (the
    parameters passed in through torch.func.functional_call, so gradcheck perturbs them)."""
    torch.manual_seed(0)
    m = GroupedLSTM(2, 2, 2, bidirectional=True).double()
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    xs = [torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True),
          torch.randn(1, 1, 2, dtype=torch.float64, requires_grad=True)]

    def f(x0, x1, *ps):
        (o0, (h0, c0)), (o1, (h1, c1)) = torch.func.functional_call(m, dict(zip(names, ps)),
                                                                    ([x0, x1],))
        return o0, o1, h0, c1

    assert torch.autograd.gradcheck(f, (*xs, *params))
    assert torch.autograd.gradgradcheck(f, (*xs, *params))


def test_compile_fullgraph_list_call():
    torch.manual_seed(0)
    m = GroupedLSTM(3, 3, 4, batch_first=True)
    xs = [torch.randn(4, 5, 3, requires_grad=True), torch.randn(2, 3, 3), torch.randn(1, 1, 3)]
    f = torch.compile(lambda *x: [o for o, _ in m(list(x))], backend="aot_eager", fullgraph=True)
    got, want = f(*xs), [o for o, _ in m(xs)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(got[0].sum(), xs[0])[0],
                               torch.autograd.grad(want[0].sum(), xs[0])[0])


# ---- errors: clear, and the module keeps working -------------------------------------------------
@pytest.mark.parametrize("cls", [GroupedLSTM, GroupedGRU, GroupedRNN])
def test_bad_lists_raise_clearly_and_change_nothing(cls):
    torch.manual_seed(0)
    m = cls(2, 3, 4)
    good = [torch.randn(4, 2, 3), torch.randn(2, 5, 3)]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ref = m(good)
    lstm = cls is GroupedLSTM
    bad_hx_shape = [(torch.randn(1, 3, 4), torch.randn(1, 3, 4)), None] if lstm else [torch.randn(1, 3, 4), None]
    cases = [
        (ValueError, "one entry per group", [good[0]]),
        (ValueError, "one entry per group", good + [good[0]]),
        (RuntimeError, "input_size", [good[0], torch.randn(2, 5, 4)]),
        (ValueError, "share one dtype|does not match weight dtype", [good[0], good[1].double()]),
        (TypeError, "must be a Tensor or PackedSequence", [good[0], "x"]),
        (ValueError, "must be 3-D", [good[0], torch.randn(1, 2, 5, 3)]),
        (RuntimeError, "larger than 0", [good[0], torch.randn(0, 5, 3)]),
    ]
    for exc, match, xs in cases:
        with pytest.raises(exc, match=match):
            m(xs)
    with pytest.raises(ValueError, match="lengths must be None"):
        m(good, lengths=torch.tensor([4, 4]))
    with pytest.raises(RuntimeError, match=r"Expected hx\[0\]"):
        m(good, bad_hx_shape)
    with pytest.raises(ValueError, match="list of 2 per-group states"):
        m(good, [None])
    with pytest.raises(ValueError, match="one entry per group"):
        m(good, groups=[1])
    after = m(good)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert_all_close(_flat(after), _flat(ref), rtol=0, atol=0)


# ---- the ops: per-(group, row) lengths ----------------------------------------------------------
def _per_group_lengths(G, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(0, T + 1, (G, B), generator=g)
    L[0, 0], L[-1, -1] = 0, T  # a row with no sequence, and one of the full length
    if G > 2:  # a group whose rows all end by T // 2 (its gradient GEMMs stop there)
        L[1] = L[1].clamp(max=T // 2)
    return L


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("path", ["sequence", "per_step"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("reverse", [False, True])
def test_op_per_group_lengths_match_the_composite(cell, path, shared, reverse):
    """grouped_recurrence_forward / backward with lengths (G, B) against the plain-torch
    composite, float64; a row of length 0 holds h0 (and c0), outputs 0 and passes its incoming
    state gradient through."""
    G, T, B, C, H = 3, 5, 4, 2, 3
    args = list(recurrence_args(cell, G, T, B, C, H, shared=shared))
    args[-1] = _per_group_lengths(G, B, T)
    leaves = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
              else a for a in args]
    with mtl_kernels.recurrence_path(path):
        fwd = ops.grouped_recurrence_forward(cell, *args, reverse)
        grads = recurrence_grads(cell, G, T, B, H)
        bwd = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, fwd, reverse))
    x, w_ih, w_hh, b, b_hh, w_hr, h0, c0, L = leaves
    want = mtl_kernels.reference.recurrence_composite(cell, x, w_ih, w_hh, b, b_hh, h0, c0, L,
                                                      reverse)
    assert_all_close(fwd[:2], want[:2], **TOL)
    if HAS_C[cell]:
        assert_all_close(fwd[2:3], want[2:3], **TOL)
    assert torch.equal(fwd[1][0, 0], args[6][0, 0])  # length 0: h_n = h0
    assert not fwd[0][0, :, 0].any()  # and every output 0
    outs = [want[0], want[1]] + ([want[2]] if HAS_C[cell] else [])
    cots = [grads[0], grads[1]] + ([grads[2]] if HAS_C[cell] else [])
    present = [t for t in (x, w_ih, w_hh, b, b_hh, h0, c0) if t is not None]
    d_want = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cots)), present)
    # the backward's results: input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0 grads
    d_got = [t for t, a in zip(bwd, (x, w_ih, w_hh, b, b_hh, None, h0, c0)) if a is not None]
    assert_all_close(d_got, d_want, **TOL)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck_with_per_group_lengths(cell):
    G, T, B, C, H = 2, 4, 3, 2, 3
    args = list(recurrence_args(cell, G, T, B, C, H, shared=False))
    args[-1] = _per_group_lengths(G, B, T, seed=1)
    args[-1][0] = 0  # a group with no sequence at all
    torch.library.opcheck(ops.grouped_recurrence_forward, (cell, *args, False))
    torch.library.opcheck(ops.grouped_recurrence, (cell, *args, True))
    fwd = ops.grouped_recurrence_forward(cell, *args, False)
    grads = recurrence_grads(cell, G, T, B, H)
    torch.library.opcheck(ops.grouped_recurrence_backward,
                          (cell, *backward_args(cell, grads, args, fwd, False)))


@pytest.mark.parametrize("cell", CELLS)
def test_op_per_group_lengths_of_no_rows(cell):
    """B = 0 with lengths (G, 0): forward and backward run (no longest row to read) and give
    zero weight gradients, as with no lengths."""
    args = list(recurrence_args(cell, 2, 3, 0, 4, 5, dtype=torch.float64, shared=False))
    args[-1] = torch.zeros(2, 0, dtype=torch.int64)
    grads = recurrence_grads(cell, 2, 3, 0, 5)
    fwd = ops.grouped_recurrence_forward(cell, *args, False)
    got = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, fwd, False), True)
    assert got[0].shape == (2, 3, 0, 4)
    for t in got[1:4]:
        assert torch.equal(t, torch.zeros_like(t))


def test_op_rejects_bad_per_group_lengths():
    G, T, B, C, H = 2, 4, 3, 2, 3
    args = list(recurrence_args("lstm", G, T, B, C, H, shared=False))
    for bad, match in ((torch.full((G, B), T + 1), r"lie in \[0, 4\]"),
                       (torch.full((G, B), -1), r"lie in \[0, 4\]"),
                       (torch.full((G + 1, B), 2), r"shape \[2, 3\]"),
                       (torch.zeros(B, dtype=torch.long), r"lie in \[1, 4\]")):  # (B,): at least 1
        args[-1] = bad
        with pytest.raises(RuntimeError, match=match):
            ops.grouped_recurrence_forward("lstm", *args, False)


# ---- the multi-task tools on ragged batches ------------------------------------------------------
def _multitask_pair(**kw):
    from mtl_kernels.reference import MultiTaskLSTMRef
    ref = MultiTaskLSTMRef(**kw).double()
    model = mtl_kernels.MultiTaskLSTM(**kw).double()
    model.lstm = GroupedLSTM.from_lstms(ref.lstms)
    model.heads.load_state_dict(ref.heads.state_dict())
    if ref.embedding is not None:
        model.embedding.load_state_dict(ref.embedding.state_dict())
    return ref, model


def test_multitask_lstm_takes_per_task_batches_in_one_call():
    """MultiTaskLSTM(list): each task its own (B_k, T_k), dense and with lengths / packed, against
    the seed model task by task; one grouped recurrence for all tasks; every gradient."""
    torch.manual_seed(0)
    ref, model = _multitask_pair(input_size=3, hidden_size=5, output_sizes=[2, 4, 1])
    xs = [torch.randn(6, 4, 3, dtype=torch.float64), torch.randn(1, 1, 3, dtype=torch.float64),
          torch.randn(3, 7, 3, dtype=torch.float64)]
    lengths = [None, None, torch.tensor([7, 2, 5])]
    before = mtl_kernels.path_counts()
    got = model(xs, lengths=lengths)
    ran = {k: v - before[k] for k, v in mtl_kernels.path_counts().items()}
    assert ran["forward_sequence"] + ran["forward_per_step"] == 1
    want = [ref(x, lengths=l, task=k) for k, (x, l) in enumerate(zip(xs, lengths))]
    assert [o.shape for o in got] == [(6, 2), (1, 4), (3, 1)]
    assert_all_close(got, want, **TOL)
    sum(o.sum() for o in got).backward()
    sum(o.sum() for o in want).backward()
    for g, lstm in enumerate(ref.lstms):
        torch.testing.assert_close(model.lstm.weight_hh_l0.grad[g], lstm.weight_hh_l0.grad, **TOL)
        torch.testing.assert_close(model.heads[g].weight.grad, ref.heads[g].weight.grad, **TOL)
    # the same batch as a PackedSequence: the same result
    packed = pack_padded_sequence(xs[2], lengths[2], batch_first=True, enforce_sorted=False)
    torch.testing.assert_close(model([xs[0], xs[1], packed])[2], got[2], **TOL)


def test_multitask_lstm_token_lists_and_bad_lists():
    torch.manual_seed(0)
    ref, model = _multitask_pair(input_size=None, hidden_size=4, output_sizes=[3, 2],
                                 vocab_size=11, embedding_dim=3)
    toks = [torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (2, 6))]
    got = model(toks)
    want = [ref(t, task=k) for k, t in enumerate(toks)]
    assert_all_close(got, want, **TOL)
    # a packed entry of token ids: the same as its rows given with lengths
    tok_lengths = torch.tensor([6, 3])
    packed = pack_padded_sequence(toks[1], tok_lengths, batch_first=True, enforce_sorted=False)
    with_lengths = model(toks, lengths=[None, tok_lengths])
    assert_all_close(model([toks[0], packed]), with_lengths, **TOL)
    assert_all_close(with_lengths[1:], [ref(toks[1], lengths=tok_lengths, task=1)], **TOL)
    with pytest.raises(ValueError, match="one entry per task"):
        model(toks[:1])
    with pytest.raises(ValueError, match="task= takes one batch"):
        model(toks, task=0)
    with pytest.raises(ValueError, match=r"lengths\[1\] must be \(2,\)"):
        model(toks, lengths=[None, torch.tensor([6, 6, 6])])
    with pytest.raises(ValueError, match="integer ids"):
        model([toks[0], torch.randn(2, 6, 3)])
    assert_all_close(model(toks), got, rtol=0, atol=0)  # still works


def test_interleaver_batches_of_per_task_sizes_feed_one_call():
    """TaskInterleaver(per_step=True) over loaders of different batch sizes yields a list that
    MultiTaskLSTM takes as it is (x_k = the batch's first field)."""
    from torch.utils.data import DataLoader, TensorDataset
    from mtl_kernels.training import TaskInterleaver
    torch.manual_seed(0)
    ref, model = _multitask_pair(input_size=3, hidden_size=4, output_sizes=[2, 2, 2])
    loaders = [DataLoader(TensorDataset(torch.randn(n, 5, 3, dtype=torch.float64)), batch_size=b)
               for n, b in ((8, 4), (6, 3), (2, 1))]
    steps = list(TaskInterleaver(loaders, "cycle", per_step=True))
    assert len(steps) == 2
    for step in steps:
        xs = [batch[0] for batch in step]
        assert [x.shape[0] for x in xs] == [4, 3, 1]
        got = model(xs)
        assert_all_close(got, [ref(x, task=k) for k, x in enumerate(xs)], **TOL)


# ---- the CUDA kernels' per-(group, row) lengths, through their CPU emulators ---------------------
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_emulated_persistent_kernels_take_per_group_lengths(cell, reverse, shared):
    """The persistent FMA kernel's and the tensor-core kernel's tilings (every block and thread of
    the plan, run on the CPU by the emulators) with lengths (G, B), rows of length 0 included,
    against the per-step op, forward and backward, fp64."""
    G, T, B, C, H = 3, 5, 7, 4, 6
    args = list(recurrence_args(cell, G, T, B, C, H, shared=shared))
    args[-1] = _per_group_lengths(G, B, T, seed=2)
    grads = recurrence_grads(cell, G, T, B, H)
    ref = ops.grouped_recurrence_forward(cell, *args, reverse)
    ref_b = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, ref, reverse))
    emu = ops._grouped_recurrence_forward_emulated(cell, *args, reverse, 4, 3, 2)
    assert_all_close(emu, ref, **TOL)
    emu_b = ops._grouped_recurrence_backward_emulated(
        cell, *backward_args(cell, grads, args, emu, reverse), 4, 3, 2, 5)
    assert_all_close(emu_b, ref_b, **TOL)
    for mma_k in (8, 16):  # the tensor-core kernel's fragments, fp64 (units, tile_rows, reg, k)
        emu = ops._grouped_recurrence_forward_emulated_mma(cell, *args, reverse, 6, 7, -1, mma_k)
        assert_all_close(emu, ref, **TOL)
        emu_b = ops._grouped_recurrence_backward_emulated_mma(
            cell, *backward_args(cell, grads, args, emu, reverse), 6, 7, -1, mma_k, 0)
        assert_all_close(emu_b, ref_b, **TOL)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_sequence_path_skips_padding_rows_exactly(cell, reverse):
    """fp32, sizes where the CPU sequence path splits the rows by work over threads and (with the
    fp32 tiles) projects the input in the kernel: its trailing padding rows skipped per step, the
    weight-gradient GEMMs cut at each group's longest row, against the per-step path, which skips
    nothing, and a list call's layout (rows past B_k of length 0; a group of no rows at all)."""
    G, T, B, C, H = 4, 20, 9, 16, 64
    args = list(recurrence_args(cell, G, T, B, C, H, dtype=torch.float32, shared=False))
    L = torch.zeros(G, B, dtype=torch.long)
    L[0, :9], L[1, :4], L[2, :2] = T, 7, 1  # tasks of (T_k, B_k) = (20, 9), (7, 4), (1, 2)
    L[3, :0] = 0  # and one with no rows
    args[-1] = L
    grads = recurrence_grads(cell, G, T, B, H, dtype=torch.float32)
    results = {}
    with torch.autograd.grad_mode.no_grad():
        for path in ("sequence", "per_step"):
            with mtl_kernels.recurrence_path(path):
                fwd = ops.grouped_recurrence_forward(cell, *args, reverse)
                bwd = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, fwd, reverse))
                inference = ops.grouped_recurrence(cell, *args, reverse)
            results[path] = (fwd, bwd, inference)
    seq, step = results["sequence"], results["per_step"]
    assert_all_close(seq[0][:3], step[0][:3], rtol=1e-5, atol=1e-5)
    assert_all_close([t for t in seq[1] if t.numel()], [t for t in step[1] if t.numel()],
                     rtol=1e-4, atol=1e-4)
    assert_all_close(seq[2][:2], step[2][:2], rtol=1e-5, atol=1e-5)
    assert not seq[0][0][1, 7:].any() and not seq[0][0][1, :, 4:].any()  # padding outputs 0
