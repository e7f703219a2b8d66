"""GroupedLSTM, GroupedGRU and GroupedRNN: N independent recurrent nets (one per task or branch)
run as one grouped op per layer and direction.

Each is a drop-in for an ``nn.ModuleList`` of ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` called in a
Python loop: the same constructor arguments (after ``num_groups``), parameters named as
``nn.LSTM``'s with a leading group dim, the same results, exception types and messages.
"""
import math
import numbers
import re
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from ._cells import CELL_GATES
from ._ops import recurrence_layer

# nn.RNNBase's mode -> the op's cell name
_CELL_OF_MODE = {"LSTM": "lstm", "GRU": "gru", "RNN_TANH": "rnn_tanh", "RNN_RELU": "rnn_relu"}
_TORCH_MODULE = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}
_CONFIG = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
           "bidirectional", "proj_size")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling() if hasattr(torch, "compiler") else False


def _check_positive_int(name: str, value, zero_ok: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name} must be greater than zero")


def _reject_kwargs(cls_name: str, kwargs: dict) -> None:
    """nn.GRU / nn.RNN's reaction to keyword arguments they do not take: ValueError for proj_size
    (any value, 0 included), TypeError for anything else."""
    if "proj_size" in kwargs:
        raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
    if kwargs:
        raise TypeError(f"{cls_name}.__init__() got an unexpected keyword argument "
                        f"'{next(iter(kwargs))}'")


