"""The seed architectures, built on GroupedLSTM and BranchAttention."""
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .branch_attention import BranchAttention
from .grouped_rnn import grouped_module_for

_COMBINES = ("concat", "attention", "mean", "sum", None)


class ParallelLSTM(nn.Module):
    """N recurrent branches over the same input, combined.

    cell: "lstm" (default), "gru" (the seeds' parallel GRUs), "rnn_tanh" or "rnn_relu": the
    branches are a GroupedLSTM / GroupedGRU / GroupedRNN (attribute ``lstm``, whatever the cell).
    combine: "concat" (concatenate the branches, then Linear(N*D*H, H)), "attention"
    (BranchAttention over branches), "mean", "sum", or None (return all branches, (N, B, T, D*H)
    with batch_first). Input (B, T, C) [(T, B, C) if not batch_first]; returns (B, T, H') where H'
    is H for concat, D*H otherwise.
    """

    def __init__(self, num_branches: int, input_size: int, hidden_size: int,
                 combine: Optional[str] = "concat", num_layers: int = 1, batch_first: bool = True,
                 dropout: float = 0.0, bidirectional: bool = False, cell: str = "lstm",
                 device=None, dtype=None):
        super().__init__()
        if combine not in _COMBINES:
            raise ValueError(f"combine must be one of {_COMBINES}, got {combine!r}")
        self.combine = combine
        module, extra = grouped_module_for(cell)
        self.lstm = module(num_branches, input_size, hidden_size, num_layers,
                           batch_first=batch_first, dropout=dropout, bidirectional=bidirectional,
                           device=device, dtype=dtype, **extra)
        width = hidden_size * (2 if bidirectional else 1)
        if combine == "concat":
            self.proj = nn.Linear(num_branches * width, hidden_size, device=device, dtype=dtype)
        elif combine == "attention":
            self.attention = BranchAttention(width, device=device, dtype=dtype)

    def forward(self, x: Tensor, hx=None, lengths: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"ParallelLSTM: input must be 3-D (one input shared by the branches), "
                             f"got shape {tuple(x.shape)}")
        out, _ = self.lstm(x, hx, lengths)  # (N, B, T, W) [batch_first] or (N, T, B, W)
        if self.combine == "concat":
            N = out.shape[0]
            return self.proj(out.permute(1, 2, 0, 3).reshape(*out.shape[1:3], N * out.shape[-1]))
        if self.combine == "attention":
            return self.attention(out)
        if self.combine == "mean":
            return out.mean(0)
        if self.combine == "sum":
            return out.sum(0)
        return out


def _pool(seq: Tensor, lengths: Optional[Tensor], how: str) -> Tensor:
    """seq (K, B, T, H) -> (K, B, H) over each sequence's valid steps."""
    K, B, T, H = seq.shape
    if how == "last":
        if lengths is None:
            return seq[:, :, -1]
        idx = (lengths.to(seq.device) - 1).view(1, B, 1, 1).expand(K, B, 1, H)
        return seq.gather(2, idx).squeeze(2)
    if lengths is None:
        return seq.mean(2) if how == "mean" else seq.amax(2)
    valid = (torch.arange(T, device=seq.device).view(1, T) < lengths.to(seq.device).view(B, 1))
    valid = valid.view(1, B, T, 1)
    if how == "mean":
        return (seq * valid).sum(2) / lengths.to(seq.device, seq.dtype).view(1, B, 1)
    return seq.masked_fill(~valid, float("-inf")).amax(2)


