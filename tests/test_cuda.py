"""GPU-only checks: half precision, fp32 accuracy targets, GroupedGRU / GroupedRNN parity with a
loop of nn.GRU / nn.RNN, autocast, CUDA graphs, the composite fallback."""
import copy

import pytest
import torch
from torch import nn

from mtl_kernels import BranchAttention, GroupedLSTM, GroupedRNNBase, branch_attention
from mtl_kernels.reference import LSTMLoop, RNNLoop, branch_attention_reference

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
              pytest.mark.usefixtures("cuda_path")]  # each test on both recurrence paths


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _case(dtype, shared=False, G=4, T=33, B=7, C=19, H=45, L=2, bi=True):
    torch.manual_seed(0)
    lstms = nn.ModuleList([nn.LSTM(C, H, L, bidirectional=bi) for _ in range(G)])
    ref = LSTMLoop(lstms).double().cuda()
    grouped = GroupedLSTM.from_lstms(lstms).cuda().to(dtype)
    x = torch.randn((T, B, C) if shared else (G, T, B, C), device="cuda")
    lengths = torch.randint(1, T + 1, (B,))
    return ref, grouped, x, lengths


@pytest.mark.parametrize("shared", [True, False])
def test_fp32_relative_error_under_1e5(shared):
    ref, grouped, x, lengths = _case(torch.float32, shared)
    out, (h, c) = grouped(x, lengths=lengths)
    r_out, (r_h, r_c) = ref(x.double(), lengths=lengths)
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [True, False])
def test_half_precision_forward_backward(dtype, shared):
    """bf16 / fp16 against fp64 on the same rounded weights and input, by norm-relative error."""
    _, grouped, x, lengths = _case(dtype, shared)
    ref = LSTMLoop(copy.deepcopy(grouped).double().to_lstms())  # the `dtype` weights, in fp64
    xh = x.to(dtype).requires_grad_()
    out, (h, c) = grouped(xh, lengths=lengths)
    assert out.dtype == dtype and c.dtype == dtype
    x64 = xh.detach().double().requires_grad_()
    r_out, (r_h, r_c) = ref(x64, lengths=lengths)
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        assert rel_err(a, b) < 1e-2
    cot = torch.randn_like(r_out)
    gx, g_w = torch.autograd.grad((out.double() * cot).sum(), [xh, grouped.weight_hh_l0])
    (rgx,) = torch.autograd.grad((r_out * cot).sum(), x64)
    assert rel_err(gx, rgx) < 2e-2
    assert torch.isfinite(g_w).all()


def _torch_modules(kind, G, C, H, **kw):
    if kind == "gru":
        return nn.ModuleList([nn.GRU(C, H, **kw) for _ in range(G)])
    return nn.ModuleList([nn.RNN(C, H, nonlinearity=kind[len("rnn_"):], **kw) for _ in range(G)])


def _outputs_and_grads(module, params, x, hx, lengths, cotangents):
    out, h_n = module(x, hx, lengths)
    loss = (out * cotangents[0]).sum() + (h_n * cotangents[1]).sum()
    return (out, h_n), torch.autograd.grad(loss, [x, hx, *params])


