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
from helpers import (CELLS, GATES, assert_all_close, assert_close_to_truth, backward_args,
                     cpu_code_paths, cpu_flags, recurrence_args, recurrence_grads, rel_err, upcast)
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
    r4 = lambda x: -(-x // 4) * 4  # noqa: E731  (W_hh and tile rows zero-padded to column quads)
    w_elems = r4(gates * H) * p["units"] if backward else gates * p["units"] * r4(H)
    w_bytes = -(-w_elems * elem_bytes // 16) * 16
    assert p["smem_bytes"] == w_bytes + p["tile_rows"] * r4(cols) * elem_bytes <= smem_block
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


def test_auto_paths_name_each_backends_choice():
    """`auto` is measured on the CPU and per step on a GPU (the persistent kernels stay opt-in
    until a recorded GPU run verifies them: README, "What has run on a GPU")."""
    paths = mtl_kernels.auto_paths()
    assert paths["cpu"] == "tuned"
    built_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(
        "mtl_kernels::grouped_recurrence_forward", "CUDA")
    assert ("cuda" in paths) == built_cuda, paths
    if built_cuda:
        assert paths["cuda"] == "per_step", paths


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


def test_cpu_specific_code_follows_the_cpu_flags(record_property):
    """The fp32 register tiles run exactly where the CPU has AVX2 and FMA (the extension's own
    run-time check against the kernel's flags); which CPU-specific code ran is recorded with the
    test (and in the session header: conftest.pytest_report_header)."""
    paths = cpu_code_paths()
    for name, value in paths.items():
        record_property(name, value)
    flags = cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to check the extension's CPU checks against")
    if "sse2" not in flags:  # every x86-64 CPU has SSE2
        pytest.skip("not an x86-64 CPU: the tiles and target clones are x86-64 only")
    assert _C._cpu_tiles_supported() == ({"avx2", "fma"} <= flags), paths


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("H", [1, 5, 64, 129])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_row_parallel_matches_per_step(cell, H, dtype):
    """The CPU's whole-sequence path (rows in parallel, its own W_hh products: in fp32 on AVX2 the
    register-tiled products of cpu_tiles.h, whose 6-row blocks and 16-column panels B = 13 and
    K * H = 20, 516 leave partial) against its per-step path (MKL batched GEMMs), forward and
    backward, with lengths, both directions. fp64 / fp32: elementwise, path against path. bf16:
    each path against fp64 on the same rounded inputs by norm-relative error: the forward against
    the fp64 forward of the rounded arguments, the backward against the fp64 backward of the
    rounded arguments and of that path's own saved forward (so that a ReLU whose pre-activation
    rounds across zero is masked alike). Two bf16 paths differ elementwise by a CPU-dependent
    amount: MKL / oneDNN's bf16 GEMMs round differently on AVX-512 than on AVX2."""
    G, T, B, C = 3, 6, 13, 4
    for reverse in (False, True):
        args = recurrence_args(cell, G, T, B, C, H, dtype, shared=False, bias=True, lengths=True)
        grads = recurrence_grads(cell, G, T, B, H, dtype)
        results = {}
        for path in ("sequence", "per_step"):
            with mtl_kernels.recurrence_path(path):
                ran = _ran(lambda: results.__setitem__(path, _forward_backward(cell, args, grads,
                                                                              reverse)))
            assert ran[f"forward_{path}"] == 1 and ran[f"backward_{path}"] == 1
        if dtype == torch.bfloat16:
            truth_f = ops.grouped_recurrence_forward(cell, *upcast(args), reverse)
            for path, (fwd, bwd) in results.items():
                truth_b = ops.grouped_recurrence_backward(
                    cell, *backward_args(cell, upcast(grads), upcast(args), upcast(fwd), reverse))
                assert_close_to_truth(fwd, truth_f, 2e-2, f"{path} forward result")
                assert_close_to_truth(bwd, truth_b, 2e-2, f"{path} backward result")
            continue
        # fp64: the two paths sum the W_hh products in different orders
        tol = {torch.float64: dict(rtol=1e-10, atol=1e-10),
               torch.float32: dict(rtol=1e-4, atol=1e-5)}[dtype]
        assert_all_close(sum(map(list, results["sequence"]), []),
                         sum(map(list, results["per_step"]), []), **tol)


def _forward_backward(cell, args, grads, reverse):
    """(the forward op's results, the backward op's on them)."""
    fwd = ops.grouped_recurrence_forward(cell, *args, reverse)
    return fwd, ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, fwd, reverse))


