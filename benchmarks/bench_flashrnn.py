"""GroupedLSTM against FlashRNN's fused multi-head LSTM (PyPI `flashrnn` 1.0.8, Apache-2.0), same run.

G independent LSTMs are FlashRNN's heads: heads = G, head dim = H (its heads are block-diagonal
recurrent weights, i.e. G independent LSTMs of size H over one batch). Sizes: multitask (G=8, B=64,
T=128, C=128, H=256) and many-small (G=32, B=16, T=64, C=64, H=64), per-group inputs; forward and
forward+backward; fp32 (TF32 off) and bf16. FlashRNN's batch must be a multiple of 8 (16 in fp32,
it pads otherwise): both sizes are.

Input projection: INCLUDED IN BOTH TIMINGS. FlashRNN's kernel starts from the gate pre-activations
Wx; here they come from one batched GEMM (x @ W_ih^T per group, torch.bmm) in the timed region, as
GroupedLSTM computes them inside its op. The forward+backward times include the gradients of W_ih,
W_hh and the bias for both (the input x needs none).

FlashRNN API used (read from the 1.0.8 wheel's flashrnn/flashrnn/flashrnn.py; the mapping is checked
against its pure-PyTorch "vanilla" backend by --check-vanilla, which runs on the CPU too):
  flashrnn(Wx, R, b, states=None, function="lstm", backend="cuda_fused", dtype="bfloat16")
    Wx (B, T, 4, heads, D)  gate inputs, layout "BTGHD"
    R  (4, heads, D, D)     R[g, h, d, p] = W_hh[h][g*D + d, p]  (layout "GHDP")
    b  (4, heads, D)        b_ih + b_hh (layout "GHD")
    gate order i, f, z(=g), o: nn.LSTM's; returns (states (2, B, T, heads, D), last states), with
    states[0] = h and states[1] = c.
  backends: "cuda_fused" (the fused persistent kernel: compiled on first use with
  torch.utils.cpp_extension.load, and re-compiled while it searches its tiling parameters),
  "cuda" (alternating GEMM + pointwise kernels), "triton_fused", "vanilla" (PyTorch).
Its first call (compilation) is timed and reported separately; the build cache goes to
$TORCH_EXTENSIONS_DIR (device_check.sh points it into build/ so a warm machine keeps it).

Every FlashRNN call is in try/except: an error is printed and recorded, and the run goes on.
Results: one JSON object per line (--json FILE, appended as each measurement finishes).

  python benchmarks/bench_flashrnn.py [--cases multitask:bfloat16,many-small:float32,...]
        [--backends cuda_fused[,triton_fused,cuda]] [--json FILE] [--repeats N] [--min-time S]
  python benchmarks/bench_flashrnn.py --check-vanilla [--device cpu]   (the layout mapping)
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import mtl_kernels  # noqa: E402
from mtl_kernels import GroupedLSTM  # noqa: E402
from envinfo import describe  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)
from timing import median_time  # noqa: E402

CONFIGS = {  # name: (G, B, T, C, H), per-group inputs
    "multitask": (8, 64, 128, 128, 256),
    "many-small": (32, 16, 64, 64, 64),
}
DEFAULT_CASES = "multitask:bfloat16,many-small:bfloat16,multitask:float32,many-small:float32"
PROJECTION = "included in both (FlashRNN: torch.bmm x @ W_ih^T + its layout permute, timed)"


def import_flashrnn():
    try:
        from flashrnn import flashrnn
        return flashrnn, None
    except Exception as e:  # noqa: BLE001  (any import failure: report it)
        return None, f"{type(e).__name__}: {e}"


def make_params(G, C, H, seed=0):
    """nn.LSTM-style parameters for G groups, fp32 on the CPU."""
    torch.manual_seed(seed)
    m = GroupedLSTM(G, C, H)
    return {k: getattr(m, k).detach().clone() for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                                         "bias_hh_l0")}


def grouped_impl(params, device, dtype):
    """GroupedLSTM with these parameters: (forward(x) -> (G, T, B, H), leaves for the gradients)."""
    w = params["weight_ih_l0"]
    G, H4, C = w.shape
    m = GroupedLSTM(G, C, H4 // 4).to(device, dtype)
    with torch.no_grad():
        for k, v in params.items():
            getattr(m, k).copy_(v)
    return (lambda x: m(x)[0]), [m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0]


def flashrnn_impl(flashrnn, backend, params, device, dtype):
    """FlashRNN's LSTM with the same parameters, heads = G, head dim = H, projection included."""
    G, H4, C = params["weight_ih_l0"].shape
    H = H4 // 4
    w_ih = params["weight_ih_l0"].to(device, dtype).requires_grad_()
    w_hh = params["weight_hh_l0"].to(device, dtype).requires_grad_()
    bias = (params["bias_ih_l0"] + params["bias_hh_l0"]).to(device, dtype).requires_grad_()
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
                  torch.float64: "float64"}[dtype]

    def forward(x):
        G_, T, B, C_ = x.shape
        gx = torch.bmm(x.reshape(G, T * B, C), w_ih.transpose(1, 2))           # (G, T*B, 4H)
        Wx = gx.view(G, T, B, 4, H).permute(2, 1, 3, 0, 4)                      # (B, T, 4, G, H)
        R = w_hh.view(G, 4, H, H).permute(1, 0, 2, 3)                           # (4, G, H, H)
        b = bias.view(G, 4, H).permute(1, 0, 2)                                 # (4, G, H)
        states, _ = flashrnn(Wx, R, b, function="lstm", backend=backend, dtype=dtype_name)
        return states[0].permute(2, 1, 0, 3)                                    # (G, T, B, H)

    return forward, [w_ih, w_hh, bias]


