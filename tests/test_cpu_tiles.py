"""The CPU's register-tiled fp32 products (csrc/recurrence/cpu_tiles.h): the whole-sequence path's
recurrent products and input projection, and the backward's gradient products, in each variant the
CPU runs (AVX-512, AVX2), against the same op in float64 and with the tiles switched off (the
generic loops and MKL), on shapes that leave every block partial: rows not a multiple of the 6- or
12-row block, columns not a multiple of the 16-column panel, depths past the 256-deep pass."""
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
    with pytest.raises(ValueError, match="'auto', 'off' or 'avx2'"):
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
    """An inference forward on the sequence path, against the float64 training forward on the
    per-step path (no chunks, no prepared W_hh), three groups with their own weights. Tiles off:
    chunks of two steps (small_chunks), W_hh prepared (the generic loops' transposed copy) at the
    first chunk and reused by the others. Tiles on: the kernel projects the input itself, one
    sequence run for all seven steps whatever the chunk size."""
    args = recurrence_args(cell, 3, 7, 13, 5, 17, dtype=torch.float32, shared=False, lengths=True)
    with mtl_kernels.recurrence_path("per_step"):
        exact = ops.grouped_recurrence_forward(cell, *_to(args, torch.float64), reverse)[:3]
    before = mtl_kernels.path_counts()["forward_sequence"]
    with mtl_kernels.cpu_tiles(tiles), mtl_kernels.recurrence_path("sequence"), torch.no_grad():
        got = ops.grouped_recurrence(cell, *args, reverse)
    runs = mtl_kernels.path_counts()["forward_sequence"] - before
    assert runs == (1 if tiles == "auto" else 4)  # seven steps in chunks of two: four chunks
    for a, e in zip(got, exact):
        if e.numel():
            assert not a.isnan().any()
            assert rel_err(a, e) < 1e-5


# (G, T, B, C, H): one of everything; odd sizes past the tiles' blocks (B = 13: 6 + 6 + 1 rows;
# 4H = 68: 4 panels and 4 columns; 39 rows of three groups split over two threads inside group 1
# for the LSTM); C = 300: a 300-deep projection, two 256-deep passes; one group's 100 rows split
# over two threads for every cell (H = 129: a row grain of 1-3, sequence_row_grain)
PROJECTION_SHAPES = [(1, 1, 1, 1, 1), (3, 7, 13, 5, 17), (2, 9, 7, 300, 6), (1, 4, 100, 10, 129)]


