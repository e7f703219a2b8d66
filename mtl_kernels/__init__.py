"""mtl_kernels: grouped LSTMs and fused attention over branches for multi-task and parallel-branch
sequence models."""
from .grouped_lstm import GroupedLSTM

__all__ = ["GroupedLSTM"]
__version__ = "0.1.0"
