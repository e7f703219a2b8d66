"""The backward's input_grad flag: a layer whose input needs no gradient (a model's data, or an
autograd.grad that asks for the weights only) skips the input gradient's product. The op returns a
(0,) placeholder for it then, and every other gradient is the one computed with it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import CELLS, backward_args, recurrence_args, recurrence_grads
from mtl_kernels import GroupedGRU, GroupedLSTM, GroupedRNN
from mtl_kernels import _ops

ops = _ops.ops


class BackwardCalls(TorchDispatchMode):
    """Records the input_grad argument of every recurrence backward op that runs under it."""

    NAMES = ("grouped_recurrence_backward", "_grouped_recurrence_backward_in_place")

    def __init__(self):
        super().__init__()
        self.input_grad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mtl_kernels" and func._opname in self.NAMES:
            flag = kwargs.get("input_grad", args[13] if len(args) > 13 else True)
            self.input_grad.append(flag)
        return func(*args, **kwargs)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("in_place", [False, True])
def test_op_without_input_grad_gives_the_same_other_gradients(device, cell, shared, in_place):
    args = recurrence_args(cell, 3, 5, 4, 6, 7, shared=shared, lengths=True, device=device)
    fwd = ops.grouped_recurrence_forward(cell, *args, True)
    grads = recurrence_grads(cell, 3, 5, 4, 7, device=device)
    want = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, fwd, True))
    op = ops._grouped_recurrence_backward_in_place if in_place else ops.grouped_recurrence_backward
    gates = fwd[3].clone()  # the in-place op writes over it
    b_args = list(backward_args(cell, grads, args, fwd, True))
    b_args[7] = gates
    got = op(cell, *b_args, input_grad=False)
    assert got[0].shape == (0,)
    assert want[0].shape == args[0].shape
    for i, (a, w) in enumerate(zip(got[1:], want[1:]), start=1):
        assert not a.isnan().any(), f"result {i} has unwritten elements"
        torch.testing.assert_close(a, w, rtol=0, atol=0, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("cell", CELLS)
def test_opcheck_without_input_grad(device, cell):
    args = recurrence_args(cell, 2, 4, 3, 5, 3, shared=False, lengths=True, device=device)
    fwd = ops.grouped_recurrence_forward(cell, *args, False)
    grads = recurrence_grads(cell, 2, 4, 3, 3, device=device)
    b_args = backward_args(cell, grads, args, fwd, False)
    torch.library.opcheck(ops.grouped_recurrence_backward, (cell, *b_args, False))
    torch.library.opcheck(ops._grouped_recurrence_backward_in_place, (cell, *b_args),
                          {"input_grad": False})


MODULES = {"lstm": (GroupedLSTM, {}), "gru": (GroupedGRU, {}),
           "rnn_tanh": (GroupedRNN, {"nonlinearity": "tanh"}),
           "rnn_relu": (GroupedRNN, {"nonlinearity": "relu"})}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_module_skips_only_the_first_layers_input_gradient(device, cell, bidirectional):
    """Data input: the first layer's backward (both directions) runs without input_grad, the
    second layer's (its input is the first's output) with it; the weight gradients are those of a
    run whose input requires grad."""
    cls, kw = MODULES[cell]
    torch.manual_seed(0)
    m = cls(3, 5, 6, num_layers=2, bidirectional=bidirectional, **kw).to(device, torch.float64)
    x = torch.randn(3, 7, 4, 5, device=device, dtype=torch.float64)  # (G, T, B, C)
    cot = torch.randn(3, 7, 4, 6 * (2 if bidirectional else 1), device=device, dtype=torch.float64)

    def weight_grads(x):
        m.zero_grad()
        with BackwardCalls() as calls:
            m(x)[0].backward(cot)
        return [p.grad.clone() for p in m.parameters()], calls.input_grad

    x_grad = x.clone().requires_grad_()
    want, flags_with = weight_grads(x_grad)
    got, flags_without = weight_grads(x)
    for g, (mod, xg, cg) in enumerate(zip(m.to_modules(), x.unbind(0), cot.unbind(0))):
        # the input gradient where it is asked for: the torch module's
        xg = xg.clone().requires_grad_()
        (dx,) = torch.autograd.grad(mod(xg)[0], xg, cg)
        torch.testing.assert_close(x_grad.grad[g], dx)
    dirs = 2 if bidirectional else 1
    assert flags_with == [True] * (2 * dirs)
    assert sorted(flags_without) == [False] * dirs + [True] * dirs
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_autograd_grad_over_the_weights_skips_the_input_gradient(device, cell):
    """An input that requires grad, but a backward that asks for the weights only."""
    cls, kw = MODULES[cell]
    torch.manual_seed(1)
    m = cls(2, 4, 5, **kw).to(device, torch.float64)
    x = torch.randn(6, 3, 4, device=device, dtype=torch.float64, requires_grad=True)  # shared
    out = m(x)[0]
    cot = torch.randn_like(out)
    params = list(m.parameters())
    want = torch.autograd.grad(out, params + [x], cot, retain_graph=True)[:-1]
    with BackwardCalls() as calls:
        got = torch.autograd.grad(out, params, cot)
    assert calls.input_grad == [False]
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_func_grad_over_the_weights_matches_nn_modules(cell):
    """torch.func.grad (the Python autograd.Function of _functorch.py) over the weights only, the
    input plain data: the gradients of the same loss through the torch modules."""
    cls, kw = MODULES[cell]
    torch.manual_seed(2)
    m = cls(2, 3, 4, **kw).double()
    loops = m.to_modules()  # the same weights, group by group
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)  # (G, T, B, C)
    params = dict(m.named_parameters())

    def loss(p):
        out = torch.func.functional_call(m, p, (x,))[0]
        return (out * out.cos()).sum()

    with BackwardCalls() as calls:
        got = torch.func.grad(loss)(params)
    assert calls.input_grad == [False]
    for g, (mod, xg) in enumerate(zip(loops, x.unbind(0))):
        out = mod(xg)[0]
        names, ps = zip(*mod.named_parameters())
        ref = torch.autograd.grad((out * out.cos()).sum(), ps)
        for name, r in zip(names, ref):
            torch.testing.assert_close(got[name][g], r, rtol=1e-10, atol=1e-10)
