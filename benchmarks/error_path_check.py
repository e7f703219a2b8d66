"""Does a failing check inside the ops raise a Python RuntimeError, or crash the process?

On the GPU machine's torch 2.11 a TORCH_CHECK whose message streams values (a std::string built in
our code, handed to libc10) once segfaulted instead of raising (benchmarks/NOTES.md, "error-path
crash"). Each case runs in its own subprocess, so a crash is reported instead of ending this
script: the recurrence op (grouped_recurrence_forward, cell "lstm") called with a weight_hh of the
wrong shape (a streamed message) on the CPU and on CUDA, directly and through autograd (inputs that
require grad), and the branch-attention op with a weight of the wrong size.

  python3 benchmarks/error_path_check.py        exit 0: every case raised RuntimeError
"""
import subprocess
import sys
import textwrap

import torch

PRELUDE = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    import mtl_kernels
    from mtl_kernels._ops import ops
    dev = {device!r}
    G, T, B, C, H = 2, 4, 3, 5, 6
    r = lambda *s, grad=False: torch.randn(*s, device=dev, requires_grad=grad)
""")

CASES = {
    "grouped_recurrence_forward lstm, weight_hh (G, 4H, 1)": (
        "ops.grouped_recurrence_forward('lstm', r(T, B, C), r(G, 4 * H, C), r(G, 4 * H, 1), "
        "r(G, 4 * H), None, None, r(G, B, H), r(G, B, H), None, False)", "weight_hh"),
    "grouped_recurrence_forward lstm through autograd, weight_hh (G, 4H, 1)": (
        "ops.grouped_recurrence_forward('lstm', r(T, B, C, grad=True), r(G, 4 * H, C, grad=True), "
        "r(G, 4 * H, 1, grad=True), r(G, 4 * H), None, None, r(G, B, H), r(G, B, H), None, False)",
        "weight_hh"),
    "branch_attention_forward, weight (H + 1,)": (
        "ops.branch_attention_forward(r(3, 7, H), r(H + 1), None)", "weight"),
}


def run_case(device, code, expect, root):
    script = PRELUDE.format(root=root, device=device) + textwrap.dedent(f"""
        try:
            {code}
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            ok = {expect!r} in str(e)
            print(("RAISED " if ok else "RAISED (unexpected message) ") + type(e).__name__ + ": " + msg[:200])
            sys.exit(0 if ok else 3)
        print("NO ERROR RAISED")
        sys.exit(4)
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    out = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode < 0:
        return False, f"CRASHED (signal {-p.returncode}); stderr tail: {p.stderr.strip()[-300:]}"
    if p.returncode != 0:
        return False, out or f"exit {p.returncode}; stderr tail: {p.stderr.strip()[-300:]}"
    return True, out


def main():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"# error paths: torch {torch.__version__}, cxx11 abi {int(torch._C._GLIBCXX_USE_CXX11_ABI)}, "
          f"devices {devices}")
    failed = 0
    for device in devices:
        for name, (code, expect) in CASES.items():
            ok, what = run_case(device, code, expect, root)
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {device:<5} {name}: {what}", flush=True)
    if not torch.cuda.is_available():
        print("(no GPU here: the CUDA cases did not run)")
    print(f"error_path_check: {'all raised RuntimeError' if not failed else f'{failed} case(s) FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
