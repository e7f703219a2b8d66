"""A true drop-in: nn.LSTM's whole interface (unbatched input, proj_size, flatten_parameters, its
exception types), ops that reject every bad argument, non-contiguous lengths, autocast, compile
and export with lengths and groups, torch.func, and data-parallel training."""
import copy
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from helpers import assert_close_to_truth, backward_args, recurrence_args, recurrence_grads
from mtl_kernels import (BranchAttention, GroupedGRU, GroupedLSTM, GroupedRNN, GroupedRNNBase,
                         MultiTaskLSTM)
from mtl_kernels import branch_attention
from mtl_kernels._ops import ops
from mtl_kernels.reference import RNNLoop

pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated.*")


# ---- silent wrong answers: lengths of any strides ---------------------------------------------
def test_non_contiguous_lengths_module_and_op():
    torch.manual_seed(0)
    m = GroupedLSTM(2, 3, 4, bidirectional=True)
    x = torch.randn(6, 4, 3, requires_grad=True)
    table = torch.tensor([[6, 0], [2, 0], [5, 0], [1, 0]])
    lengths = table[:, 0]  # a column: stride 2
    assert not lengths.is_contiguous()
    out, (h, c) = m(x, lengths=lengths)
    out_c, (h_c, c_c) = m(x, lengths=lengths.contiguous())
    torch.testing.assert_close(out, out_c)
    torch.testing.assert_close(h, h_c)
    g1 = torch.autograd.grad(out.sum() + h.sum(), x)[0]
    g2 = torch.autograd.grad(out_c.sum() + h_c.sum(), x)[0]
    torch.testing.assert_close(g1, g2)
    # the op itself, with lengths[::2]
    args = recurrence_args("lstm", 2, 5, 3, 3, 4)
    long_lengths = torch.tensor([5, 9, 2, 9, 4, 9])
    strided = long_lengths[::2]
    a = ops.grouped_recurrence_forward("lstm", *args[:-1], strided, False)
    b = ops.grouped_recurrence_forward("lstm", *args[:-1], strided.contiguous(), False)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    grads = recurrence_grads("lstm", 2, 5, 3, 4)
    args_s = (*args[:-1], strided)
    args_c = (*args[:-1], strided.contiguous())
    for u, v in zip(ops.grouped_recurrence_backward("lstm", *backward_args("lstm", grads, args_s, a, False)),
                    ops.grouped_recurrence_backward("lstm", *backward_args("lstm", grads, args_c, b, False))):
        assert torch.equal(u, v)


# ---- the ops reject every bad argument, naming it --------------------------------------------
def _lstm_op_case(shared=True):
    G, T, B, C, H = 2, 4, 3, 5, 3
    x, w_ih, w_hh, b, _, _, h0, c0, L = recurrence_args("lstm", G, T, B, C, H, shared=shared,
                                                        lengths=True)
    fwd = ops.grouped_lstm_forward(x, w_ih, w_hh, b, h0, c0, L, False)
    g_out, g_h, g_c = recurrence_grads("lstm", G, T, B, H)
    bwd = dict(grad_output=g_out, grad_h_n=g_h, grad_c_n=g_c, input=x, weight_ih=w_ih,
               weight_hh=w_hh, gates=fwd[3], h_states=fwd[4], c_states=fwd[5], lengths=L,
               reverse=False)
    return (G, T, B, C, H), bwd


BACKWARD_ORDER = ["grad_output", "grad_h_n", "grad_c_n", "input", "weight_ih", "weight_hh", "gates",
                  "h_states", "c_states", "lengths", "reverse"]


def _bad_backward_cases():
    (G, T, B, C, H), _ = _lstm_op_case()
    return [
        ("grad_h_n", lambda a: torch.randn(G, 1, H, dtype=torch.float64), "grad_h_n"),
        ("grad_c_n", lambda a: torch.randn(G, B + 1, H, dtype=torch.float64), "grad_c_n"),
        ("weight_hh", lambda a: a["weight_hh"][:, :, :H - 1], "weight_hh"),
        ("c_states", lambda a: a["c_states"][:, :, :B - 1], "c_states"),
        ("gates", lambda a: a["gates"].reshape(G, T, B, 4 * H), "gates"),  # right size, wrong layout
        ("lengths", lambda a: torch.tensor([T + 1, 1, 2]), "lengths must lie in"),
        ("lengths", lambda a: torch.tensor([1, 1, 2], dtype=torch.int32), "lengths must have dtype"),
        ("grad_output", lambda a: a["grad_output"].float(), "grad_output must have dtype torch.float64"),
        ("h_states", lambda a: a["h_states"].float(), "h_states must have dtype"),
        ("grad_output", lambda a: a["grad_output"][:, :T - 1], "grad_output must have shape"),
        ("h_states", lambda a: a["h_states"].to_sparse(), "SparseCPU"),  # the dispatcher refuses it
        ("input", lambda a: a["input"].int(), "input must be a floating-point"),
    ]


