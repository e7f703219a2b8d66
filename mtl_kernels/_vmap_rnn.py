"""vmap batching rules for torch's own recurrent ops (aten::lstm / gru / rnn_tanh / rnn_relu, padded
``.input`` and packed ``.data`` overloads): PyTorch's model ensembling of nn.LSTM / nn.GRU / nn.RNN,

    params, buffers = torch.func.stack_module_state(lstms)
    out = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))(...)

runs through the grouped op: one grouped recurrence per layer and direction for all members.

Why a rule is needed: the ops take a ``Tensor[]`` (hx, params), so functorch cannot generate its
per-member fallback and raises "Batching rule not implemented for aten::lstm.input. We could not
generate a fallback." The rules are Python kernels on the FuncTorchBatched dispatch key (where that
error came from), so they run only when a vmap level is the innermost transform and the op meets a
tensor batched at it: every non-vmapped call, and vmap(grad(f)) (grad innermost: torch decomposes
the op into per-layer ops with batching rules, as before), take torch's path unchanged.

Inside a rule (level L, N = the vmapped size), the tensors are unwrapped at L and one of three
things runs below L (see _below), so that outer transforms (grad(vmap(...)), an outer vmap) see
ordinary ops:
  * grouped: some parameter is vmapped -> G = N groups, the grouped op per layer and direction
    (mtl_kernels._ops.recurrence_layer, which itself takes the torch.func path under outer
    transforms); an unvmapped parameter is expanded to the G members; an unvmapped input is the
    grouped op's shared input (T, B, C), a vmapped one its per-group input (G, T, B, C).
  * folded: no parameter is vmapped (vmap over data only, e.g. vmap(model)(xs)) -> the N members
    are N times the batch: torch's own op once, with batch N*B. Exact, and torch's kernels.
  * loop: anything the two above do not serve (mismatched dtypes / devices / shapes, a vmapped
    batch_sizes, autocast, dtypes other than fp16/bf16/fp32/fp64) -> the op once per member,
    stacked. Correct, and it raises torch's own error where torch would.
Dropout (train, dropout > 0, num_layers > 1) follows vmap's ``randomness``: "error" (vmap's default)
raises as any random op under vmap does; "different" draws a mask per member; "same" one mask shared
by all members.

Also here: the batched gradients of the grouped modules (a vmap over their C++ backward, whose
in-place op functorch cannot batch): _backward_in_place_rule and its legacy-vmap twin.
"""
import contextlib
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import _add_batch_dim, _unwrap_batched, is_batchedtensor

from ._cells import CELL_GATES
from ._ops import recurrence_layer
from .reference import recurrence_composite

aten = torch.ops.aten
_GROUPED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# for the tests and the benchmark: how many calls took each way since import
_rule_counts = {"grouped": 0, "folded": 0, "loop": 0, "unbatched": 0}


def rule_counts() -> dict:
    """How many vmapped calls of torch's recurrent ops each rule path served since import:
    {"grouped", "folded", "loop", "unbatched"} (unbatched: nothing vmapped at the level)."""
    return dict(_rule_counts)


class _Call:
    """One call of a recurrent op, its arguments named, with the tensors unwrapped at the vmap
    level: `x` and `bdim` pairs for input / batch_sizes, `hx` (list of one or two), `params`."""

    def __init__(self, cell, packed, args):
        self.cell, self.packed = cell, packed
        if packed:
            (self.input, self.batch_sizes, hx, self.params, self.has_biases, self.num_layers,
             self.dropout, self.train, self.bidirectional) = args
            self.batch_first = False
        else:
            (self.input, hx, self.params, self.has_biases, self.num_layers, self.dropout,
             self.train, self.bidirectional, self.batch_first) = args
            self.batch_sizes = None
        self.hx = list(hx) if cell == "lstm" else [hx]
        self.params = list(self.params)

    def rebuild(self, input, batch_sizes, hx, params):
        """The op's argument tuple with these tensors."""
        h = list(hx) if self.cell == "lstm" else hx[0]
        tail = (self.has_biases, self.num_layers, self.dropout, self.train, self.bidirectional)
        if self.packed:
            return (input, batch_sizes, h, list(params)) + tail
        return (input, h, list(params)) + tail + (self.batch_first,)