class GroupedRNNBase(nn.Module):
    r"""``num_groups`` independent recurrent nets with one configuration, run together.

    ``mode`` is ``nn.RNNBase``'s: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU". Parameters are the
    torch module's with a leading group dim ``G``: ``weight_ih_l{k}[_reverse]`` (G, K*H, in_k),
    ``weight_hh_l{k}[_reverse]`` (G, K*H, R), ``bias_ih_l{k}[_reverse]`` and
    ``bias_hh_l{k}[_reverse]`` (G, K*H), and for an LSTM with ``proj_size`` P > 0
    ``weight_hr_l{k}[_reverse]`` (G, P, H); K = 4 (LSTM: i, f, g, o), 3 (GRU: r, z, n) or 1 (RNN),
    R = P or H; init U(-1/sqrt(H), 1/sqrt(H)).

    ``forward(input, hx=None, lengths=None, groups=None)``:
      * ``input``: (T, B, C) [(B, T, C) if batch_first] one input shared by every group;
        (G, T, B, C) [(G, B, T, C)] one input per group; (T, C) one unbatched input shared by every
        group (one per group unbatched: give it a batch of one, (G, T, 1, C)); or a
        ``PackedSequence`` whose ``data`` is (sum_len, C) shared or (sum_len, G, C) per group.
      * ``hx``: (G, num_layers * D, B, R) [(G, num_layers * D, R) unbatched]; an LSTM takes
        (h0, c0) with c0 of width H. Zeros when None.
      * ``lengths`` (B,) integers in [1, T]: steps t >= lengths[b] are padding; their outputs are 0
        and the final states are those at each sequence's last valid step (as with packed input).
      * ``groups``: a list (or 1-D integer tensor) of group indices: run only those groups; the
        group dim of a per-group input, of hx and of the results is then ``len(groups)``.
      * returns ``output`` (G, T, B, D*R) [(G, B, T, D*R); (G, T, D*R) unbatched; a
        ``PackedSequence`` with data (sum_len, G, D*R) for packed input] and ``h_n``
        (G, num_layers * D, B, R) [LSTM: ``(h_n, c_n)``].

    Under ``torch.autocast`` the recurrence runs in the autocast dtype (as ``nn.LSTM`` does), and
    gradients reach the parameters in their own dtype.
    """

    def __init__(self, mode: str, num_groups: int, input_size: int, hidden_size: int,
                 num_layers: int = 1, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None) -> None:
        super().__init__()
        if mode not in _CELL_OF_MODE:
            raise ValueError("Unrecognized RNN mode: " + str(mode))
        # nn.RNNBase's checks, types and messages
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the "
                             "probability of an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so "
                          "non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(bidirectional, bool) and bidirectional not in (0, 1):  # nn.LSTM takes 0/1
            raise TypeError(
                f"bidirectional should be of type bool, got: {type(bidirectional).__name__}")
        bidirectional = bool(bidirectional)
        _check_positive_int("num_groups", num_groups)
        _check_positive_int("input_size", input_size)
        _check_positive_int("hidden_size", hidden_size)
        _check_positive_int("num_layers", num_layers)
        _check_positive_int("proj_size", proj_size, zero_ok=True)
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.mode = mode
        self.num_groups = num_groups
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        G, H, R = num_groups, hidden_size, proj_size or hidden_size
        KH = CELL_GATES[_CELL_OF_MODE[mode]] * H
        self._flat_weights_names: List[str] = []
        self._all_weights: List[List[str]] = []
        for layer in range(num_layers):
            in_k = input_size if layer == 0 else R * D
            for d in range(D):
                sfx = f"l{layer}" + ("_reverse" if d == 1 else "")
                shapes = [("weight_ih_" + sfx, (G, KH, in_k)), ("weight_hh_" + sfx, (G, KH, R))]
                if bias:
                    shapes += [("bias_ih_" + sfx, (G, KH)), ("bias_hh_" + sfx, (G, KH))]
                if proj_size:
                    shapes += [("weight_hr_" + sfx, (G, proj_size, H))]
                for name, shape in shapes:
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                self._flat_weights_names += [name for name, _ in shapes]
                self._all_weights.append([name for name, _ in shapes])
        self.reset_parameters()

    @property
    def cell(self) -> str:
        """The op's name of the cell: "lstm", "gru", "rnn_tanh" or "rnn_relu"."""
        return _CELL_OF_MODE[self.mode]

    # -- parameters -------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for weight in self.parameters():
                weight.uniform_(-stdv, stdv)

    @property
    def _flat_weights(self) -> List[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> List[List[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """A no-op, for code written for nn.LSTM: the grouped op reads the parameters as they are."""

    def _layer_params(self, layer: int, direction: int):
        """(weight_ih, weight_hh, bias_ih, bias_hh, weight_hr) of a layer and direction, None where
        the configuration has none (bias=False, no proj_size). A registered parameter is read from
        _parameters (five nn.Module.__getattr__ calls took ~15 us per layer on the 2-core CI CPU);
        anything else (a parametrization's property, a weight set by a hook) by getattr."""
        sfx = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        params = self._parameters
        present = (True, True, self.bias, self.bias, self.proj_size > 0)
        return tuple((params[name] if name in params else getattr(self, name)) if has else None
                     for name, has in zip(("weight_ih" + sfx, "weight_hh" + sfx, "bias_ih" + sfx,
                                           "bias_hh" + sfx, "weight_hr" + sfx), present))

    def extra_repr(self) -> str:
        s = f"num_groups={self.num_groups}, {self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        return s

    # -- conversion from / to a ModuleList of the torch module ----------------------------------
    def _torch_kwargs(self) -> dict:
        kwargs = {k: getattr(self, k) for k in _CONFIG if k != "proj_size"}
        if self.mode == "LSTM":
            kwargs["proj_size"] = self.proj_size
        if self.mode.startswith("RNN"):
            kwargs["nonlinearity"] = "tanh" if self.mode == "RNN_TANH" else "relu"
        return kwargs

    @classmethod
    def from_modules(cls, modules: Sequence[nn.RNNBase]) -> "GroupedRNNBase":
        """One grouped module whose group g is a copy of ``modules[g]``: identically configured
        ``nn.LSTM``s for GroupedLSTM, ``nn.GRU``s for GroupedGRU, ``nn.RNN``s for GroupedRNN."""
        modules = list(modules)
        if not modules:
            raise ValueError("from_modules needs at least one module")
        if cls is GroupedRNNBase:  # the grouped class of the modules' kind
            mode = getattr(modules[0], "mode", None)
            if mode not in _CELL_OF_MODE:
                raise TypeError(f"from_modules takes nn.LSTM, nn.GRU or nn.RNN modules, got "
                                f"{type(modules[0]).__name__}")
            return {"LSTM": GroupedLSTM, "GRU": GroupedGRU}.get(mode, GroupedRNN).from_modules(modules)
        want = _TORCH_MODULE[cls._mode_for(modules[0])]
        for i, m in enumerate(modules):
            if type(m) is not want:
                raise TypeError(f"{cls.__name__}.from_modules: element {i} is {type(m).__name__}, "
                                f"not {want.__name__}")
            for key in _CONFIG + ("mode",):
                if getattr(m, key, None) != getattr(modules[0], key, None):
                    raise ValueError(f"from_modules: modules[{i}].{key}={getattr(m, key)!r} differs "
                                     f"from modules[0].{key}={getattr(modules[0], key)!r}")
        ref = modules[0]
        p0 = next(ref.parameters())
        for i, m in enumerate(modules):  # no silent cast of a group's weights to modules[0]'s dtype
            for name, p in m.named_parameters():
                if p.dtype != p0.dtype or p.device != p0.device:
                    raise ValueError(f"from_modules: modules[{i}].{name} is {p.dtype} on {p.device}, "
                                     f"but modules[0]'s parameters are {p0.dtype} on {p0.device}")
        kwargs = dict(num_layers=ref.num_layers, bias=ref.bias, batch_first=ref.batch_first,
                      dropout=ref.dropout, bidirectional=ref.bidirectional, device=p0.device,
                      dtype=p0.dtype)
        if ref.mode == "LSTM":
            kwargs["proj_size"] = ref.proj_size
        if ref.mode.startswith("RNN"):
            kwargs["nonlinearity"] = ref.nonlinearity
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the single-layer dropout warning was the module's already
            out = cls(len(modules), ref.input_size, ref.hidden_size, **kwargs)
        with torch.no_grad():
            for name in out._flat_weights_names:
                getattr(out, name).copy_(torch.stack([getattr(m, name) for m in modules]))
        for name in out._flat_weights_names:  # frozen weights stay frozen
            flags = {getattr(m, name).requires_grad for m in modules}
            if len(flags) > 1:
                raise ValueError(f"from_modules: {name} requires grad in some modules and not in "
                                 f"others; a grouped parameter has one requires_grad for all groups")
            getattr(out, name).requires_grad_(flags.pop())
        out.train(ref.training)
        return out

    @classmethod
    def _mode_for(cls, module: nn.Module) -> str:
        return getattr(module, "mode", "")

    def to_modules(self) -> nn.ModuleList:
        """An ``nn.ModuleList`` of the torch module (nn.LSTM / nn.GRU / nn.RNN) with this module's
        weights (copies), group by group."""
        p0 = self.weight_ih_l0
        modules = nn.ModuleList()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for g in range(self.num_groups):
                m = _TORCH_MODULE[self.mode](device=p0.device, dtype=p0.dtype, **self._torch_kwargs())
                with torch.no_grad():
                    for name in self._flat_weights_names:
                        getattr(m, name).copy_(getattr(self, name)[g])
                for name in self._flat_weights_names:
                    getattr(m, name).requires_grad_(getattr(self, name).requires_grad)
                modules.append(m)
        modules.train(self.training)
        return modules

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Also accept the state dict of an nn.ModuleList of the torch module: '{prefix}{g}.{name}'.
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.(\w+)$")
        per_group = {}
        for key in list(state_dict.keys()):
            m = pattern.match(key)
            if m and m.group(2) in self._flat_weights_names:
                per_group.setdefault(m.group(2), {})[int(m.group(1))] = key
        for name, keys in per_group.items():
            if prefix + name in state_dict:
                error_msgs.append(f"state dict has both '{prefix + name}' and per-module keys for it")
                continue
            if sorted(keys) != list(range(self.num_groups)):
                error_msgs.append(f"ModuleList state dict for '{prefix + name}' has modules "
                                  f"{sorted(keys)}, expected 0..{self.num_groups - 1}")
                continue
            want = tuple(getattr(self, name).shape[1:])
            shapes = [tuple(getattr(state_dict[keys[g]], "shape", ())) for g in range(self.num_groups)]
            bad = [g for g in range(self.num_groups) if shapes[g] != want]
            if bad:  # as load_state_dict reports it (not torch.stack's error)
                error_msgs.append(f"size mismatch for {keys[bad[0]]}: copying a param with shape "
                                  f"{shapes[bad[0]]} from checkpoint, the shape in current model "
                                  f"is {want}.")
                continue
            state_dict[prefix + name] = torch.stack([state_dict.pop(keys[g])
                                                     for g in range(self.num_groups)])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, input: Union[Tensor, PackedSequence, Sequence], hx=None,
                lengths: Optional[Tensor] = None, groups: Optional[Sequence[int]] = None):
        # one batch per group, each its own B and T (a PackedSequence is a tuple too: not a list)
        if isinstance(input, (list, tuple)) and not isinstance(input, PackedSequence):
            return self._forward_list(input, hx, lengths, groups)
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            if lengths is not None:
                raise ValueError("lengths must be None when input is a PackedSequence")
            padded, lengths = pad_packed_sequence(input)  # (T, B, C) or (T, B, G, C), original order
            x = padded if padded.dim() == 3 else padded.permute(2, 0, 1, 3)
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"input must be a Tensor or PackedSequence, got {type(input).__name__}")
            x = input
            if x.dim() not in (2, 3, 4):
                raise ValueError(
                    f"{type(self).__name__}: Expected input to be 2D (unbatched, shared), 3D "
                    f"(shared: {'(B, T, C)' if self.batch_first else '(T, B, C)'}) or 4D (one per "
                    f"group: {'(G, B, T, C)' if self.batch_first else '(G, T, B, C)'}), got "
                    f"{x.dim()}D instead")
            unbatched = x.dim() == 2
            if unbatched:
                x = x.unsqueeze(1)  # (T, 1, C)
            elif self.batch_first:
                x = x.transpose(-3, -2)
        shared = x.dim() == 3

        group_index = self._group_index(groups, x.device)
        G = self.num_groups if group_index is None else group_index.numel()
        if not shared and x.shape[0] != G:
            raise ValueError(f"{type(self).__name__}: per-group input has {x.shape[0]} groups, "
                             f"expected {G}")
        T, B = x.shape[-3], x.shape[-2]
        self._check_input(x, T)
        lengths = self._check_lengths(lengths, B, T, x.device)
        # hx None: zero states, made per layer and direction below
        h0, c0 = (None, None) if hx is None else self._check_hx(hx, G, B, x, unbatched)
        output, h_n, c_n = self._run_layers(x, h0, c0, lengths, group_index, G, B)
        hidden = h_n if c_n is None else (h_n, c_n)

        if packed:
            return self._pack_like(output, input, lengths), hidden
        if unbatched:  # drop the batch dim of one
            output = output.squeeze(2)
            hidden = tuple(t.squeeze(2) for t in hidden) if c_n is not None else hidden.squeeze(2)
        elif self.batch_first:
            output = output.transpose(1, 2)  # (G, B, T, D*R)
        return output, hidden

    # -- helpers -----------------------------------------------------------------------------
    def _forward_list(self, inputs: Sequence, hx, lengths, groups):
        """forward() for a list of per-group inputs: entry k is group k's own batch (of groups[k]
        with ``groups``), each (T_k, B_k, C) [(B_k, T_k, C) batch_first], (T_k, C) unbatched or a
        PackedSequence, with its own T_k and B_k. Returns what the loop ``[m(x) for m, x in
        zip(modules, inputs)]`` returns: a list of (output_k, h_k) [(output_k, (h_k, c_k))], each
        in the torch module's shapes and in its entry's form.

        How: the entries are padded into one per-group input (G, max T, max B, C) with per-(group,
        row) lengths (G, max B): T_k for a tensor entry's rows, the packed lengths for a packed
        one, 0 for the rows past B_k (no sequence: output 0, state held). So every layer and
        direction is still one grouped op call for all groups."""
        name = type(self).__name__
        if lengths is not None:
            raise ValueError(f"{name}: lengths must be None for a list of per-group inputs (give "
                             f"an entry as a PackedSequence for lengths of its own)")
        p0 = self.weight_ih_l0
        group_index = self._group_index(groups, p0.device)
        G = self.num_groups if group_index is None else group_index.numel()
        if len(inputs) != G:
            what = f"{G} (the groups given)" if groups is not None else f"{G} (num_groups)"
            raise ValueError(f"{name}: a list of per-group inputs needs one entry per group, "
                             f"{what}; got {len(inputs)}")
        entries = [self._list_entry(k, item) for k, item in enumerate(inputs)]
        x0 = entries[0][0]
        for k, (x_k, _, _) in enumerate(entries):
            if x_k.dtype != x0.dtype:
                raise ValueError(f"{name}: input[{k}] has dtype {x_k.dtype}, input[0] {x0.dtype}: "
                                 f"the entries of a list must share one dtype")
        T = max(x_k.shape[0] for x_k, _, _ in entries)
        B = max(x_k.shape[1] for x_k, _, _ in entries)
        # x (G, T, B, C): each entry zero-padded past its own steps and rows
        x = torch.stack([nn.functional.pad(x_k, (0, 0, 0, B - x_k.shape[1], 0, T - x_k.shape[0]))
                         for x_k, _, _ in entries])
        lengths = torch.zeros(G, B, dtype=torch.int64)  # (G, B): 0 = a row with no sequence
        for k, (x_k, len_k, _) in enumerate(entries):
            lengths[k, :x_k.shape[1]] = x_k.shape[0] if len_k is None else len_k
        h0, c0 = (None, None) if hx is None else self._check_hx_list(hx, entries, G, B, x, inputs)
        output, h_n, c_n = self._run_layers(x, h0, c0, lengths.to(x.device), group_index, G, B)

        results = []
        # one autograd node splits the groups (its backward stacks their gradients once); an
        # index output[k] per group made a zero-filled full-size gradient each, summed after
        outputs = output.unbind(0)
        for k, (x_k, len_k, form) in enumerate(entries):
            T_k, B_k = x_k.shape[0], x_k.shape[1]
            out_k = outputs[k][:T_k, :B_k]  # (T_k, B_k, D*R)
            # fresh state tensors, as nn.LSTM's (detach_() on them must work)
            h_k = h_n[k, :, :B_k].clone()
            c_k = None if c_n is None else c_n[k, :, :B_k].clone()
            if form == "packed":
                out_k = self._pack_entry(out_k, inputs[k], len_k)
                unsort = inputs[k].unsorted_indices
                if unsort is not None:  # states in the original row order, as nn.LSTM's
                    h_k = h_k.index_select(1, unsort.to(h_k.device))
                    c_k = None if c_k is None else c_k.index_select(1, unsort.to(c_k.device))
            elif form == "unbatched":
                out_k, h_k = out_k[:, 0], h_k[:, 0]
                c_k = None if c_k is None else c_k[:, 0]
            elif self.batch_first:
                out_k = out_k.transpose(0, 1)  # (B_k, T_k, D*R)
            results.append((out_k, h_k if c_k is None else (h_k, c_k)))
        return results

    def _list_entry(self, k: int, item):
        """Entry k of a list input -> (x_k (T_k, B_k, C) time-major, lengths_k (B_k,) int64 on the
        CPU for a PackedSequence else None, its form: "batched" | "unbatched" | "packed"). A packed
        entry's rows come in its sorted order (longest first), not the original one."""
        name = type(self).__name__
        if isinstance(item, PackedSequence):
            x_k, len_k = pad_packed_sequence(item)  # (T_k, B_k, C), the original row order
            form = "packed"
            if item.sorted_indices is not None:  # rows longest first, as packed: the kernels
                # skip a group's trailing rows once their sequences ended
                x_k = x_k.index_select(1, item.sorted_indices.to(x_k.device))
                len_k = len_k.index_select(0, item.sorted_indices.cpu())
            if x_k.dim() != 3:
                raise ValueError(f"{name}: input[{k}] must pack (T, B, C) sequences, got data of "
                                 f"{item.data.dim()}D")
        elif isinstance(item, Tensor):
            if item.dim() not in (2, 3):
                raise ValueError(
                    f"{name}: input[{k}] must be 3-D ({'(B, T, C)' if self.batch_first else '(T, B, C)'}"
                    f") or 2-D (unbatched (T, C)) in a list of per-group inputs, got {item.dim()}D")
            form = "unbatched" if item.dim() == 2 else "batched"
            x_k = item.unsqueeze(1) if form == "unbatched" else (
                item.transpose(0, 1) if self.batch_first else item)
            len_k = None
        else:
            raise TypeError(f"{name}: input[{k}] must be a Tensor or PackedSequence, got "
                            f"{type(item).__name__}")
        self._check_input(x_k, x_k.shape[0], f"input[{k}]")
        return x_k, len_k, form

    def _check_input(self, x: Tensor, T: int, what: str = "input"):
        """x's features, dtype, device and length against the module's, with nn.LSTM's messages
        (`what` names the input: "input", or a list's entry "input[k]")."""
        p0 = self.weight_ih_l0
        entry = "" if what == "input" else f" ({what})"
        if x.shape[-1] != self.input_size:
            raise RuntimeError(f"{what}.size(-1) must be equal to input_size. Expected "
                               f"{self.input_size}, got {x.shape[-1]}")
        if x.dtype != p0.dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(f"RNN input dtype ({x.dtype}){entry} does not match weight dtype "
                             f"({p0.dtype}). Convert input: input.to({p0.dtype}), or convert model: "
                             f"model.to({x.dtype})")
        if x.device != p0.device:
            raise RuntimeError(f"{type(self).__name__}: {what} is on {x.device} but the parameters "
                               f"are on {p0.device}")
        if T == 0:
            raise RuntimeError(f"Expected sequence length to be larger than 0 in RNN{entry}")

    def _check_hx_list(self, hx, entries, G: int, B: int, x: Tensor, inputs):
        """hx for a list input: one state per group in the torch module's shapes ((h_k, c_k) for
        the LSTM; each (L*D, B_k, width), (L*D, width) for an unbatched entry; an entry None:
        zeros) -> (h0, c0 or None), each (G, L*D, B, width), zero past B_k; a packed entry's rows
        in its sorted order (``inputs[k].sorted_indices``), as _list_entry lays them out."""
        name = type(self).__name__
        lstm = self.mode == "LSTM"
        if not isinstance(hx, (list, tuple)) or len(hx) != G or (
                lstm and any(isinstance(h, Tensor) for h in hx)):
            raise ValueError(f"{name}: with a list of per-group inputs, hx must be a list of {G} "
                             f"per-group states{' (h_k, c_k)' if lstm else ''} in the torch "
                             f"module's shapes, or None")
        LD = self.num_layers * (2 if self.bidirectional else 1)
        widths = (self.proj_size or self.hidden_size, self.hidden_size)
        padded = ([], [])
        for k, (state, (x_k, _, form)) in enumerate(zip(hx, entries)):
            B_k = x_k.shape[1]
            order = getattr(inputs[k], "sorted_indices", None)  # packed entries only
            if state is None:
                parts = [x.new_zeros(LD, B_k, w) for w in widths[:2 if lstm else 1]]
            else:
                if lstm and (not isinstance(state, (tuple, list)) or len(state) != 2):
                    raise ValueError(f"{name}: hx[{k}] must be a tuple (h_k, c_k) for an LSTM")
                parts = list(state) if lstm else [state]
            for i, t in enumerate(parts):
                what = f"hx[{k}]" + (f"[{i}]" if lstm else "")
                if not isinstance(t, Tensor):
                    raise TypeError(f"{name}: {what} must be a Tensor, got {type(t).__name__}")
                if state is not None and form == "unbatched":
                    if t.dim() != 2:
                        raise RuntimeError(f"For unbatched 2-D input[{k}], {what} should also be "
                                           f"2-D but got {t.dim()}-D tensor")
                    t = t.unsqueeze(1)
                expected = (LD, B_k, widths[i])
                if tuple(t.shape) != expected:
                    raise RuntimeError(f"Expected {what} size {expected}, got {list(t.shape)}")
                if t.device != x.device:
                    raise RuntimeError(f"{what} is on {t.device} but input is on {x.device}")
                if t.dtype != x.dtype and not torch._C._is_any_autocast_enabled():
                    raise RuntimeError(f"{what} dtype ({t.dtype}) does not match input dtype "
                                       f"({x.dtype})")
                if order is not None:
                    t = t.index_select(1, order.to(t.device))
                padded[i].append(nn.functional.pad(t, (0, 0, 0, B - B_k)))
        h0 = torch.stack(padded[0])
        return h0, (torch.stack(padded[1]) if lstm else None)

    @staticmethod
    def _pack_entry(output: Tensor, like: PackedSequence, lengths: Tensor) -> PackedSequence:
        """Pack one group's output (T, B, D*R), its rows already in the sorted order of its packed
        input (_list_entry), with that input's batch order."""
        packed = pack_padded_sequence(output, lengths.cpu(), enforce_sorted=True)  # data (sum_len, D*R)
        return PackedSequence(packed.data, packed.batch_sizes, like.sorted_indices,
                              like.unsorted_indices)

    def _run_layers(self, x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor],
                    lengths: Optional[Tensor], group_index: Optional[Tensor], G: int, B: int):
        """Every layer and direction, one grouped op call each. x (T, B, C) shared or (G, T, B, C)
        per group, time-major; h0 / c0 (G, L*D, B, R / H) or None (zeros); lengths (B,) or (G, B)
        or None. Returns output (G, T, B, D*R), h_n (G, L*D, B, R), c_n (G, L*D, B, H) or None."""
        lstm = self.mode == "LSTM"
        R = self.proj_size or self.hidden_size

        D = 2 if self.bidirectional else 1
        cell = self.cell
        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_params(layer, d)
                if group_index is not None:
                    w_ih, w_hh, b_ih, b_hh, w_hr = (
                        None if w is None else w.index_select(0, group_index)
                        for w in (w_ih, w_hh, b_ih, b_hh, w_hr))
                # both biases as they are: gru keeps b_hn inside r * (W_hn h + b_hn), the other
                # cells' op adds b_hh to b_ih (no add here, and no autograd node for one)
                k = layer * D + d
                if h0 is None:  # zero initial states, one layer and direction's own
                    h0_k = x.new_zeros(G, B, R)
                    c0_k = x.new_zeros(G, B, self.hidden_size) if lstm else None
                else:
                    h0_k, c0_k = h0[:, k], (None if c0 is None else c0[:, k])
                out, h, c = recurrence_layer(cell, layer_input, w_ih, w_hh, b_ih, b_hh, h0_k, c0_k,
                                             lengths, reverse=d == 1, weight_hr=w_hr)
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_out = outs[0] if D == 1 else torch.cat(outs, dim=-1)  # (G, T, B, D*R)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_out = nn.functional.dropout(layer_out, self.dropout, training=True)
            layer_input = layer_out
        # (G, L*D, B, R): fresh tensors, not views of the op's results (as nn.LSTM's: detach_()
        # on them, as truncated BPTT does, must work)
        return layer_input, torch.stack(h_n, 1), (torch.stack(c_n, 1) if lstm else None)

    def _group_index(self, groups, device) -> Optional[Tensor]:
        """groups -> a 1-D int64 index on `device`. Checked in Python for a list (no tensor, no
        sync, nothing data-dependent under torch.compile); a tensor's values are checked in eager
        only (index_select bounds-checks them anyway)."""
        if groups is None:
            return None
        if isinstance(groups, Tensor):
            if groups.dim() != 1 or groups.numel() == 0 or groups.dtype.is_floating_point or \
                    groups.dtype == torch.bool:
                raise ValueError("groups must be a non-empty 1-D list or integer tensor of group "
                                 f"indices, got {groups}")
            if not _is_compiling():
                lo, hi = int(groups.min()), int(groups.max())
                if lo < 0 or hi >= self.num_groups:
                    raise ValueError(f"groups must lie in [0, {self.num_groups}), got "
                                     f"{groups.tolist()}")
            return groups.to(device=device, dtype=torch.long)
        if isinstance(groups, numbers.Number) or not hasattr(groups, "__iter__"):
            raise TypeError(f"groups must be a list or 1-D integer tensor of group indices, got "
                            f"{type(groups).__name__}")
        groups = list(groups)
        if not groups:
            raise ValueError("groups must be a non-empty 1-D list or integer tensor of group indices")
        for g in groups:
            if not isinstance(g, numbers.Integral) or isinstance(g, bool):
                raise TypeError(f"groups must hold integers, got {g!r} ({type(g).__name__})")
            if not 0 <= g < self.num_groups:
                raise ValueError(f"groups must lie in [0, {self.num_groups}), got {groups}")
        return torch.tensor(groups, dtype=torch.long, device=device)

    @staticmethod
    def _check_lengths(lengths, B: int, T: int, device) -> Optional[Tensor]:
        if lengths is None:
            return None
        lengths = torch.as_tensor(lengths)
        if lengths.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.shape != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        # The value check needs the values: eager only. Under torch.compile the op checks a CPU
        # tensor itself (same bounds), and the kernels stay in bounds for any value.
        if B > 0 and not _is_compiling():
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 1 or hi > T:
                raise ValueError(f"lengths must lie in [1, {T}] (the number of time steps), "
                                 f"got values in [{lo}, {hi}]")
        return lengths.to(device=device, dtype=torch.int64)

    def _check_hx(self, hx, G: int, B: int, x: Tensor, unbatched: bool):
        """hx (given) -> (h0, c0 or None), each (G, L*D, B, width)."""
        LD = self.num_layers * (2 if self.bidirectional else 1)
        R = self.proj_size or self.hidden_size
        lstm = self.mode == "LSTM"
        if lstm:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise ValueError("hx must be a tuple (h0, c0) for an LSTM")
            states = list(hx)
            names, widths = ("hidden[0]", "hidden[1]"), (R, self.hidden_size)
        else:
            states, names, widths = [hx], ("hidden",), (R,)
        for i, t in enumerate(states):
            if not isinstance(t, Tensor):
                raise TypeError(f"hx must hold Tensors, got {type(t).__name__}")
            want_dim = 3 if unbatched else 4
            if t.dim() != want_dim:
                kind = "unbatched 2-D input" if unbatched else "batched input"
                raise RuntimeError(f"For {kind}, hx{' and cx' if lstm else ''} should be {want_dim}-D "
                                   f"(G, num_layers * num_directions, {'' if unbatched else 'B, '}H) "
                                   f"but got {t.dim()}-D tensors")
            if unbatched:
                t = t.unsqueeze(2)
            expected = (G, LD, B, widths[i])
            if tuple(t.shape) != expected:
                raise RuntimeError(f"Expected {names[i]} size {expected}, got {list(t.shape)}")
            if t.device != x.device:
                raise RuntimeError(f"{names[i]} is on {t.device} but input is on {x.device}")
            states[i] = t
        for name, t in zip(names, states):
            if t.dtype != x.dtype and not torch._C._is_any_autocast_enabled():
                raise RuntimeError(f"{name} dtype ({t.dtype}) does not match input dtype ({x.dtype})")
        return states[0], (states[1] if lstm else None)

    @staticmethod
    def _pack_like(output: Tensor, like: PackedSequence, lengths: Tensor) -> PackedSequence:
        """Pack output (G, T, B, D*R) with the batch order of the packed input ``like``."""
        out_tb = output.permute(1, 2, 0, 3)  # (T, B, G, D*R)
        lengths = lengths.cpu()
        if like.sorted_indices is not None:
            out_tb = out_tb.index_select(1, like.sorted_indices.to(out_tb.device))
            lengths = lengths.index_select(0, like.sorted_indices.cpu())
        packed = pack_padded_sequence(out_tb, lengths, enforce_sorted=True)  # data (sum_len, G, D*R)
        return PackedSequence(packed.data, packed.batch_sizes, like.sorted_indices,
                              like.unsorted_indices)