@pytest.mark.parametrize("name,make,message", _bad_backward_cases(),
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(_bad_backward_cases())])
def test_backward_op_rejects_bad_argument(name, make, message):
    _, args = _lstm_op_case()
    args[name] = make(args)
    with pytest.raises((RuntimeError, NotImplementedError), match=message):
        ops.grouped_lstm_backward(*[args[k] for k in BACKWARD_ORDER])


def test_forward_ops_reject_bad_arguments():
    x, w_ih, w_hh, b, b_hh, _, h0, c0, L = recurrence_args("lstm", 2, 4, 3, 5, 3, lengths=True)
    call = lambda **kw: ops.grouped_lstm_forward(*[kw.get(k, v) for k, v in dict(  # noqa: E731
        input=x, weight_ih=w_ih, weight_hh=w_hh, bias=b, h0=h0, c0=c0, lengths=L,
        reverse=False).items()])
    for kw, msg in [(dict(weight_hh=w_hh[:, :, :2]), "weight_hh must have shape"),
                    (dict(h0=h0[:, :2]), "h0 must have shape"),
                    (dict(c0=c0.float()), "c0 must have dtype torch.float64, got torch.float32"),
                    (dict(bias=b[:, :5]), "bias must have shape"),
                    (dict(lengths=torch.tensor([0, 1, 2])), r"lengths must lie in \[1, 4\]"),
                    (dict(lengths=torch.tensor([1, 2])), "lengths must have shape"),
                    (dict(input=x[:0]), "at least one time step"),
                    (dict(weight_ih=w_ih[:, :7]), "weight_ih must be")]:
        with pytest.raises(RuntimeError, match=msg):
            call(**kw)
    # the generic op: arguments that do not belong to the cell
    with pytest.raises(RuntimeError, match="c0 must be None"):
        ops.grouped_recurrence_forward("gru", *recurrence_args("gru", 2, 4, 3, 5, 3)[:7], c0, None, False)
    with pytest.raises(RuntimeError, match="unknown cell"):
        ops.grouped_recurrence_forward("lstmx", x, w_ih, w_hh, b, None, None, h0, c0, None, False)
    with pytest.raises(RuntimeError, match="weight_hr .* for the LSTM only"):
        gx, gw_ih, gw_hh, gb, gb_hh, _, gh0, _, _ = recurrence_args("gru", 2, 4, 3, 5, 3)
        ops.grouped_recurrence_forward("gru", gx, gw_ih, gw_hh, gb, gb_hh,
                                       torch.randn(2, 2, 3, dtype=torch.float64), gh0, None, None, False)


def test_branch_attention_backward_rejects_bad_arguments():
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64)
    out, weights, lse = ops.branch_attention_forward(x, w, None)
    g = torch.randn_like(out)
    for kw, msg in [(dict(lse=lse[:4]), "lse must have shape"),
                    (dict(lse=lse.float()), "lse must have dtype"),
                    (dict(grad_out=g[:, :4]), "grad_out must have shape"),
                    (dict(grad_out=g.float()), "grad_out must have dtype"),
                    (dict(grad_weights=torch.randn(3, 5, dtype=torch.float64)), "grad_weights must have shape"),
                    (dict(weight=w[:4]), "weight must have shape"),
                    (dict(bias=torch.randn(2, dtype=torch.float64)), "bias must have shape")]:
        args = dict(grad_out=g, grad_weights=None, branches=x, weight=w, bias=None, lse=lse)
        args.update(kw)
        with pytest.raises(RuntimeError, match=msg):
            ops.branch_attention_backward(*args.values())