def _unwrap(t, level):
    """(value, bdim): bdim None where `t` is not batched at `level` (or is not a tensor)."""
    if isinstance(t, Tensor) and is_batchedtensor(t):
        return _unwrap_batched(t, level)
    return t, None


def _logical(t: Tensor, bdim: Optional[int]) -> Sequence[int]:
    """The shape a member sees."""
    return t.shape if bdim is None else t.shape[:bdim] + t.shape[bdim + 1:]


def _to_front(t: Tensor, bdim: Optional[int], G: int) -> Tensor:
    """A member-first tensor (G, *member shape): the vmapped dim moved to 0, or `t` expanded."""
    return t.expand(G, *t.shape) if bdim is None else t.movedim(bdim, 0)


def _dropout_active(call: _Call) -> bool:
    # torch's own condition (aten/src/ATen/native/RNN.cpp: between layers, training only)
    return call.dropout > 0 and call.train and call.num_layers > 1


def _random_error(info_randomness: str, call: _Call) -> None:
    if info_randomness == "error" and _dropout_active(call):
        # the words of vmap's own error for any random op under randomness="error"
        raise RuntimeError(
            "vmap: called random operation while in randomness error mode. Please either use the "
            "'same' or 'different' randomness flags on vmap or perform the randomness operation "
            f"out of vmap (here: the dropout={call.dropout} between the layers of a training-mode "
            f"{call.cell} module; model.eval() or dropout=0 needs no randomness)")


# ---- which path ---------------------------------------------------------------------------------
def _grouped_layout_ok(call: _Call, x, xd, hx, hxd, params, pds) -> bool:
    """Whether the grouped op serves this call: every shape, dtype and device as the op's checks
    want them. Anything else goes to the loop, which gives torch's own result or error."""
    if torch._C._is_any_autocast_enabled():  # autocast's casts are torch's op's business
        return False
    tensors = [x, *hx, *params]
    if not all(isinstance(t, Tensor) for t in tensors):
        return False
    dtype, device = x.dtype, x.device
    if dtype not in _GROUPED_DTYPES or any(t.dtype != dtype or t.device != device for t in tensors):
        return False
    if call.batch_sizes is not None and call.batch_sizes_bdim is not None:
        return False  # per-member batch sizes: no common padded layout
    D = 2 if call.bidirectional else 1
    L = call.num_layers
    lstm = call.cell == "lstm"
    if len(hx) != (2 if lstm else 1):
        return False
    hs = [_logical(h, d) for h, d in zip(hx, hxd)]
    xs = _logical(x, xd)
    if len(xs) != (2 if call.packed else 3) or any(len(h) != 3 for h in hs):
        return False
    if call.packed:
        B = int(call.batch_sizes[0]) if call.batch_sizes.numel() else 0
        C = xs[1]
    else:
        B = xs[0] if call.batch_first else xs[1]
        C = xs[2]
    if B == 0 or C == 0 or (not call.packed and xs[1 if call.batch_first else 0] == 0):
        return False
    R = hs[0][2]
    H = hs[1][2] if lstm else R
    proj = lstm and R != H
    stride = 2 + 2 * bool(call.has_biases) + int(proj)
    if len(params) != L * D * stride or any(tuple(h[:2]) != (L * D, B) for h in hs):
        return False
    KH = CELL_GATES[call.cell] * H
    for layer in range(L):
        in_k = C if layer == 0 else D * R
        want = [(KH, in_k), (KH, R)] + [(KH,), (KH,)] * bool(call.has_biases) + [(R, H)] * proj
        for d in range(D):
            k = (layer * D + d) * stride
            got = [tuple(_logical(p, pd)) for p, pd in zip(params[k:k + stride], pds[k:k + stride])]
            if got != want:
                return False
    return True



# ---- running below the vmap level ----------------------------------------------------------------
# A rule is a kernel on the FuncTorchBatched key: it runs inside the vmap level's dispatch state
# (autograd keys excluded, vmap's randomness key included). Ops it calls on the unwrapped tensors
# with FuncTorchBatched excluded, as functorch's C++ rules do, reach the level's back-mode kernel,
# which restores the state of the level below and pops the level: ordinary eager autograd with no
# transform left, an outer transform's rule otherwise. Python code that asks the functorch stack
# (recurrence_layer: C++ autograd or the torch.func Function?) must run down there too, so the
# grouped path is one op of its own, _vmap_rnn_layers, whose composite body runs at that level.
def _below():
    return torch._C._ExcludeDispatchKeyGuard(
        torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched))