def _gemm_calls(fn):
    """fn()'s result and how many ATen GEMM calls it made (the driver's input projection is one
    bmm or mm; the tiles' products are no ATen calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(e.count for e in prof.key_averages() if e.key in ("aten::bmm", "aten::mm"))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", PROJECTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("lengths,reverse", [(True, False), (False, True), (True, True)])
def test_inference_projecting_in_the_kernel(small_chunks, cell, shape, shared, lengths, reverse):
    """The inference forward whose sequence kernel projects x_t W_ih^T itself, step by step (fp32
    with the tiles: one sequence run and no GEMM call, where two-step chunks would take one run
    and one GEMM each), against the float64 training forward and against the same call with the
    projection by MKL in chunks (tiles off), for a shared input and one per group, with lengths and
    either direction. The output buffer is NaN-poisoned first: any element left unwritten shows."""
    G, T, B, C, H = shape
    args = recurrence_args(cell, G, T, B, C, H, dtype=torch.float32, shared=shared, lengths=lengths)
    exact = ops.grouped_recurrence_forward(cell, *_to(args, torch.float64), reverse)[:3]
    with mtl_kernels.recurrence_path("sequence"), torch.no_grad():
        before = mtl_kernels.path_counts()["forward_sequence"]
        with mtl_kernels.cpu_tiles("auto"):
            got, gemms = _gemm_calls(lambda: ops.grouped_recurrence(cell, *args, reverse))
        assert (mtl_kernels.path_counts()["forward_sequence"] - before, gemms) == (1, 0)
        before = mtl_kernels.path_counts()["forward_sequence"]
        with mtl_kernels.cpu_tiles("off"):
            chunked, gemms = _gemm_calls(lambda: ops.grouped_recurrence(cell, *args, reverse))
        chunks = (T + 1) // 2
        assert (mtl_kernels.path_counts()["forward_sequence"] - before, gemms) == (chunks, chunks)
    for a, c, e in zip(got, chunked, exact):
        if e.numel():
            assert not a.isnan().any(), "an element no kernel wrote (NaN-poisoned)"
            assert rel_err(a, e) < 1e-5
            assert rel_err(a, c) < 1e-5


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", PROJECTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shared,lengths,reverse", [(True, True, False), (False, True, True)])
def test_training_forward_projecting_in_the_kernel(cell, shape, shared, lengths, reverse):
    """The training forward on the sequence path in fp32 with the tiles projects the input inside
    the kernel too (no GEMM call; one with the tiles off): every result (output, states and the
    saved values backward reads) against the same call with the projection by MKL (tiles off),
    the gates buffer NaN-poisoned first, and the gradients from those saved values against
    float64."""
    G, T, B, C, H = shape
    args = recurrence_args(cell, G, T, B, C, H, dtype=torch.float32, shared=shared, lengths=lengths)
    grads = recurrence_grads(cell, G, T, B, H, dtype=torch.float32)
    with mtl_kernels.recurrence_path("sequence"):
        before = mtl_kernels.path_counts()["forward_sequence"]
        with mtl_kernels.cpu_tiles("auto"):
            fused, gemms = _gemm_calls(lambda: ops.grouped_recurrence_forward(cell, *args, reverse))
        assert (mtl_kernels.path_counts()["forward_sequence"] - before, gemms) == (1, 0)
        with mtl_kernels.cpu_tiles("off"):
            gemm, gemms = _gemm_calls(lambda: ops.grouped_recurrence_forward(cell, *args, reverse))
        assert gemms == 1
        d_fused = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, fused, reverse))
        args64, grads64 = _to(args, torch.float64), _to(grads, torch.float64)
        fwd64 = ops.grouped_recurrence_forward(cell, *args64, reverse)
        d_exact = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads64, args64, fwd64,
                                                                       reverse))
    for a, g in zip(fused, gemm):
        if g.numel():
            assert not a.isnan().any(), "an element no kernel wrote (NaN-poisoned)"
            assert rel_err(a, g) < 1e-5
    for a, e in zip(d_fused, d_exact):
        if e.numel():
            assert rel_err(a, e) < 1e-5


# The tiles' variants this CPU runs: `auto` is AVX-512 where the CPU has AVX-512F, and `avx2` then
# runs the AVX2 variant on the same machine; without AVX-512 both run the AVX2 variant.
AVX512 = _C._cpu_tiles_avx512_supported()
VARIANTS = [pytest.param("auto", id="auto-avx512" if AVX512 else "auto-avx2"),
            pytest.param("avx2", id="avx2", marks=pytest.mark.skipif(
                not AVX512, reason="this CPU has no AVX-512F: `auto` is already the AVX2 variant"))]

# (G, T, B, C, H): one of everything; odd sizes (B = 13 rows: 12 + 1 in the AVX-512 blocks, 6 + 6
# + 1 in AVX2's; 4H = 68: 4 panels and 4 columns, 2 AVX-512 panel pairs the second partial); the
# seed-tasks shape;
# a 300-deep input (grad_input's K = 4H = 132 and T*B = 315 deep weight sums: two 256-deep
# passes); 301 rows (chunks of 96 rows and a 13-row one); 4H = 280 rows in chunks of 96, 96 and
# 88 over T*B = 333 (two passes, the second 77 deep); 4H = 400 with C = 130: dW_ih's dg^T
# gathered per pass (rows_times_packed), in chunks of 96 and a 16-row one
GRADIENT_SHAPES = [(1, 1, 1, 1, 1), (3, 7, 13, 5, 17), (2, 10, 32, 100, 50), (2, 45, 7, 300, 33),
                   (1, 4, 301, 3, 9), (1, 9, 37, 20, 70), (1, 5, 23, 130, 100)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape", GRADIENT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("shared,lengths,input_grad", [(True, "rows", True), (False, "rows", False),
                                                       (False, "groups", True), (True, None, False)])
def test_backward_gradient_products_in_the_tiles(variant, cell, shape, shared, lengths, input_grad):
    """The backward's weight and input gradients (dg^T x, dr^T h_{t-1}, dg W_ih) in the tiles: no
    ATen GEMM call in the backward (the MKL path: one bmm / mm each), the same results as MKL's
    (tiles off) and as float64, for a shared input (grad_input sums the groups) and one per group,
    with lengths (B,), per-(group, row) lengths (G, B) (each group's products stop at its longest
    row), none, and with and without the input's gradient. The outputs are NaN-poisoned first."""
    from test_ragged import _per_group_lengths
    G, T, B, C, H = shape
    args = list(recurrence_args(cell, G, T, B, C, H, dtype=torch.float32, shared=shared,
                                lengths=lengths == "rows"))
    if lengths == "groups":
        args[-1] = _per_group_lengths(G, B, T, seed=2)
    grads = recurrence_grads(cell, G, T, B, H, dtype=torch.float32)

    def backward(a, g):
        fwd = ops.grouped_recurrence_forward(cell, *a, False)
        return _gemm_calls(lambda: ops.grouped_recurrence_backward(
            cell, *backward_args(cell, g, a, fwd, False), input_grad))

    with mtl_kernels.recurrence_path("sequence"):
        with mtl_kernels.cpu_tiles(variant):
            tiled, gemms = backward(args, grads)
        with mtl_kernels.cpu_tiles("off"):
            untiled, gemms_off = backward(args, grads)
        exact, _ = backward(_to(args, torch.float64), _to(grads, torch.float64))
    assert gemms == 0
    # the MKL path's products: dW_ih, dW_hh and dx, one GEMM each (one per group when ragged)
    assert gemms_off == (2 + input_grad) * (G if lengths == "groups" and not shared else 1)
    assert (tiled[0].numel() > 0) == input_grad
    # 3e-5: the fp32 recurrence's rounding through T steps reaches every result alike (at
    # 1x9x37x20x70 the RNN's grad_h0, which no gradient product touches, is 1.2e-5 off float64)
    for i, (a, u, e) in enumerate(zip(tiled, untiled, exact)):
        if e.numel():
            assert not a.isnan().any(), f"result {i}: an element no kernel wrote (NaN-poisoned)"
            assert rel_err(a, e) < 3e-5, i
            assert rel_err(a, u) < 3e-5, i


