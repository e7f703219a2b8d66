"""The persistent grouped-LSTM kernel (issue: one launch for the whole sequence).

On the CPU: its work split, shared-memory layouts, index math and per-thread arithmetic run through
the emulator op (every block and thread of a plan, in order, with the same code the CUDA kernel
runs), against the per-step op; and its planner, against the limits of an H100. The real kernel
on a GPU: test_persistent_cuda.py.
"""
import random

import pytest
import torch

import mtl_kernels
from mtl_kernels import GroupedLSTM, _C
from mtl_kernels._ops import ops

# What torch reports for an H100 SXM (sm_90): SMs, opt-in smem per block, smem per SM, threads per
# SM, threads per block.
H100 = (132, 227 * 1024, 228 * 1024, 2048, 1024)
MAX_ROWS = 8  # kPersistentMaxRows
MAX_THREADS = 256  # kPersistentMaxThreads


def _op_args(G, T, B, C, H, dtype, shared, bias, lengths, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    x = r(T, B, C) if shared else r(G, T, B, C)
    w_ih, w_hh = r(G, 4 * H, C) * 0.5, r(G, 4 * H, H) * 0.5
    b = r(G, 4 * H) if bias else None
    h0, c0 = r(G, B, H), r(G, B, H)
    L = torch.randint(1, T + 1, (B,), generator=g).to(device) if lengths else None
    return x, w_ih, w_hh, b, h0, c0, L


def _grads(G, T, B, H, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return r(G, T, B, H), r(G, B, H), r(G, B, H)


def _assert_all_close(got, want, **tol):
    for i, (a, b) in enumerate(zip(got, want)):
        assert not a.isnan().any(), f"result {i} has unwritten (NaN-poisoned) elements"
        torch.testing.assert_close(a, b, msg=lambda m: f"result {i}: {m}", **tol)


TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


# ---- the emulator: the CUDA kernel's work, run on the CPU ---------------------------------------
# (G, T, B, C, H, (units, tile_rows, threads_y, chunk)): whole-group blocks, one unit per block,
# slices and tiles that do not divide H and B, one row per thread and up to 8, backward dgates fills
# of all 4H columns (0), of one column, and of chunks that do not divide 4H; G = T = B = H = 1.
TILINGS = [
    (3, 5, 7, 4, 6, (6, 7, 7, 0)),
    (3, 5, 7, 4, 6, (1, 1, 1, 1)),
    (3, 5, 7, 4, 6, (4, 3, 2, 7)),
    (2, 4, 9, 3, 7, (3, 9, 2, 28)),  # 5 rows per thread -> the kRows=8 instance, tile edge mid-thread
    (2, 6, 13, 5, 10, (4, 5, 1, 16)),
    (1, 1, 1, 1, 1, (1, 1, 1, 0)),
    (1, 3, 2, 2, 1, (1, 2, 1, 3)),
    (4, 2, 1, 3, 5, (2, 1, 1, 19)),
    (2, 7, 16, 3, 33, (32, 16, 2, 33)),  # 8 rows per thread, 2 slices of 32 and 1, 4 chunks
    # H and chunks multiples of 4: the 4-wide inner loops (forward over h, backward over dgates)
    (2, 4, 5, 3, 8, (3, 5, 2, 12)),
    (3, 3, 6, 2, 12, (5, 4, 1, 0)),
    (1, 2, 3, 2, 4, (4, 3, 3, 8)),
    (2, 3, 9, 2, 16, (16, 9, 2, 20)),  # 4-wide chunks of 20 and a last one of 4
]


@pytest.mark.parametrize("G,T,B,C,H,tiling", TILINGS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shared,bias,lengths", [(True, True, True), (False, False, True),
                                                 (True, False, False), (False, True, False)])
def test_emulated_persistent_matches_per_step_fp64(G, T, B, C, H, tiling, reverse, shared, bias,
                                                   lengths):
    args = _op_args(G, T, B, C, H, torch.float64, shared, bias, lengths)
    ref = ops.grouped_lstm_forward(*args, reverse)
    emu = ops._grouped_lstm_forward_emulated(*args, reverse, *tiling[:3])
    _assert_all_close(emu, ref, **TOL[torch.float64])
    x, w_ih, w_hh, _, _, _, L = args
    grads = _grads(G, T, B, H, torch.float64)
    ref_b = ops.grouped_lstm_backward(*grads, x, w_ih, w_hh, *ref[3:], L, reverse)
    emu_b = ops._grouped_lstm_backward_emulated(*grads, x, w_ih, w_hh, *emu[3:], L, reverse, *tiling)
    _assert_all_close(emu_b, ref_b, **TOL[torch.float64])


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_persistent_half_and_single(dtype):
    """Against fp64 on the same (rounded) inputs, the emulated kernel is as accurate as the
    per-step path (it keeps the recurrent sums and dh in fp32 registers, the per-step path rounds
    h @ W_hh^T and dh to the input dtype between steps)."""
    G, T, B, C, H, tiling = 3, 6, 5, 4, 12, (5, 3, 1, 16)
    args = _op_args(G, T, B, C, H, dtype, shared=False, bias=True, lengths=True)
    args64 = [a.double() if a is not None and a.is_floating_point() else a for a in args]
    truth = ops.grouped_lstm_forward(*args64, False)
    ref = ops.grouped_lstm_forward(*args, False)
    emu = ops._grouped_lstm_forward_emulated(*args, False, *tiling[:3])
    assert emu[5].dtype == torch.float32  # fp32 cell state for the half types
    limit = 1e-6 if dtype == torch.float32 else 1e-2
    for i in range(6):
        assert not emu[i].isnan().any()
        assert _rel_err(emu[i], truth[i]) <= max(1.5 * _rel_err(ref[i], truth[i]), limit), i
    x, w_ih, w_hh, _, _, _, L = args
    grads = _grads(G, T, B, H, dtype)
    truth_b = ops.grouped_lstm_backward(*[g.double() for g in grads], *args64[:3], *truth[3:],
                                        L, False)
    ref_b = ops.grouped_lstm_backward(*grads, x, w_ih, w_hh, *ref[3:], L, False)
    emu_b = ops._grouped_lstm_backward_emulated(*grads, x, w_ih, w_hh, *emu[3:], L, False, *tiling)
    for i in range(6):
        assert not emu_b[i].isnan().any()
        assert _rel_err(emu_b[i], truth_b[i]) <= max(1.5 * _rel_err(ref_b[i], truth_b[i]), limit), i


def test_emulated_paths_mix():
    """The two paths save the same tensors: either backward runs on either forward's."""
    G, T, B, C, H, tiling = 2, 5, 4, 3, 5, (2, 3, 2, 0)
    args = _op_args(G, T, B, C, H, torch.float64, shared=True, bias=True, lengths=True)
    x, w_ih, w_hh, _, _, _, L = args
    grads = _grads(G, T, B, H, torch.float64)
    per_step = ops.grouped_lstm_forward(*args, False)
    emulated = ops._grouped_lstm_forward_emulated(*args, False, *tiling[:3])
    want = ops.grouped_lstm_backward(*grads, x, w_ih, w_hh, *per_step[3:], L, False)
    got_1 = ops._grouped_lstm_backward_emulated(*grads, x, w_ih, w_hh, *per_step[3:], L, False, *tiling)
    got_2 = ops.grouped_lstm_backward(*grads, x, w_ih, w_hh, *emulated[3:], L, False)
    _assert_all_close(got_1, want, **TOL[torch.float64])
    _assert_all_close(got_2, want, **TOL[torch.float64])


def test_emulated_random_tilings():
    rng = random.Random(0)
    for seed in range(12):
        G, T, B, C, H = (rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 12), rng.randint(1, 5),
                         rng.randint(1, 12))
        units, tile_rows = rng.randint(1, H), rng.randint(1, B)
        threads_y = rng.randint(-(-tile_rows // MAX_ROWS), tile_rows)
        tiling = (units, tile_rows, threads_y, rng.choice([0, rng.randint(1, 4 * H)]))
        shared, bias, lengths, reverse = (rng.random() < 0.5 for _ in range(4))
        args = _op_args(G, T, B, C, H, torch.float64, shared, bias, lengths, seed=seed)
        ref = ops.grouped_lstm_forward(*args, reverse)
        emu = ops._grouped_lstm_forward_emulated(*args, reverse, *tiling[:3])
        _assert_all_close(emu, ref, **TOL[torch.float64])
        x, w_ih, w_hh, _, _, _, L = args
        grads = _grads(G, T, B, H, torch.float64, seed=seed)
        ref_b = ops.grouped_lstm_backward(*grads, x, w_ih, w_hh, *ref[3:], L, reverse)
        emu_b = ops._grouped_lstm_backward_emulated(*grads, x, w_ih, w_hh, *emu[3:], L, reverse,
                                                    *tiling)
        _assert_all_close(emu_b, ref_b, **TOL[torch.float64])


@pytest.mark.parametrize("tiling", [(0, 2, 1), (7, 2, 1), (2, 0, 1), (2, 5, 1), (2, 4, 5),
                                    (2, 4, 0)])
def test_emulated_rejects_invalid_tiling(tiling):
    args = _op_args(2, 3, 4, 3, 5, torch.float64, True, True, False)
    # units > H, tile_rows > B, threads_y > tile_rows, zeros: all invalid; (2, 5, 1) > B = 4
    with pytest.raises(RuntimeError, match="invalid tiling"):
        ops._grouped_lstm_forward_emulated(*args, False, *tiling[:3])


def test_emulated_ops_opcheck():
    args = _op_args(2, 3, 4, 3, 5, torch.float64, True, True, True)
    torch.library.opcheck(ops._grouped_lstm_forward_emulated, (*args, False, 2, 3, 2))
    fwd = ops._grouped_lstm_forward_emulated(*args, False, 2, 3, 2)
    x, w_ih, w_hh, _, _, _, L = args
    torch.library.opcheck(ops._grouped_lstm_backward_emulated,
                          (*_grads(2, 3, 4, 5, torch.float64), x, w_ih, w_hh, *fwd[3:], L, False,
                           2, 3, 2, 7))


# ---- the planner ----------------------------------------------------------------------------
def _plan(G, B, H, elem_bytes, backward, limits=H100):
    return _C.persistent_plan(G, B, H, elem_bytes, backward, *limits)


def _check_plan_invariants(p, G, B, H, elem_bytes, backward, limits=H100):
    sms, smem_block, smem_sm, threads_sm, threads_block = limits
    assert 1 <= p["units"] <= min(H, MAX_THREADS)
    assert p["slices"] == -(-H // p["units"])
    assert 1 <= p["tile_rows"] <= B and p["tiles"] == -(-B // p["tile_rows"])
    assert p["threads_y"] <= p["tile_rows"] <= p["threads_y"] * p["rows_per_thread"]
    assert p["rows_per_thread"] in (1, 2, 4, 8)
    assert p["threads"] == p["units"] * p["threads_y"] <= min(MAX_THREADS, threads_block)
    cols = p["chunk"]
    assert 1 <= cols <= (4 * H if backward else H) and (backward or cols == H)
    w_bytes = -(-4 * p["units"] * H * elem_bytes // 16) * 16
    assert p["smem_bytes"] == w_bytes + p["tile_rows"] * cols * elem_bytes <= smem_block
    assert p["blocks"] == G * p["tiles"] * p["slices"]
    assert p["blocks"] <= p["blocks_per_sm"] * sms  # co-resident
    assert p["blocks_per_sm"] * (p["smem_bytes"] + 1024) <= smem_sm


CONFIGS = {"seed-tasks": (2, 32, 50), "seed-branches": (3, 32, 20), "many-small": (32, 16, 64),
           "multitask": (8, 64, 256)}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("elem_bytes", [4, 2])
@pytest.mark.parametrize("backward", [False, True])
def test_plan_benchmark_configs_on_h100(name, elem_bytes, backward):
    G, B, H = CONFIGS[name]
    p = _plan(G, B, H, elem_bytes, backward)
    assert p["fits"], p["reason"]
    if name == "multitask" and backward and elem_bytes == 4:
        # whole fp32 dgates rows (4 KB) next to a 128 KB W_hh slice leave too few rows per block
        assert p["chunk"] < 4 * H
    _check_plan_invariants(p, G, B, H, elem_bytes, backward)
    if name == "seed-branches":
        assert p["slices"] == 1  # one block holds a whole group: no inter-block barrier at all


def test_plan_random_sizes_hold_invariants():
    rng = random.Random(1)
    fits = 0
    for _ in range(400):
        G, B, H = rng.randint(1, 64), rng.randint(1, 300), rng.randint(1, 700)
        elem_bytes, backward = rng.choice([2, 4, 8]), rng.random() < 0.5
        p = _plan(G, B, H, elem_bytes, backward)
        if p["fits"]:
            fits += 1
            _check_plan_invariants(p, G, B, H, elem_bytes, backward)
        else:
            assert p["reason"]
    assert 50 < fits < 400  # the sample reaches both sides of the limits


def test_plan_does_not_fit_when_one_unit_exceeds_shared_memory():
    p = _plan(1, 4, 20000, 4, False)  # 4 x 20000 x 4 B = 320 KB for a single hidden unit
    assert not p["fits"] and "shared memory" in p["reason"]
    p = _plan(200, 64, 256, 4, False)  # 1600 blocks of 128 KB: cannot all be resident
    assert not p["fits"] and "resident" in p["reason"]


def _ran(fn):
    before = mtl_kernels.path_counts()
    fn()
    after = mtl_kernels.path_counts()
    return {k: after[k] - before[k] for k in after}


def test_recurrence_path_switch_and_cpu_counts():
    with pytest.raises(ValueError):
        with mtl_kernels.recurrence_path("fast"):
            pass
    small, large = GroupedLSTM(2, 3, 4), GroupedLSTM(2, 3, 129)
    x = torch.randn(5, 2, 3)
    with mtl_kernels.recurrence_path("auto"):  # the CPU runs rows in parallel up to H = 128
        ran = _ran(lambda: small(x)[0].sum().backward())
        assert ran == {"forward_sequence": 1, "forward_per_step": 0, "backward_sequence": 1,
                       "backward_per_step": 0}
        ran = _ran(lambda: large(x)[0].sum().backward())
        assert ran["forward_per_step"] == 1 and ran["backward_per_step"] == 1
    with mtl_kernels.recurrence_path("per_step"):
        ran = _ran(lambda: small(x)[0].sum().backward())
        assert ran["forward_per_step"] == 1 and ran["backward_per_step"] == 1
    with mtl_kernels.recurrence_path("persistent"):
        ran = _ran(lambda: small(x)[0].sum().backward())
        assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1


def test_invalid_path_variable_raises(monkeypatch):
    monkeypatch.setenv("MTL_KERNELS_LSTM_PATH", "fastest")
    with pytest.raises(RuntimeError, match="MTL_KERNELS_LSTM_PATH must be"):
        GroupedLSTM(2, 3, 4)(torch.randn(5, 2, 3))


@pytest.mark.parametrize("H", [1, 5, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_row_parallel_matches_per_step(H, dtype, monkeypatch):
    """The CPU's whole-sequence path (rows in parallel, its own W_hh products) against its
    per-step path (MKL batched GEMMs), forward and backward, with lengths, both directions."""
    G, T, B, C = 3, 6, 5, 4
    for reverse in (False, True):
        args = _op_args(G, T, B, C, H, dtype, shared=False, bias=True, lengths=True)
        x, w_ih, w_hh, _, _, _, L = args
        grads = _grads(G, T, B, H, dtype)
        results = {}
        for path in ("auto", "per_step"):
            monkeypatch.setenv("MTL_KERNELS_LSTM_PATH", path)
            fwd = ops.grouped_lstm_forward(*args, reverse)
            bwd = ops.grouped_lstm_backward(*grads, x, w_ih, w_hh, *fwd[3:], L, reverse)
            results[path] = fwd + bwd
        tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
        _assert_all_close(results["auto"], results["per_step"], **tol)