def _current_vmap():
    """(level, batch size, randomness) of the vmap level whose rule is running."""
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter
    interpreter = retrieve_current_functorch_interpreter()
    return interpreter.level(), interpreter.batch_size(), interpreter.randomness()


def _same_rng_loop(device, n, fn):
    """[fn(i) for i in range(n)], each from the same RNG state (vmap's randomness="same")."""
    cuda = device.type == "cuda"
    state = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
    out = []
    for i in range(n):
        torch.cuda.set_rng_state(state, device) if cuda else torch.set_rng_state(state)
        out.append(fn(i))
    return out


# ---- the rule for torch's ops ----------------------------------------------------------------------
def _rule(cell: str, packed: bool, op, keyset, *args):
    level, N, randomness = _current_vmap()
    call = _Call(cell, packed, args)
    x, xd = _unwrap(call.input, level)
    bs, call.batch_sizes_bdim = _unwrap(call.batch_sizes, level)
    unwrapped = [_unwrap(t, level) for t in call.hx + call.params]
    hx, hxd = [t for t, _ in unwrapped[:len(call.hx)]], [d for _, d in unwrapped[:len(call.hx)]]
    params = [t for t, _ in unwrapped[len(call.hx):]]
    pds = [d for _, d in unwrapped[len(call.hx):]]
    if all(d is None for d in [xd, call.batch_sizes_bdim, *hxd, *pds]):
        _rule_counts["unbatched"] += 1  # nothing vmapped at this level: the op one level down
        with _below():
            return op(*args)
    call.batch_sizes = bs
    _random_error(randomness, call)
    with _below():
        if not _grouped_layout_ok(call, x, xd, hx, hxd, params, pds):
            _rule_counts["loop"] += 1
            outs = _loop(call, op, N, randomness, x, xd, bs, hx, hxd, params, pds)
        elif all(d is None for d in pds) and not packed and not (
                _dropout_active(call) and randomness == "same"):
            _rule_counts["folded"] += 1
            outs = _folded(call, op, N, x, xd, hx, hxd, params)
        else:
            _rule_counts["grouped"] += 1
            outs = _grouped(call, N, randomness, x, xd, bs, hx, hxd, params, pds)
    # every result carries the member dim, at the out_dim each path gives
    return tuple(_add_batch_dim(t, d, level) for t, d in outs)


def _loop(call, op, N, randomness, x, xd, bs, hx, hxd, params, pds):
    """The op once per member (member i: each vmapped tensor's slice i), results stacked at 0."""
    def sl(t, d, i):
        return t if d is None else t.select(d, i)

    def member(i):
        return op(*call.rebuild(sl(x, xd, i), sl(bs, call.batch_sizes_bdim, i),
                                [sl(h, d, i) for h, d in zip(hx, hxd)],
                                [sl(p, d, i) for p, d in zip(params, pds)]))

    if randomness == "same" and _dropout_active(call):
        results = _same_rng_loop(x.device, N, member)
    else:
        results = [member(i) for i in range(N)]
    return [(torch.stack(r), 0) for r in zip(*results)]


def _folded(call, op, N, x, xd, hx, hxd, params):
    """No parameter vmapped: the N members are N times the batch, torch's op runs once.
    x (T, B, C) [batch_first (B, T, C)] per member -> (T, N*B, C) [(N*B, T, C)];
    each state (L*D, B, W) -> (L*D, N*B, W); results unfolded, the member dim where B was."""
    b = 0 if call.batch_first else 1  # the batch dim of a member's input
    B = _logical(x, xd)[b]
    # member dim just before the batch dim, then merged with it (member-major: n*B + b)
    xf = (x.unsqueeze(b).expand(*x.shape[:b], N, *x.shape[b:]) if xd is None
          else x.movedim(xd, b)).flatten(b, b + 1)
    hf = [(h.unsqueeze(1).expand(h.shape[0], N, *h.shape[1:]) if d is None
           else h.movedim(d, 1)).flatten(1, 2) for h, d in zip(hx, hxd)]
    out, *states = op(*call.rebuild(xf, None, hf, params))
    out = out.unflatten(b, (N, B))  # (T, N, B, D*R) [(N, B, T, D*R)]
    states = [s.unflatten(1, (N, B)) for s in states]  # (L*D, N, B, W)
    return [(out, b)] + [(s, 1) for s in states]


