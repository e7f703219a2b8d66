"""GroupedLSTM: N independent LSTMs (one per task or branch) run as one grouped op."""
import contextlib
import math
import os
import re
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import _C
from ._ops import grouped_lstm_layer

_PATH_ENV = "MTL_KERNELS_LSTM_PATH"
_PATHS = ("auto", "persistent", "per_step")


@contextlib.contextmanager
def recurrence_path(path: str):
    """Choose how GroupedLSTM runs its recurrence, within a ``with`` block.

    ``"auto"`` (the default) and ``"persistent"``: the whole sequence in one kernel wherever that
    applies, else the per-step path. On a GPU that is the persistent kernel (all time steps in one
    launch), where its plan fits the device (W_hh slices in shared memory, all blocks resident at
    once); on the CPU, rows in parallel for all steps, for hidden sizes up to 128.
    ``"per_step"``: one batched GEMM and one cell kernel per step. The same as setting the
    environment variable ``MTL_KERNELS_LSTM_PATH``.
    """
    if path not in _PATHS:
        raise ValueError(f"recurrence_path must be one of {_PATHS}, got {path!r}")
    old = os.environ.get(_PATH_ENV)
    os.environ[_PATH_ENV] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ[_PATH_ENV]
        else:
            os.environ[_PATH_ENV] = old


def path_counts() -> dict:
    """How many single-layer, single-direction recurrences ran on each path since import:
    ``{"forward_sequence", "forward_per_step", "backward_sequence", "backward_per_step"}``, where
    "sequence" is the whole-sequence kernel (the persistent kernel on a GPU, rows in parallel on
    the CPU; the CPU emulator test hook counts too)."""
    fs, fp, bs, bp = _C.path_counts()
    return {"forward_sequence": fs, "forward_per_step": fp, "backward_sequence": bs,
            "backward_per_step": bp}

_LSTM_CONFIG = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                "bidirectional")


