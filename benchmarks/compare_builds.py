"""GroupedLSTM on two builds of the extension, in the same run: forward and forward+backward (eager,
the C++ autograd) medians, and the ratio after/before.

Each build runs in its own subprocess with PYTHONPATH set to that tree (a checkout with the
extension built in place, e.g. `git worktree add /tmp/wt_before <commit>` and
`MTL_KERNELS_FORCE_CPU=1 python3 setup.py build_ext --inplace` there), one subprocess per
(round, config, build). The rounds interleave the builds, in alternating order (before, after;
after, before; ...), so machine noise hits both; each cell of the table is the median over the
rounds of each round's median. Both builds run the default recurrence path ("auto"; the
environment's MTL_KERNELS_LSTM_PATH is removed), and the `path` columns say what ran forward /
backward (Q whole-sequence, S per-step).

On a shared machine other processes' CPU time distorts CPU timings badly (with 2 OpenMP threads on
2 busy cores the kernels' barriers spin: 10-40x slower). So before each subprocess the script
waits (up to --idle-wait seconds) until the CPUs are idle (< 10% busy over 1 s, from /proc/stat),
and each subprocess measures the CPU share other processes took while it timed (`others`: total
busy time from /proc/stat less its own, over wall time x cores); a run where that share exceeds
--max-others is discarded and run again (up to --retries times, waiting for idle CPUs first). The
table's `others` column is the largest share among the runs kept.

Configs, seeds and inputs are bench_grouped_lstm.py's (its CONFIGS, read from that file; the same
torch.manual_seed(0) stream: G nn.LSTM, GroupedLSTM.from_lstms, the batched nn.LSTM, the inputs and
output gradients), so the numbers compare with its `grouped` column.

  python3 benchmarks/compare_builds.py --before /tmp/wt_before [--after .] [--rounds 5]
        [--configs seed-tasks,seed-branches,many-small,multitask] [--device cpu] [--idle-wait S]
        [--input-grad]
        [--json FILE]
"""
import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIGS = "seed-tasks,seed-branches,many-small,multitask"


