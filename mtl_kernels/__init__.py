"""mtl_kernels: grouped LSTMs and fused attention over branches for multi-task and parallel-branch
sequence models."""
from .blocks import MultiTaskLSTM, ParallelLSTM
from .branch_attention import BranchAttention, branch_attention
from .grouped_lstm import GroupedLSTM, path_counts, recurrence_path

__all__ = ["GroupedLSTM", "BranchAttention", "branch_attention", "ParallelLSTM", "MultiTaskLSTM",
           "recurrence_path", "path_counts"]
__version__ = "0.1.0"
