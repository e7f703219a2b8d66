"""The persistent kernel (the GPU implementation of the "sequence" recurrence path) on a GPU, for
every cell: lstm, gru, rnn_tanh, rnn_relu (skipped without a GPU; the emulator and planner tests
that run on the CPU are in test_persistent.py).

The real kernel against the per-step path in fp64, both directions, every cell; half and single
precision against fp64 on the same rounded inputs, every cell; bit-for-bit determinism with one
slice per group and with several (the inter-block barrier), LSTM and GRU; several slices per group,
every cell; a long LSTM sequence (T = 1000) across the barrier; randomized sizes around the fit
limits, every cell; the fallback when the plan cannot fit, every cell. These run the FMA variant of
the kernel (fp32 and fp64 always; the half types with mtl_kernels.tensor_cores("off")).

The tensor-core variant (persistent_mma.h, cuda_persistent_mma.cu): bf16 / fp16 against fp64,
every cell; fp32 on tensor cores (TF32) only where TF32 is allowed (LSTM, GRU); the switch
(tensor_cores("off") runs the FMA variant), every cell; determinism (LSTM, GRU); a long sequence
(T = 300) across the barrier and the chunked TF32 backward (LSTM). benchmarks/device_check.sh runs
this file first and alone.
"""
import contextlib
import random

import pytest
import torch

import mtl_kernels
from helpers import (CELLS, GATES, assert_all_close, assert_close_to_truth, backward_args,
                     recurrence_args, recurrence_grads, rel_err, upcast)
from mtl_kernels import _C
from mtl_kernels._ops import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

DEVICE = "cuda"
SEQ = "sequence"  # the recurrence path whose GPU implementation is the persistent kernel
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def _case(cell, G, T, B, C, H, dtype, shared=True, bias=True, lengths=True, seed=0, w_scale=None):
    """The forward op's arguments and the backward's incoming gradients, drawn in fp64 on the CPU,
    rounded to `dtype`, then moved to DEVICE (tests/helpers.py). Weights are standard normal times
    `w_scale`: by default 0.5, but 1/sqrt(H) for the plain RNN, which has no gate to damp it: at 0.5
    its states and rounding differences grow ~0.5 sqrt(H) per step (relu: ~3e5 after 9 steps at
    H = 64, so fp64 sums taken in another order differ by more than 1e-12 relative, and fp16
    overflows; tanh at H = 300: fp32 paths apart by 2e-4 after 6 steps)."""
    if w_scale is None:
        w_scale = H ** -0.5 if cell.startswith("rnn") else 0.5
    args = recurrence_args(cell, G, T, B, C, H, dtype, shared=shared, bias=bias, lengths=lengths,
                           seed=seed, device=DEVICE, w_scale=w_scale)
    grads = recurrence_grads(cell, G, T, B, H, dtype, seed=seed + 1, device=DEVICE)
    return args, grads