def bench_configs():
    """bench_grouped_lstm.py's CONFIGS, read from its source (importing it would import
    mtl_kernels from this checkout, not from the build under test)."""
    with open(os.path.join(HERE, "bench_grouped_lstm.py")) as fh:
        tree = ast.parse(fh.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CONFIGS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError("no CONFIGS in bench_grouped_lstm.py")


def cpu_busy_jiffies():
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (None where it is missing)."""
    try:
        with open("/proc/stat") as fh:
            vals = [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal
    return total - idle, total


def wait_until_idle(max_wait, threshold=0.10):
    """Waits until the CPUs are less than `threshold` busy over a 1 s sample, at most `max_wait`
    seconds; returns the last sample's busy fraction (None without /proc/stat)."""
    t_end = time.time() + max_wait
    while True:
        a = cpu_busy_jiffies()
        time.sleep(1.0)
        b = cpu_busy_jiffies()
        if a is None or b is None:
            return None
        busy = (b[0] - a[0]) / max(b[1] - a[1], 1)
        if busy < threshold or time.time() >= t_end:
            return busy


def worker(args):
    """One build, one config: prints one JSON line."""
    import torch
    from torch import nn

    import mtl_kernels
    from mtl_kernels import GroupedLSTM
    from timing import median_time  # benchmarks/ is sys.path[0] (this script's folder)

    root = os.path.realpath(args.tree)
    where = os.path.realpath(mtl_kernels.__file__)
    if not where.startswith(root + os.sep):
        sys.exit(f"mtl_kernels imported from {where}, not from {root}")
    device = torch.device(args.device)
    G, B, T, C, H, kind = bench_configs()[args.config]
    torch.manual_seed(0)  # as bench_grouped_lstm.bench_config
    lstms = nn.ModuleList([nn.LSTM(C, H) for _ in range(G)]).to(device)
    grouped = GroupedLSTM.from_lstms(lstms)
    nn.LSTM(C, H)  # the benchmark's batched baseline: same random stream after it
    x = torch.randn(T, B, C, device=device) if kind == "shared" else torch.randn(G, T, B, C, device=device)
    x.requires_grad_(args.input_grad)  # fwd+bwd then also computes the input gradient
    torch.randn(T, G * B, C, device=device)  # the batched baseline's input
    grad = torch.stack([torch.randn(T, B, H, device=device) for _ in range(G)])

    def fwd():
        return grouped(x)[0]

    def fwd_bwd():
        fwd().backward(grad)

    before = mtl_kernels.path_counts()
    fwd_bwd()
    after = mtl_kernels.path_counts()
    path = "/".join("Q" if after[f"{d}_sequence"] > before[f"{d}_sequence"] else "S"
                    for d in ("forward", "backward"))
    hz = os.sysconf("SC_CLK_TCK")
    j0, own0, w0 = cpu_busy_jiffies(), time.process_time(), time.perf_counter()
    with torch.no_grad():
        t_f = median_time(fwd, device, args.warmup, args.repeats, args.min_time)
    t_fb = median_time(fwd_bwd, device, args.warmup, args.repeats, args.min_time)
    j1, own1, w1 = cpu_busy_jiffies(), time.process_time(), time.perf_counter()
    others = None
    if j0 is not None and j1 is not None:  # CPU share of the other processes while this one timed
        others = max(0.0, ((j1[0] - j0[0]) / hz - (own1 - own0)) / ((w1 - w0) * (os.cpu_count() or 1)))
    print(json.dumps({"config": args.config, "fwd_ms": t_f * 1e3, "fwdbwd_ms": t_fb * 1e3, "path": path,
                      "others_cpu": others, "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "mtl_kernels": where}))


def run_one(tree, config, args):
    env = {k: v for k, v in os.environ.items() if k != "MTL_KERNELS_LSTM_PATH"}
    env["PYTHONPATH"] = os.path.realpath(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--tree", tree, "--config", config,
           "--device", args.device, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
           "--min-time", str(args.min_time)] + (["--input-grad"] if args.input_grad else [])
    p = subprocess.run(cmd, env=env, cwd="/", capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"worker failed ({tree}, {config}, exit {p.returncode}):\n{p.stdout}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def git_head(tree):
    try:
        return subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "?"
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="the tree of the build before (extension built in place)")
    ap.add_argument("--after", default=os.path.dirname(HERE), help="the tree of the build after (default: this checkout)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--idle-wait", type=float, default=300,
                    help="seconds to wait, at most, for idle CPUs before each subprocess (0: do not wait)")
    ap.add_argument("--max-others", type=float, default=0.05,
                    help="a run during which other processes took more than this share of the CPUs is run again")
    ap.add_argument("--retries", type=int, default=4, help="runs again at most this many times")
    ap.add_argument("--input-grad", action="store_true",
                    help="the input requires grad: fwd+bwd also computes the input gradient")
    ap.add_argument("--json", help="write every measurement and the summary to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if not args.before:
        ap.error("--before is required")
    configs = [c for c in args.configs.split(",") if c]
    known = bench_configs()
    for c in configs:
        if c not in known:
            ap.error(f"unknown config {c!r}; choose from {', '.join(known)}")
    builds = {"before": args.before, "after": args.after}
    print(f"# compare_builds: before {args.before} ({git_head(args.before)}), after {args.after} "
          f"({git_head(args.after)}), device {args.device}, {args.rounds} rounds, each a median of >= "
          f"{args.repeats} runs after {args.warmup} warm-up; input requires grad: {args.input_grad}; "
          "load average at start "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    runs, discarded = [], []
    t0 = time.time()
    for r in range(args.rounds):
        order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
        for c in configs:
            for b in order:
                for attempt in range(args.retries + 1):
                    busy = wait_until_idle(args.idle_wait) if args.idle_wait > 0 else None
                    rec = dict(run_one(builds[b], c, args), build=b, round=r, busy_before=busy,
                               attempt=attempt)
                    if rec["others_cpu"] is None or rec["others_cpu"] <= args.max_others:
                        break
                    discarded.append(rec)
                runs.append(rec)
        print(f"round {r + 1}/{args.rounds} done, {time.time() - t0:.0f} s, load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}, {len(discarded)} runs discarded so far "
              f"(others > {args.max_others:.0%})", flush=True)
    threads = {rec["threads"] for rec in runs}
    print(f"# torch {runs[0]['torch']}, threads {sorted(threads)}; times are medians over the rounds, in ms; "
          f"ratio = after / before (< 1: after is faster); range = the per-round ratios' min-max; "
          f"others = the largest CPU share other processes took during one of the row's runs")
    hdr = (f"{'config':<14}{'path b/a':>10} | {'fwd before':>11}{'after':>9}{'ratio':>7}{'range':>12} | "
           f"{'f+b before':>11}{'after':>9}{'ratio':>7}{'range':>12} | {'others':>6}")
    print(hdr)
    print("-" * len(hdr))
    summary = []
    for c in configs:
        row = {"config": c}
        cols = []
        for key in ("fwd_ms", "fwdbwd_ms"):
            per = {b: [rec[key] for rec in runs if rec["config"] == c and rec["build"] == b] for b in builds}
            ratios = [a / b for a, b in zip(per["after"], per["before"])]  # round by round
            med = {b: statistics.median(v) for b, v in per.items()}
            row[key] = {"before": med["before"], "after": med["after"], "ratio": med["after"] / med["before"],
                        "round_ratios": ratios}
            cols.append(f"{med['before']:>11.3f}{med['after']:>9.3f}{med['after'] / med['before']:>7.2f}"
                        f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>12}")
        paths = {b: sorted({rec["path"] for rec in runs if rec["config"] == c and rec["build"] == b}) for b in builds}
        row["path"] = paths
        shares = [rec["others_cpu"] for rec in runs if rec["config"] == c and rec["others_cpu"] is not None]
        row["others_cpu_max"] = max(shares) if shares else None
        summary.append(row)
        others = f"{100 * max(shares):>5.0f}%" if shares else f"{'-':>6}"
        print(f"{c:<14}{','.join(paths['before']) + ' ' + ','.join(paths['after']):>10} | {cols[0]} | {cols[1]} | "
              f"{others}")
    print(f"# load average at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())}, {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"builds": builds, "runs": runs, "discarded": discarded, "summary": summary}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