class GroupedLSTM(GroupedRNNBase):
    r"""``num_groups`` independent LSTMs (``nn.LSTM``'s arguments after ``num_groups``, proj_size
    included), run together: a drop-in for an ``nn.ModuleList`` of ``nn.LSTM``. Returns
    ``output, (h_n, c_n)``; see :class:`GroupedRNNBase` for the shapes."""

    def __init__(self, num_groups: int, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None) -> None:
        super().__init__("LSTM", num_groups, input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, proj_size, device, dtype)

    @classmethod
    def from_lstms(cls, lstms: Sequence[nn.LSTM]) -> "GroupedLSTM":
        """A GroupedLSTM whose group g is a copy of ``lstms[g]`` (identically configured)."""
        return cls.from_modules(lstms)

    def to_lstms(self) -> nn.ModuleList:
        """An ``nn.ModuleList`` of ``nn.LSTM`` with this module's weights (copies)."""
        return self.to_modules()

    @classmethod
    def _mode_for(cls, module):
        return "LSTM"


class GroupedGRU(GroupedRNNBase):
    r"""``num_groups`` independent GRUs (``nn.GRU``'s arguments after ``num_groups``), run
    together: a drop-in for an ``nn.ModuleList`` of ``nn.GRU``. Gate order r, z, n as ``nn.GRU``
    (b_hn inside r * (W_hn h + b_hn)). Returns ``output, h_n``."""

    def __init__(self, num_groups: int, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, device=None, dtype=None, **kwargs) -> None:
        _reject_kwargs(type(self).__name__, kwargs)
        super().__init__("GRU", num_groups, input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, 0, device, dtype)

    @classmethod
    def from_grus(cls, grus: Sequence[nn.GRU]) -> "GroupedGRU":
        """A GroupedGRU whose group g is a copy of ``grus[g]`` (identically configured)."""
        return cls.from_modules(grus)

    def to_grus(self) -> nn.ModuleList:
        """An ``nn.ModuleList`` of ``nn.GRU`` with this module's weights (copies)."""
        return self.to_modules()

    @classmethod
    def _mode_for(cls, module):
        return "GRU"