def _assert_all_equal(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{what} result {i} differs between runs"


def _assert_as_accurate(got, ref, truth, limit, what):
    """Each result of `got` is within 1.5x the norm-relative error of `ref` (the per-step path in the
    same dtype) against `truth` (fp64 on the same rounded inputs), or within `limit`."""
    for i, (a, r, t) in enumerate(zip(got, ref, truth)):
        assert not a.isnan().any(), f"{what} result {i} has NaNs"
        err, ref_err = rel_err(a, t), rel_err(r, t)
        assert err <= max(1.5 * ref_err, limit), \
            f"{what} result {i}: rel. error {err:.3g}, per-step path {ref_err:.3g}"


def _device_limits():
    p = torch.cuda.get_device_properties(0)
    return (p.multi_processor_count, p.shared_memory_per_block_optin,
            p.shared_memory_per_multiprocessor, p.max_threads_per_multi_processor,
            p.max_threads_per_block)


def _plan(cell, G, B, H, dtype, backward):
    elem = torch.empty((), dtype=dtype).element_size()
    return _C.persistent_plan(G, B, H, elem, backward, *_device_limits(), GATES[cell])


def _mma_plan(cell, G, B, H, dtype, backward):
    """The tensor-core variant's plan (mma k: 8 for fp32 as TF32, 16 for bf16 / fp16)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return _C.persistent_mma_plan(G, B, H, elem, backward, *_device_limits(), GATES[cell],
                                  8 if dtype == torch.float32 else 16)


def _run(cell, path, args, grads, reverse=False, tensor_cores=None):
    """Forward and backward ops on one recurrence path, with mtl_kernels.tensor_cores(tensor_cores)
    where given (None: the switch as it is); returns (forward results, backward results, how many
    recurrences ran each way: path_counts()'s keys, and "forward_tensor_cores" and
    "backward_tensor_cores", the persistent launches on the tensor-core variant, which also count
    as sequence runs)."""
    before, tc_before = mtl_kernels.path_counts(), mtl_kernels.tensor_core_counts()
    switch = mtl_kernels.tensor_cores(tensor_cores) if tensor_cores else contextlib.nullcontext()
    with mtl_kernels.recurrence_path(path), switch:
        fwd = ops.grouped_recurrence_forward(cell, *args, reverse)
        bwd = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, fwd, reverse))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    after, tc_after = mtl_kernels.path_counts(), mtl_kernels.tensor_core_counts()
    ran = {k: after[k] - before[k] for k in after}
    ran.update({f"{k}_tensor_cores": tc_after[k] - tc_before[k] for k in tc_after})
    return fwd, bwd, ran


def _tc(ran):
    """(forward, backward) launches of the tensor-core variant in _run's counts."""
    return ran["forward_tensor_cores"], ran["backward_tensor_cores"]


def _run_case(cell, path, G, T, B, C, H, dtype, shared=True, bias=True, lengths=True,
              reverse=False, seed=0):
    return _run(cell, path, *_case(cell, G, T, B, C, H, dtype, shared, bias, lengths, seed), reverse)


@pytest.mark.parametrize("cell", CELLS)
def test_cuda_auto_runs_per_step(cell):
    """The CUDA `auto` path runs per step, also where the persistent plan fits: the persistent
    kernels are opt-in (recurrence_path("sequence")) until a GPU run verifies them."""
    G, T, B, C, H = 2, 5, 4, 3, 8
    assert _plan(cell, G, B, H, torch.float32, False)["fits"]
    _, _, ran = _run_case(cell, "auto", G, T, B, C, H, torch.float32)
    assert ran["forward_sequence"] == 0 and ran["backward_sequence"] == 0, ran
    assert ran["forward_per_step"] == 1 and ran["backward_per_step"] == 1, ran


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("G,T,B,C,H", [(3, 7, 5, 4, 6), (1, 1, 1, 1, 1), (32, 9, 16, 8, 64),
                                       (2, 5, 33, 3, 50), (8, 4, 64, 16, 256), (4, 3, 3, 2, 97)])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_persistent_matches_per_step(cell, G, T, B, C, H, reverse):
    dtype = torch.float64
    p_fwd, p_bwd, ran = _run_case(cell, SEQ, G, T, B, C, H, dtype, reverse=reverse)
    fits_f = _plan(cell, G, B, H, dtype, False)["fits"]
    fits_b = _plan(cell, G, B, H, dtype, True)["fits"]
    assert ran["forward_sequence"] == int(fits_f) and ran["backward_sequence"] == int(fits_b)
    s_fwd, s_bwd, ran_s = _run_case(cell, "per_step", G, T, B, C, H, dtype, reverse=reverse)
    assert ran_s["forward_sequence"] == 0 and ran_s["backward_sequence"] == 0
    assert_all_close(p_fwd, s_fwd, **TOL[dtype])
    assert_all_close(p_bwd, s_bwd, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_persistent_half_and_single(cell, dtype):
    """Against fp64 computed from the same rounded inputs, by norm-relative error (as the emulated
    test in test_persistent.py): every forward and backward result of the persistent kernel is as
    accurate as the per-step path in the same dtype (within 1.5x its error), or within `limit`
    (fp32 1e-5, the README's fp32 target; bf16/fp16 1e-2). An elementwise check against fp64 from
    unrounded inputs fails on input rounding alone. The FMA variant (tensor cores off; the
    tensor-core variant's test is test_cuda_mma_half_matches_fp64)."""
    G, T, B, C, H = 32, 16, 16, 64, 64
    args, grads = _case(cell, G, T, B, C, H, dtype, shared=False)
    truth_f, truth_b, _ = _run(cell, "per_step", upcast(args), upcast(grads))
    ref_f, ref_b, _ = _run(cell, "per_step", args, grads)
    got_f, got_b, ran = _run(cell, SEQ, args, grads, tensor_cores="off")
    assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
    assert _tc(ran) == (0, 0)
    assert got_f[5].dtype == torch.float32  # fp32 aux (the LSTM's cell state), also for the half types
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    _assert_as_accurate(got_f, ref_f, truth_f, limit, "forward")
    _assert_as_accurate(got_b, ref_b, truth_b, limit, "backward")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("H,slices", [(96, "one"), (300, "several")])
def test_cuda_persistent_is_deterministic(cell, H, slices):
    """Three runs bit-for-bit equal, forward and backward: with one block per (group, tile) (no
    inter-block barrier) and with several slices per group (a barrier every step)."""
    G, T, B, C = 8, 20, 24, 16
    for backward in (False, True):
        plan = _plan(cell, G, B, H, torch.float32, backward)
        assert plan["fits"] and (plan["slices"] == 1) == (slices == "one"), plan
    runs = [_run_case(cell, SEQ, G, T, B, C, H, torch.float32, seed=3) for _ in range(3)]
    for fwd, bwd, ran in runs:
        assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
    for fwd, bwd, _ in runs[1:]:
        _assert_all_equal(fwd, runs[0][0], "forward")
        _assert_all_equal(bwd, runs[0][1], "backward")


@pytest.mark.parametrize("cell", CELLS)
def test_cuda_persistent_random_sizes_around_the_limits(cell):
    """Sizes on both sides of the fit limits: fitting ones run persistent, the rest fall back, and
    every one matches the per-step path."""
    rng = random.Random(2)
    sizes = [(rng.randint(1, 40), rng.randint(1, 70), rng.choice([31, 32, 33, 127, 128, 200, 300,
                                                                 400, 513]))
             for _ in range(10)]
    for i, (G, B, H) in enumerate(sizes):
        fits = _plan(cell, G, B, H, torch.float32, False)["fits"]
        fwd, bwd, ran = _run_case(cell, SEQ, G, 3, B, 5, H, torch.float32, seed=i)
        # never persistent without a plan; with one, the kernel's registers may still rule it out
        assert ran["forward_sequence"] <= int(fits)
        ref_f, ref_b, _ = _run_case(cell, "per_step", G, 3, B, 5, H, torch.float32, seed=i)
        assert_all_close(fwd, ref_f, rtol=1e-4, atol=1e-4)
        assert_all_close(bwd, ref_b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cell", CELLS)
def test_cuda_persistent_several_slices_per_group(cell):
    """H = 300: no block holds a whole group's W_hh (fp32 on an H100: 10 slices for the LSTM, 5 for
    the GRU, 3 for the RNN), so every step crosses the inter-block barrier. fp32, reverse: forward
    elementwise against the per-step path; the backward, whose gradients reach ~100 here (W_hh * 0.5
    at H = 300 amplifies dh), by norm-relative error against fp64 on the same inputs (an elementwise
    1e-3 fails on cancellation in both paths' fp32 sums)."""
    G, T, B, C, H = 3, 6, 8, 5, 300
    for backward in (False, True):
        plan = _plan(cell, G, B, H, torch.float32, backward)
        assert plan["fits"] and plan["slices"] > 1, plan
    args, grads = _case(cell, G, T, B, C, H, torch.float32)
    fwd, bwd, ran = _run(cell, SEQ, args, grads, reverse=True)
    assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
    ref_f, ref_b, _ = _run(cell, "per_step", args, grads, reverse=True)
    truth_f, truth_b, _ = _run(cell, "per_step", upcast(args), upcast(grads), reverse=True)
    assert_all_close(fwd, ref_f, rtol=1e-4, atol=1e-4)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-5, "forward")
    _assert_as_accurate(bwd, ref_b, truth_b, 1e-5, "backward")


@pytest.mark.parametrize("cell", CELLS)
def test_cuda_forced_persistent_falls_back_when_it_does_not_fit(cell):
    """G = 200, B = 64, H = 256: the blocks (1600 of 128 KB for the LSTM) cannot all be resident, so
    a forced sequence path runs per step (cheap to set up, unlike a hidden size too large for shared
    memory)."""
    G, T, B, C, H = 200, 2, 64, 3, 256
    for backward in (False, True):
        plan = _plan(cell, G, B, H, torch.float32, backward)
        assert not plan["fits"] and "resident" in plan["reason"], plan
    fwd, bwd, ran = _run_case(cell, SEQ, G, T, B, C, H, torch.float32, lengths=False)
    assert ran["forward_sequence"] == 0 and ran["forward_per_step"] == 1
    assert ran["backward_sequence"] == 0 and ran["backward_per_step"] == 1
    assert torch.isfinite(fwd[0]).all() and torch.isfinite(bwd[2]).all()


def test_cuda_persistent_long_sequence_across_the_barrier():
    """T = 1000 steps, H = 300, B = 4, LSTM: several slices per group (10 of 32 units in fp32, 19 of
    16 in fp64 on an H100; asserted through the planner with this device's limits), so both kernels
    wait at the inter-block barrier about 1000 times per launch.

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
            plan = _plan("lstm", G, B, H, dtype, backward)
            assert plan["fits"] and plan["slices"] > 1, (dtype, backward, plan)
    args, grads = _case("lstm", G, T, B, C, H, torch.float32, shared=False, w_scale=H ** -0.5,
                        seed=7)
    args = list(args)
    args[8] = torch.tensor([T, T - 1, T // 2 + 17, 5], device=DEVICE)  # lengths
    args64, grads64 = upcast(args), upcast(grads)

    runs = [_run("lstm", SEQ, args, grads) for _ in range(3)]
    for fwd, bwd, ran in runs:
        assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
    for fwd, bwd, _ in runs[1:]:
        _assert_all_equal(fwd, runs[0][0], "fp32 forward")
        _assert_all_equal(bwd, runs[0][1], "fp32 backward")
    ref_f, ref_b, _ = _run("lstm", "per_step", args, grads)
    truth_f, truth_b, _ = _run("lstm", "per_step", args64, grads64)
    _assert_as_accurate(runs[0][0], ref_f, truth_f, 1e-5, "fp32 forward")
    _assert_as_accurate(runs[0][1], ref_b, truth_b, 1e-5, "fp32 backward")

    for reverse in (False, True):
        fwd, bwd, ran = _run("lstm", SEQ, args64, grads64, reverse)
        assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
        ref_f, ref_b, _ = (truth_f, truth_b, None) if not reverse else \
            _run("lstm", "per_step", args64, grads64, reverse)
        assert_all_close(fwd, ref_f, rtol=1e-10, atol=1e-10)
        assert_all_close(bwd, ref_b, rtol=1e-10, atol=1e-10)


# ---- the tensor-core variant (persistent_mma.h, cuda_persistent_mma.cu) ------------------------
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,T,B,C,H,reverse", [(3, 7, 21, 8, 40, False), (8, 5, 64, 16, 256, True),
                                               (2, 4, 5, 3, 300, False)])
def test_cuda_mma_half_matches_fp64(cell, dtype, G, T, B, C, H, reverse):
    """bf16 / fp16 on tensor cores (every cell; one slice, and several with the barrier; tiles of
    16 rows and a partial one; H = 300: units and k padding), forward and backward, against fp64 on
    the same rounded inputs by norm-relative error: within 1.5x the per-step path's error in the
    same dtype, or 1e-2."""
    args, grads = _case(cell, G, T, B, C, H, dtype, shared=False)
    fwd, bwd, ran = _run(cell, SEQ, args, grads, reverse, tensor_cores="auto")
    want = (int(_mma_plan(cell, G, B, H, dtype, False)["fits"]),
            int(_mma_plan(cell, G, B, H, dtype, True)["fits"]))
    assert _tc(ran) == want, (ran, want)  # every fitting plan ran on tensor cores
    assert ran["forward_tensor_cores"] <= ran["forward_sequence"]
    assert ran["backward_tensor_cores"] <= ran["backward_sequence"]
    truth_f, truth_b, _ = _run(cell, "per_step", upcast(args), upcast(grads), reverse)
    ref_f, ref_b, _ = _run(cell, "per_step", args, grads, reverse)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-2, f"{cell} forward")
    _assert_as_accurate(bwd, ref_b, truth_b, 1e-2, f"{cell} backward")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_mma_tf32_only_when_allowed(cell):
    """fp32 runs on tensor cores (TF32 operands) only where TF32 is allowed for matmuls; then its
    error against fp64 is TF32's (<= 1e-2), and without it the FMA variant runs (fp32: <= 1e-5)."""
    G, T, B, C, H = 4, 6, 32, 8, 128
    args, grads = _case(cell, G, T, B, C, H, torch.float32, shared=False)
    truth_f, truth_b, _ = _run(cell, "per_step", upcast(args), upcast(grads))
    ref_f, ref_b, _ = _run(cell, "per_step", args, grads)
    assert not torch.backends.cuda.matmul.allow_tf32  # conftest: strict fp32 by default
    fwd, bwd, ran = _run(cell, SEQ, args, grads, tensor_cores="auto")
    assert _tc(ran) == (0, 0)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-5, "fp32 forward")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        fwd, bwd, ran = _run(cell, SEQ, args, grads, tensor_cores="auto")
        want = (int(_mma_plan(cell, G, B, H, torch.float32, False)["fits"]),
                int(_mma_plan(cell, G, B, H, torch.float32, True)["fits"]))
        assert _tc(ran) == want == (1, 1)
        _assert_as_accurate(fwd, ref_f, truth_f, 1e-2, "tf32 forward")
        _assert_as_accurate(bwd, ref_b, truth_b, 1e-2, "tf32 backward")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


@pytest.mark.parametrize("cell", CELLS)
def test_cuda_mma_switch_off_runs_fma(cell):
    """tensor_cores("off"): the same sequence path on the FMA variant; the same math summed in
    another order, so each variant is held against fp64 on the same rounded inputs (norm-relative),
    not against the other."""
    args, grads = _case(cell, 4, 5, 16, 8, 64, torch.bfloat16, shared=False)
    on_f, on_b, ran_on = _run(cell, SEQ, args, grads, tensor_cores="auto")
    off_f, off_b, ran_off = _run(cell, SEQ, args, grads, tensor_cores="off")
    assert _tc(ran_on) == (1, 1) and _tc(ran_off) == (0, 0)
    for ran in (ran_on, ran_off):
        assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1
    truth_f, truth_b, _ = _run(cell, "per_step", upcast(args), upcast(grads))
    for variant, got in (("tensor cores", list(on_f) + list(on_b)), ("FMA", list(off_f) + list(off_b))):
        assert_close_to_truth(got, list(truth_f) + list(truth_b), 2e-2, variant)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("H", [64, 300])
def test_cuda_mma_is_deterministic(cell, H):
    """Three runs bit-for-bit equal on tensor cores (one slice per group; several with the
    barrier)."""
    args, grads = _case(cell, 6, 12, 24, 8, H, torch.bfloat16, shared=False, seed=5)
    runs = [_run(cell, SEQ, args, grads, tensor_cores="auto") for _ in range(3)]
    assert all(_tc(r[2]) == (1, 1) for r in runs)
    for fwd, bwd, _ in runs[1:]:
        _assert_all_equal(fwd, runs[0][0], "forward")
        _assert_all_equal(bwd, runs[0][1], "backward")


def test_cuda_mma_long_sequence_and_chunked_backward():
    """T = 300 across the barrier (H = 256: 4 slices), bf16, LSTM; and fp32 with TF32 at
    multitask size, whose backward fills drec in chunks (the planner's choice on an H100/H200)."""
    args, grads = _case("lstm", 2, 300, 16, 8, 256, torch.bfloat16, shared=False, seed=7,
                        w_scale=256 ** -0.5)
    fwd, bwd, ran = _run("lstm", SEQ, args, grads, tensor_cores="auto")
    assert _tc(ran) == (1, 1)
    truth_f, truth_b, _ = _run("lstm", "per_step", upcast(args), upcast(grads))
    ref_f, ref_b, _ = _run("lstm", "per_step", args, grads)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-2, "forward")
    _assert_as_accurate(bwd, ref_b, truth_b, 1e-2, "backward")
    plan = _mma_plan("lstm", 8, 64, 256, torch.float32, True)
    if not plan["fits"] or plan["chunk_ktiles"] == plan["ktiles"]:
        pytest.skip(f"this device's plan has no chunked backward: {plan}")
    args, grads = _case("lstm", 8, 4, 64, 8, 256, torch.float32, shared=False, seed=9,
                        w_scale=256 ** -0.5)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        fwd, bwd, ran = _run("lstm", SEQ, args, grads, tensor_cores="auto")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    assert _tc(ran) == (1, 1)
    truth_f, truth_b, _ = _run("lstm", "per_step", upcast(args), upcast(grads))
    ref_f, ref_b, _ = _run("lstm", "per_step", args, grads)
    _assert_as_accurate(fwd, ref_f, truth_f, 1e-2, "tf32 forward")
    _assert_as_accurate(bwd, ref_b, truth_b, 1e-2, "tf32 backward")
