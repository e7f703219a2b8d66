"""Plain-PyTorch references: what users run today, and the test oracle for the fused ops.

Nothing here is fast on purpose; everything here is what the seed designs wrote by hand.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class LSTMLoop(nn.Module):
    """An ``nn.ModuleList`` of ``nn.LSTM`` called in a Python loop, with GroupedLSTM's calling
    convention: input (T, B, C) shared or (G, T, B, C) per group [batch_first: (B, T, C) /
    (G, B, T, C)], hx (G, L*D, B, H) each, lengths (B,). Returns the stacked results."""

    def __init__(self, lstms: Sequence[nn.LSTM]):
        super().__init__()
        self.lstms = nn.ModuleList(lstms)

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None,
                lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        outs, hs, cs = [], [], []
        bf = self.lstms[0].batch_first
        for g, lstm in enumerate(self.lstms):
            x = input if input.dim() == 3 else input[g]
            h = None if hx is None else (hx[0][g], hx[1][g])
            if lengths is None:
                out, (h_n, c_n) = lstm(x, h)
            else:
                T = x.shape[1] if bf else x.shape[0]
                packed = pack_padded_sequence(x, lengths.cpu(), batch_first=bf, enforce_sorted=False)
                out, (h_n, c_n) = lstm(packed, h)
                out, _ = pad_packed_sequence(out, batch_first=bf, total_length=T)
            outs.append(out)
            hs.append(h_n)
            cs.append(c_n)
        return torch.stack(outs), (torch.stack(hs), torch.stack(cs))


def branch_attention_reference(branches: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                               return_weights: bool = False):
    """Unfused attention over branches: branches (G, *, H) -> (*, H) [, weights (G, *)]."""
    scores = F.linear(branches, weight.reshape(1, -1), bias).squeeze(-1)  # (G, *)
    weights = torch.softmax(scores, dim=0)
    out = (weights.unsqueeze(-1) * branches).sum(0)
    return (out, weights) if return_weights else out


class ParallelLSTMBlockRef(nn.Module):
    """The seed parallel-LSTM block: N nn.LSTMs over the same (B, T, C) input, combined by
    concatenation + Linear, by attention (Linear(H, 1) scores, softmax over branches, weighted
    sum), by mean or sum, or not at all (combine=None returns (N, B, T, H))."""

    def __init__(self, num_branches: int, input_size: int, hidden_size: int,
                 combine: Optional[str] = "concat", num_layers: int = 1):
        super().__init__()
        self.lstms = nn.ModuleList([nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
                                    for _ in range(num_branches)])
        self.combine = combine
        if combine == "concat":
            self.proj = nn.Linear(num_branches * hidden_size, hidden_size)
        elif combine == "attention":
            self.attention = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        outs = [lstm(x)[0] for lstm in self.lstms]  # each (B, T, H)
        if self.combine == "concat":
            return self.proj(torch.cat(outs, dim=-1))
        stacked = torch.stack(outs)  # (N, B, T, H)
        if self.combine == "attention":
            weights = torch.softmax(self.attention(stacked).squeeze(-1), dim=0)  # (N, B, T)
            return (weights.unsqueeze(-1) * stacked).sum(0)
        if self.combine == "mean":
            return stacked.mean(0)
        if self.combine == "sum":
            return stacked.sum(0)
        return stacked


def last_valid_step(out: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """out (B, T, H) batch-first -> (B, H): the output at each sequence's last valid step."""
    if lengths is None:
        return out[:, -1]
    idx = (lengths.to(out.device) - 1).view(-1, 1, 1).expand(-1, 1, out.shape[-1])
    return out.gather(1, idx).squeeze(1)


class MultiTaskLSTMRef(nn.Module):
    """The seed per-task model: optional shared embedding, one nn.LSTM per task, last valid step,
    one Linear head per task."""

    def __init__(self, input_size: int, hidden_size: int, output_sizes: List[int],
                 vocab_size: Optional[int] = None, embedding_dim: Optional[int] = None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim) if vocab_size else None
        in_size = embedding_dim if vocab_size else input_size
        self.lstms = nn.ModuleList([nn.LSTM(in_size, hidden_size, batch_first=True)
                                    for _ in output_sizes])
        self.heads = nn.ModuleList([nn.Linear(hidden_size, k) for k in output_sizes])

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None, task: Optional[int] = None):
        if self.embedding is not None:
            x = self.embedding(x)
        tasks = range(len(self.lstms)) if task is None else [task]
        outs = []
        for k in tasks:
            xk = x if x.dim() == 3 else x[k]
            if lengths is None:
                seq, _ = self.lstms[k](xk)
            else:
                packed = pack_padded_sequence(xk, lengths.cpu(), batch_first=True, enforce_sorted=False)
                seq, _ = self.lstms[k](packed)
                seq, _ = pad_packed_sequence(seq, batch_first=True, total_length=xk.shape[1])
            outs.append(self.heads[k](last_valid_step(seq, lengths)))
        return outs[0] if task is not None else outs


def grouped_lstm_composite(input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                           bias: Optional[Tensor], h0: Tensor, c0: Tensor,
                           lengths: Optional[Tensor] = None, reverse: bool = False):
    """One layer and direction of grouped_lstm_forward in plain differentiable torch ops (the op's
    arguments; returns output (G, T, B, H), h_n, c_n). The oracle for csrc/grouped_lstm_autograd.cpp's
    composite, which double backward differentiates."""
    if input.dim() == 3:  # (T, B, C) shared -> (G, T, B, 4H)
        xp = torch.einsum("tbc,gnc->gtbn", input, weight_ih)
    else:
        xp = torch.einsum("gtbc,gnc->gtbn", input, weight_ih)
    if bias is not None:
        xp = xp + bias[:, None, None, :]
    T = xp.shape[1]
    h, c, outs = h0, c0, [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        i, f, g, o = (xp[:, t] + torch.bmm(h, weight_hh.transpose(1, 2))).chunk(4, dim=-1)
        c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_t = torch.sigmoid(o) * torch.tanh(c_t)
        if lengths is not None:  # padding steps hold the state and emit zeros
            valid = (t < lengths.to(xp.device)).to(xp.dtype)[None, :, None]  # (1, B, 1)
            c_t = valid * c_t + (1 - valid) * c
            h_t, out_t = valid * h_t + (1 - valid) * h, valid * h_t
        else:
            out_t = h_t
        outs[t], h, c = out_t, h_t, c_t
    return torch.stack(outs, dim=1), h, c
