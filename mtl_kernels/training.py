"""Multi-task training helpers: per-task losses with sum / fixed / learned-uncertainty weighting,
and an interleaving loader over several DataLoaders of different sizes."""
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["MultiTaskLoss", "TaskInterleaver"]


class MultiTaskLoss(nn.Module):
    """Combines one loss per task.

    reduction:
      "sum"         total = sum_k L_k
      "weighted"    total = sum_k w_k L_k, fixed ``weights``
      "uncertainty" total = sum_k exp(-s_k) L_k + s_k, with s_k = log sigma_k^2 learned per task
                    (Kendall, Gal & Cipolla 2018; s starts at 0, i.e. weight 1)
    forward(outputs, targets, tasks=None) -> (total, {task: loss value as a float}); ``tasks``
    names which tasks ``outputs``/``targets`` belong to (default: all, in order), so a step that
    holds one task's batch (round-robin training) weights it like the full sum would.
    """

    def __init__(self, losses: Sequence[Callable[[Tensor, Tensor], Tensor]], reduction: str = "sum",
                 weights: Optional[Sequence[float]] = None):
        super().__init__()
        if reduction not in ("sum", "weighted", "uncertainty"):
            raise ValueError(f"reduction must be 'sum', 'weighted' or 'uncertainty', got {reduction!r}")
        if not losses:
            raise ValueError("MultiTaskLoss needs at least one task loss")
        self.losses = list(losses)
        self.reduction = reduction
        if reduction == "weighted":
            if weights is None or len(weights) != len(losses):
                raise ValueError(f"reduction='weighted' needs {len(losses)} weights")
            self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        elif weights is not None:
            raise ValueError("weights are only used with reduction='weighted'")
        if reduction == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(losses)))

    def forward(self, outputs: Sequence[Tensor], targets: Sequence[Tensor],
                tasks: Optional[Sequence[int]] = None) -> Tuple[Tensor, Dict[int, float]]:
        tasks = list(range(len(self.losses))) if tasks is None else list(tasks)
        if not (len(outputs) == len(targets) == len(tasks)):
            raise ValueError(f"got {len(outputs)} outputs, {len(targets)} targets for tasks {tasks}")
        total, logs = 0.0, {}
        for out, tgt, k in zip(outputs, targets, tasks):
            if not 0 <= k < len(self.losses):
                raise ValueError(f"task {k} out of range [0, {len(self.losses)})")
            loss_k = self.losses[k](out, tgt)
            logs[k] = float(loss_k.detach())
            if self.reduction == "weighted":
                loss_k = self.weights[k] * loss_k
            elif self.reduction == "uncertainty":
                loss_k = torch.exp(-self.log_vars[k]) * loss_k + self.log_vars[k]
            total = total + loss_k
        return total, logs


class TaskInterleaver:
    """Iterates several DataLoaders (one per task) together.

    mode:
      "cycle"        restart the shorter loaders until the longest is done (no task is forgotten
                     while another finishes its epoch)
      "shortest"     stop when the shortest loader is done
      "proportional" draw each step's task with probability proportional to its loader's length,
                     for sum(lengths) steps (per_step=False only)
    per_step:
      False -> yields (task_id, batch): tasks in turn (0, 1, 2, 0, ...) or drawn ("proportional")
      True  -> yields a list with one batch per task per step
    Task draws use their own generator seeded by ``seed``: the task order repeats under a seed; the
    batches inside each loader follow that loader's own sampler.
    """

    def __init__(self, loaders: Sequence, mode: str = "cycle", per_step: bool = False,
                 seed: Optional[int] = None):
        if mode not in ("cycle", "shortest", "proportional"):
            raise ValueError(f"mode must be 'cycle', 'shortest' or 'proportional', got {mode!r}")
        if per_step and mode == "proportional":
            raise ValueError("mode='proportional' draws one task per step; use per_step=False")
        if not loaders:
            raise ValueError("TaskInterleaver needs at least one loader")
        self.loaders = list(loaders)
        self.lengths = [len(dl) for dl in self.loaders]
        if min(self.lengths) == 0:
            raise ValueError(f"every loader needs at least one batch, got lengths {self.lengths}")
        self.mode, self.per_step, self.seed = mode, per_step, seed
        self._epoch = 0

    def _steps(self) -> int:
        if self.mode == "proportional":
            return sum(self.lengths)
        n = max(self.lengths) if self.mode == "cycle" else min(self.lengths)
        return n if self.per_step else n * len(self.loaders)

    def __len__(self) -> int:
        return self._steps()

    def _task_order(self) -> List[int]:
        K = len(self.loaders)
        if self.mode == "proportional":
            g = torch.Generator().manual_seed((self.seed or 0) + self._epoch)
            p = torch.tensor(self.lengths, dtype=torch.float64)
            return torch.multinomial(p / p.sum(), self._steps(), replacement=True, generator=g).tolist()
        return [i % K for i in range(self._steps())]

    def __iter__(self) -> Iterator:
        iters = [iter(dl) for dl in self.loaders]

        def next_batch(k):
            try:
                return next(iters[k])
            except StopIteration:  # only "cycle"/"proportional" get here: restart that loader
                iters[k] = iter(self.loaders[k])
                return next(iters[k])

        if self.per_step:
            for _ in range(self._steps()):
                yield [next_batch(k) for k in range(len(self.loaders))]
        else:
            order = self._task_order()
            self._epoch += 1  # a new (seeded) task draw for the next pass
            for k in order:
                yield k, next_batch(k)