def _grouped(call, G, randomness, x, xd, bs, hx, hxd, params, pds):
    """Some parameter vmapped: G = N groups, one _vmap_rnn_layers call (a grouped op per layer and
    direction). Returns [(output, out_dim), (h_n, 0)(, (c_n, 0))]."""
    lengths = lengths_cpu = None
    if call.packed:
        # data (sum_len, C) shared / (G, sum_len, C) per member -> padded (T, B, [G,] C) + lengths;
        # batch_sizes is torch's (sorted by length, B = batch_sizes[0]), so is the padded order
        data = x if xd is None else x.movedim(xd, 1)  # (sum_len, [G,] C)
        padded, lengths_cpu = torch._VF._pad_packed_sequence(data, bs, False, 0.0, bs.numel())
        x_tb = padded if xd is None else padded.permute(2, 0, 1, 3)  # (T, B, C) | (G, T, B, C)
        lengths = lengths_cpu.to(device=x.device, dtype=torch.int64)
    elif xd is None:  # shared: (T, B, C)
        x_tb = x.transpose(0, 1) if call.batch_first else x
    else:  # per member: (G, T, B, C)
        x_tb = x.movedim(xd, 0)
        x_tb = x_tb.transpose(1, 2) if call.batch_first else x_tb
    mode = "none" if not _dropout_active(call) else randomness  # "same" | "different"
    outs = torch.ops.mtl_kernels._vmap_rnn_layers(
        call.cell, x_tb, lengths, [_to_front(h, d, G) for h, d in zip(hx, hxd)],
        [_to_front(p, d, G) for p, d in zip(params, pds)], bool(call.has_biases),
        call.num_layers, bool(call.bidirectional), float(call.dropout), mode)
    output, states = outs[0], outs[1:]  # (G, T, B, D*R); (G, L*D, B, W)
    if call.packed:
        # padded (T, B, G, D*R) -> data (sum_len, G, D*R), torch's packed order
        out_data, _ = torch._VF._pack_padded_sequence(output.permute(1, 2, 0, 3), lengths_cpu, False)
        result = [(out_data, 1)]
    else:
        result = [(output.transpose(1, 2) if call.batch_first else output, 0)]
    return result + [(s, 0) for s in states]


# ---- the grouped layers: an op of its own, so that its body runs below the vmap level ------------
def _layers(cell: str, input: Tensor, lengths: Optional[Tensor], hx: List[Tensor],
            params: List[Tensor], has_biases: bool, num_layers: int, bidirectional: bool,
            dropout: float, dropout_mode: str) -> List[Tensor]:
    """G independent nets, all layers and directions: input (T, B, C) shared or (G, T, B, C) per
    group; lengths (B,) or None; hx [h0 (G, L*D, B, R)(, c0 (G, L*D, B, H))]; params: torch's flat
    order (per layer, per direction: w_ih, w_hh[, b_ih, b_hh][, w_hr]), each with a leading G;
    dropout_mode "none" | "different" (a mask per group) | "same" (one mask for all groups).
    Returns [output (G, T, B, D*R), h_n (G, L*D, B, R)(, c_n (G, L*D, B, H))]."""
    lstm = cell == "lstm"
    D = 2 if bidirectional else 1
    stride = len(params) // (num_layers * D)
    # No transform left at this level (plain vmap, then eager autograd): the grouped op and its C++
    # autograd. Under an outer grad / vjp / jacrev / jvp (grad(vmap(f)) ...) this body runs inside
    # that transform's dispatch, where the torch.func autograd.Function of recurrence_layer cannot be
    # dispatched (a higher-order op needs the transform's front key, excluded in here): the same
    # recurrence in plain differentiable ops, which every transform supports.
    layer_fn = recurrence_composite if torch._C._are_functorch_transforms_active() else recurrence_layer
    proj = stride == 3 + 2 * has_biases  # the LSTM's w_hr after the biases
    layer_input = input
    h_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w = [p.contiguous() for p in params[k * stride:(k + 1) * stride]]  # (G, ...) each
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            # both biases as they are: the op adds b_hh to b_ih except for the GRU's b_hn
            out, h, c = layer_fn(cell, layer_input, w[0], w[1], b_ih, b_hh, hx[0][:, k],
                                 hx[1][:, k] if lstm else None, lengths, reverse=d == 1,
                                 weight_hr=w[-1] if proj else None)
            outs.append(out)  # (G, T, B, R)
            h_n.append(h)  # (G, B, R)
            c_n.append(c)  # (G, B, H) or None
        layer_out = outs[0] if D == 1 else torch.cat(outs, dim=-1)  # (G, T, B, D*R)
        if dropout_mode != "none" and layer < num_layers - 1:
            if dropout_mode == "same":  # one mask (T, B, D*R) for every group
                layer_out = layer_out * F.dropout(torch.ones_like(layer_out[0]), dropout, True)
            else:
                layer_out = F.dropout(layer_out, dropout, True)
        layer_input = layer_out
    result = [layer_input, torch.stack(h_n, 1)]  # fresh (G, L*D, B, R), as torch's
    if lstm:
        result.append(torch.stack(c_n, 1))
    return result


