"""The persistent grouped-LSTM kernel on a GPU (skipped without one; the emulator and planner tests
that run on the CPU are in test_persistent.py).

The real kernel against the per-step path in fp64, both directions; half and single precision
against fp64 on the same rounded inputs; bit-for-bit determinism with one slice per group and with
several (the inter-block barrier); a long sequence (T = 1000) across the barrier; randomized sizes
around the fit limits; the fallback when the plan cannot fit. benchmarks/device_check.sh runs this
file first and alone.
"""
import random

import pytest
import torch

import mtl_kernels
from mtl_kernels import _C
from mtl_kernels._ops import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

DEVICE = "cuda"


def _sequence_path():
    """The whole-sequence path's name for mtl_kernels.recurrence_path ("persistent" before it was
    renamed "sequence")."""
    for name in ("sequence", "persistent"):
        try:
            with mtl_kernels.recurrence_path(name):
                return name
        except ValueError:
            pass
    raise RuntimeError("recurrence_path takes neither 'sequence' nor 'persistent'")


SEQ = _sequence_path()  # the persistent kernel on a GPU
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _op_args(G, T, B, C, H, dtype, shared=True, bias=True, lengths=True, seed=0, w_scale=0.5):
    """Inputs drawn in fp64 on the CPU, rounded to `dtype`, then moved to DEVICE."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)  # noqa: E731
    x = r(T, B, C) if shared else r(G, T, B, C)
    w_ih, w_hh = r(G, 4 * H, C) * w_scale, r(G, 4 * H, H) * w_scale
    b = r(G, 4 * H) if bias else None
    h0, c0 = r(G, B, H), r(G, B, H)
    L = torch.randint(1, T + 1, (B,), generator=g).to(DEVICE) if lengths else None
    return x, w_ih, w_hh, b, h0, c0, L


def _grads(G, T, B, H, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)  # noqa: E731
    return r(G, T, B, H), r(G, B, H), r(G, B, H)


def _upcast(tensors):
    return [t.double() if t is not None and t.is_floating_point() else t for t in tensors]


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _assert_all_close(got, want, **tol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert not a.isnan().any(), f"result {i} has unwritten (NaN-poisoned) elements"
        torch.testing.assert_close(a, b, msg=lambda m: f"result {i}: {m}", **tol)


def _assert_all_equal(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{what} result {i} differs between runs"


def _assert_as_accurate(got, ref, truth, limit, what):
    """Each result of `got` is within 1.5x the norm-relative error of `ref` (the per-step path in the
    same dtype) against `truth` (fp64 on the same rounded inputs), or within `limit`."""
    for i, (a, r, t) in enumerate(zip(got, ref, truth)):
        assert not a.isnan().any(), f"{what} result {i} has NaNs"
        err, ref_err = _rel_err(a, t), _rel_err(r, t)
        assert err <= max(1.5 * ref_err, limit), \
            f"{what} result {i}: rel. error {err:.3g}, per-step path {ref_err:.3g}"


def _device_limits():
    p = torch.cuda.get_device_properties(0)
    return (p.multi_processor_count, p.shared_memory_per_block_optin,
            p.shared_memory_per_multiprocessor, p.max_threads_per_multi_processor,
            p.max_threads_per_block)


def _plan(G, B, H, dtype, backward):
    elem = torch.empty((), dtype=dtype).element_size()
    return _C.persistent_plan(G, B, H, elem, backward, *_device_limits())


def _forward_op(args, reverse):
    """The grouped-LSTM forward op: (output, h_n, c_n, gates, h_states, c_states). Either the
    LSTM op or the cell-generic one that replaces it (cell "lstm", no separate bias_hh)."""
    x, w_ih, w_hh, b, h0, c0, L = args
    if hasattr(ops, "grouped_lstm_forward"):
        return ops.grouped_lstm_forward(x, w_ih, w_hh, b, h0, c0, L, reverse)
    return ops.grouped_recurrence_forward("lstm", x, w_ih, w_hh, b, None, h0, c0, L, reverse)


def _backward_op(grads, args, saved, reverse):
    """The grouped-LSTM backward op: (d input, d w_ih, d w_hh, d bias, d h0, d c0)."""
    x, w_ih, w_hh, _, _, _, L = args
    if hasattr(ops, "grouped_lstm_backward"):
        return ops.grouped_lstm_backward(*grads, x, w_ih, w_hh, *saved, L, reverse)
    r = ops.grouped_recurrence_backward("lstm", *grads, x, w_ih, w_hh, *saved, L, reverse)
    return tuple(r[:4]) + tuple(r[5:])  # without d bias_hh (GRU only)


def _run(path, args, grads, reverse=False):
    """Forward and backward ops on one recurrence path; returns (forward results, backward
    results, how many recurrences ran each way)."""
    before = mtl_kernels.path_counts()
    with mtl_kernels.recurrence_path(path):
        fwd = _forward_op(args, reverse)
        bwd = _backward_op(grads, args, fwd[3:], reverse)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    after = mtl_kernels.path_counts()
    return fwd, bwd, {k: after[k] - before[k] for k in after}


def _run_cuda(path, G, T, B, C, H, dtype, shared=True, bias=True, lengths=True, reverse=False,
              seed=0):
    args = _op_args(G, T, B, C, H, dtype, shared, bias, lengths, seed=seed)
    return _run(path, args, _grads(G, T, B, H, dtype, seed=seed + 1), reverse)


@pytest.mark.parametrize("G,T,B,C,H", [(3, 7, 5, 4, 6), (1, 1, 1, 1, 1), (32, 9, 16, 8, 64),
                                       (2, 5, 33, 3, 50), (8, 4, 64, 16, 256), (4, 3, 3, 2, 97)])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_persistent_matches_per_step(G, T, B, C, H, reverse):
    dtype = torch.float64
    p_fwd, p_bwd, ran = _run_cuda(SEQ, G, T, B, C, H, dtype, reverse=reverse)
    fits_f = _plan(G, B, H, dtype, False)["fits"]
    fits_b = _plan(G, B, H, dtype, True)["fits"]
    assert ran["forward_sequence"] == int(fits_f) and ran["backward_sequence"] == int(fits_b)
    s_fwd, s_bwd, ran_s = _run_cuda("per_step", G, T, B, C, H, dtype, reverse=reverse)
    assert ran_s["forward_sequence"] == 0 and ran_s["backward_sequence"] == 0
    _assert_all_close(p_fwd, s_fwd, **TOL[dtype])
    _assert_all_close(p_bwd, s_bwd, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_persistent_half_and_single(dtype):
    """Against fp64 computed from the same rounded inputs, by norm-relative error (as the emulated
    test in test_persistent.py): every forward and backward result of the persistent kernel is as
    accurate as the per-step path in the same dtype (within 1.5x its error), or within `limit`
    (fp32 1e-5, the README's fp32 target; bf16/fp16 1e-2). An elementwise check against fp64 from
    unrounded inputs fails on input rounding alone."""
    G, T, B, C, H = 32, 16, 16, 64, 64
    args = _op_args(G, T, B, C, H, dtype, shared=False)
    grads = _grads(G, T, B, H, dtype)
    truth_f, truth_b, _ = _run("per_step", _upcast(args), _upcast(grads))
    ref_f, ref_b, _ = _run("per_step", args, grads)
    got_f, got_b, ran = _run(SEQ, args, grads)
    assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
    assert got_f[5].dtype == torch.float32  # fp32 cell state, also for the half types
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_as_accurate(got_f, ref_f, truth_f, limit, "forward")
    _assert_as_accurate(got_b, ref_b, truth_b, limit, "backward")


@pytest.mark.parametrize("H,slices", [(96, "one"), (300, "several")])
def test_cuda_persistent_is_deterministic(H, slices):
    """Three runs bit-for-bit equal, forward and backward: with one block per (group, tile) (no
    inter-block barrier) and with several slices per group (a barrier every step)."""
    G, T, B, C = 8, 20, 24, 16
    for backward in (False, True):
        plan = _plan(G, B, H, torch.float32, backward)
        assert plan["fits"] and (plan["slices"] == 1) == (slices == "one"), plan
    runs = [_run_cuda(SEQ, G, T, B, C, H, torch.float32, seed=3) for _ in range(3)]
    for fwd, bwd, ran in runs:
        assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
    for fwd, bwd, _ in runs[1:]:
        _assert_all_equal(fwd, runs[0][0], "forward")
        _assert_all_equal(bwd, runs[0][1], "backward")


def test_cuda_persistent_random_sizes_around_the_limits():
    """Sizes on both sides of the fit limits: fitting ones run persistent, the rest fall back, and
    every one matches the per-step path."""
    rng = random.Random(2)
    sizes = [(rng.randint(1, 40), rng.randint(1, 70), rng.choice([31, 32, 33, 127, 128, 200, 300,
                                                                 400, 513]))
             for _ in range(10)]
    for i, (G, B, H) in enumerate(sizes):
        fits = _plan(G, B, H, torch.float32, False)["fits"]
        fwd, bwd, ran = _run_cuda(SEQ, G, 3, B, 5, H, torch.float32, seed=i)
        # never persistent without a plan; with one, the kernel's registers may still rule it out
        assert ran["forward_sequence"] <= int(fits)
        ref_f, ref_b, _ = _run_cuda("per_step", G, 3, B, 5, H, torch.float32, seed=i)
        _assert_all_close(fwd, ref_f, rtol=1e-4, atol=1e-4)
        _assert_all_close(bwd, ref_b, rtol=1e-3, atol=1e-3)


def test_cuda_persistent_several_slices_per_group():
    """H = 300: no block holds a whole group's W_hh, so every step crosses the inter-block barrier.
    fp32, reverse: forward elementwise against the per-step path; the backward, whose gradients
    reach ~100 here (W_hh * 0.5 at H = 300 amplifies dh), by norm-relative error against fp64 on the
    same inputs (an elementwise 1e-3 fails on cancellation in both paths' fp32 sums)."""
    G, T, B, C, H = 3, 6, 8, 5, 300
    for backward in (False, True):
        plan = _plan(G, B, H, torch.float32, backward)
        assert plan["fits"] and plan["slices"] > 1, plan
    args, grads = _op_args(G, T, B, C, H, torch.float32), _grads(G, T, B, H, torch.float32)
    fwd, bwd, ran = _run(SEQ, args, grads, reverse=True)
    assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
    ref_f, ref_b, _ = _run("per_step", args, grads, reverse=True)
    truth_f, truth_b, _ = _run("per_step", _upcast(args), _upcast(grads), reverse=True)
    _assert_all_close(fwd, ref_f, rtol=1e-4, atol=1e-4)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-5, "forward")
    _assert_as_accurate(bwd, ref_b, truth_b, 1e-5, "backward")


def test_cuda_forced_persistent_falls_back_when_it_does_not_fit():
    """G = 200, B = 64, H = 256: 1600 blocks of 128 KB cannot all be resident, so a forced
    persistent path runs per step (cheap to set up, unlike a hidden size too large for shared
    memory)."""
    G, T, B, C, H = 200, 2, 64, 3, 256
    for backward in (False, True):
        plan = _plan(G, B, H, torch.float32, backward)
        assert not plan["fits"] and "resident" in plan["reason"], plan
    fwd, bwd, ran = _run_cuda(SEQ, G, T, B, C, H, torch.float32, lengths=False)
    assert ran["forward_sequence"] == 0 and ran["forward_per_step"] == 1
    assert ran["backward_sequence"] == 0 and ran["backward_per_step"] == 1
    assert torch.isfinite(fwd[0]).all() and torch.isfinite(bwd[2]).all()


def test_cuda_persistent_long_sequence_across_the_barrier():
    """T = 1000 steps, H = 300, B = 4: several slices per group (10 of 32 units in fp32, 19 of 16 in
    fp64 on an H100; asserted through the planner with this device's limits), so both kernels wait
    at the inter-block barrier about 1000 times per launch.

    - fp32, forward direction: three runs (forward and backward) bit-for-bit equal to each other,
      and as accurate as the per-step path against fp64 on the same inputs (norm-relative, within
      1.5x its error or 1e-5; elementwise, the fp32 weight gradients summed over 1000 steps differ
      by up to half of 1e-4 between the paths already on the CPU emulator);
    - fp64 on the same inputs, both directions: equal to the per-step path within rtol = atol =
      1e-10. The two paths sum in different orders, so bitwise equality is not expected (the CPU
      emulator differs by ~1e-15); a stale h from another slice or a step run ahead would be off
      by ~1e-2.
    Weights are scaled 1/sqrt(H) (nn.LSTM's init scale) so the recurrence contracts and rounding
    differences do not grow over 1000 steps. Lengths T, T-1, T/2+17 and 5: rows end mid-sequence.
    """
    G, T, B, C, H = 2, 1000, 4, 8, 300
    for dtype in (torch.float32, torch.float64):
        for backward in (False, True):
            plan = _plan(G, B, H, dtype, backward)
            assert plan["fits"] and plan["slices"] > 1, (dtype, backward, plan)
    args = list(_op_args(G, T, B, C, H, torch.float32, shared=False, w_scale=H ** -0.5, seed=7))
    args[6] = torch.tensor([T, T - 1, T // 2 + 17, 5], device=DEVICE)
    grads = _grads(G, T, B, H, torch.float32, seed=8)
    args64, grads64 = _upcast(args), _upcast(grads)

    runs = [_run(SEQ, args, grads) for _ in range(3)]
    for fwd, bwd, ran in runs:
        assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
    for fwd, bwd, _ in runs[1:]:
        _assert_all_equal(fwd, runs[0][0], "fp32 forward")
        _assert_all_equal(bwd, runs[0][1], "fp32 backward")
    ref_f, ref_b, _ = _run("per_step", args, grads)
    truth_f, truth_b, _ = _run("per_step", args64, grads64)
    _assert_as_accurate(runs[0][0], ref_f, truth_f, 1e-5, "fp32 forward")
    _assert_as_accurate(runs[0][1], ref_b, truth_b, 1e-5, "fp32 backward")

    for reverse in (False, True):
        fwd, bwd, ran = _run(SEQ, args64, grads64, reverse)
        assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
        ref_f, ref_b, _ = (truth_f, truth_b, None) if not reverse else \
            _run("per_step", args64, grads64, reverse)
        _assert_all_close(fwd, ref_f, rtol=1e-10, atol=1e-10)
        _assert_all_close(bwd, ref_b, rtol=1e-10, atol=1e-10)


# ---- the tensor-core variant (persistent_mma.h, cuda_persistent_mma.cu) ------------------------
def _tensor_cores():
    """mtl_kernels.tensor_cores and tensor_core_counts, or None where the build predates them."""
    if not hasattr(mtl_kernels, "tensor_cores"):
        pytest.skip("this build has no tensor-core variant")
    return mtl_kernels.tensor_cores, mtl_kernels.tensor_core_counts


def _mma_plan(G, B, H, dtype, backward, gates=4):
    elem = torch.empty((), dtype=dtype).element_size()
    return _C.persistent_mma_plan(G, B, H, elem, backward, *_device_limits(), gates,
                                  8 if dtype == torch.float32 else 16)


def _cell_args(cell, G, T, B, C, H, dtype, seed=0, shared=False, w_scale=0.5):
    """grouped_recurrence_forward's arguments for any cell, drawn in fp64 on the CPU, rounded to
    dtype, moved to the GPU."""
    g = torch.Generator().manual_seed(seed)
    K = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}[cell]
    r = lambda *s, sc=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * sc).to(dtype).to(DEVICE)  # noqa: E731
    x = r(T, B, C) if shared else r(G, T, B, C)
    b_hh = r(G, K * H) if cell == "gru" else None
    c0 = r(G, B, H) if cell == "lstm" else None
    L = torch.randint(1, T + 1, (B,), generator=g).to(DEVICE)
    return (x, r(G, K * H, C, sc=w_scale), r(G, K * H, H, sc=w_scale), r(G, K * H), b_hh, None,
            r(G, B, H), c0, L)


def _cell_grads(cell, G, T, B, H, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)  # noqa: E731
    return r(G, T, B, H), r(G, B, H), (r(G, B, H) if cell == "lstm" else None)


def _cell_run(cell, args, grads, reverse=False, mode="auto"):
    """Forward and backward of the generic op on the sequence path with tensor cores `mode`;
    returns (forward, backward, tensor-core launches (forward, backward), sequence runs)."""
    tensor_cores, counts = _tensor_cores()
    before, before_p = counts(), mtl_kernels.path_counts()
    with mtl_kernels.recurrence_path(SEQ), tensor_cores(mode):
        fwd = ops.grouped_recurrence_forward(cell, *args, reverse)
        x, w_ih, w_hh, _, _, w_hr, _, _, L = args
        bwd = ops.grouped_recurrence_backward(cell, *grads, x, w_ih, w_hh, w_hr, fwd[3], fwd[4],
                                              fwd[5], L, reverse)
    torch.cuda.synchronize()
    after, after_p = counts(), mtl_kernels.path_counts()
    tc = (after["forward"] - before["forward"], after["backward"] - before["backward"])
    seq = (after_p["forward_sequence"] - before_p["forward_sequence"],
           after_p["backward_sequence"] - before_p["backward_sequence"])
    return fwd, bwd, tc, seq


def _per_step(cell, args, grads, reverse=False):
    with mtl_kernels.recurrence_path("per_step"):
        fwd = ops.grouped_recurrence_forward(cell, *args, reverse)
        x, w_ih, w_hh, _, _, w_hr, _, _, L = args
        bwd = ops.grouped_recurrence_backward(cell, *grads, x, w_ih, w_hh, w_hr, fwd[3], fwd[4],
                                              fwd[5], L, reverse)
    return fwd, bwd


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,T,B,C,H,reverse", [(3, 7, 21, 8, 40, False), (8, 5, 64, 16, 256, True),
                                               (2, 4, 5, 3, 300, False)])