# ---- nn.LSTM's interface ------------------------------------------------------------------------
@pytest.mark.parametrize("cls,torch_cls", [(GroupedLSTM, nn.LSTM), (GroupedGRU, nn.GRU),
                                           (GroupedRNN, nn.RNN)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input_like_torch(cls, torch_cls, batch_first):
    """2-D input (T, C) is one unbatched sequence shared by every group: group g gives what
    torch's module g gives on it, with hx (G, L*D, H) and results without a batch dim."""
    torch.manual_seed(0)
    mods = nn.ModuleList([torch_cls(3, 4, 2, bidirectional=True, batch_first=batch_first)
                          for _ in range(3)]).double()
    grouped = cls.from_modules(mods)
    x = torch.randn(5, 3, dtype=torch.float64)
    lstm = cls is GroupedLSTM
    h0 = torch.randn(3, 4, 4, dtype=torch.float64)
    hx = (h0, torch.randn(3, 4, 4, dtype=torch.float64)) if lstm else h0
    out, hn = grouped(x, hx)
    assert out.shape == (3, 5, 8)
    for g, m in enumerate(mods):
        r_out, r_hn = m(x, (hx[0][g], hx[1][g]) if lstm else hx[g])
        torch.testing.assert_close(out[g], r_out)
        if lstm:
            torch.testing.assert_close(hn[0][g], r_hn[0])
            torch.testing.assert_close(hn[1][g], r_hn[1])
        else:
            torch.testing.assert_close(hn[g], r_hn)
    with pytest.raises(RuntimeError, match="should be 3-D"):
        grouped(x, (h0[:, :, None], hx[1]) if lstm else h0[:, :, None])


def _proj_case(G=3, L=2, bi=True, bf=False, seed=0):
    torch.manual_seed(seed)
    lstms = nn.ModuleList([nn.LSTM(5, 7, L, bidirectional=bi, batch_first=bf, proj_size=3)
                           for _ in range(G)]).double()
    return lstms, GroupedLSTM.from_lstms(lstms)


@pytest.mark.parametrize("with_len", [False, True])
@pytest.mark.parametrize("shared", [True, False])
def test_proj_size_parity(device, with_len, shared):
    lstms, grouped = _proj_case()
    lstms, grouped = lstms.to(device), grouped.to(device)
    assert grouped.proj_size == 3 and grouped.weight_hr_l1_reverse.shape == (3, 3, 7)
    G, T, B = 3, 6, 4
    x = torch.randn((T, B, 5) if shared else (G, T, B, 5), dtype=torch.float64, device=device,
                    requires_grad=True)
    hx = (torch.randn(G, 4, B, 3, dtype=torch.float64, device=device, requires_grad=True),
          torch.randn(G, 4, B, 7, dtype=torch.float64, device=device, requires_grad=True))
    lengths = torch.tensor([6, 2, 5, 1]) if with_len else None
    ref = RNNLoop(lstms)
    names = [n for n, _ in lstms[0].named_parameters()]
    out, (h, c) = grouped(x, hx, lengths)
    r_out, (r_h, r_c) = ref(x, hx, lengths)
    for a, r in ((out, r_out), (h, r_h), (c, r_c)):
        torch.testing.assert_close(a, r)
    cot = [torch.randn_like(t) for t in (out, h, c)]
    params = [getattr(grouped, n) for n in names]
    ref_params = [getattr(m, n) for n in names for m in lstms]
    got = torch.autograd.grad([out, h, c], [x, *hx, *params], cot)
    want = torch.autograd.grad([r_out, r_h, r_c], [x, *hx, *ref_params], cot)
    for a, r in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, r)
    for k, n in enumerate(names):
        torch.testing.assert_close(got[3 + k], torch.stack(want[3 + k * G:3 + (k + 1) * G]),
                                   msg=lambda m: f"{n}: {m}")


def test_proj_size_gradcheck_and_opcheck():
    args = list(recurrence_args("lstm", 2, 3, 3, 2, 4, proj=2, lengths=True))
    inputs = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    diff = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor) and a.requires_grad]

    def f(*ts):
        full = list(inputs)
        for i, t in zip(diff, ts):
            full[i] = t
        return ops.grouped_recurrence_forward("lstm", *full, True)[:3]

    assert torch.autograd.gradcheck(f, [inputs[i] for i in diff])
    assert torch.autograd.gradgradcheck(f, [inputs[i] for i in diff])
    plain = recurrence_args("lstm", 2, 3, 3, 2, 4, proj=2, lengths=True)
    torch.library.opcheck(ops.grouped_recurrence_forward, ("lstm", *plain, False))
    fwd = ops.grouped_recurrence_forward("lstm", *plain, False)
    grads = recurrence_grads("lstm", 2, 3, 3, 4, proj=2)
    torch.library.opcheck(ops.grouped_recurrence_backward,
                          ("lstm", *backward_args("lstm", grads, plain, fwd, False)))