def _layers_rule(keyset, cell, input, lengths, hx, params, has_biases, num_layers, bidirectional,
                 dropout, dropout_mode):
    """_vmap_rnn_layers under an outer vmap (nested vmap of torch's op): the outer members times
    the G groups are N*G groups of one call, where the dropout modes agree; else a loop over the
    outer members."""
    level, N, randomness = _current_vmap()
    x, xd = _unwrap(input, level)
    ln, ld = _unwrap(lengths, level)
    hs = [_unwrap(h, level) for h in hx]
    ps = [_unwrap(p, level) for p in params]
    rest = (has_biases, num_layers, bidirectional, dropout)
    op = torch.ops.mtl_kernels._vmap_rnn_layers
    if all(d is None for d in [xd, ld] + [d for _, d in hs + ps]):
        with _below():
            return op(cell, input, lengths, hx, params, *rest, dropout_mode)
    if dropout_mode != "none" and randomness == "error":
        raise RuntimeError(
            "vmap: called random operation while in randomness error mode. Please either use the "
            "'same' or 'different' randomness flags on vmap or perform the randomness operation "
            f"out of vmap (here: the dropout={dropout} between the layers of a training-mode "
            f"{cell} module)")
    with _below():
        if ld is not None or (dropout_mode != "none" and dropout_mode != randomness):
            def member(i):
                sl = lambda t, d: t if d is None else t.select(d, i)  # noqa: E731
                return op(cell, sl(x, xd), sl(ln, ld), [sl(t, d) for t, d in hs],
                          [sl(t, d) for t, d in ps], *rest, dropout_mode)
            results = (_same_rng_loop(x.device, N, member) if randomness == "same"
                       else [member(i) for i in range(N)])
            outs = [torch.stack(r) for r in zip(*results)]
        else:
            def merge(t, d):  # (G, ...) per outer member -> (N*G, ...)
                t = t.expand(N, *t.shape) if d is None else t.movedim(d, 0)
                return t.flatten(0, 1)
            G = params[0].shape[0] if ps[0][1] is None else ps[0][0].shape[1 if ps[0][1] == 0 else 0]
            if x.dim() - (xd is not None) == 3:  # shared (T, B, C)
                x_m = x if xd is None else merge(x.movedim(xd, 0).unsqueeze(1).expand(
                    N, G, *x.movedim(xd, 0).shape[1:]), 0)
            else:
                x_m = merge(x, xd)
            outs = op(cell, x_m, ln, [merge(t, d) for t, d in hs], [merge(t, d) for t, d in ps],
                      *rest, dropout_mode)
            outs = [t.unflatten(0, (N, G)) for t in outs]
    return [_add_batch_dim(t, 0, level) for t in outs]


