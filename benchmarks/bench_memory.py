"""Peak memory of a forward+backward (and of a no_grad forward): the nn.LSTM / nn.GRU loop against
the grouped module, each measured in a fresh process.

CPU: the growth of the process's peak resident set (getrusage ru_maxrss) over its size after the
model, the inputs and a warm-up call at a tiny size, so that the number is what one call at the
config's size adds. CUDA: torch.cuda.max_memory_allocated over the memory held before the call.

  python benchmarks/bench_memory.py [--device cpu|cuda] [--configs multitask,...] [--cell lstm]
                                    [--json FILE]
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_grouped_lstm import CONFIGS  # noqa: E402

_CHILD = r"""
import os, resource, sys, json
import torch
from torch import nn
sys.path.insert(0, os.environ["REPO"])
from mtl_kernels import GroupedRNNBase

G, B, T, C, H, kind = json.loads(os.environ["CONFIG"])
impl, mode, device, cell = os.environ["IMPL"], os.environ["MODE"], os.environ["DEVICE"], os.environ["CELL"]
torch.manual_seed(0)
mk = {"lstm": lambda: nn.LSTM(C, H), "gru": lambda: nn.GRU(C, H),
      "rnn_tanh": lambda: nn.RNN(C, H), "rnn_relu": lambda: nn.RNN(C, H, nonlinearity="relu")}[cell]
mods = nn.ModuleList([mk() for _ in range(G)]).to(device)
grouped = GroupedRNNBase.from_modules(mods)


def run(T_, B_):
    x = torch.randn(T_, B_, C, device=device) if kind == "shared" else torch.randn(G, T_, B_, C, device=device)
    if impl == "loop":
        xs = [x] * G if kind == "shared" else list(x.unbind(0))
        if mode == "fwd":
            with torch.no_grad():
                return [m(xi)[0] for m, xi in zip(mods, xs)]
        outs = [m(xi)[0] for m, xi in zip(mods, xs)]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return outs
    if mode == "fwd":
        with torch.no_grad():
            return grouped(x)[0]
    out = grouped(x)[0]
    out.backward(torch.ones_like(out))
    return out


def rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


run(2, 2)  # warm-up: kernels, allocator, lazy initialisation
if device == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run(T, B)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
else:
    base = rss_bytes()
    run(T, B)
    peak = rss_bytes() - base
print(json.dumps({"peak_bytes": peak}))
"""


def measure(config, impl, mode, device, cell):
    env = {**os.environ, "CONFIG": json.dumps(CONFIGS[config]), "IMPL": impl, "MODE": mode,
           "DEVICE": device, "CELL": cell, "REPO": os.path.dirname(HERE)}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{config} {impl} {mode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configs", default="seed-tasks,seed-branches,many-small,multitask")
    ap.add_argument("--cell", default="lstm", choices=["lstm", "gru", "rnn_tanh", "rnn_relu"])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print(f"# peak memory growth of one call, MB (fresh process each; device {args.device}, "
          f"cell {args.cell}); ratio = grouped / loop")
    hdr = f"{'config':<14} | {'f+b loop':>9}{'grouped':>9}{'ratio':>7} | {'fwd loop':>9}{'grouped':>9}{'ratio':>7}"
    print(hdr)
    print("-" * len(hdr))
    for name in args.configs.split(","):
        r = {"config": name}
        for mode in ("fwd+bwd", "fwd"):
            m = "fwd" if mode == "fwd" else "fb"
            loop = measure(name, "loop", m, args.device, args.cell)
            grouped = measure(name, "grouped", m, args.device, args.cell)
            r[mode] = {"loop_MB": loop / 2**20, "grouped_MB": grouped / 2**20,
                       "ratio": grouped / max(loop, 1)}
        rows.append(r)
        fb, f = r["fwd+bwd"], r["fwd"]
        print(f"{name:<14} | {fb['loop_MB']:>9.1f}{fb['grouped_MB']:>9.1f}{fb['ratio']:>7.2f} | "
              f"{f['loop_MB']:>9.1f}{f['grouped_MB']:>9.1f}{f['ratio']:>7.2f}", flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"device": args.device, "cell": args.cell, "results": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