def test_gradient_products_of_narrow_operands_stay_on_mkl():
    """C = H = 1 over T*B = 38,400 rows: the panels (16 floats a row) would copy the operands 8x
    over 4 MB, so the backward's products run on MKL's GEMMs (three calls), with results within
    fp32 rounding of float64."""
    G, T, B, C, H = 1, 64, 600, 1, 1
    args = recurrence_args("lstm", G, T, B, C, H, dtype=torch.float32, shared=False)
    grads = recurrence_grads("lstm", G, T, B, H, dtype=torch.float32)
    with mtl_kernels.recurrence_path("sequence"), mtl_kernels.cpu_tiles("auto"):
        fwd = ops.grouped_recurrence_forward("lstm", *args, False)
        got, gemms = _gemm_calls(lambda: ops.grouped_recurrence_backward(
            "lstm", *backward_args("lstm", grads, args, fwd, False), True))
    assert gemms == 3
    args64, grads64 = _to(args, torch.float64), _to(grads, torch.float64)
    fwd64 = ops.grouped_recurrence_forward("lstm", *args64, False)
    exact = ops.grouped_recurrence_backward("lstm", *backward_args("lstm", grads64, args64, fwd64,
                                                                   False), True)
    for a, e in zip(got, exact):
        if e.numel():
            assert rel_err(a, e) < 3e-5