# ---- batched gradients of the grouped modules ----------------------------------------------------
# mtl_kernels::_grouped_recurrence_backward_in_place under a vmap: the modules' C++ backward run
# over N cotangents at once. autograd.grad(is_grads_batched=True), gradcheck / gradgradcheck's
# check_batched_grad and autograd.functional.jacobian(vectorize=True) vmap with torch's legacy vmap
# (torch._vmap_internals: the "Batched" key); a torch.func.vmap over autograd.grad of an eager
# graph with torch.func's (FuncTorchBatched). Neither's fallback serves an op that writes an
# argument; and the saved gates it writes over are one forward's, so each member needs a copy.
_BACKWARD_ARGS = ("grad_output", "grad_h_n", "grad_c_n", "input", "weight_ih", "weight_hh",
                  "weight_hr", "gates", "h_states", "aux", "lengths")


def _backward_batched(cell, val, dim, N, reverse, input_grad, shared):
    """The backward of N members. val: the op's tensor arguments by name, unwrapped; dim: their
    vmapped dims (None: the same for every member); shared: the input is (T, B, C).
    Returns [(result, out_dim or None)] for the op's 8 results.

    Where only the incoming gradients are vmapped (the saved tensors are one forward's: the usual
    case), the N cotangents of the G groups are N*G groups of one backward call over copies of the
    saved tensors, in the per-group layout: input (N*G, T, B, C) (a shared input's gradient is then
    the sum over its groups), gates (N*G, T, B, KH). Otherwise a loop over the members of the
    backward that writes nothing (grouped_recurrence_backward)."""
    ops = torch.ops.mtl_kernels
    G = val["weight_ih"].shape[0] if dim["weight_ih"] is None else val["weight_ih"].shape[1]
    if any(dim[k] is not None for k in _BACKWARD_ARGS if not k.startswith("grad_")):
        def member(i):
            a = {k: v if dim[k] is None or v is None else v.select(dim[k], i)
                 for k, v in val.items()}
            return ops.grouped_recurrence_backward(cell, *[a[k] for k in _BACKWARD_ARGS[:10]],
                                                   a["lengths"], reverse, input_grad)
        return [(torch.stack(r), 0) for r in zip(*[member(i) for i in range(N)])]

    def merged(t, d=None):  # (G, ...) per member -> (N*G, ...), a copy
        t = t.expand(N, *t.shape) if d is None else t.movedim(d, 0)
        return t.reshape(N * t.shape[1], *t.shape[2:])

    x, gates, aux, w_hr, g_c = val["input"], val["gates"], val["aux"], val["weight_hr"], val["grad_c_n"]
    d = ops._grouped_recurrence_backward_in_place(
        cell, merged(val["grad_output"], dim["grad_output"]),  # (N*G, T, B, R)
        merged(val["grad_h_n"], dim["grad_h_n"]),  # (N*G, B, R)
        None if g_c is None else merged(g_c, dim["grad_c_n"]),  # (N*G, B, H)
        merged(x.expand(G, *x.shape) if shared else x),  # (N*G, T, B, C)
        merged(val["weight_ih"]), merged(val["weight_hh"]), None if w_hr is None else merged(w_hr),
        merged(gates.permute(2, 0, 1, 3) if shared else gates),  # (T, B, G, KH) -> (N*G, T, B, KH)
        merged(val["h_states"]),  # (N*G, T+1, B, R)
        merged(aux) if aux.numel() else aux,  # (N*G, T+1, B, H) or the (0,) of a cell without
        val["lengths"], reverse, input_grad)
    out = []
    for i, t in enumerate(d):
        if t.dim() == 1 and t.numel() == 0:  # a (0,) placeholder: the same for every member
            out.append((t, None))
            continue
        t = t.unflatten(0, (N, G))  # (N, G, ...)
        if i == 0 and shared:
            t = t.sum(1)  # a shared input's gradient: the sum over its groups, (N, T, B, C)
        out.append((t, 0))
    return out