class MultiTaskLSTM(nn.Module):
    """One recurrent net per task (cell "lstm" by default, or "gru", "rnn_tanh", "rnn_relu"), each
    with its own Linear head; optional shared embedding.

    forward(x, lengths=None, task=None):
      x: (B, T, C) shared by every task, (K, B, T, C) one batch per task, token ids (B, T) /
         (K, B, T) with an embedding, or a PackedSequence of either; or a list of K per-task
         batches, each its own B_k and T_k: (B_k, T_k, C) / token ids (B_k, T_k) or a
         PackedSequence (lengths then a list of K entries, each (B_k,) or None), all tasks still
         one grouped call per layer (what TaskInterleaver(per_step=True) yields, loaders of
         different batch sizes included).
      task: None -> a list with every task's output (B, output_sizes[k]);
            k    -> task k's output only, computing only task k's recurrence (round-robin training
                    with one task's batch per step).
    Pooling over time: "last" valid step (default), "mean" or "max" over valid steps.
    """

    def __init__(self, input_size: Optional[int], hidden_size: int, output_sizes: Sequence[int],
                 vocab_size: Optional[int] = None, embedding_dim: Optional[int] = None,
                 num_layers: int = 1, dropout: float = 0.0, pooling: str = "last",
                 padding_idx: Optional[int] = None, cell: str = "lstm", device=None, dtype=None):
        super().__init__()
        if pooling not in ("last", "mean", "max"):
            raise ValueError(f"pooling must be 'last', 'mean' or 'max', got {pooling!r}")
        if not output_sizes:
            raise ValueError("output_sizes must name at least one task")
        if (vocab_size is None) != (embedding_dim is None):
            raise ValueError("give both vocab_size and embedding_dim for token input, or neither")
        self.embedding = (nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx,
                                       device=device, dtype=dtype) if vocab_size else None)
        in_size = embedding_dim if vocab_size else input_size
        if in_size is None:
            raise ValueError("input_size is required without an embedding")
        self.num_tasks = len(output_sizes)
        self.pooling = pooling
        module, extra = grouped_module_for(cell)
        self.lstm = module(self.num_tasks, in_size, hidden_size, num_layers, batch_first=True,
                           dropout=dropout, device=device, dtype=dtype, **extra)
        self.heads = nn.ModuleList([nn.Linear(hidden_size, k, device=device, dtype=dtype)
                                    for k in output_sizes])

    def forward(self, x: Union[Tensor, PackedSequence, Sequence], lengths=None,
                task: Optional[int] = None):
        if isinstance(x, (list, tuple)) and not isinstance(x, PackedSequence):  # (a namedtuple)
            return self._forward_tasks(x, lengths, task)
        if isinstance(x, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths must be None when x is a PackedSequence")
            # a packed batch is one input shared by every task: (B, T, C) or token ids (B, T)
            x, lengths = pad_packed_sequence(x, batch_first=True)
        if task is not None and not 0 <= task < self.num_tasks:
            raise ValueError(f"task must lie in [0, {self.num_tasks}), got {task}")
        if self.embedding is not None:
            if x.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"token input must be integer ids, got {x.dtype}")
            x = self.embedding(x)
        per_task = x.dim() == 4
        groups = None
        if task is not None:
            groups = [task]
            if per_task:
                x = x[task : task + 1]
        seq, _ = self.lstm(x, lengths=lengths, groups=groups)  # (K', B, T, H)
        pooled = _pool(seq, lengths, self.pooling)  # (K', B, H)
        if task is not None:
            return self.heads[task](pooled[0])
        return [head(pooled[k]) for k, head in enumerate(self.heads)]

    def _forward_tasks(self, xs: Sequence, lengths, task: Optional[int]) -> List[Tensor]:
        """forward() for a list of K per-task batches, each its own (B_k, T_k): a list of K
        outputs (B_k, output_sizes[k]). Every task's recurrence runs in the same grouped call (the
        grouped module's list input, per-(task, row) lengths)."""
        K = self.num_tasks
        if task is not None:
            raise ValueError("task= takes one batch; a list of per-task batches runs every task")
        if len(xs) != K:
            raise ValueError(f"a list of per-task batches needs one entry per task ({K}), got {len(xs)}")
        if lengths is None:
            lengths = [None] * K
        elif not isinstance(lengths, (list, tuple)) or len(lengths) != K:
            raise ValueError(f"with a list of per-task batches, lengths must be None or a list of "
                             f"{K} entries (each (B_k,) or None)")
        entries = []
        for k, (x, len_k) in enumerate(zip(xs, lengths)):
            if isinstance(x, PackedSequence):  # passed on packed (token ids embedded in place)
                if len_k is not None:
                    raise ValueError(f"lengths[{k}] must be None when x[{k}] is a PackedSequence")
                if self.embedding is not None:
                    self._check_token_ids(x.data, k, "(sum_len,)", 1)
                    x = PackedSequence(self.embedding(x.data), x.batch_sizes, x.sorted_indices,
                                       x.unsorted_indices)
                entries.append(x)
                continue
            if not isinstance(x, Tensor):
                raise TypeError(f"x[{k}] must be a Tensor or PackedSequence, got {type(x).__name__}")
            if self.embedding is not None:
                self._check_token_ids(x, k, "(B_k, T_k)", 2)
                x = self.embedding(x)  # (B_k, T_k, E)
            elif x.dim() != 3:
                raise ValueError(f"x[{k}] must be (B_k, T_k, C), got shape {tuple(x.shape)}")
            if len_k is not None:
                len_k = torch.as_tensor(len_k).cpu()
                if tuple(len_k.shape) != (x.shape[0],):
                    raise ValueError(f"lengths[{k}] must be ({x.shape[0]},), one per row of x[{k}], "
                                     f"got shape {tuple(len_k.shape)}")
                x = pack_padded_sequence(x, len_k, batch_first=True, enforce_sorted=False)
            entries.append(x)
        outs = []
        for k, (seq, _) in enumerate(self.lstm(entries)):
            len_k = None
            if isinstance(seq, PackedSequence):  # (B_k, T_k, H) and its lengths, for the pooling
                seq, len_k = pad_packed_sequence(seq, batch_first=True)
            pooled = _pool(seq.unsqueeze(0), len_k, self.pooling)[0]  # (B_k, H)
            outs.append(self.heads[k](pooled))
        return outs

    @staticmethod
    def _check_token_ids(ids: Tensor, k: int, shape: str, dim: int):
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != dim:
            raise ValueError(f"x[{k}]: token input must be integer ids {shape}, got {ids.dtype} of "
                             f"shape {tuple(ids.shape)}")