def test_flatten_parameters_and_weight_attributes():
    m = GroupedLSTM(2, 3, 4, num_layers=2, proj_size=2)
    m.flatten_parameters()  # many models call it; a no-op here
    assert m.proj_size == 2 and m.mode == "LSTM"
    assert m._flat_weights_names[:5] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0",
                                          "weight_hr_l0"]
    assert m.all_weights[1][0] is m.weight_ih_l1 and len(m._flat_weights) == 10
    assert GroupedGRU(2, 3, 4).proj_size == 0


def _exception(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e)
    return None


@pytest.mark.parametrize("case", [
    "input_size_float", "batch_first_str", "bias_int", "hidden_zero",
    "layers_zero", "dropout_big", "proj_too_big", "wrong_input_size", "zero_steps", "input_5d",
    "dtype_mismatch", "hx_size"])
def test_exception_types_match_nn_lstm(case):
    """Where nn.LSTM raises, GroupedLSTM raises the same exception type."""
    x = torch.randn(5, 2, 3)
    builds = {
        "input_size_float": (lambda c: c(3.0, 4)), "batch_first_str": (lambda c: c(3, 4, batch_first="False")),
        "bias_int": (lambda c: c(3, 4, bias=0)),
        "hidden_zero": (lambda c: c(3, 0)), "layers_zero": (lambda c: c(3, 4, num_layers=0)),
        "dropout_big": (lambda c: c(3, 4, dropout=2)), "proj_too_big": (lambda c: c(3, 4, proj_size=4)),
    }
    calls = {
        "wrong_input_size": lambda m, grouped: m(torch.randn(5, 2, 4)),
        "zero_steps": lambda m, grouped: m(torch.randn(0, 2, 3)),
        "input_5d": lambda m, grouped: m(torch.randn(1, 1, 5, 2, 3)),
        "dtype_mismatch": lambda m, grouped: m(x.double()),
        "hx_size": lambda m, grouped: m(x, (torch.zeros(2, 1, 3, 4) if grouped else torch.zeros(1, 3, 4),
                                            torch.zeros(2, 1, 2, 4) if grouped else torch.zeros(1, 2, 4))),
    }
    if case in builds:
        want = _exception(lambda: builds[case](nn.LSTM))
        got = _exception(lambda: builds[case](lambda *a, **k: GroupedLSTM(2, *a, **k)))
    else:
        want = _exception(lambda: calls[case](nn.LSTM(3, 4), False))
        got = _exception(lambda: calls[case](GroupedLSTM(2, 3, 4), True))
    assert want is not None and got is want, (case, got, want)


def test_bidirectional_takes_a_bool_or_0_1_like_nn_lstm():
    assert GroupedLSTM(2, 3, 4, bidirectional=1).bidirectional is True  # nn.LSTM takes 1 too
    with pytest.raises(TypeError, match="bidirectional should be of type bool"):
        GroupedLSTM(2, 3, 4, bidirectional="True")


