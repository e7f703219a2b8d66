"""The CPU's register-tiled fp32 products (csrc/recurrence/cpu_tiles.h), the whole-sequence path's
recurrent products, against the same op in float64 and with the tiles switched off (the generic
loops), on shapes that leave every block partial: rows not a multiple of the 6-row block, columns
not a multiple of the 16-column panel, depths past the 256-deep pass."""
import pytest
import torch

import mtl_kernels
from helpers import (CELLS, backward_args, recurrence_args, recurrence_grads,
                     rel_err)
from mtl_kernels import _C
from mtl_kernels._ops import ops
from test_grouped_lstm import check_parity, make_case

pytestmark = pytest.mark.skipif(not _C._cpu_tiles_supported(), reason="needs a CPU with AVX2 and FMA")


@pytest.fixture
def tiles_off():
    """Runs the test's body with the tiles switched off (the generic loops)."""
    with mtl_kernels.cpu_tiles("off"):
        yield


def _run(cell, args, grads, reverse):
    """Forward, inference forward and backward results of one recurrence, as a flat list."""
    fwd = ops.grouped_recurrence_forward(cell, *args, reverse)
    with torch.no_grad():
        inference = ops.grouped_recurrence(cell, *args, reverse)
    bwd = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, fwd, reverse))
    return [t for t in (*fwd[:3], *inference, *bwd) if t is not None and t.numel()]


def _to(tensors, dtype):
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                 for t in tensors)


# (G, T, B, C, H): one of everything; 4H = 68 (4 panels and 4 columns), B = 13 (2 blocks and 1
# row); a long sequence of a wide input; B = 100 rows of one group split over two threads, H = 129
# (a 516-deep backward product: 3 passes); B = 301 rows (chunks of 96 and a 13-row one)
SHAPES = [(1, 1, 1, 1, 1), (3, 7, 13, 5, 17), (2, 45, 7, 300, 33), (2, 3, 100, 10, 129),
          (1, 4, 301, 3, 9)]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shared,lengths,reverse", [(False, True, False), (True, False, True)])
def test_tiled_fp32_matches_float64_and_untiled(cell, shape, shared, lengths, reverse):
    G, T, B, C, H = shape
    args = recurrence_args(cell, G, T, B, C, H, dtype=torch.float32, shared=shared, lengths=lengths)
    grads = recurrence_grads(cell, G, T, B, H, dtype=torch.float32)
    with mtl_kernels.recurrence_path("sequence"):
        tiled = _run(cell, args, grads, reverse)
        with mtl_kernels.cpu_tiles("off"):
            untiled = _run(cell, args, grads, reverse)
        exact = _run(cell, _to(args, torch.float64), _to(grads, torch.float64), reverse)
    # norm-relative: a ReLU RNN's states grow to ~1e3, and weight gradients sum T*B products
    errors = {name: [rel_err(a, e) for a, e in zip(got, exact)]
              for name, got in (("tiled", tiled), ("untiled", untiled))}
    assert all(not t.isnan().any() for t in tiled), "an element no kernel wrote (NaN-poisoned)"
    assert max(errors["tiled"]) < 1e-5, errors
    assert max(errors["untiled"]) < 1e-5, errors
    if shape[-1] > 100:  # long sums: the tiles add in another order than the loops: some bits differ
        assert any(not torch.equal(a, b) for a, b in zip(tiled, untiled))


def test_switch_returns_the_previous_value(tiles_off):
    assert _C.get_cpu_tiles() == "off"
    assert _C.set_cpu_tiles("off") == "off"
    assert _C.set_cpu_tiles("auto") == "off"
    assert _C.get_cpu_tiles() == "auto"
    assert _C.set_cpu_tiles("off") == "auto"
    with pytest.raises(ValueError, match="'auto' or 'off'"):
        _C.set_cpu_tiles("on")
    assert _C.get_cpu_tiles() == "off"


@pytest.mark.parametrize("shared", [True, False])
def test_module_parity_with_nn_lstm_fp32(shared):
    """GroupedLSTM in fp32, two bidirectional layers with lengths and initial states, at sizes past
    the tiles' blocks (B = 11 rows: a 6-row block and 5; 4H = 180 columns: 11 panels and 4), against
    a loop of nn.LSTM: outputs, states and every gradient, on both paths."""
    for path in ("sequence", "per_step"):
        with mtl_kernels.recurrence_path(path):
            lstms, grouped, x, hx, lengths = make_case(3, 37, 11, 23, 45, L=2, bi=True, shared=shared,
                                                       with_lengths=True, with_hx=True,
                                                       dtype=torch.float32)
            check_parity(lstms, grouped, x, hx, lengths, torch.float32)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tiles", ["auto", "off"])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunked_inference_reuses_the_prepared_weight(small_chunks, cell, tiles, reverse):
    """An inference forward in chunks of two steps prepares W_hh (packed panels, or the generic
    loops' transposed copy) at its first chunk and reuses it for the others: every chunk's
    results against the float64 training forward on the per-step path (no chunks, no prepared
    W_hh), three groups with their own weights."""
    args = recurrence_args(cell, 3, 7, 13, 5, 17, dtype=torch.float32, shared=False, lengths=True)
    with mtl_kernels.recurrence_path("per_step"):
        exact = ops.grouped_recurrence_forward(cell, *_to(args, torch.float64), reverse)[:3]
    # seven steps in chunks of two (small_chunks): four chunks
    with mtl_kernels.cpu_tiles(tiles), mtl_kernels.recurrence_path("sequence"), torch.no_grad():
        got = ops.grouped_recurrence(cell, *args, reverse)
    for a, e in zip(got, exact):
        if e.numel():
            assert not a.isnan().any()
            assert rel_err(a, e) < 1e-5


def test_context_manager_restores_the_switch():
    before = _C.get_cpu_tiles()
    with mtl_kernels.cpu_tiles("off"):
        assert _C.get_cpu_tiles() == "off"
        with mtl_kernels.cpu_tiles("auto"):
            assert _C.get_cpu_tiles() == "auto"
        assert _C.get_cpu_tiles() == "off"
    assert _C.get_cpu_tiles() == before
    with pytest.raises(ValueError, match="cpu_tiles must be one of"):
        with mtl_kernels.cpu_tiles("on"):
            pass
    assert _C.get_cpu_tiles() == before