# ---- the tensor-core variant (persistent_mma.h): fragment layouts, emulator, planner ----------
MMA_KS = [16, 8]  # m16n8k16 (bf16 / fp16) and m16n8k8 (tf32)


@pytest.mark.parametrize("mma_k", MMA_KS)
@pytest.mark.parametrize("operand", ["a", "b", "c"])
def test_mma_fragment_map_is_a_bijection(mma_k, operand):
    """Each (lane, element) of a fragment holds a distinct element of its matrix, and together
    they cover it: A 16 x k, B k x 8, C 16 x 8 (the PTX ISA's fragment layouts)."""
    shape = {"a": (16, mma_k), "b": (mma_k, 8), "c": (16, 8)}[operand]
    per_lane = {"a": mma_k // 2, "b": mma_k // 4, "c": 4}[operand]
    m = _C.mma_fragment_map(mma_k, operand)
    assert len(m) == 32 * per_lane == shape[0] * shape[1]
    assert sorted((lane, e) for lane, e, _, _ in m) == [(l, e) for l in range(32) for e in range(per_lane)]
    cells = {(r, c) for _, _, r, c in m}
    assert cells == {(r, c) for r in range(shape[0]) for c in range(shape[1])}


def _ptx_isa_fragments(mma_k, operand, lane, i):
    """Row and column of element i (a_i / b_i / c_i, low to high) of `lane`, as the PTX ISA's
    "Matrix Fragments for mma.m16n8k16" (.bf16 / .f16) and "mma.m16n8k8" (.tf32) sections state."""
    g, t = lane >> 2, lane % 4  # groupID, threadID_in_group
    if operand == "c":  # fp32 accumulators, both shapes
        return (g if i < 2 else g + 8), t * 2 + (i & 1)
    if mma_k == 16:
        if operand == "a":
            row = g if (0 <= i < 2 or 4 <= i < 6) else g + 8
            col = t * 2 + (i & 1) if i < 4 else t * 2 + (i & 1) + 8
            return row, col
        return (t * 2 + (i & 1) if i < 2 else t * 2 + (i & 1) + 8), g  # b: (row = k, col = n)
    if operand == "a":
        return (g if i in (0, 2) else g + 8), (t if i in (0, 1) else t + 4)
    return (t if i == 0 else t + 4), g


@pytest.mark.parametrize("mma_k", MMA_KS)
@pytest.mark.parametrize("operand", ["a", "b", "c"])
def test_mma_fragment_map_matches_the_ptx_isa(mma_k, operand):
    """Every (lane, element) of the mapping functions against the PTX ISA's formulas."""
    for lane, i, row, col in _C.mma_fragment_map(mma_k, operand):
        assert (row, col) == _ptx_isa_fragments(mma_k, operand, lane, i), (lane, i)


@pytest.mark.parametrize("mma_k", MMA_KS)
def test_mma_ldmatrix_addresses_give_the_a_layout(mma_k):
    """The kernels' per-lane ldmatrix.x4 row addresses, through ldmatrix's documented semantics
    (lanes 8i..8i+7 address matrix i's rows; lane l receives word l % 4 of row l / 4 of each),
    load exactly the A fragment layout, at an offset inside a padded tile."""
    assert sorted(_C.mma_fragment_map(mma_k, "ldmatrix")) == sorted(_C.mma_fragment_map(mma_k, "a"))


def _mma_forward_both(cell, args, reverse, tiling):
    ref = ops.grouped_recurrence_forward(cell, *args, reverse)
    emu = ops._grouped_recurrence_forward_emulated_mma(cell, *args, reverse, *tiling)
    return ref, emu


# (G, T, B, C, H, (units, tile_rows, reg_ktiles, backward chunk_ktiles)): one partial octet (H < 8);
# two warps, the second partial, and two m-tiles, the second partial, drec fills of one k-tile;
# W_hh fragments all in shared memory (reg 0), three slices and three tiles that do not divide H
# and B; k padding (H = 40: 3 k-tiles of 16 or 5 of 8), 1 k-tile in registers and the rest in
# shared memory, fills of 3 k-tiles (a partial last one); 5 warps and 4 m-tiles; all ones; two
# slices, three tiles, 2 k-tiles in registers, fills of 5 k-tiles.
MMA_TILINGS = [
    (3, 5, 7, 4, 6, (6, 7, -1, 0)),
    (2, 4, 20, 3, 12, (12, 20, -1, 1)),
    (2, 3, 37, 3, 20, (8, 17, 0, 2)),
    (1, 3, 5, 2, 40, (16, 5, 1, 3)),
    (2, 2, 64, 3, 33, (33, 64, -1, 0)),
    (1, 1, 1, 1, 1, (1, 1, -1, 0)),
    (3, 4, 9, 2, 17, (9, 4, 2, 5)),
]


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("G,T,B,C,H,tiling", MMA_TILINGS)
@pytest.mark.parametrize("mma_k", MMA_KS)
@pytest.mark.parametrize("reverse,shared,bias,lengths", [(False, True, True, True),
                                                         (True, False, False, True),
                                                         (True, True, False, False)])
def test_emulated_mma_matches_per_step_fp64(cell, G, T, B, C, H, tiling, mma_k, reverse, shared,
                                           bias, lengths):
    """fp64 through the tensor-core variant's fragments (either layout), exactly: its tiling,
    fragment mapping, ldmatrix addresses, padding, register/shared-memory split and chunked drec
    fills against the per-step op to fp64 rounding."""
    units, tile_rows, reg, chunk = tiling
    args = recurrence_args(cell, G, T, B, C, H, shared=shared, bias=bias, lengths=lengths)
    ref, emu = _mma_forward_both(cell, args, reverse, (units, tile_rows, reg, mma_k))
    assert_all_close(emu, ref, **TOL[torch.float64])
    grads = recurrence_grads(cell, G, T, B, H)
    ref_b = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, ref, reverse))
    emu_b = ops._grouped_recurrence_backward_emulated_mma(
        cell, *backward_args(cell, grads, args, emu, reverse), units, tile_rows, reg, mma_k, chunk)
    assert_all_close(emu_b, ref_b, **TOL[torch.float64])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype,mma_k", [(torch.bfloat16, 16), (torch.float16, 16),
                                         (torch.float32, 8)])