@pytest.mark.parametrize("kind", ["gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("shared", [True, False])
def test_gru_rnn_fp32_parity_with_torch_loop(kind, shared):
    """GroupedGRU / GroupedRNN against the ModuleList of nn.GRU / nn.RNN called in a loop on CUDA
    (cuDNN, TF32 off), fp32, 2 layers, bidirectional, lengths and hx: outputs, final states and every
    gradient (input, hx, each parameter) within test_cells.py's fp32 tolerances; and the grouped
    module's outputs within 1e-5 (norm-relative) of the fp64 loop."""
    torch.manual_seed(0)
    G, T, B, C, H, L = 3, 17, 9, 33, 29, 2
    mods = _torch_modules(kind, G, C, H, num_layers=L, bidirectional=True).cuda()
    grouped = GroupedRNNBase.from_modules(mods)
    loop, loop64 = RNNLoop(mods), RNNLoop(copy.deepcopy(mods)).double()
    x = torch.randn((T, B, C) if shared else (G, T, B, C), device="cuda", requires_grad=True)
    hx = torch.randn(G, 2 * L, B, H, device="cuda", requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    g = torch.Generator().manual_seed(1)
    cot = [torch.randn(*s, generator=g).cuda() for s in ((G, T, B, 2 * H), (G, 2 * L, B, H))]
    names = [n for n, _ in mods[0].named_parameters()]
    (out, h_n), grads = _outputs_and_grads(grouped, [getattr(grouped, n) for n in names], x, hx,
                                           lengths, cot)
    (r_out, r_h), r_grads = _outputs_and_grads(loop, [getattr(m, n) for n in names for m in mods],
                                               x, hx, lengths, cot)
    tol = dict(rtol=1e-4, atol=2e-5)
    for a, b in ((out, r_out), (h_n, r_h), (grads[0], r_grads[0]), (grads[1], r_grads[1])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)
    for k, n in enumerate(names):
        want = torch.stack(r_grads[2 + k * G:2 + (k + 1) * G])
        torch.testing.assert_close(grads[2 + k], want, **tol, msg=lambda m: f"{n}: {m}")
    with torch.no_grad():
        o64, h64 = loop64(x.double(), hx.double(), lengths)
    assert rel_err(out, o64) < 1e-5 and rel_err(h_n, h64) < 1e-5


def test_autocast_cuda_bf16_grouped_lstm_and_branch_attention():
    """Under torch.autocast("cuda", bfloat16), as nn.LSTM: GroupedLSTM runs in bf16 (outputs and
    states bf16), BranchAttention too; the gradients reach the fp32 parameters in fp32, and outputs
    and gradients are close to the fp32 run's (the attention weight's gradient, a difference of
    branch scores, within 1e-1; its bias's is zero: a softmax over branches ignores a shared bias)."""
    torch.manual_seed(0)
    lstm = GroupedLSTM.from_lstms(nn.ModuleList([nn.LSTM(6, 8, 2) for _ in range(3)])).cuda()
    att = BranchAttention(8).cuda()
    params = [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.weight_hh_l1, att.weight,
              att.bias]
    limits = [5e-2] * 4 + [1e-1, None]
    x = torch.randn(7, 4, 6, device="cuda")
    lengths = torch.tensor([7, 3, 5, 1])

    def run():
        branches, (h, c) = lstm(x, lengths=lengths)
        combined = att(branches)
        loss = combined.float().pow(2).sum() + h.float().sum()
        return (branches, h, c, combined), torch.autograd.grad(loss, params)

    ref, ref_grads = run()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, grads = run()
    assert all(t.dtype == torch.bfloat16 for t in got), [t.dtype for t in got]
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 2e-2
    for p, gr, r, limit in zip(params, grads, ref_grads, limits):
        assert gr.dtype == torch.float32 == p.dtype and torch.isfinite(gr).all()
        if limit is not None:
            assert gr.abs().sum() > 0 and rel_err(gr, r) < limit


def test_cuda_graph_capture_forward_backward():
    torch.manual_seed(0)
    m = GroupedLSTM(3, 8, 16, num_layers=2).cuda()
    x = torch.randn(4, 12, 5, 8, device="cuda")[:3].contiguous().requires_grad_()  # per group
    static_x = x.detach().clone().requires_grad_()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up on a side stream, as the CUDA-graph docs require
        for _ in range(2):
            m.zero_grad(set_to_none=True)
            m(static_x)[0].sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    m.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_out = m(static_x)[0]
        static_out.sum().backward()
    new_x = torch.randn_like(static_x)
    static_x.data.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    eager = GroupedLSTM(3, 8, 16, num_layers=2).cuda()
    eager.load_state_dict(m.state_dict())
    xe = new_x.clone().requires_grad_()
    out_e = eager(xe)[0]
    out_e.sum().backward()
    torch.testing.assert_close(static_out, out_e)
    torch.testing.assert_close(m.weight_hh_l1.grad, eager.weight_hh_l1.grad)


def test_branch_attention_large_h_composite_path():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 1500, device="cuda", dtype=torch.float64, requires_grad=True)
    w = (torch.randn(1500, device="cuda", dtype=torch.float64) / 40).requires_grad_()
    b = torch.randn(1, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: branch_attention(x, w, b, return_weights=True),
                                    (x, w, b))


@pytest.mark.parametrize("G,M,H", [(3, 640, 20), (8, 8192, 256), (4, 8192, 512), (5, 100, 1000)])
def test_branch_attention_fp32_accuracy(G, M, H):
    torch.manual_seed(0)
    x = torch.randn(G, M, H, device="cuda", requires_grad=True)
    w = (torch.randn(H, device="cuda") / H ** 0.5).requires_grad_()
    out = branch_attention(x, w)
    ref = branch_attention_reference(x.double(), w.double())
    assert rel_err(out, ref) < 1e-5