class GroupedRNN(GroupedRNNBase):
    r"""``num_groups`` independent Elman RNNs (``nn.RNN``'s arguments after ``num_groups``:
    ``nonlinearity`` "tanh" or "relu"), run together: a drop-in for an ``nn.ModuleList`` of
    ``nn.RNN``. Returns ``output, h_n``."""

    def __init__(self, num_groups: int, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None,
                 **kwargs) -> None:
        _reject_kwargs(type(self).__name__, kwargs)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__("RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU", num_groups,
                         input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + (f", nonlinearity={self.nonlinearity}" if self.nonlinearity != "tanh" else "")

    @classmethod
    def from_rnns(cls, rnns: Sequence[nn.RNN]) -> "GroupedRNN":
        """A GroupedRNN whose group g is a copy of ``rnns[g]`` (identically configured)."""
        return cls.from_modules(rnns)

    def to_rnns(self) -> nn.ModuleList:
        """An ``nn.ModuleList`` of ``nn.RNN`` with this module's weights (copies)."""
        return self.to_modules()

    @classmethod
    def _mode_for(cls, module):
        mode = getattr(module, "mode", "RNN_TANH")
        return mode if mode in ("RNN_TANH", "RNN_RELU") else "RNN_TANH"  # a GRU / LSTM: TypeError


def grouped_module_for(cell: str):
    """The grouped module class and its extra kwargs for a cell name of the blocks' ``cell=``
    argument: "lstm", "gru", "rnn_tanh" or "rnn_relu"."""
    if cell == "lstm":
        return GroupedLSTM, {}
    if cell == "gru":
        return GroupedGRU, {}
    if cell in ("rnn_tanh", "rnn_relu"):
        return GroupedRNN, {"nonlinearity": cell[4:]}
    raise ValueError(f"cell must be 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu', got {cell!r}")