def test_emulated_mma_half_and_tf32(cell, dtype, mma_k):
    """bf16 / fp16 (m16n8k16) and fp32 with TF32 operands (m16n8k8), fp32 accumulation, against
    fp64 on the same rounded inputs by norm-relative error: bf16 / fp16 as accurate as the per-step
    path in the same dtype (within 1.5x) or within 1e-2; TF32 within 1e-2, and measurably less
    accurate than fp32 (the operands are rounded to 10 mantissa bits, as on the GPU)."""
    G, T, B, C, H = 3, 6, 21, 4, 40
    tiling = (24, 18, 1, mma_k)  # 2 slices, 2 tiles, 2 m-tiles per tile, registers and smem
    args = recurrence_args(cell, G, T, B, C, H, dtype, shared=False, bias=True, lengths=True)
    args64 = upcast(args)
    truth = ops.grouped_recurrence_forward(cell, *args64, False)
    ref, emu = _mma_forward_both(cell, args, False, tiling)
    assert emu[5].dtype == (torch.float32 if dtype != torch.float32 else dtype)  # fp32 aux
    grads = recurrence_grads(cell, G, T, B, H, dtype)
    truth_b = ops.grouped_recurrence_backward(
        cell, *backward_args(cell, upcast(grads), args64, truth, False))
    ref_b = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, ref, False))
    emu_b = ops._grouped_recurrence_backward_emulated_mma(
        cell, *backward_args(cell, grads, args, emu, False), *tiling, 2)  # fills of 2 k-tiles
    for what, got, want, per_step in (("forward", emu, truth, ref), ("backward", emu_b, truth_b, ref_b)):
        for i in range(len(got)):
            assert not got[i].isnan().any(), (what, i)
            if not got[i].numel():
                continue
            err, ref_err = rel_err(got[i], want[i]), rel_err(per_step[i], want[i])
            if dtype == torch.float32:
                assert err <= 1e-2, (what, i, err)
            else:
                assert err <= max(1.5 * ref_err, 1e-2), (what, i, err, ref_err)
    if dtype == torch.float32:  # the recurrent sums saw TF32 operands: h_n is off by ~1e-4..1e-3
        assert rel_err(emu[1], truth[1]) > 10 * rel_err(ref[1], truth[1])