def test_cuda_mma_half_matches_fp64(cell, dtype, G, T, B, C, H, reverse):
    """bf16 / fp16 on tensor cores (every cell; one slice, and several with the barrier; tiles of
    16 rows and a partial one; H = 300: units and k padding), forward and backward, against fp64 on
    the same rounded inputs by norm-relative error: within 1.5x the per-step path's error in the
    same dtype, or 1e-2."""
    args, grads = _cell_args(cell, G, T, B, C, H, dtype), _cell_grads(cell, G, T, B, H, dtype)
    fwd, bwd, tc, seq = _cell_run(cell, args, grads, reverse)
    K = {"lstm": 4, "gru": 3}.get(cell, 1)
    want = (int(_mma_plan(G, B, H, dtype, False, K)["fits"]), int(_mma_plan(G, B, H, dtype, True, K)["fits"]))
    assert tc == want, (tc, want)  # every fitting plan ran on tensor cores
    assert tc[0] <= seq[0] and tc[1] <= seq[1]
    up = lambda ts: [t.double() if t is not None and t.is_floating_point() else t for t in ts]  # noqa: E731
    truth_f, truth_b = _per_step(cell, up(args), up(grads), reverse)
    ref_f, ref_b = _per_step(cell, args, grads, reverse)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-2, f"{cell} forward")
    _assert_as_accurate(bwd, ref_b, truth_b, 1e-2, f"{cell} backward")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_mma_tf32_only_when_allowed(cell):
    """fp32 runs on tensor cores (TF32 operands) only where TF32 is allowed for matmuls; then its
    error against fp64 is TF32's (<= 1e-2), and without it the FMA variant runs (fp32: <= 1e-5)."""
    G, T, B, C, H = 4, 6, 32, 8, 128
    args, grads = _cell_args(cell, G, T, B, C, H, torch.float32), _cell_grads(cell, G, T, B, H, torch.float32)
    up = lambda ts: [t.double() if t is not None and t.is_floating_point() else t for t in ts]  # noqa: E731
    truth_f, truth_b = _per_step(cell, up(args), up(grads))
    ref_f, ref_b = _per_step(cell, args, grads)
    assert not torch.backends.cuda.matmul.allow_tf32  # conftest: strict fp32 by default
    fwd, bwd, tc, _ = _cell_run(cell, args, grads)
    assert tc == (0, 0)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-5, "fp32 forward")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        fwd, bwd, tc, _ = _cell_run(cell, args, grads)
        K = 4 if cell == "lstm" else 3
        want = (int(_mma_plan(G, B, H, torch.float32, False, K)["fits"]),
                int(_mma_plan(G, B, H, torch.float32, True, K)["fits"]))
        assert tc == want == (1, 1)
        _assert_as_accurate(fwd, ref_f, truth_f, 1e-2, "tf32 forward")
        _assert_as_accurate(bwd, ref_b, truth_b, 1e-2, "tf32 backward")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_cuda_mma_switch_off_runs_fma():
    args = _cell_args("lstm", 4, 5, 16, 8, 64, torch.bfloat16)
    grads = _cell_grads("lstm", 4, 5, 16, 64, torch.bfloat16)
    on_f, on_b, tc_on, seq_on = _cell_run("lstm", args, grads, mode="auto")
    off_f, off_b, tc_off, seq_off = _cell_run("lstm", args, grads, mode="off")
    assert tc_on == (1, 1) and tc_off == (0, 0) and seq_on == seq_off == (1, 1)
    for a, b in zip(list(on_f) + list(on_b), list(off_f) + list(off_b)):  # same math, other sums
        if a.numel():
            assert _rel_err(a, b) < 2e-2


