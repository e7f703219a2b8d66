"""mtl_kernels: grouped recurrent nets (LSTM, GRU, RNN) and fused attention over branches for
multi-task and parallel-branch sequence models."""
from .blocks import MultiTaskLSTM, ParallelLSTM
from .branch_attention import BranchAttention, branch_attention
from .grouped_rnn import GroupedGRU, GroupedLSTM, GroupedRNN, GroupedRNNBase
from . import _vmap_rnn  # noqa: F401  (registers vmap rules for torch's lstm / gru / rnn ops)
from .paths import auto_paths, cpu_tiles, path_counts, recurrence_path, tensor_core_counts, tensor_cores, tuned_paths

__all__ = ["GroupedLSTM", "GroupedGRU", "GroupedRNN", "GroupedRNNBase", "BranchAttention",
           "branch_attention", "ParallelLSTM", "MultiTaskLSTM", "recurrence_path", "path_counts",
           "tuned_paths", "auto_paths", "tensor_cores", "tensor_core_counts", "cpu_tiles"]
__version__ = "0.2.0"
