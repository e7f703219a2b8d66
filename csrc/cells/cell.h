// What a cell type carries (cells/lstm.h, gru.h, rnn.h) and the list of cells the ops know.
//
// A cell is a struct with
//   kName          the op-level name ("lstm", "gru", "rnn_tanh", "rnn_relu")
//   kGates         H-wide gate blocks in W_ih (G, kGates*H, C), W_hh (G, kGates*H, H) and in the
//                  saved per-step `gates` (the input projection, overwritten with what backward needs)
//   kCellState     a second recurrent state c (LSTM), fp32 for the half types, with c0 / c_n
//   kAux           the cell saves one acc_t value per unit and step in `aux_states` (G, T+1, B, H)
//                  at the step's next slot: c for the LSTM (also its state), W_hn h + b_hn for the GRU
//   kRecBias       the recurrent bias b_hh is applied apart from b_ih (GRU: r * (W_hn h + b_hn));
//                  otherwise the op takes one folded bias b_ih + b_hh
//   kSplitRecGrad  the gradient of the recurrent pre-activations differs from the input-side one
//                  (GRU's n gate), so backward keeps a second buffer `drec` for the W_hh products
//   forward<M>(x, r, h_prev, aux_prev, act, h, aux)
//                  x[k]: input-side pre-activation (x W_ih^T + bias)[k*H + j], r[k]: recurrent side
//                  (W_hh h_{t-1} (+ b_hh))[k*H + j]; writes the saved values act[k], h_t[j] and aux.
//                  Templated on the math policy M and the value type, so the same formula runs in
//                  the kernels (acc_t) and in the composite that double backward differentiates
//                  (at::Tensor).
//   backward(act, h_prev, aux_prev, aux_next, dh, daux, dx, drec, dh_direct)
//                  dh: the gradient reaching h_t[j]; daux in: reaching c_t, out: reaching c_{t-1}
//                  (cell-state cells); dx / drec: input- / recurrent-side pre-activation gradients;
//                  dh_direct: the part of dh_{t-1} that does not go through W_hh.
#pragma once

#include <c10/util/Exception.h>

#include <cstring>
#include <string>

#include "cells/gru.h"
#include "cells/lstm.h"
#include "cells/rnn.h"

namespace mtl_kernels {

enum class CellKind { kLstm, kGru, kRnnTanh, kRnnRelu };
// Every cell the ops know: for code that lists them (_C.cell_traits).
constexpr CellKind kAllCellKinds[] = {CellKind::kLstm, CellKind::kGru, CellKind::kRnnTanh,
                                     CellKind::kRnnRelu};

inline CellKind parse_cell(const std::string& name) {
  if (name == LstmCell::kName) return CellKind::kLstm;
  if (name == GruCell::kName) return CellKind::kGru;
  if (name == RnnTanhCell::kName) return CellKind::kRnnTanh;
  if (name == RnnReluCell::kName) return CellKind::kRnnRelu;
  TORCH_CHECK(false, "mtl_kernels: unknown cell '", name, "' (expected lstm, gru, rnn_tanh or rnn_relu)");
}

// Calls f(Cell()) for the cell of that kind.
template <typename F>
decltype(auto) dispatch_cell(CellKind kind, const F& f) {
  switch (kind) {
    case CellKind::kLstm: return f(LstmCell());
    case CellKind::kGru: return f(GruCell());
    case CellKind::kRnnTanh: return f(RnnTanhCell());
    default: return f(RnnReluCell());
  }
}

// Whether the ops add a given b_hh to the bias for this cell (one without a recurrent bias of its
// own: lstm, rnn), so that b_hh's gradient is the bias's. The GRU keeps b_hn apart.
inline bool folds_bias_hh(CellKind kind) {
  return dispatch_cell(kind, [](auto c) { return !decltype(c)::kRecBias; });
}

}  // namespace mtl_kernels
