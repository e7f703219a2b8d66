"""grouped_recurrence, the op the modules run: without a gradient to compute (no_grad,
inference_mode, frozen weights) it keeps nothing for backward, runs the input projection in chunks
of steps and alternates the states between two slots; with one, it saves what backward needs and
keeps it to itself, its backward reusing the saved gates' buffer. Either way it gives
grouped_recurrence_forward's results and gradients."""
import pytest
import torch

import mtl_kernels
from helpers import CELLS, backward_args, recurrence_args, recurrence_grads
from mtl_kernels import GroupedGRU, GroupedLSTM, GroupedRNN
from mtl_kernels import _ops


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T", [1, 2, 7])
@pytest.mark.parametrize("shared,lengths,reverse", [(True, True, False), (False, True, True),
                                                    (True, False, True), (False, False, False)])
@pytest.mark.parametrize("chunked", [False, True])
def test_inference_op_equals_the_training_forward(device, cell, T, shared, lengths, reverse,
                                                   chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    args = recurrence_args(cell, 3, T, 5, 4, 6, shared=shared, lengths=lengths, device=device)
    full = _ops.ops.grouped_recurrence_forward(cell, *args, reverse)
    with torch.no_grad():
        out, h_n, c_n = _ops.ops.grouped_recurrence(cell, *args, reverse)
    for a, r in zip((out, h_n, c_n), full[:3]):
        assert not a.isnan().any()
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck(device, small_chunks, cell):
    args = recurrence_args(cell, 2, 5, 3, 4, 3, lengths=True, device=device)
    torch.library.opcheck(_ops.ops.grouped_recurrence, (cell, *args, True))
    grad_args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in recurrence_args(cell, 2, 5, 3, 4, 3, lengths=True, device=device)]
    torch.library.opcheck(_ops.ops.grouped_recurrence, (cell, *grad_args, False))
    fwd = _ops.ops.grouped_recurrence_forward(cell, *args, False)
    grads = recurrence_grads(cell, 2, 5, 3, 3, device=device)
    torch.library.opcheck(_ops.ops._grouped_recurrence_backward_in_place,
                          (cell, *backward_args(cell, grads, args, fwd, False)))


@pytest.mark.parametrize("cell", CELLS)
def test_training_gradients_and_retain_graph(device, cell):
    """grouped_recurrence's backward (in place over its saved gates) gives
    grouped_recurrence_forward's gradients, and a second backward through the same graph
    (retain_graph) gives them again."""
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in recurrence_args(cell, 3, 6, 4, 5, 7, lengths=True, device=device)]
    diff = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    mine = _ops.ops.grouped_recurrence(cell, *leaves, True)
    ref = _ops.ops.grouped_recurrence_forward(cell, *leaves, True)[:3]
    n = 3 if cell == "lstm" else 2
    cot = [torch.randn_like(t) for t in ref[:n]]
    want = torch.autograd.grad(ref[:n], diff, cot)
    first = torch.autograd.grad(mine[:n], diff, cot, retain_graph=True)
    second = torch.autograd.grad(mine[:n], diff, cot)
    for w, a, b in zip(want, first, second):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b, w, rtol=1e-12, atol=1e-12)


def _saved_bytes(fn):
    """The bytes autograd saves for backward while fn runs (saved-tensor hooks see the C++
    autograd's saved tensors too)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(saved), result


@pytest.mark.parametrize("cls", [GroupedLSTM, GroupedGRU, GroupedRNN])
def test_modules_save_nothing_when_nothing_needs_grad(cls):
    torch.manual_seed(0)
    m = cls(3, 4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 4)
    saved, want = _saved_bytes(lambda: m(x)[0])  # parameters require grad: the training forward
    gates_bytes = 6 * 2 * 3 * (4 if cls is GroupedLSTM else 3 if cls is GroupedGRU else 1) * 5 * 4
    assert saved >= 4 * gates_bytes  # each layer and direction keeps its gates (and more)
    for ctx in (torch.no_grad(), torch.inference_mode()):
        with ctx:
            saved, got = _saved_bytes(lambda: m(x)[0])
        assert saved == 0
        torch.testing.assert_close(got, want.detach())
    m.requires_grad_(False)  # frozen weights, an input that needs no grad
    saved, got = _saved_bytes(lambda: m(x)[0])
    assert saved == 0 and not got.requires_grad
    torch.testing.assert_close(got, want.detach())
    x.requires_grad_()  # ... but an input that does: the training forward
    saved, got = _saved_bytes(lambda: m(x)[0])
    assert saved > 0
    got.sum().backward()
    assert x.grad is not None


def test_inference_with_projection_and_packed(device):
    torch.manual_seed(0)
    m = GroupedLSTM(2, 3, 6, proj_size=2, num_layers=2, bidirectional=True).double().to(device)
    x = torch.randn(5, 4, 3, dtype=torch.float64, device=device)
    lengths = torch.tensor([5, 2, 4, 1])
    want = m(x, lengths=lengths)
    with torch.no_grad():
        got = m(x, lengths=lengths)
    torch.testing.assert_close(got[0], want[0].detach())
    torch.testing.assert_close(got[1][1], want[1][1].detach())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inference_on_both_paths_counts(small_chunks, dtype):
    m = GroupedLSTM(2, 3, 4).to(dtype)
    x = torch.randn(7, 2, 3, dtype=dtype)
    for path in ("sequence", "per_step"):
        before = mtl_kernels.path_counts()
        with mtl_kernels.recurrence_path(path), torch.no_grad():
            m(x)
        after = mtl_kernels.path_counts()
        # seven steps in chunks of two: four chunks, each one recurrence on the chosen path; except
        # where the sequence kernel projects the input itself (fp32 with the CPU's tiles): one run
        # of all seven steps, no chunks
        fused = (path == "sequence" and dtype == torch.float32
                 and mtl_kernels._C._cpu_tiles_supported() and mtl_kernels._C.get_cpu_tiles() == "auto")
        assert after[f"forward_{path}"] - before[f"forward_{path}"] == (1 if fused else 4)
