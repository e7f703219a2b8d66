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
from helpers import (CELLS, GATES, assert_all_close, backward_args, recurrence_args, recurrence_grads,
                     rel_err, upcast)
from mtl_kernels import GroupedLSTM, _C
from mtl_kernels._ops import ops

# What torch reports for an H100 SXM (sm_90): SMs, opt-in smem per block, smem per SM, threads per
# SM, threads per block.
H100 = (132, 227 * 1024, 228 * 1024, 2048, 1024)
MAX_ROWS = 8  # kPersistentMaxRows
MAX_THREADS = 256  # kPersistentMaxThreads


TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _forward_both(cell, args, reverse, tiling):
    """The per-step op and the emulated persistent kernel on the same arguments."""
    ref = ops.grouped_recurrence_forward(cell, *args, reverse)
    emu = ops._grouped_recurrence_forward_emulated(cell, *args, reverse, *tiling[:3])
    return ref, emu


# ---- the emulator: the CUDA kernel's work, run on the CPU ---------------------------------------
# (G, T, B, C, H, (units, tile_rows, threads_y, chunk)): whole-group blocks, one unit per block,
# slices and tiles that do not divide H and B, one row per thread and up to 8, backward drec fills
# of all KH columns (0), of one column, and of chunks that do not divide KH; G = T = B = H = 1.
TILINGS = [
    (3, 5, 7, 4, 6, (6, 7, 7, 0)),
    (3, 5, 7, 4, 6, (1, 1, 1, 1)),
    (3, 5, 7, 4, 6, (4, 3, 2, 7)),
    (2, 4, 9, 3, 7, (3, 9, 2, 5)),  # 5 rows per thread -> the kRows=8 instance, tile edge mid-thread
    (2, 6, 13, 5, 10, (4, 5, 1, 16)),
    (1, 1, 1, 1, 1, (1, 1, 1, 0)),
    (1, 3, 2, 2, 1, (1, 2, 1, 1)),
    (4, 2, 1, 3, 5, (2, 1, 1, 3)),
    (2, 7, 16, 3, 33, (32, 16, 2, 33)),  # 8 rows per thread, 2 slices of 32 and 1, chunks
    # H and chunks multiples of 4: the 4-wide inner loops (forward over h, backward over drec)
    (2, 4, 5, 3, 8, (3, 5, 2, 4)),
    (3, 3, 6, 2, 12, (5, 4, 1, 0)),
    (1, 2, 3, 2, 4, (4, 3, 3, 4)),
    (2, 3, 9, 2, 16, (16, 9, 2, 8)),
]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("G,T,B,C,H,tiling", TILINGS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shared,bias,lengths", [(True, True, True), (False, False, True),
                                                 (True, False, False), (False, True, False)])
def test_emulated_persistent_matches_per_step_fp64(cell, G, T, B, C, H, tiling, reverse, shared,
                                                   bias, lengths):
    tiling = (*tiling[:3], min(tiling[3], GATES[cell] * H))  # drec columns per fill <= KH
    args = recurrence_args(cell, G, T, B, C, H, shared=shared, bias=bias, lengths=lengths)
    ref, emu = _forward_both(cell, args, reverse, tiling)
    assert_all_close(emu, ref, **TOL[torch.float64])
    grads = recurrence_grads(cell, G, T, B, H)
    ref_b = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, ref, reverse))
    emu_b = ops._grouped_recurrence_backward_emulated(
        cell, *backward_args(cell, grads, args, emu, reverse), *tiling)
    assert_all_close(emu_b, ref_b, **TOL[torch.float64])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_persistent_half_and_single(cell, dtype):
    """Against fp64 on the same (rounded) inputs, the emulated kernel is as accurate as the
    per-step path (it keeps the recurrent sums and dh in fp32 registers, the per-step path rounds
    h @ W_hh^T and dh to the input dtype between steps)."""
    G, T, B, C, H = 3, 6, 5, 4, 12
    tiling = (5, 3, 1, min(16, GATES[cell] * H))
    args = recurrence_args(cell, G, T, B, C, H, dtype, shared=False, bias=True, lengths=True)
    args64 = upcast(args)
    truth = ops.grouped_recurrence_forward(cell, *args64, False)
    ref, emu = _forward_both(cell, args, False, tiling)
    assert emu[5].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)  # fp32 aux
    limit = 1e-6 if dtype == torch.float32 else 1e-2
    for i in range(6):
        assert not emu[i].isnan().any()
        if emu[i].numel():
            assert rel_err(emu[i], truth[i]) <= max(1.5 * rel_err(ref[i], truth[i]), limit), i
    grads = recurrence_grads(cell, G, T, B, H, dtype)
    truth_b = ops.grouped_recurrence_backward(
        cell, *backward_args(cell, upcast(grads), args64, truth, False))
    ref_b = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, ref, False))
    emu_b = ops._grouped_recurrence_backward_emulated(
        cell, *backward_args(cell, grads, args, emu, False), *tiling)
    for i in range(len(emu_b)):
        assert not emu_b[i].isnan().any()
        if emu_b[i].numel():
            assert rel_err(emu_b[i], truth_b[i]) <= max(1.5 * rel_err(ref_b[i], truth_b[i]), limit), i