@pytest.mark.parametrize("cell", CELLS)
def test_emulated_mma_paths_mix(cell):
    """The tensor-core variant saves the per-step path's tensors: either backward runs on either
    forward's."""
    G, T, B, C, H, tiling = 2, 5, 19, 3, 10, (8, 18, 0, 16)
    args = recurrence_args(cell, G, T, B, C, H, shared=True, bias=True, lengths=True)
    grads = recurrence_grads(cell, G, T, B, H)
    per_step, emulated = _mma_forward_both(cell, args, False, tiling)
    want = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, per_step, False))
    got_1 = ops._grouped_recurrence_backward_emulated_mma(
        cell, *backward_args(cell, grads, args, per_step, False), *tiling)
    got_2 = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, emulated, False))
    assert_all_close(got_1, want, **TOL[torch.float64])
    assert_all_close(got_2, want, **TOL[torch.float64])


@pytest.mark.parametrize("cell", CELLS)
def test_emulated_mma_random_tilings(cell):
    rng = random.Random(3)
    for seed in range(6):
        G, T, B, C, H = (rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 70), rng.randint(1, 4),
                         rng.randint(1, 70))
        mma_k = rng.choice(MMA_KS)
        units, tile_rows = rng.randint(1, min(H, 64)), rng.randint(1, min(B, 64))
        reg = rng.choice([-1, 0, rng.randint(0, min(-(-H // mma_k), 48 // GATES[cell]))])
        tiling = (units, tile_rows, reg, mma_k)
        chunk = rng.choice([0, rng.randint(1, 8)])
        shared, bias, lengths, reverse = (rng.random() < 0.5 for _ in range(4))
        args = recurrence_args(cell, G, T, B, C, H, shared=shared, bias=bias, lengths=lengths,
                               seed=seed)
        ref, emu = _mma_forward_both(cell, args, reverse, tiling)
        assert_all_close(emu, ref, **TOL[torch.float64])
        grads = recurrence_grads(cell, G, T, B, H, seed=seed)
        ref_b = ops.grouped_recurrence_backward(cell, *backward_args(cell, grads, args, ref, reverse))
        emu_b = ops._grouped_recurrence_backward_emulated_mma(
            cell, *backward_args(cell, grads, args, emu, reverse), *tiling, chunk)
        assert_all_close(emu_b, ref_b, **TOL[torch.float64])


@pytest.mark.parametrize("tiling", [(0, 2, -1, 16), (6, 2, -1, 16), (2, 5, -1, 16),
                                    (2, 4, 2, 16), (2, 4, -1, 4), (2, 0, -1, 8)])
def test_emulated_mma_rejects_invalid_tiling(tiling):
    # units 0 or > H = 5, tile_rows > B = 4 or 0, reg_ktiles beyond the k-tiles (H = 5: 1), mma_k 4
    args = recurrence_args("lstm", 2, 3, 4, 3, 5)
    with pytest.raises(RuntimeError, match="invalid tiling"):
        ops._grouped_recurrence_forward_emulated_mma("lstm", *args, False, *tiling)


def test_emulated_mma_too_large_and_dtype_checks():
    args = recurrence_args("rnn_tanh", 1, 2, 70, 2, 80)
    with pytest.raises(RuntimeError, match="invalid tiling"):  # > 64 units, > 64 rows per block
        ops._grouped_recurrence_forward_emulated_mma("rnn_tanh", *args, False, 72, 8, -1, 16)
    with pytest.raises(RuntimeError, match="invalid tiling"):
        ops._grouped_recurrence_forward_emulated_mma("rnn_tanh", *args, False, 8, 65, -1, 16)
    for dtype, bad_k in ((torch.bfloat16, 8), (torch.float16, 8), (torch.float32, 16)):
        args = recurrence_args("lstm", 1, 2, 3, 2, 4, dtype)
        with pytest.raises(RuntimeError, match="does not apply to this dtype"):
            ops._grouped_recurrence_forward_emulated_mma("lstm", *args, False, 4, 3, -1, bad_k)


@pytest.mark.parametrize("cell", CELLS)
def test_emulated_mma_ops_opcheck(cell):
    args = recurrence_args(cell, 2, 3, 4, 3, 5, lengths=True)
    tiling = (3, 4, -1, 8)
    torch.library.opcheck(ops._grouped_recurrence_forward_emulated_mma, (cell, *args, False, *tiling))
    fwd = ops._grouped_recurrence_forward_emulated_mma(cell, *args, False, *tiling)
    grads = recurrence_grads(cell, 2, 3, 4, 5)
    torch.library.opcheck(ops._grouped_recurrence_backward_emulated_mma,
                          (cell, *backward_args(cell, grads, args, fwd, False), *tiling, 1))


def _mma_plan(G, B, H, elem_bytes, backward, limits=H100, gates=4, mma_k=16):
    return _C.persistent_mma_plan(G, B, H, elem_bytes, backward, *limits, gates, mma_k)


def _check_mma_plan_invariants(p, G, B, H, elem_bytes, backward, limits=H100, gates=4, mma_k=16):
    sms, smem_block, smem_sm, threads_sm, threads_block = limits
    assert p["gates"] == gates and p["mma_k"] == mma_k
    assert 1 <= p["units"] <= min(H, 64) and p["warps"] == -(-p["units"] // 8)
    assert p["slices"] == -(-H // p["units"])
    assert 1 <= p["tile_rows"] <= min(B, 64) and p["tiles"] == -(-B // p["tile_rows"])
    assert p["mtiles"] == -(-p["tile_rows"] // 16)
    kdim = gates * H if backward else H
    assert p["ktiles"] == -(-kdim // mma_k)
    reg_max = min(p["ktiles"], 48 if backward else 48 // gates)  # 96 registers of fragments
    assert p["reg_ktiles"] == reg_max  # the planner fills the registers first
    assert 1 <= p["chunk_ktiles"] <= p["ktiles"] and (backward or p["chunk_ktiles"] == p["ktiles"])
    n_tiles = 1 if backward else gates
    w_smem = (p["ktiles"] - p["reg_ktiles"]) * p["warps"] * n_tiles * 32 * (mma_k // 4) * elem_bytes
    assert p["w_smem_bytes"] == w_smem
    stride = p["chunk_ktiles"] * mma_k + mma_k // 2
    assert p["tile_stride"] == stride and (stride * elem_bytes // 16) % 2 == 1  # ldmatrix: no conflicts
    tile = 16 * p["mtiles"] * stride * elem_bytes
    state = (3 if backward else 1) * p["warps"] * p["mtiles"] * 32 * 4 * 4
    assert p["state_bytes"] == state
    assert p["smem_bytes"] == -(-w_smem // 16) * 16 + -(-tile // 16) * 16 + state <= smem_block
    assert p["threads"] == 32 * p["warps"] <= min(256, threads_block)
    assert p["blocks"] == G * p["tiles"] * p["slices"] <= p["blocks_per_sm"] * sms
    assert p["blocks_per_sm"] * p["threads"] * 256 <= 65536  # registers: <= 256 per thread assumed
    assert p["blocks_per_sm"] * (p["smem_bytes"] + 1024) <= smem_sm


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("elem_bytes,mma_k", [(2, 16), (4, 8)])
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("gates", [4, 3, 1])
def test_mma_plan_benchmark_configs_on_h100(name, elem_bytes, mma_k, backward, gates):
    G, B, H = CONFIGS[name]
    p = _mma_plan(G, B, H, elem_bytes, backward, gates=gates, mma_k=mma_k)
    assert p["fits"], p["reason"]
    _check_mma_plan_invariants(p, G, B, H, elem_bytes, backward, gates=gates, mma_k=mma_k)
    assert p["blocks"] <= 132  # one block per SM in all of these
    if name in ("seed-tasks", "seed-branches", "many-small"):
        assert p["slices"] == 1 and p["w_smem_bytes"] == 0  # whole groups, W_hh in registers


def test_mma_plan_multitask():
    """Multitask (G=8, B=64, H=256), the LSTM: 4 slices of 64 units (8 warps), tiles of 16 rows:
    128 blocks. bf16: 12 of the forward's 16 k-tiles of W_hh fragments in registers, 48 of the
    backward's 64, the rest (32 KB) in shared memory; TF32 (k-tiles 8 wide): 12 of 32 and 48 of 128,
    160 KB in shared memory, and the backward fills drec in two chunks of 64 k-tiles."""
    for backward in (False, True):
        p = _mma_plan(8, 64, 256, 2, backward)
        assert (p["units"], p["slices"], p["tile_rows"], p["blocks"]) == (64, 4, 16, 128), p
        assert p["ktiles"] == (64 if backward else 16) and p["reg_ktiles"] == (48 if backward else 12)
        assert p["w_smem_bytes"] == 32 * 1024 and p["chunk_ktiles"] == p["ktiles"]
        p = _mma_plan(8, 64, 256, 4, backward, mma_k=8)
        assert (p["units"], p["slices"], p["tile_rows"], p["blocks"]) == (64, 4, 16, 128), p
        assert p["ktiles"] == (128 if backward else 32) and p["reg_ktiles"] == (48 if backward else 12)
        assert p["w_smem_bytes"] == 160 * 1024
        assert p["chunk_ktiles"] == (64 if backward else 32)


def test_mma_plan_random_sizes_hold_invariants():
    rng = random.Random(4)
    fits = 0
    for _ in range(400):
        G, B, H = rng.randint(1, 64), rng.randint(1, 300), rng.randint(1, 700)
        (elem_bytes, mma_k), backward = rng.choice([(2, 16), (4, 8)]), rng.random() < 0.5
        gates = rng.choice([1, 3, 4])
        p = _mma_plan(G, B, H, elem_bytes, backward, gates=gates, mma_k=mma_k)
        if p["fits"]:
            fits += 1
            _check_mma_plan_invariants(p, G, B, H, elem_bytes, backward, gates=gates, mma_k=mma_k)
        else:
            assert p["reason"]
    assert 50 < fits < 400


def test_mma_plan_does_not_fit():
    p = _mma_plan(200, 64, 256, 2, False)  # 200 groups x 4 slices: not resident at once
    assert not p["fits"] and "resident" in p["reason"]
    for backward in (False, True):  # wide (G=4, B=128, H=512) bf16: 8 slices x 4 tiles of 32 rows
        p = _mma_plan(4, 128, 512, 2, backward)
        assert p["fits"] and p["blocks"] == 128 and p["tile_rows"] == 32, p


def test_tensor_core_switch():
    assert _C.get_tensor_cores() in ("auto", "off")
    with pytest.raises(ValueError):
        with mtl_kernels.tensor_cores("on"):
            pass
    with mtl_kernels.tensor_cores("off"):
        assert _C.get_tensor_cores() == "off"
        with mtl_kernels.tensor_cores("auto"):
            assert _C.get_tensor_cores() == "auto"
        assert _C.get_tensor_cores() == "off"
    before = mtl_kernels.tensor_core_counts()
    GroupedLSTM(2, 3, 16)(torch.randn(4, 2, 3))  # the CPU never runs the GPU's kernels
    assert mtl_kernels.tensor_core_counts() == before