def test_groups_must_be_integers():
    m = GroupedLSTM(3, 3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(TypeError, match="integers"):
        m(x, groups=[0.5])
    with pytest.raises(TypeError, match="integers"):
        m(x, groups=[True])
    with pytest.raises(ValueError, match="non-empty"):
        m(x, groups=torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        m(x, groups=[3])
    a = m(x, groups=[2, 0])[0]
    b = m(x, groups=torch.tensor([2, 0]))[0]
    torch.testing.assert_close(a, b)


# ---- autocast -----------------------------------------------------------------------------------
def test_autocast_cpu_bf16_like_nn_lstm():
    torch.manual_seed(0)
    lstms = nn.ModuleList([nn.LSTM(6, 8, 2) for _ in range(2)])
    grouped = GroupedLSTM.from_lstms(lstms)
    x = torch.randn(7, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = grouped(x)
    assert out.dtype == torch.bfloat16 and c.dtype == torch.bfloat16
    # against fp64 on what autocast rounds: the input, the weights and the fp32 sum b_ih + b_hh,
    # each to bf16 (norm-relative; helpers.assert_close_to_truth)
    truth = GroupedLSTM.from_lstms(lstms).double()
    with torch.no_grad():
        for name, p in truth.named_parameters():
            if name.startswith("bias_ih"):
                p.copy_((p + getattr(truth, name.replace("ih", "hh"))).float().bfloat16())
            elif name.startswith("bias_hh"):
                p.zero_()
            else:
                p.copy_(p.float().bfloat16())
    want, (want_h, want_c) = truth(x.bfloat16().double())
    assert_close_to_truth([out, h, c], [want, want_h, want_c], 2e-2)
    out.float().sum().backward()
    assert grouped.weight_hh_l1.grad is not None and grouped.weight_hh_l1.grad.dtype == torch.float32
    assert grouped.weight_hh_l1.grad.abs().sum() > 0


def test_autocast_after_linear_feeds_grouped_lstm_and_branch_attention():
    """An autocast nn.Linear hands bf16 activations to fp32 modules: nn.LSTM takes them, and so do
    GroupedLSTM, GroupedGRU and BranchAttention."""
    torch.manual_seed(0)
    proj = nn.Linear(5, 6)
    lstm, gru, att = GroupedLSTM(3, 6, 8), GroupedGRU(3, 6, 8), BranchAttention(8)
    x = torch.randn(7, 2, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = proj(x)
        assert y.dtype == torch.bfloat16
        nn.LSTM(6, 8)(y)  # what nn.LSTM does
        branches, _ = lstm(y)
        gru(y)
        combined = att(branches.float())
        combined_w = branch_attention(branches, att.weight, att.bias)
    assert branches.dtype == torch.bfloat16 and combined.dtype == torch.bfloat16
    (combined.float().sum() + combined_w.float().sum()).backward()
    for p in (proj.weight, lstm.weight_ih_l0, att.weight):
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0


def test_autocast_cpu_dtype_per_cell_like_torch():
    """Under CPU autocast each grouped module computes in the dtype its torch module does: nn.LSTM
    and nn.RNN in bf16, nn.GRU in fp32 (the CPU does not autocast it); and GroupedGRU also takes an
    autocast nn.Linear's bf16 output (computing in the weights' fp32), with fp32 outputs that match
    the nn.GRU loop on the same fp32-rounded input."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4)
    cases = ((nn.LSTM(4, 5), torch.bfloat16), (nn.GRU(4, 5), torch.float32),
             (nn.RNN(4, 5), torch.bfloat16), (nn.RNN(4, 5, nonlinearity="relu"), torch.bfloat16))
    for torch_mod, want in cases:
        grouped = GroupedRNNBase.from_modules([torch_mod, copy.deepcopy(torch_mod)])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = grouped(x)[0]
            try:  # torch's own answer where it runs (nn.LSTM's bf16 oneDNN path needs AVX-512)
                want = torch_mod(x)[0].dtype
            except RuntimeError:
                assert isinstance(torch_mod, nn.LSTM)
        assert got.dtype == want, (type(torch_mod).__name__, got.dtype, want)
    gru = nn.GRU(5, 6)
    grouped = GroupedGRU.from_grus([gru])
    proj = nn.Linear(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = proj(x)
        out, h = grouped(y)
    assert y.dtype == torch.bfloat16 and out.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(out[0], gru(y.float())[0])
    out.sum().backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_autocast_kernels_registered_for_cpu_and_cuda():
    """The ops that compute (the forward, the inference forward, branch attention) have autocast
    kernels under both AutocastCPU and AutocastCUDA: the same template, so the CPU tests above
    exercise the code the CUDA key runs (test_cuda.py runs it on a GPU)."""
    for op in ("grouped_recurrence_forward", "grouped_recurrence", "branch_attention_forward"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mtl_kernels::{op}", key), (op, key)


# ---- torch.compile and torch.export --------------------------------------------------------------
class _Counter:
    """A torch.compile backend that counts the graphs it is given."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize("cls", [GroupedLSTM, GroupedGRU])
def test_compile_fullgraph_with_lengths_and_groups(cls):
    torch.manual_seed(0)
    m = cls(4, 3, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 3, requires_grad=True)
    lengths = torch.tensor([6, 3])
    f = torch.compile(lambda x, L: m(x, lengths=L, groups=[2, 0])[0], backend="aot_eager",
                      fullgraph=True)
    got, want = f(x, lengths), m(x, lengths=lengths, groups=[2, 0])[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0],
                               torch.autograd.grad(want.sum(), x)[0])
    g = torch.compile(lambda x, L, idx: m(x, lengths=L, groups=idx)[0], backend="aot_eager",
                      fullgraph=True)
    torch.testing.assert_close(g(x, lengths, torch.tensor([2, 0])), want)


def test_export_with_lengths_and_groups():
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = GroupedLSTM(4, 3, 5, batch_first=True)

        def forward(self, x, lengths, groups):
            return self.lstm(x, lengths=lengths, groups=groups)[0]

    model = Model()
    x, lengths, groups = torch.randn(2, 6, 3), torch.tensor([6, 3]), torch.tensor([3, 1])
    ep = torch.export.export(model, (x, lengths, groups))
    torch.testing.assert_close(ep.module()(x, lengths, groups), model(x, lengths, groups))
    lengths2 = torch.tensor([2, 5])
    torch.testing.assert_close(ep.module()(x, lengths2, groups), model(x, lengths2, groups))


def test_dynamic_compile_does_not_recompile_for_new_t_or_b():
    torch.manual_seed(0)
    m = GroupedLSTM(2, 3, 4, num_layers=2)
    counter = _Counter()
    torch._dynamo.reset()
    step = torch.compile(lambda x, L: m(x, lengths=L)[0].sum(), backend=counter, dynamic=True)
    for T, B in [(5, 2), (7, 2), (9, 4), (11, 6)]:  # B != C = 3: no duck-sized specialisation
        x = torch.randn(T, B, 3)
        L = torch.randint(1, T + 1, (B,))
        loss = step(x, L)
        loss.backward()
    assert counter.graphs == 1, counter.graphs


def test_multitask_compiles_once_per_task():
    torch.manual_seed(0)
    model = MultiTaskLSTM(4, 6, [2, 3, 2])
    counter = _Counter()
    torch._dynamo.reset()
    f = torch.compile(model, backend=counter)
    x = torch.randn(3, 5, 4)
    for _ in range(3):
        for task in range(3):
            f(x, task=task).sum().backward()
    assert counter.graphs <= 3, counter.graphs


# ---- torch.func ---------------------------------------------------------------------------------
def test_torch_func_grad_vjp_vmap_over_the_recurrence():
    from torch.func import functional_call, grad, vjp, vmap
    torch.manual_seed(0)
    m = GroupedLSTM(2, 3, 4).double()
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(5, 3, 3, dtype=torch.float64)

    def loss(p, x):
        return functional_call(m, p, (x,))[0].pow(2).sum()

    g = grad(loss)(params, x)
    loss(dict(m.named_parameters()), x).backward()
    for k, v in m.named_parameters():
        torch.testing.assert_close(g[k], v.grad)
    out, fn = vjp(lambda x: functional_call(m, params, (x,))[0], x)
    cot = torch.randn_like(out)
    (gx,) = fn(cot)
    xr = x.clone().requires_grad_()
    torch.testing.assert_close(gx, torch.autograd.grad(m(xr)[0], xr, cot)[0])
    # per-sample gradients: vmap over a batch of single sequences (T, 1, C)
    xs = torch.randn(4, 5, 1, 3, dtype=torch.float64)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(4):
        one = grad(loss)(params, xs[i])
        torch.testing.assert_close(per_sample["weight_hh_l0"][i], one["weight_hh_l0"])
    # vmap of the forward alone
    outs = vmap(lambda x: m(x)[0])(xs.float().double())
    for i in range(4):
        torch.testing.assert_close(outs[i], m(xs[i])[0])


def test_torch_func_over_branch_attention():
    from torch.func import grad, vmap
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    w = torch.randn(5, dtype=torch.float64)
    b = torch.randn(1, dtype=torch.float64)

    def f(x, w, b):
        return branch_attention(x, w, b).pow(2).sum()

    gx, gw = grad(f, argnums=(0, 1))(x, w, b)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    rx, rw = torch.autograd.grad(f(xr, wr, b), (xr, wr))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    xs = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    out = vmap(lambda x: branch_attention(x, w, b))(xs)
    for i in range(6):
        torch.testing.assert_close(out[i], branch_attention(xs[i], w, b))


# ---- data parallel ------------------------------------------------------------------------------
_PARALLEL_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.environ["REPO"])
    from mtl_kernels import GroupedLSTM

    def model():
        torch.manual_seed(0)
        return GroupedLSTM(3, 4, 5, num_layers=2).double()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.randn(6, 8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if os.environ["MODE"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrapped = DDP(model())
        params = wrapped.module.named_parameters()
        full_grad = lambda p: p.grad
    else:  # FSDP2: parameters sharded over the ranks, gradients reduce-scattered
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        wrapped = model()
        fully_shard(wrapped, mesh=init_device_mesh("cpu", (world,)))
        params = wrapped.named_parameters()
        full_grad = lambda p: p.grad.full_tensor()
    shard = x[:, rank * 4:(rank + 1) * 4]  # each rank half of the batch
    (wrapped(shard)[0].pow(2).sum() * world).backward()  # both average: the whole batch's sum
    single = model()
    single(x)[0].pow(2).sum().backward()
    for (n, p), q in zip(params, single.parameters()):
        torch.testing.assert_close(full_grad(p), q.grad, msg=n)
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)
    # Past the checks, skip the interpreter's teardown: with torch 2.13.0 one FSDP2 rank once
    # aborted there ("terminate called without an active exception", after printing ok; seen once
    # in the CI wheel check, not in 20 reruns), which is torch's shutdown, not what this tests.
    os._exit(0)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_gloo_two_processes_matches_single_process(tmp_path, mode):
    """DistributedDataParallel and FSDP2 (fully_shard) on the CPU with gloo: gradients over two
    processes with half the batch each equal one process over the whole batch."""
    if mode == "fsdp2":
        pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2 in this torch")
        from torch.distributed import fsdp
        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("torch.distributed.fsdp.fully_shard needs torch >= 2.6")
    script = tmp_path / "parallel.py"
    script.write_text(_PARALLEL_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "MODE": mode, "OMP_NUM_THREADS": "1",
           "REPO": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} ok" in out, out


# ---- parameters read each call: parametrizations and weight hooks apply ------------------------
class _Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w


def test_parametrized_and_hooked_weights_are_the_ones_used():
    """torch.nn.utils.parametrize (a property replaces the parameter) and the older weight_norm
    (a forward pre-hook sets a plain tensor attribute) both decide what the forward reads, as in
    nn.LSTM."""
    from torch.nn.utils import parametrize
    torch.manual_seed(0)
    lstms = nn.ModuleList([nn.LSTM(3, 4, bidirectional=True).double() for _ in range(2)])
    grouped = GroupedLSTM.from_lstms(lstms)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    unscaled = grouped(x)[0].detach()
    for m in [grouped, *lstms]:
        parametrize.register_parametrization(m, "weight_hh_l0_reverse", _Scale())
        parametrize.register_parametrization(m, "bias_hh_l0", _Scale())
    want = torch.stack([m(x)[0] for m in lstms])
    got = grouped(x)[0]
    torch.testing.assert_close(got, want)
    assert (got - unscaled).abs().max() > 1e-3  # the parametrized values were the ones used
    got.sum().backward()
    orig = grouped.parametrizations.weight_hh_l0_reverse.original
    assert orig.grad is not None and orig.grad.abs().sum() > 0

    # weight_norm: weight = g v / |v|, recomputed by a pre-hook each call; doubling g doubles it
    plain = GroupedLSTM(2, 3, 4).double()
    normed = torch.nn.utils.weight_norm(copy.deepcopy(plain), "weight_ih_l0")
    with torch.no_grad():
        normed.weight_ih_l0_g.mul_(2)
        plain.weight_ih_l0.mul_(2)
    torch.testing.assert_close(normed(x)[0], plain(x)[0])


def test_states_are_fresh_tensors_that_detach_in_place():
    """Truncated BPTT cuts the graph with h.detach_() between chunks: h_n and c_n must not be views
    (nn.LSTM's are not)."""
    for m in (GroupedLSTM(2, 3, 4), GroupedLSTM(2, 3, 4, num_layers=2, bidirectional=True)):
        x = torch.randn(5, 2, 3)
        hx = None
        for _ in range(2):
            out, hx = m(x, hx)
            out.sum().backward()
            for t in hx:
                assert t._base is None
                t.detach_()
                assert not t.requires_grad