@pytest.mark.parametrize("variant", VARIANTS)
def test_module_gradients_in_the_tiles_match_nn_lstm(variant):
    """GroupedLSTM fp32, two bidirectional layers (the second layer's input needs its gradient),
    per-group inputs with lengths, against a loop of nn.LSTM: the tiles' gradient products inside a
    whole model, on both paths, for the variant the switch names."""
    with mtl_kernels.cpu_tiles(variant):
        for path in ("sequence", "per_step"):
            with mtl_kernels.recurrence_path(path):
                lstms, grouped, x, hx, lengths = make_case(2, 13, 19, 7, 21, L=2, bi=True,
                                                           shared=False, with_lengths=True,
                                                           with_hx=True, dtype=torch.float32)
                check_parity(lstms, grouped, x, hx, lengths, torch.float32)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("shape,shared", [((3, 9, 29, 37, 41), False), ((1, 5, 23, 130, 100), True),
                                          ((2, 5, 23, 130, 100), False)],
                         ids=["3x9x29x37x41", "gathered-shared", "gathered-per-group"])
def test_avx512_and_avx2_variants_agree(cell, shape, shared):
    """Where the CPU has AVX-512, the two variants' results on one call (forward, inference,
    backward): the same bits, since both add each output element's products in the same k order
    (in blocks of other shapes), and within fp32 rounding of float64; also where the weight
    gradients gather dg^T per pass (4H >= 384, C >= 128), for a shared input and per group."""
    if not AVX512:
        pytest.skip("this CPU has no AVX-512F: only the AVX2 variant runs here")
    G, T, B, C, H = shape
    args = recurrence_args(cell, G, T, B, C, H, dtype=torch.float32, shared=shared, lengths=True)
    grads = recurrence_grads(cell, G, T, B, H, dtype=torch.float32)
    with mtl_kernels.recurrence_path("sequence"):
        with mtl_kernels.cpu_tiles("auto"):
            wide = _run(cell, args, grads, False)
        with mtl_kernels.cpu_tiles("avx2"):
            narrow = _run(cell, args, grads, False)
        exact = _run(cell, _to(args, torch.float64), _to(grads, torch.float64), False)
    for a, b, e in zip(wide, narrow, exact):
        assert torch.equal(a, b)
        assert rel_err(a, e) < 3e-5


@pytest.mark.parametrize("shared", [True, False])
def test_gradient_products_same_bits_on_any_thread_count(shared):
    """The tiles' gradient products split output rows over the threads, never a sum: grad_input,
    grad_weight_ih and grad_weight_hh are the same bits on 1, 2 and 7 threads (7: more threads
    than some pools have items), with per-(group, row) lengths for the per-group input."""
    from test_ragged import _per_group_lengths
    G, T, B, C, H = 3, 6, 11, 130, 100
    args = list(recurrence_args("lstm", G, T, B, C, H, dtype=torch.float32, shared=shared,
                                lengths=shared))
    if not shared:
        args[-1] = _per_group_lengths(G, B, T, seed=3)
    grads = recurrence_grads("lstm", G, T, B, H, dtype=torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 7):
            torch.set_num_threads(threads)
            with mtl_kernels.recurrence_path("sequence"):
                fwd = ops.grouped_recurrence_forward("lstm", *args, False)
                results.append(ops.grouped_recurrence_backward(
                    "lstm", *backward_args("lstm", grads, args, fwd, False), True)[:3])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


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