@pytest.mark.parametrize("H", [64, 300])
def test_cuda_mma_is_deterministic(H):
    """Three runs bit-for-bit equal on tensor cores (one slice per group; several with the
    barrier)."""
    args = _cell_args("lstm", 6, 12, 24, 8, H, torch.bfloat16, seed=5)
    grads = _cell_grads("lstm", 6, 12, 24, H, torch.bfloat16, seed=6)
    runs = [_cell_run("lstm", args, grads) for _ in range(3)]
    assert all(r[2] == (1, 1) for r in runs)
    for fwd, bwd, _, _ in runs[1:]:
        _assert_all_equal(fwd, runs[0][0], "forward")
        _assert_all_equal(bwd, runs[0][1], "backward")


def test_cuda_mma_long_sequence_and_chunked_backward():
    """T = 300 across the barrier (H = 256: 4 slices), bf16; and fp32 with TF32 at multitask size,
    whose backward fills drec in chunks (the planner's choice on an H100/H200)."""
    args = _cell_args("lstm", 2, 300, 16, 8, 256, torch.bfloat16, seed=7, w_scale=256 ** -0.5)
    grads = _cell_grads("lstm", 2, 300, 16, 256, torch.bfloat16, seed=8)
    fwd, bwd, tc, _ = _cell_run("lstm", args, grads)
    assert tc == (1, 1)
    up = lambda ts: [t.double() if t is not None and t.is_floating_point() else t for t in ts]  # noqa: E731
    truth_f, truth_b = _per_step("lstm", up(args), up(grads))
    ref_f, ref_b = _per_step("lstm", args, grads)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-2, "forward")
    _assert_as_accurate(bwd, ref_b, truth_b, 1e-2, "backward")
    plan = _mma_plan(8, 64, 256, torch.float32, True)
    if not plan["fits"] or plan["chunk_ktiles"] == plan["ktiles"]:
        pytest.skip(f"this device's plan has no chunked backward: {plan}")
    args = _cell_args("lstm", 8, 4, 64, 8, 256, torch.float32, seed=9, w_scale=256 ** -0.5)
    grads = _cell_grads("lstm", 8, 4, 64, 256, torch.float32, seed=10)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        fwd, bwd, tc, _ = _cell_run("lstm", args, grads)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert tc == (1, 1)
    truth_f, truth_b = _per_step("lstm", up(args), up(grads))
    ref_f, ref_b = _per_step("lstm", args, grads)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-2, "tf32 forward")
    _assert_as_accurate(bwd, ref_b, truth_b, 1e-2, "tf32 backward")
