"""End-to-end multi-task training on real data: a ModuleList of nn.LSTM against GroupedLSTM.

Data: scikit-learn's handwritten digits (shipped inside the package, nothing downloaded), each 8x8
image read row by row as an 8-step sequence of 8 features. Three tasks of different kinds and
sizes, each with its own training subset:
  digit  10-class (cross-entropy)      on 100% of the training split
  even   binary (BCE with logits)      on 50%
  mod3   3-class (cross-entropy)       on 25%
Both models start from the same weights and see the same batches (same seed); one batch per task per
step (TaskInterleaver, cycle mode), each task its own batch size (--batch-sizes, 64/32/16 by default:
the three loaders then have equally many batches), losses summed by MultiTaskLoss. The grouped model
takes the step's list of batches as it is: one grouped call for the three tasks of different sizes.

  python benchmarks/train_multitask.py [--epochs 15] [--batch-sizes 64,32,16] [--device cpu|cuda]
                                       [--json F] [--no-plot]
Needs scikit-learn (pip install .[bench]); tqdm (progress bar) and matplotlib (PNG plot) optional.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mtl_kernels import GroupedLSTM  # noqa: E402
from mtl_kernels.training import MultiTaskLoss, TaskInterleaver  # noqa: E402

TASKS = [  # name, number of classes (1 = binary), fraction of the training split, label function
    ("digit", 10, 1.00, lambda y: y),
    ("even", 1, 0.50, lambda y: (y % 2 == 0).long()),
    ("mod3", 3, 0.25, lambda y: y % 3),
]


def load_data(max_samples, seed):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("train_multitask.py needs scikit-learn: pip install scikit-learn (or .[bench])")
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).view(-1, 8, 8) / 16.0  # (N, T=8, C=8)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)[:max_samples]
    X, y = X[perm], y[perm]
    n_train = int(0.75 * len(y))
    train, test = (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])
    train_sets = []
    for name, _, frac, label in TASKS:
        idx = torch.randperm(n_train, generator=g)[: max(1, int(frac * n_train))]
        train_sets.append(TensorDataset(train[0][idx], label(train[1][idx])))
    return train_sets, test


class LoopModel(nn.Module):
    """What users write today: one nn.LSTM per task in a ModuleList, called in a loop."""

    def __init__(self, hidden):
        super().__init__()
        self.lstms = nn.ModuleList([nn.LSTM(8, hidden, batch_first=True) for _ in TASKS])
        self.heads = nn.ModuleList([nn.Linear(hidden, k) for _, k, _, _ in TASKS])

    def forward(self, xs):  # xs: list of (B, T, C), one per task
        return [head(lstm(x)[0][:, -1]) for lstm, head, x in zip(self.lstms, self.heads, xs)]


class GroupedModel(nn.Module):
    def __init__(self, loop_model):
        super().__init__()
        self.lstm = GroupedLSTM.from_lstms(loop_model.lstms)
        self.heads = nn.ModuleList([nn.Linear(h.in_features, h.out_features) for h in loop_model.heads])
        self.heads.load_state_dict(loop_model.heads.state_dict())

    def forward(self, xs):  # one (B_k, T, C) batch per task, B_k its own -> one grouped op for all
        outs = self.lstm(list(xs))  # [(output_k (B_k, T, H), (h_k, c_k))], as the loop's
        return [head(out[:, -1]) for (out, _), head in zip(outs, self.heads)]


def task_loss(k):
    return F.binary_cross_entropy_with_logits if TASKS[k][1] == 1 else F.cross_entropy


def evaluate(model, test, device):
    from sklearn.metrics import f1_score
    model.eval()
    x, y = test[0].to(device), test[1]
    with torch.no_grad():
        outs = model([x] * len(TASKS))
    metrics = {}
    for k, (name, classes, _, label) in enumerate(TASKS):
        target = label(y)
        pred = (outs[k].squeeze(-1) > 0).long().cpu() if classes == 1 else outs[k].argmax(-1).cpu()
        metrics[name] = {"accuracy": (pred == target).float().mean().item(),
                         "f1_macro": f1_score(target.numpy(), pred.numpy(), average="macro")}
    model.train()
    return metrics


def train(model, train_sets, test, args, device, label):
    g = torch.Generator().manual_seed(args.seed)
    loaders = [DataLoader(ds, batch_size=b, shuffle=True, generator=g, drop_last=True)
               for ds, b in zip(train_sets, args.batch_sizes)]
    batches = TaskInterleaver(loaders, mode="cycle", per_step=True)
    criterion = MultiTaskLoss([task_loss(k) for k in range(len(TASKS))])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    history, epoch_times = [], []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        it = tqdm(batches, desc=f"{label} epoch {epoch + 1}", leave=False) if tqdm else batches
        losses = {k: [] for k in range(len(TASKS))}
        for step in it:
            xs = [b[0].to(device) for b in step]
            ys = [b[1].to(device) for b in step]
            ys = [yk.float() if TASKS[k][1] == 1 else yk for k, yk in enumerate(ys)]
            outs = model(xs)
            outs = [o.squeeze(-1) if TASKS[k][1] == 1 else o for k, o in enumerate(outs)]
            total, logs = criterion(outs, ys)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            for k, v in logs.items():
                losses[k].append(v)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_times.append(time.perf_counter() - t0)
        metrics = evaluate(model, test, device)
        history.append({"epoch": epoch + 1, "loss": {TASKS[k][0]: statistics.mean(v) for k, v in losses.items()},
                        "metrics": metrics})
        if not tqdm:
            print(f"  {label} epoch {epoch + 1}: {epoch_times[-1]:.2f}s " +
                  " ".join(f"{n}={m['accuracy']:.3f}" for n, m in metrics.items()), flush=True)
    return history, epoch_times


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, axes = plt.subplots(2, len(TASKS), figsize=(4 * len(TASKS), 6), sharex=True)
    for label, res in results.items():
        for k, (name, *_rest) in enumerate(TASKS):
            ep = [h["epoch"] for h in res["history"]]
            axes[0, k].plot(ep, [h["loss"][name] for h in res["history"]], label=label)
            axes[1, k].plot(ep, [h["metrics"][name]["accuracy"] for h in res["history"]], label=label)
            axes[0, k].set_title(f"{name}: train loss")
            axes[1, k].set_title(f"{name}: test accuracy")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-sizes", default="64,32,16",
                    help="one batch size per task, comma-separated (or one for all)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-samples", type=int, default=10 ** 9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--plot", default="train_multitask.png")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    sizes = [int(v) for v in args.batch_sizes.split(",")]
    if len(sizes) not in (1, len(TASKS)) or min(sizes) < 1:
        ap.error(f"--batch-sizes needs 1 or {len(TASKS)} positive sizes, got {args.batch_sizes!r}")
    args.batch_sizes = sizes * len(TASKS) if len(sizes) == 1 else sizes
    device = torch.device(args.device)
    train_sets, test = load_data(args.max_samples, args.seed)
    print(f"# digits as 8-step sequences; tasks " +
          ", ".join(f"{n} ({'binary' if c == 1 else f'{c}-class'}, {len(ds)} train)"
                    for (n, c, _, _), ds in zip(TASKS, train_sets)) + f"; {len(test[1])} test; {device}; "
          f"batch sizes {args.batch_sizes}")
    torch.manual_seed(args.seed)
    loop_model = LoopModel(args.hidden).to(device)
    grouped_model = GroupedModel(loop_model).to(device)  # same initial weights
    results = {}
    for label, model in (("ModuleList", loop_model), ("GroupedLSTM", grouped_model)):
        history, times = train(model, train_sets, test, args, device, label)
        # the first epoch pays one-off costs (allocator, thread pools); report the rest if any
        steady = times[1:] if len(times) > 1 else times
        results[label] = {"history": history, "epoch_s": statistics.mean(steady),
                          "metrics": history[-1]["metrics"]}
    base, grp = results["ModuleList"], results["GroupedLSTM"]
    print(f"\n{'task':<8}{'metric':<10}{'ModuleList':>12}{'GroupedLSTM':>13}")
    for name in base["metrics"]:
        for metric in ("accuracy", "f1_macro"):
            print(f"{name:<8}{metric:<10}{base['metrics'][name][metric]:>12.3f}{grp['metrics'][name][metric]:>13.3f}")
    print(f"\ntime per epoch: ModuleList {base['epoch_s'] * 1e3:.1f} ms, GroupedLSTM "
          f"{grp['epoch_s'] * 1e3:.1f} ms, speed-up {base['epoch_s'] / grp['epoch_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    if not args.no_plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