@pytest.mark.parametrize("cell", CELLS)
def test_emulated_paths_mix(cell):
    """The two paths save the same tensors: either backward runs on either forward's."""
    G, T, B, C, H, tiling = 2, 5, 4, 3, 5, (2, 3, 2, 0)
    args = recurrence_args(cell, G, T, B, C, H, shared=True, bias=True, lengths=True)
    grads = recurrence_grads(cell, G, T, B, H)
    per_step, emulated = _forward_both(cell, args, False, tiling)
    want = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, per_step, False))
    got_1 = ops._grouped_recurrence_backward_emulated(
        cell, *backward_args(cell, grads, args, per_step, False), *tiling)
    got_2 = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, emulated, False))
    assert_all_close(got_1, want, **TOL[torch.float64])
    assert_all_close(got_2, want, **TOL[torch.float64])


@pytest.mark.parametrize("cell", CELLS)
def test_emulated_random_tilings(cell):
    rng = random.Random(0)
    for seed in range(8):
        G, T, B, C, H = (rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 12), rng.randint(1, 5),
                         rng.randint(1, 12))
        units, tile_rows = rng.randint(1, H), rng.randint(1, B)
        threads_y = rng.randint(-(-tile_rows // MAX_ROWS), tile_rows)
        tiling = (units, tile_rows, threads_y, rng.choice([0, rng.randint(1, GATES[cell] * H)]))
        shared, bias, lengths, reverse = (rng.random() < 0.5 for _ in range(4))
        args = recurrence_args(cell, G, T, B, C, H, shared=shared, bias=bias, lengths=lengths,
                               seed=seed)
        ref, emu = _forward_both(cell, args, reverse, tiling)
        assert_all_close(emu, ref, **TOL[torch.float64])
        grads = recurrence_grads(cell, G, T, B, H, seed=seed)
        ref_b = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, ref, reverse))
        emu_b = ops._grouped_recurrence_backward_emulated(
            cell, *backward_args(cell, grads, args, emu, reverse), *tiling)
        assert_all_close(emu_b, ref_b, **TOL[torch.float64])


@pytest.mark.parametrize("tiling", [(0, 2, 1), (7, 2, 1), (2, 0, 1), (2, 5, 1), (2, 4, 5),
                                    (2, 4, 0)])
def test_emulated_rejects_invalid_tiling(tiling):
    args = recurrence_args("lstm", 2, 3, 4, 3, 5)
    # units > H, tile_rows > B, threads_y > tile_rows, zeros: all invalid; (2, 5, 1) > B = 4
    with pytest.raises(RuntimeError, match="invalid tiling"):
        ops._grouped_recurrence_forward_emulated("lstm", *args, False, *tiling[:3])


@pytest.mark.parametrize("cell", CELLS)
def test_emulated_ops_opcheck(cell):
    args = recurrence_args(cell, 2, 3, 4, 3, 5, lengths=True)
    torch.library.opcheck(ops._grouped_recurrence_forward_emulated, (cell, *args, False, 2, 3, 2))
    fwd = ops._grouped_recurrence_forward_emulated(cell, *args, False, 2, 3, 2)
    grads = recurrence_grads(cell, 2, 3, 4, 5)
    torch.library.opcheck(ops._grouped_recurrence_backward_emulated,
                          (cell, *backward_args(cell, grads, args, fwd, False), 2, 3, 2, 4))