class GroupedLSTM(nn.Module):
    r"""``num_groups`` independent LSTMs with identical configuration, run together.

    A drop-in for an ``nn.ModuleList`` of ``nn.LSTM`` called in a Python loop: group ``g`` computes
    exactly what ``nn.LSTM`` number ``g`` would, with the same parameters (``from_lstms`` /
    ``to_lstms`` / ``load_state_dict`` of the ModuleList's state dict).

    Parameters are ``nn.LSTM``'s with a leading group dim ``G``: ``weight_ih_l{k}[_reverse]``
    (G, 4H, in_k), ``weight_hh_l{k}[_reverse]`` (G, 4H, H), ``bias_ih_l{k}[_reverse]`` and
    ``bias_hh_l{k}[_reverse]`` (G, 4H); gate order i, f, g, o; init U(-1/sqrt(H), 1/sqrt(H)).

    ``forward(input, hx=None, lengths=None, groups=None)``:
      * ``input`` (T, B, C) [(B, T, C) if batch_first]: one input shared by every group;
        (G, T, B, C) [(G, B, T, C)]: one input per group; or a ``PackedSequence`` whose ``data`` is
        (sum_len, C) shared or (sum_len, G, C) per group.
      * ``hx`` = (h0, c0), each (G, num_layers * D, B, H); zeros when None.
      * ``lengths`` (B,) int64: steps t >= lengths[b] are padding; their outputs are 0 and
        h_n / c_n are the states at each sequence's last valid step (as with packed sequences).
      * ``groups`` a list of group indices: run only those groups; the group dim of a per-group
        input, of hx and of the results is then ``len(groups)``.
      * returns ``output`` (G, T, B, D*H) [(G, B, T, D*H)] (a ``PackedSequence`` with data
        (sum_len, G, D*H) for packed input) and ``(h_n, c_n)``, each (G, num_layers * D, B, H).
    """

    def __init__(self, num_groups: int, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("num_groups", num_groups), ("input_size", input_size),
                            ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero "
                          f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                          f"num_layers={num_layers}")
        self.num_groups = num_groups
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        G, H = num_groups, hidden_size
        self._param_names: List[str] = []
        for layer in range(num_layers):
            in_k = input_size if layer == 0 else H * D
            for d in range(D):
                sfx = f"l{layer}" + ("_reverse" if d == 1 else "")
                shapes = [("weight_ih_" + sfx, (G, 4 * H, in_k)), ("weight_hh_" + sfx, (G, 4 * H, H))]
                if bias:
                    shapes += [("bias_ih_" + sfx, (G, 4 * H)), ("bias_hh_" + sfx, (G, 4 * H))]
                for name, shape in shapes:
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    self._param_names.append(name)
        self.reset_parameters()

    # -- parameters -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for name in self._param_names:
                getattr(self, name).uniform_(-bound, bound)

    def _layer_params(self, layer: int, direction: int):
        sfx = f"l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih, w_hh = getattr(self, "weight_ih_" + sfx), getattr(self, "weight_hh_" + sfx)
        if self.bias:
            return w_ih, w_hh, getattr(self, "bias_ih_" + sfx), getattr(self, "bias_hh_" + sfx)
        return w_ih, w_hh, None, None

    def extra_repr(self) -> str:
        s = f"num_groups={self.num_groups}, {self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s

    # -- conversion from / to a ModuleList of nn.LSTM ----------------------------------------
    @classmethod
    def from_lstms(cls, lstms: Sequence[nn.LSTM]) -> "GroupedLSTM":
        """A GroupedLSTM whose group g is a copy of ``lstms[g]`` (identically configured nn.LSTMs)."""
        lstms = list(lstms)
        if not lstms:
            raise ValueError("from_lstms needs at least one nn.LSTM")
        for i, m in enumerate(lstms):
            if not isinstance(m, nn.LSTM):
                raise TypeError(f"from_lstms: element {i} is {type(m).__name__}, not nn.LSTM")
            if getattr(m, "proj_size", 0):
                raise ValueError("from_lstms: nn.LSTM with proj_size > 0 is not supported")
            for key in _LSTM_CONFIG:
                if getattr(m, key) != getattr(lstms[0], key):
                    raise ValueError(f"from_lstms: lstms[{i}].{key}={getattr(m, key)!r} differs from "
                                     f"lstms[0].{key}={getattr(lstms[0], key)!r}")
        ref = lstms[0]
        p0 = next(ref.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the single-layer dropout warning was nn.LSTM's already
            out = cls(len(lstms), ref.input_size, ref.hidden_size, ref.num_layers, ref.bias,
                      ref.batch_first, ref.dropout, ref.bidirectional, device=p0.device, dtype=p0.dtype)
        with torch.no_grad():
            for name in out._param_names:
                getattr(out, name).copy_(torch.stack([getattr(m, name) for m in lstms]))
        out.train(ref.training)
        return out

    def to_lstms(self) -> nn.ModuleList:
        """An ``nn.ModuleList`` of ``nn.LSTM`` with this module's weights (copies)."""
        p0 = self.weight_ih_l0
        lstms = nn.ModuleList()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for g in range(self.num_groups):
                m = nn.LSTM(self.input_size, self.hidden_size, self.num_layers, self.bias,
                            self.batch_first, self.dropout, self.bidirectional,
                            device=p0.device, dtype=p0.dtype)
                with torch.no_grad():
                    for name in self._param_names:
                        getattr(m, name).copy_(getattr(self, name)[g])
                lstms.append(m)
        lstms.train(self.training)
        return lstms

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Also accept the state dict of an nn.ModuleList of nn.LSTM: keys '{prefix}{g}.{name}'.
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.(\w+)$")
        per_group = {}
        for key in list(state_dict.keys()):
            m = pattern.match(key)
            if m and m.group(2) in self._param_names:
                per_group.setdefault(m.group(2), {})[int(m.group(1))] = key
        for name, keys in per_group.items():
            if prefix + name in state_dict:
                error_msgs.append(f"state dict has both '{prefix + name}' and per-LSTM keys for it")
                continue
            if sorted(keys) != list(range(self.num_groups)):
                error_msgs.append(f"ModuleList state dict for '{prefix + name}' has LSTMs "
                                  f"{sorted(keys)}, expected 0..{self.num_groups - 1}")
                continue
            state_dict[prefix + name] = torch.stack([state_dict.pop(keys[g])
                                                     for g in range(self.num_groups)])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, input: Union[Tensor, PackedSequence],
                hx: Optional[Tuple[Tensor, Tensor]] = None, lengths: Optional[Tensor] = None,
                groups: Optional[Sequence[int]] = None):
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("lengths must be None when input is a PackedSequence")
            padded, lengths = pad_packed_sequence(input)  # (T, B, C) or (T, B, G, C), original order
            x = padded if padded.dim() == 3 else padded.permute(2, 0, 1, 3)
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
            x = input
            if x.dim() not in (3, 4):
                raise ValueError("GroupedLSTM: input must be 3-D (shared: "
                                 f"{'(B, T, C)' if self.batch_first else '(T, B, C)'}) or 4-D (per group: "
                                 f"{'(G, B, T, C)' if self.batch_first else '(G, T, B, C)'}), got "
                                 f"shape {tuple(x.shape)}")
            if self.batch_first:
                x = x.transpose(-3, -2)
        shared = x.dim() == 3

        group_index = self._group_index(groups, x.device)
        G = self.num_groups if group_index is None else group_index.numel()
        if not shared and x.shape[0] != G:
            raise ValueError(f"GroupedLSTM: per-group input has {x.shape[0]} groups, expected {G}")
        T, B = x.shape[-3], x.shape[-2]
        if x.shape[-1] != self.input_size:
            raise ValueError(f"GroupedLSTM: input.size(-1) must be equal to input_size. "
                             f"Expected {self.input_size}, got {x.shape[-1]}")
        p0 = self.weight_ih_l0
        if x.dtype != p0.dtype:
            raise ValueError(f"GroupedLSTM: input dtype {x.dtype} does not match the parameters' "
                             f"dtype {p0.dtype}")
        if x.device != p0.device:
            raise ValueError(f"GroupedLSTM: input is on {x.device} but the parameters are on {p0.device}")
        if T == 0:
            raise ValueError("GroupedLSTM: input has no time steps")
        lengths = self._check_lengths(lengths, B, T, x.device)
        h0, c0 = self._check_hx(hx, G, B, x)

        D = 2 if self.bidirectional else 1
        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh = self._layer_params(layer, d)
                if group_index is not None:
                    w_ih, w_hh = w_ih.index_select(0, group_index), w_hh.index_select(0, group_index)
                    if b_ih is not None:
                        b_ih, b_hh = b_ih.index_select(0, group_index), b_hh.index_select(0, group_index)
                bias = b_ih + b_hh if b_ih is not None else None
                k = layer * D + d
                out, h, c = grouped_lstm_layer(layer_input, w_ih, w_hh, bias, h0[:, k], c0[:, k],
                                               lengths, reverse=d == 1)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_out = outs[0] if D == 1 else torch.cat(outs, dim=-1)  # (G, T, B, D*H)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_out = nn.functional.dropout(layer_out, self.dropout, training=True)
            layer_input = layer_out
        output = layer_input
        hidden = (torch.stack(h_n, 1), torch.stack(c_n, 1))  # (G, L*D, B, H)

        if packed:
            return self._pack_like(output, input, lengths), hidden
        if self.batch_first:
            output = output.transpose(1, 2)  # (G, B, T, D*H)
        return output, hidden

    # -- helpers -----------------------------------------------------------------------------
    def _group_index(self, groups, device) -> Optional[Tensor]:
        if groups is None:
            return None
        idx = torch.as_tensor(list(groups) if not isinstance(groups, Tensor) else groups,
                              dtype=torch.long)
        if idx.dim() != 1 or idx.numel() == 0:
            raise ValueError("groups must be a non-empty 1-D list of group indices")
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_groups:
            raise ValueError(f"groups must lie in [0, {self.num_groups}), got {idx.tolist()}")
        return idx.to(device)

    @staticmethod
    def _check_lengths(lengths, B: int, T: int, device) -> Optional[Tensor]:
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths)
        if lengths.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if B > 0:
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 1 or hi > T:
                raise ValueError(f"lengths must lie in [1, {T}] (the number of time steps), "
                                 f"got values in [{lo}, {hi}]")
        return lengths.to(device=device, dtype=torch.int64)

    def _check_hx(self, hx, G: int, B: int, x: Tensor) -> Tuple[Tensor, Tensor]:
        LD = self.num_layers * (2 if self.bidirectional else 1)
        expected = (G, LD, B, self.hidden_size)
        if hx is None:
            z = x.new_zeros(expected)
            return z, z
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError("hx must be a tuple (h0, c0)")
        for name, t in zip(("h0", "c0"), hx):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a Tensor")
            if tuple(t.shape) != expected:
                raise RuntimeError(f"Expected hidden {name} size {expected}, got {tuple(t.shape)}")
            if t.dtype != x.dtype or t.device != x.device:
                raise ValueError(f"{name} must have the input's dtype and device ({x.dtype}, "
                                 f"{x.device}), got ({t.dtype}, {t.device})")
        return hx[0], hx[1]

    @staticmethod
    def _pack_like(output: Tensor, like: PackedSequence, lengths: Tensor) -> PackedSequence:
        """Pack output (G, T, B, D*H) with the batch order of the packed input ``like``."""
        out_tb = output.permute(1, 2, 0, 3)  # (T, B, G, D*H)
        lengths = lengths.cpu()
        if like.sorted_indices is not None:
            out_tb = out_tb.index_select(1, like.sorted_indices.to(out_tb.device))
            lengths = lengths.index_select(0, like.sorted_indices.cpu())
        packed = pack_padded_sequence(out_tb, lengths, enforce_sorted=True)  # data (sum_len, G, D*H)
        return PackedSequence(packed.data, packed.batch_sizes, like.sorted_indices,
                              like.unsorted_indices)