def outputs_and_grads(forward, leaves, x, grad):
    for p in leaves:
        p.grad = None
    out = forward(x)
    out.backward(grad)
    return [out.detach()] + [p.grad.detach().clone() for p in leaves]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check_vanilla(flashrnn, device):
    """FlashRNN's PyTorch backend against GroupedLSTM in fp64: output and the three gradients."""
    G, B, T, C, H = 3, 8, 7, 5, 16
    params = make_params(G, C, H)
    params = {k: v.double() for k, v in params.items()}
    x = torch.randn(G, T, B, C, dtype=torch.float64, device=device)
    grad = torch.randn(G, T, B, H, dtype=torch.float64, device=device)
    want = outputs_and_grads(*grouped_impl(params, device, torch.float64), x, grad)
    got = outputs_and_grads(*flashrnn_impl(flashrnn, "vanilla", params, device, torch.float64), x, grad)
    errs = {n: rel_err(a, b) for n, a, b in zip(("out", "d_w_ih", "d_w_hh", "d_bias"), got, want)}
    ok = all(e < 1e-12 for e in errs.values())
    print(f"check-vanilla ({device}, fp64, G={G} B={B} T={T} C={C} H={H}): rel. errors {errs} -> "
          f"{'layout mapping OK' if ok else 'MAPPING WRONG'}")
    return ok


def time_pair(forward, leaves, x, grad, device, args):
    with torch.no_grad():
        t_f = median_time(lambda: forward(x), device, args.warmup, args.repeats, args.min_time)
    t_fb = median_time(lambda: forward(x).backward(grad), device, args.warmup, args.repeats, args.min_time)
    return t_f * 1e3, t_fb * 1e3


