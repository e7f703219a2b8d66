"""Plain-PyTorch references: what users run today, and the test oracle for the fused ops.

Nothing here is fast on purpose; everything here is what the seed designs wrote by hand.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class RNNLoop(nn.Module):
    """An ``nn.ModuleList`` of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` called in a Python loop, with
    the grouped modules' calling convention: input (T, B, C) shared or (G, T, B, C) per group
    [batch_first: (B, T, C) / (G, B, T, C)], hx (G, L*D, B, R) (an LSTM: a pair), lengths (B,).
    Returns the stacked results."""

    def __init__(self, modules: Sequence[nn.RNNBase]):
        super().__init__()
        self.lstms = nn.ModuleList(modules)

    def forward(self, input: Tensor, hx=None, lengths: Optional[Tensor] = None):
        outs, hs, cs = [], [], []
        bf = self.lstms[0].batch_first
        lstm = isinstance(self.lstms[0], nn.LSTM)
        for g, m in enumerate(self.lstms):
            x = input if input.dim() == 3 else input[g]
            h = None if hx is None else ((hx[0][g], hx[1][g]) if lstm else hx[g])
            if lengths is None:
                out, h_n = m(x, h)
            else:
                T = x.shape[1] if bf else x.shape[0]
                packed = pack_padded_sequence(x, lengths.cpu(), batch_first=bf, enforce_sorted=False)
                out, h_n = m(packed, h)
                out, _ = pad_packed_sequence(out, batch_first=bf, total_length=T)
            outs.append(out)
            if lstm:
                hs.append(h_n[0])
                cs.append(h_n[1])
            else:
                hs.append(h_n)
        hidden = (torch.stack(hs), torch.stack(cs)) if lstm else torch.stack(hs)
        return torch.stack(outs), hidden


LSTMLoop = RNNLoop  # the name the LSTM tests use


def branch_attention_reference(branches: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                               return_weights: bool = False):
    """Unfused attention over branches: branches (G, *, H) -> (*, H) [, weights (G, *)]."""
    scores = F.linear(branches, weight.reshape(1, -1), bias).squeeze(-1)  # (G, *)
    weights = torch.softmax(scores, dim=0)
    out = (weights.unsqueeze(-1) * branches).sum(0)
    return (out, weights) if return_weights else out


class ParallelLSTMBlockRef(nn.Module):
    """The seed parallel block: N nn.LSTMs (or nn.GRUs with module=nn.GRU: the seeds' parallel
    GRUs) over the same (B, T, C) input, combined by concatenation + Linear, by attention
    (Linear(H, 1) scores, softmax over branches, weighted sum), by mean or sum, or not at all
    (combine=None returns (N, B, T, H))."""

    def __init__(self, num_branches: int, input_size: int, hidden_size: int,
                 combine: Optional[str] = "concat", num_layers: int = 1, module=nn.LSTM):
        super().__init__()
        self.lstms = nn.ModuleList([module(input_size, hidden_size, num_layers, batch_first=True)
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


def _cell_step(cell: str, x: Tensor, r: Tensor, h: Tensor, c: Optional[Tensor]):
    """One step of a cell in plain torch ops: x, r the input- and recurrent-side pre-activations
    (G, B, K*H) (r includes b_hh for the GRU). Returns h_t, c_t (None without a cell state)."""
    if cell == "lstm":
        i, f, g, o = (x + r).chunk(4, dim=-1)
        c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_t), c_t
    if cell == "gru":  # nn.GRU: n = tanh(x_n + r * (W_hn h + b_hn))
        x_r, x_z, x_n = x.chunk(3, dim=-1)
        h_r, h_z, h_n = r.chunk(3, dim=-1)
        rr, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + rr * h_n)
        return (1 - z) * n + z * h, None
    if cell == "rnn_tanh":
        return torch.tanh(x + r), None
    if cell == "rnn_relu":
        return torch.relu(x + r), None
    raise ValueError(f"unknown cell {cell!r}")


def recurrence_composite(cell: str, input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                         bias: Optional[Tensor], bias_hh: Optional[Tensor], h0: Tensor,
                         c0: Optional[Tensor], lengths: Optional[Tensor] = None,
                         reverse: bool = False, weight_hr: Optional[Tensor] = None):
    """One layer and direction of grouped_recurrence_forward in plain differentiable torch ops (the
    op's arguments; returns output (G, T, B, R), h_n, c_n or None; weight_hr: the LSTM's projection). The oracle for the C++
    composite that double backward differentiates (csrc/recurrence/autograd.cpp), and the
    backward of the torch.func rules (_functorch.py)."""
    if input.dim() == 3:  # (T, B, C) shared -> (G, T, B, KH)
        xp = torch.einsum("tbc,gnc->gtbn", input, weight_ih)
    else:
        xp = torch.einsum("gtbc,gnc->gtbn", input, weight_ih)
    if bias is not None:
        xp = xp + bias[:, None, None, :]
    T = xp.shape[1]
    h, c, outs = h0, c0, [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        r = torch.bmm(h, weight_hh.transpose(1, 2))
        if bias_hh is not None:
            r = r + bias_hh[:, None, :]
        h_t, c_t = _cell_step(cell, xp[:, t], r, h, c)
        if weight_hr is not None:
            h_t = torch.bmm(h_t, weight_hr.transpose(1, 2))
        if lengths is not None:  # padding steps hold the state and emit zeros
            valid = (t < lengths.to(xp.device)).to(xp.dtype)  # (B,) shared or (G, B) per group
            valid = valid[None, :, None] if valid.dim() == 1 else valid[:, :, None]
            if c_t is not None:
                c_t = valid * c_t + (1 - valid) * c
            h_t, out_t = valid * h_t + (1 - valid) * h, valid * h_t
        else:
            out_t = h_t
        outs[t], h, c = out_t, h_t, c_t
    return torch.stack(outs, dim=1), h, c


def grouped_lstm_composite(input: Tensor, weight_ih: Tensor, weight_hh: Tensor,
                           bias: Optional[Tensor], h0: Tensor, c0: Tensor,
                           lengths: Optional[Tensor] = None, reverse: bool = False):
    """recurrence_composite for the LSTM, with grouped_lstm_forward's arguments."""
    return recurrence_composite("lstm", input, weight_ih, weight_hh, bias, None, h0, c0, lengths,
                                reverse)


def branch_attention_composite(branches: Tensor, weight: Tensor, bias: Optional[Tensor] = None):
    """branch_attention_forward's out (M, H) and weights (G, M) in plain torch ops: branches
    (G, M, H), weight (H,), bias (1,) or None."""
    scores = branches @ weight  # (G, M)
    if bias is not None:
        scores = scores + bias
    p = torch.softmax(scores, dim=0)
    return (p.unsqueeze(-1) * branches).sum(0), p
