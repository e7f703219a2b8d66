"""GPU-only checks: half precision, fp32 accuracy targets, CUDA graphs, the composite fallback."""
import pytest
import torch
from torch import nn

from mtl_kernels import GroupedLSTM, branch_attention
from mtl_kernels.reference import LSTMLoop, branch_attention_reference

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
    ref, grouped, x, lengths = _case(dtype, shared)
    xh = x.to(dtype).requires_grad_()
    out, (h, c) = grouped(xh, lengths=lengths)
    assert out.dtype == dtype and c.dtype == dtype
    x64 = x.double().requires_grad_()
    r_out, (r_h, r_c) = ref(x64, lengths=lengths)
    for a, b in ((out, r_out), (h, r_h), (c, r_c)):
        assert rel_err(a, b) < 1e-2
    cot = torch.randn_like(r_out)
    gx, g_w = torch.autograd.grad((out.double() * cot).sum(), [xh, grouped.weight_hh_l0])
    (rgx,) = torch.autograd.grad((r_out * cot).sum(), x64)
    assert rel_err(gx, rgx) < 2e-2
    assert torch.isfinite(g_w).all()


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