def run_case(name, dtype, flashrnn, backends, device, args, emit):
    G, B, T, C, H = CONFIGS[name]
    assert B % 8 == 0, "FlashRNN's batch must be a multiple of 8"
    dt = getattr(torch, dtype)
    params = make_params(G, C, H)
    params_rounded = {k: v.to(dt).float() for k, v in params.items()}  # every impl sees the same values
    g = torch.Generator().manual_seed(1)
    x = torch.randn(G, T, B, C, generator=g).to(device, dt)
    grad = torch.randn(G, T, B, H, generator=g).to(device, dt)
    base = {"config": name, "G": G, "B": B, "T": T, "C": C, "H": H, "dtype": dtype, "projection": PROJECTION}
    with mtl_kernels.recurrence_path("per_step"):  # fp64 truth, independent of the kernel under test
        truth = outputs_and_grads(*grouped_impl({k: v.double() for k, v in params_rounded.items()},
                                                device, torch.float64), x.double(), grad.double())
    rows = []

    def accuracy(forward, leaves):
        got = outputs_and_grads(forward, leaves, x, grad)
        return {n: rel_err(a, b) for n, a, b in zip(("out", "d_w_ih", "d_w_hh", "d_bias"), got, truth)}

    for path in ("sequence", "per_step"):
        rec = dict(base, impl=f"GroupedLSTM {path}")
        with mtl_kernels.recurrence_path(path):
            fwd, leaves = grouped_impl(params_rounded, device, dt)
            before = mtl_kernels.path_counts()
            rec["rel_err_vs_fp64"] = accuracy(fwd, leaves)
            after = mtl_kernels.path_counts()
            rec["ran"] = {k: after[k] - before[k] for k in after}
            rec["fwd_ms"], rec["fwdbwd_ms"] = time_pair(fwd, leaves, x, grad, device, args)
        rows.append(rec)
        emit(rec)
    for backend in backends:
        rec = dict(base, impl=f"FlashRNN {backend}")
        try:
            fwd, leaves = flashrnn_impl(flashrnn, backend, params_rounded, device, dt)
            t0 = time.perf_counter()
            with torch.no_grad():
                fwd(x)
            torch.cuda.synchronize()
            rec["first_forward_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            fwd(x).backward(grad)  # a backward module may compile on first use too
            torch.cuda.synchronize()
            rec["first_fwdbwd_s"] = time.perf_counter() - t0
            rec["rel_err_vs_fp64"] = accuracy(fwd, leaves)
            rec["fwd_ms"], rec["fwdbwd_ms"] = time_pair(fwd, leaves, x, grad, device, args)
        except Exception as e:  # noqa: BLE001  (report and go on)
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            print(f"FlashRNN {backend} {name} {dtype} FAILED: {rec['error']}", flush=True)
            traceback.print_exc()
            torch.cuda.synchronize()
        rows.append(rec)
        emit(rec)
    return rows


def fmt(v, spec=">9.3f"):
    return format(v, spec) if isinstance(v, (int, float)) else f"{'-':>9}"


def print_table(rows):
    ref = {r["dtype"] + r["config"]: r for r in rows if r["impl"] == "GroupedLSTM sequence"}
    print(f"{'config':<11}{'dtype':<9}{'impl':<24}{'fwd ms':>9}{'f+b ms':>9}{'fwd/GL':>8}{'f+b/GL':>8}"
          f"{'out err':>9}{'dW_hh err':>10}{'1st s':>7}")
    for r in rows:
        base = ref.get(r["dtype"] + r["config"], {})
        ratio = lambda k: (r[k] / base[k]) if isinstance(r.get(k), float) and base.get(k) else None  # noqa: E731
        e = r.get("rel_err_vs_fp64", {})
        first = r.get("first_forward_s")
        print(f"{r['config']:<11}{r['dtype']:<9}{r['impl']:<24}{fmt(r.get('fwd_ms'))}{fmt(r.get('fwdbwd_ms'))}"
              f"{fmt(ratio('fwd_ms'), '>8.2f')}{fmt(ratio('fwdbwd_ms'), '>8.2f')}"
              f"{fmt(e.get('out'), '>9.1e')}{fmt(e.get('d_w_hh'), '>10.1e')}"
              f"{fmt(first, '>7.1f') if first is not None else '':>7}"
              + (f"  ERROR {r['error'][:80]}" if "error" in r else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=DEFAULT_CASES, help="config:dtype,... in this order")
    ap.add_argument("--backends", default="cuda_fused", help="FlashRNN backends, comma-separated")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--min-time", type=float, default=0.2)
    ap.add_argument("--json", help="append one JSON object per line to this file")
    ap.add_argument("--check-vanilla", action="store_true",
                    help="only check the layout mapping against FlashRNN's PyTorch backend (fp64)")
    args = ap.parse_args()
    cases = [tuple(c.split(":")) for c in args.cases.split(",") if c]
    for c in cases:
        if len(c) != 2 or c[0] not in CONFIGS or c[1] not in ("float32", "bfloat16", "float16"):
            sys.exit(f"bad case {':'.join(c)!r}: config:dtype with config in {list(CONFIGS)}")
    device = torch.device(args.device)
    flashrnn, err = import_flashrnn()
    if args.check_vanilla:
        if flashrnn is None:
            print(f"bench_flashrnn: flashrnn is not importable ({err}); nothing checked")
            return 0
        return 0 if check_vanilla(flashrnn, device) else 1
    if device.type != "cuda" or not torch.cuda.is_available():
        print("bench_flashrnn: needs CUDA (no GPU visible here): nothing timed. "
              "`--check-vanilla --device cpu` checks the layout mapping on the CPU"
              + ("" if flashrnn else f" (flashrnn not importable here: {err})") + ".")
        return 0
    if flashrnn is None:
        print(f"bench_flashrnn: flashrnn is not importable ({err}). Carry its wheel (.whl/) and run\n"
              "  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/flashrnn-*.whl; "
              "export PYTHONPATH=/tmp/site:$PYTHONPATH")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    env = describe(device)
    try:
        import importlib.metadata as md
        env["flashrnn"] = md.version("flashrnn")
    except Exception:  # noqa: BLE001
        env["flashrnn"] = "unknown"
    env.update({"torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"), "projection": PROJECTION})
    print(f"# GroupedLSTM vs FlashRNN: {env}")
    print(f"# projection: {PROJECTION}; times are medians in ms; /GL = over GroupedLSTM sequence "
          "(the sequence path: the persistent kernel)")

    def emit(rec):
        print(json.dumps(rec), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    emit({"env": env, "cases": args.cases, "backends": args.backends})
    rows = []
    backends = [b for b in args.backends.split(",") if b]
    for name, dtype in cases:
        print(f"\n## {name} {dtype}", flush=True)
        rows += run_case(name, dtype, flashrnn, backends, device, args, emit)
        print_table([r for r in rows if r["config"] == name and r["dtype"] == dtype])
    print("\n# all cases")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