def _backward_in_place_rule(keyset, cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                            weight_hh, weight_hr, gates, h_states, aux, lengths, reverse,
                            input_grad=True):
    """The FuncTorchBatched kernel (torch.func.vmap)."""
    args = (grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, gates,
            h_states, aux, lengths)
    level, N, _ = _current_vmap()
    un = {k: _unwrap(v, level) for k, v in zip(_BACKWARD_ARGS, args)}
    with _below():
        if all(d is None for _, d in un.values()):
            return torch.ops.mtl_kernels._grouped_recurrence_backward_in_place(
                cell, *args, reverse, input_grad)
        res = _backward_batched(cell, {k: v for k, (v, _) in un.items()},
                                {k: d for k, (_, d) in un.items()}, N, reverse, input_grad,
                                input.dim() == 3)
    return tuple(t if d is None else _add_batch_dim(t, d, level) for t, d in res)


def _legacy_vmap_level() -> int:
    """The level of the innermost legacy vmap (torch._vmap_internals), which has no query of its
    own: one more nesting, read, undone."""
    level = torch._C._vmapmode_increment_nesting()
    torch._C._vmapmode_decrement_nesting()
    return level - 1


@contextlib.contextmanager
def _legacy_vmap_mode_off(level: int):
    """The legacy vmap's nesting at 0 meanwhile (its mode key, on while any level is, is not
    reachable from Python by name); the batched tensors keep their levels."""
    for _ in range(level):
        torch._C._vmapmode_decrement_nesting()
    try:
        yield
    finally:
        for _ in range(level):
            torch._C._vmapmode_increment_nesting()


def _backward_in_place_legacy_rule(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                   weight_hh, weight_hr, gates, h_states, aux, lengths, reverse,
                                   input_grad=True):
    """The "Batched" kernel (torch's legacy vmap: is_grads_batched, check_batched_grad,
    jacobian(vectorize=True)). A legacy batched tensor is unwrapped with its vmapped dim at 0."""
    from torch._C._functorch import is_legacy_batchedtensor
    args = (grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, gates,
            h_states, aux, lengths)
    level = _legacy_vmap_level()
    batched = [isinstance(t, Tensor) and is_legacy_batchedtensor(t) for t in args]
    # the vmapped size: the leading dim of a batched argument, unwrapped (the size is only used
    # to expand an argument that is not batched at this level, so 1 will do here)
    N = torch._remove_batch_dim(args[batched.index(True)], level, 1, 0).shape[0]
    val = {k: torch._remove_batch_dim(t, level, N, 0) if b else t
           for k, t, b in zip(_BACKWARD_ARGS, args, batched)}
    dim = {k: 0 if b else None for k, b in zip(_BACKWARD_ARGS, batched)}
    # the legacy vmap's mode key refuses random ops, and the CPU path tuner's first call of a new
    # shape (N*G groups) times both paths on random scratch inputs: the mode off meanwhile
    with _legacy_vmap_mode_off(level):
        res = _backward_batched(cell, val, dim, N, reverse, input_grad, input.dim() == 3)
    return tuple(t if d is None else torch._add_batch_dim(t, d, level) for t, d in res)


# ---- registration ------------------------------------------------------------------------------------
_mtl_lib = torch.library.Library("mtl_kernels", "FRAGMENT")
_mtl_lib.define("_vmap_rnn_layers(str cell, Tensor input, Tensor? lengths, Tensor[] hx, "
                "Tensor[] params, bool has_biases, int num_layers, bool bidirectional, "
                "float dropout, str dropout_mode) -> Tensor[]")
_mtl_lib.impl("_vmap_rnn_layers", _layers, "CompositeImplicitAutograd")
_mtl_lib.impl("_vmap_rnn_layers", _layers_rule, "FuncTorchBatched", with_keyset=True)
_mtl_lib.impl("_grouped_recurrence_backward_in_place", _backward_in_place_rule, "FuncTorchBatched",
              with_keyset=True)
_mtl_lib.impl("_grouped_recurrence_backward_in_place", _backward_in_place_legacy_rule, "Batched")

_aten_lib = torch.library.Library("aten", "IMPL")
for _cell in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
    for _overload, _packed in (("input", False), ("data", True)):
        def _kernel(keyset, *args, _cell=_cell, _packed=_packed,
                    _op=getattr(getattr(aten, _cell), _overload)):
            return _rule(_cell, _packed, _op, keyset, *args)
        _aten_lib.impl(f"{_cell}.{_overload}", _kernel, "FuncTorchBatched", with_keyset=True)
