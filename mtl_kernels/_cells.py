"""What each cell carries, read from the C++ cells (csrc/cells/*.h: kGates, kCellState, kAux,
kRecBias) so that the Python side (the fake kernels in _ops.py, the torch.func path in
_functorch.py) follows the kernels instead of keeping tables of its own."""
from . import _C

_CELL_TRAITS = _C.cell_traits()  # {cell: (gates, cell_state, aux, rec_bias)}

# H-wide gate blocks: the K of the (G, K*H, ...) weights and of the saved gates.
CELL_GATES = {cell: t[0] for cell, t in _CELL_TRAITS.items()}
# A second recurrent state c (the LSTM): c0 / c_n.
CELL_HAS_STATE = {cell: t[1] for cell, t in _CELL_TRAITS.items()}
# One saved acc_t value per unit and step (`aux`: the LSTM's c, the GRU's W_hn h + b_hn).
CELL_HAS_AUX = {cell: t[2] for cell, t in _CELL_TRAITS.items()}
# b_hh kept apart from the bias (the GRU's b_hn). Elsewhere the ops fold b_hh into the bias, and
# b_hh's gradient is the bias's.
CELL_KEEPS_BIAS_HH = {cell: t[3] for cell, t in _CELL_TRAITS.items()}
