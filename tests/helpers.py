"""Test helpers shared by the test files: inputs of the recurrence ops for any cell, comparisons."""
import torch

CELLS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
HAS_C = {"lstm": True, "gru": False, "rnn_tanh": False, "rnn_relu": False}


def cpu_flags():
    """The CPU's feature flags as the kernel reports them (/proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# x86-64-v4's AVX-512 subsets (the row loops' target_clones in csrc/recurrence/cpu.cpp)
X86_64_V4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def cpu_code_paths():
    """The CPU-specific code this machine runs: the fp32 register tiles (AVX2 + FMA, chosen at run
    time by the extension), the row loops' target clone (GCC's resolver picks x86-64-v4 where all
    its AVX-512 subsets are present, v3 with AVX2 + FMA), and ATen's own CPU capability (what
    nn.LSTM and the MKL / oneDNN products use)."""
    from mtl_kernels import _C
    flags = cpu_flags()
    clone = ("x86-64-v4 (AVX-512)" if X86_64_V4 <= flags else
             "x86-64-v3 (AVX2)" if {"avx2", "fma"} <= flags else "default")
    tiles = ("AVX-512 (auto) and AVX2+FMA" if _C._cpu_tiles_avx512_supported() else
             "AVX2+FMA" if _C._cpu_tiles_supported() else "off (no AVX2+FMA)")
    return {"fp32 tiles": tiles,
            "row loops": clone,
            "avx512_bf16": "avx512_bf16" in flags,
            "ATen": torch.backends.cpu.get_cpu_capability()}


def randn(g, *shape, dtype=torch.float64, device="cpu", scale=1.0):
    """Fresh normal values drawn in fp64 on the CPU (so every dtype sees the same values, rounded)."""
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def recurrence_args(cell, G, T, B, C, H, dtype=torch.float64, shared=True, bias=True,
                    lengths=False, seed=0, device="cpu", proj=0, w_scale=0.5):
    """grouped_recurrence_forward's arguments after `cell` and before `reverse`:
    (input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths)."""
    g = torch.Generator().manual_seed(seed)
    K, R = GATES[cell], proj or H
    r = lambda *s, scale=1.0: randn(g, *s, dtype=dtype, device=device, scale=scale)  # noqa: E731
    x = r(T, B, C) if shared else r(G, T, B, C)
    w_ih, w_hh = r(G, K * H, C, scale=w_scale), r(G, K * H, R, scale=w_scale)
    b = r(G, K * H) if bias else None
    b_hh = r(G, K * H) if bias and cell == "gru" else None
    w_hr = r(G, proj, H, scale=w_scale) if proj else None
    h0 = r(G, B, R)
    c0 = r(G, B, H) if HAS_C[cell] else None
    L = torch.randint(1, T + 1, (B,), generator=g).to(device) if lengths else None
    return x, w_ih, w_hh, b, b_hh, w_hr, h0, c0, L


def recurrence_grads(cell, G, T, B, H, dtype=torch.float64, seed=1, device="cpu", proj=0):
    """The backward's incoming gradients: (grad_output, grad_h_n, grad_c_n or None)."""
    g = torch.Generator().manual_seed(seed)
    R = proj or H
    r = lambda *s: randn(g, *s, dtype=dtype, device=device)  # noqa: E731
    return r(G, T, B, R), r(G, B, R), (r(G, B, H) if HAS_C[cell] else None)


def backward_args(cell, grads, args, fwd, reverse):
    """grouped_recurrence_backward's arguments after `cell`, from the forward's arguments and results."""
    x, w_ih, w_hh, _, _, w_hr, _, _, L = args
    return (*grads, x, w_ih, w_hh, w_hr, fwd[3], fwd[4], fwd[5], L, reverse)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def assert_close_to_truth(got, truth, bound, what="result"):
    """Reduced-precision results against fp64 computed from the same rounded inputs, by
    norm-relative error: each of `got` within `bound` of its `truth`, and none NaN-poisoned. The
    rule for every bf16 / fp16 comparison in these tests: an elementwise bound between two
    reduced-precision paths (or against fp64 of unrounded inputs) depends on the CPU's arithmetic
    (MKL / oneDNN round differently on AVX-512 than on AVX2) and fails on a few elements."""
    for i, (a, t) in enumerate(zip(got, truth)):
        if a is None or not a.numel():
            continue
        assert not a.isnan().any(), f"{what} {i} has unwritten (NaN-poisoned) elements"
        err = rel_err(a, t)
        assert err <= bound, f"{what} {i}: norm-relative error {err:.3g} against fp64 > {bound:g}"


def rounded_fp64(module, dtype):
    """A float64 copy of `module` whose parameters are first rounded to `dtype`: the exact
    arithmetic of the weights a `dtype` run sees."""
    import copy
    ref = copy.deepcopy(module)
    with torch.no_grad():
        for p in ref.parameters():
            p.data = p.data.to(dtype).double()
    return ref.double()


def assert_all_close(got, want, **tol):
    """Every result close, and none NaN-poisoned (an element no kernel wrote)."""
    for i, (a, b) in enumerate(zip(got, want)):
        assert not a.isnan().any(), f"result {i} has unwritten (NaN-poisoned) elements"
        torch.testing.assert_close(a, b, msg=lambda m: f"result {i}: {m}", **tol)


def upcast(tensors):
    return [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]