# ---- the planner ----------------------------------------------------------------------------
def _plan(G, B, H, elem_bytes, backward, limits=H100, gates=4):
    return _C.persistent_plan(G, B, H, elem_bytes, backward, *limits, gates)


def _check_plan_invariants(p, G, B, H, elem_bytes, backward, limits=H100, gates=4):
    sms, smem_block, smem_sm, threads_sm, threads_block = limits
    assert p["gates"] == gates
    assert 1 <= p["units"] <= min(H, MAX_THREADS)
    assert p["slices"] == -(-H // p["units"])
    assert 1 <= p["tile_rows"] <= B and p["tiles"] == -(-B // p["tile_rows"])
    assert p["threads_y"] <= p["tile_rows"] <= p["threads_y"] * p["rows_per_thread"]
    assert p["rows_per_thread"] in (1, 2, 4, 8)
    assert p["threads"] == p["units"] * p["threads_y"] <= min(MAX_THREADS, threads_block)
    cols = p["chunk"]
    assert 1 <= cols <= (gates * H if backward else H) and (backward or cols == H)
    w_bytes = -(-gates * p["units"] * H * elem_bytes // 16) * 16
    assert p["smem_bytes"] == w_bytes + p["tile_rows"] * cols * elem_bytes <= smem_block
    assert p["blocks"] == G * p["tiles"] * p["slices"]
    assert p["blocks"] <= p["blocks_per_sm"] * sms  # co-resident
    assert p["blocks_per_sm"] * (p["smem_bytes"] + 1024) <= smem_sm


CONFIGS = {"seed-tasks": (2, 32, 50), "seed-branches": (3, 32, 20), "many-small": (32, 16, 64),
           "multitask": (8, 64, 256)}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("elem_bytes", [4, 2])
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("gates", [4, 3, 1])
def test_plan_benchmark_configs_on_h100(name, elem_bytes, backward, gates):
    G, B, H = CONFIGS[name]
    p = _plan(G, B, H, elem_bytes, backward, gates=gates)
    assert p["fits"], p["reason"]
    if name == "multitask" and backward and elem_bytes == 4 and gates == 4:
        # whole fp32 drec rows (4 KB) next to a 128 KB W_hh slice leave too few rows per block
        assert p["chunk"] < 4 * H
    _check_plan_invariants(p, G, B, H, elem_bytes, backward, gates=gates)
    if name == "seed-branches":
        assert p["slices"] == 1  # one block holds a whole group: no inter-block barrier at all


def test_plan_random_sizes_hold_invariants():
    rng = random.Random(1)
    fits = 0
    for _ in range(400):
        G, B, H = rng.randint(1, 64), rng.randint(1, 300), rng.randint(1, 700)
        elem_bytes, backward, gates = rng.choice([2, 4, 8]), rng.random() < 0.5, rng.choice([1, 3, 4])
        p = _plan(G, B, H, elem_bytes, backward, gates=gates)
        if p["fits"]:
            fits += 1
            _check_plan_invariants(p, G, B, H, elem_bytes, backward, gates=gates)
        else:
            assert p["reason"]
    assert 50 < fits < 400  # the sample reaches both sides of the limits


def test_plan_does_not_fit_when_one_unit_exceeds_shared_memory():
    p = _plan(1, 4, 20000, 4, False)  # 4 x 20000 x 4 B = 320 KB for a single hidden unit
    assert not p["fits"] and "shared memory" in p["reason"]
    p = _plan(200, 64, 256, 4, False)  # 1600 blocks of 128 KB: cannot all be resident
    assert not p["fits"] and "resident" in p["reason"]
    # a slice's W_hh is K x units x H: at multitask size (H = 256, fp32) an LSTM slice holds 32
    # units (8 slices per group), a GRU's 64 (4 slices), an RNN's 128 (2)
    slices = [_plan(8, 64, 256, 4, False, gates=k)["slices"] for k in (4, 3, 1)]
    assert slices == [8, 4, 2], slices


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
    with mtl_kernels.recurrence_path("per_step"):
        assert _C.get_recurrence_path() == "per_step"
        ran = _ran(lambda: small(x)[0].sum().backward())
        assert ran["forward_per_step"] == 1 and ran["backward_per_step"] == 1
    with mtl_kernels.recurrence_path("sequence"):  # at any size
        ran = _ran(lambda: large(x)[0].sum().backward())
        assert ran["forward_sequence"] == 1 and ran["backward_sequence"] == 1


def test_cpu_auto_path_is_measured_per_shape():
    """On the CPU, `auto` times both paths once per shape (on scratch inputs of that shape) and
    runs the faster one on every call: the same inputs give the same results, bit for bit."""
    _C._reset_tuned_paths()
    m = GroupedLSTM(2, 3, 7)
    x = torch.randn(5, 2, 3, requires_grad=True)
    with mtl_kernels.recurrence_path("auto"):
        runs = [_ran(lambda: m(x)[0].sum().backward()) for _ in range(3)]
        keys = {c["key"]: c for c in mtl_kernels.tuned_paths()}
        assert set(keys) == {"lstm forward 2 2 7 Float", "lstm backward 2 2 7 Float"}
        for phase in ("forward", "backward"):
            choice = keys[f"lstm {phase} 2 2 7 Float"]
            assert choice["sequence_s"] > 0 and choice["per_step_s"] > 0
            assert choice["sequence"] == (choice["sequence_s"] <= choice["per_step_s"])
            path = f"{phase}_sequence" if choice["sequence"] else f"{phase}_per_step"
            assert all(r[path] == 1 for r in runs)  # one path, every call; calibration uncounted
        with torch.no_grad():
            outs = [m(x)[0] for _ in range(3)]
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        assert "lstm inference 2 2 7 Float" in {c["key"] for c in mtl_kernels.tuned_paths()}
        m(torch.randn(5, 3, 3))  # another batch size: another shape, timed anew
        assert any(c["key"].startswith("lstm forward 2 3 7") for c in mtl_kernels.tuned_paths())


def test_path_switch_is_one_setting_for_every_thread():
    """The switch is the extension's atomic setting, not the environment: a thread sees what
    another set, and the environment variable no longer moves it once read."""
    import os
    import threading
    seen = []
    with mtl_kernels.recurrence_path("per_step"):
        os.environ["MTL_KERNELS_LSTM_PATH"] = "sequence"
        try:
            t = threading.Thread(target=lambda: seen.append(_C.get_recurrence_path()))
            t.start()
            t.join()
        finally:
            del os.environ["MTL_KERNELS_LSTM_PATH"]
    assert seen == ["per_step"]


def test_invalid_path_variable_raises():
    """MTL_KERNELS_LSTM_PATH is read once, when the extension first needs the path: a bad value
    fails then, naming the variable's choices."""
    import subprocess
    import sys
    code = ("import torch, mtl_kernels\n"
            "try:\n    mtl_kernels.GroupedLSTM(2, 3, 4)(torch.randn(5, 2, 3))\n"
            "except RuntimeError as e:\n    print('raised', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "MTL_KERNELS_LSTM_PATH": "fastest"})
    assert "raised" in out.stdout and "'auto', 'sequence' or 'per_step'" in out.stdout, out


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("H", [1, 5, 64, 129])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpu_row_parallel_matches_per_step(cell, H, dtype):
    """The CPU's whole-sequence path (rows in parallel, its own W_hh products) against its
    per-step path (MKL batched GEMMs), forward and backward, with lengths, both directions."""
    G, T, B, C = 3, 6, 5, 4
    for reverse in (False, True):
        args = recurrence_args(cell, G, T, B, C, H, dtype, shared=False, bias=True, lengths=True)
        grads = recurrence_grads(cell, G, T, B, H, dtype)
        results = {}
        for path in ("sequence", "per_step"):
            with mtl_kernels.recurrence_path(path):
                ran = _ran(lambda: results.setdefault(path, []).extend(
                    (fwd := ops.grouped_recurrence_forward(cell, *args, reverse))
                    + ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, fwd,
                                                                           reverse))))
            assert ran[f"forward_{path}"] == 1 and ran[f"backward_{path}"] == 1
        # fp64: the two paths sum the W_hh products in different orders
        tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-2)
        assert_all_close(results["sequence"], results["per_step"], **tol)
