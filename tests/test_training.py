"""MultiTaskLoss, TaskInterleaver and a smoke run of the training benchmark."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from mtl_kernels.training import MultiTaskLoss, TaskInterleaver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outputs():
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    binary = torch.randn(6, requires_grad=True)
    return [logits, binary], [torch.randint(0, 4, (6,)), torch.randint(0, 2, (6,)).float()]


LOSSES = [F.cross_entropy, F.binary_cross_entropy_with_logits]


def test_loss_sum_and_weighted():
    outs, tgts = _outputs()
    l0, l1 = F.cross_entropy(outs[0], tgts[0]), F.binary_cross_entropy_with_logits(outs[1], tgts[1])
    total, logs = MultiTaskLoss(LOSSES)(outs, tgts)
    torch.testing.assert_close(total, l0 + l1)
    assert logs == pytest.approx({0: l0.item(), 1: l1.item()})
    total, _ = MultiTaskLoss(LOSSES, "weighted", [0.25, 2.0])(outs, tgts)
    torch.testing.assert_close(total, 0.25 * l0 + 2.0 * l1)
    # one task's batch alone (round-robin): only that task's term
    total, logs = MultiTaskLoss(LOSSES, "weighted", [0.25, 2.0])([outs[1]], [tgts[1]], tasks=[1])
    torch.testing.assert_close(total, 2.0 * l1)
    assert list(logs) == [1]


def test_uncertainty_weights_are_learned():
    outs, tgts = _outputs()
    crit = MultiTaskLoss(LOSSES, "uncertainty")
    total, logs = crit(outs, tgts)
    torch.testing.assert_close(total, torch.tensor(sum(logs.values())))  # s = 0 at the start
    total.backward()
    g = crit.log_vars.grad
    assert g is not None and (g != 0).all()
    # d/ds (exp(-s) L + s) = 1 - L at s = 0
    torch.testing.assert_close(g, 1 - torch.tensor([logs[0], logs[1]]))
    opt = torch.optim.SGD(crit.parameters(), lr=0.1)
    opt.step()
    assert not torch.equal(crit.log_vars.detach(), torch.zeros(2))


def test_loss_errors():
    with pytest.raises(ValueError, match="weights"):
        MultiTaskLoss(LOSSES, "weighted")
    with pytest.raises(ValueError, match="reduction"):
        MultiTaskLoss(LOSSES, "mean")
    outs, tgts = _outputs()
    with pytest.raises(ValueError, match="task 5"):
        MultiTaskLoss(LOSSES)([outs[0]], [tgts[0]], tasks=[5])


def _loaders(sizes, batch=2):
    return [DataLoader(TensorDataset(torch.arange(n) + 100 * k), batch_size=batch)
            for k, n in enumerate(sizes)]


def test_interleaver_cycle_and_shortest_counts_and_order():
    loaders = _loaders([6, 2, 4])  # 3, 1 and 2 batches
    steps = list(TaskInterleaver(loaders, "cycle"))
    assert [k for k, _ in steps] == [0, 1, 2] * 3
    task1 = [b[0].tolist() for k, b in steps if k == 1]
    assert task1 == [[100, 101]] * 3  # the short loader restarts
    task0 = [b[0].tolist() for k, b in steps if k == 0]
    assert task0 == [[0, 1], [2, 3], [4, 5]]  # the longest runs exactly once
    assert len(TaskInterleaver(loaders, "cycle")) == 9
    shortest = list(TaskInterleaver(loaders, "shortest"))
    assert [k for k, _ in shortest] == [0, 1, 2]
    per_step = list(TaskInterleaver(loaders, "cycle", per_step=True))
    assert len(per_step) == 3 and all(len(s) == 3 for s in per_step)
    assert len(list(TaskInterleaver(loaders, "shortest", per_step=True))) == 1


def test_interleaver_proportional_is_deterministic_and_proportional():
    loaders = _loaders([200, 20], batch=1)
    a = [k for k, _ in TaskInterleaver(loaders, "proportional", seed=7)]
    b = [k for k, _ in TaskInterleaver(loaders, "proportional", seed=7)]
    c = [k for k, _ in TaskInterleaver(loaders, "proportional", seed=8)]
    assert a == b and a != c and len(a) == 220
    assert 0.8 < a.count(0) / len(a) < 0.97  # expected 200/220 = 0.91
    with pytest.raises(ValueError, match="per_step"):
        TaskInterleaver(loaders, "proportional", per_step=True)
    with pytest.raises(ValueError, match="at least one batch"):
        TaskInterleaver(_loaders([0, 2]))


def test_train_benchmark_smoke(tmp_path):
    pytest.importorskip("sklearn")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "train_multitask.py"), "--epochs", "1",
           "--hidden", "8", "--max-samples", "300", "--no-plot", "--json", str(tmp_path / "r.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    assert "speed-up" in res.stdout and "digit" in res.stdout
    import json
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data["ModuleList"]["metrics"]) == set(data["GroupedLSTM"]["metrics"])
