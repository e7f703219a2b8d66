// One call's recurrence as raw pointers and strides (host and device): what every kernel of every
// path gets, whichever the cell. The host builds these from tensors (recurrence/driver.h); a
// kernel picks the rows of step t with forward_row / backward_row.
//
// Shapes (K = Cell::kGates, H hidden units; one layer, one direction, all G groups):
//   gates    the input projection (x W_ih^T), overwritten by the forward with the saved values
//            (Cell::forward's act); row (g, t, b) = K*H contiguous values at
//            g * gates_sg + t * gates_st + b * gates_sb: (T, B, G, KH) for an input shared by the
//            groups, (G, T, B, KH) for one input per group. Where the CPU's sequence kernel
//            projects the input itself (driver.h: projected_input) it writes each step's
//            projection here first; an inference forward's gates then hold one step, (G, B, KH)
//            with gates_st = 0.
//   dgates   backward: the input-side pre-activation gradients, gates' layout
//   drec     backward: the recurrent-side ones (== dgates unless Cell::kSplitRecGrad)
//   h_states (G, nslot, B, H): slot t and t+1 are the states around step t (forward direction;
//            prev_slot / next_slot below give the reverse direction's), modulo nslot: nslot is T+1
//            when every step's state is kept for backward, 2 for an inference forward (the states
//            alternate between two slots)
//   aux      (G, nslot, B, H) acc_t, cells with kAux: the value the cell saves at a step's next
//            slot (the LSTM's c, with c0 in the first slot)
//   output   (G, T, B, H)
//   lengths  (B,) shared by the groups, or (G, B) per (group, row) (lengths_sg = B; a row may
//            hold no sequence: length 0), or nullptr: steps t >= the row's length are padding
//            (state held, output 0); an inference forward runs the sequence in chunks, its local
//            step t being time t0 + t
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace mtl_kernels {

// The states around step t live in slots t and t+1 (forward); in the reverse direction slot t+1
// is before step t and slot t after it. Loop step s of a forward runs time step forward_time(s); a
// backward runs them in the opposite order.
MTL_HD int64_t prev_slot(int64_t t, bool reverse) { return reverse ? t + 1 : t; }
MTL_HD int64_t next_slot(int64_t t, bool reverse) { return reverse ? t : t + 1; }
MTL_HD int64_t first_slot(int64_t T, bool reverse) { return reverse ? T : 0; }
MTL_HD int64_t last_slot(int64_t T, bool reverse) { return reverse ? 0 : T; }
MTL_HD int64_t forward_time(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }
MTL_HD int64_t backward_time(int64_t s, int64_t T, bool reverse) { return reverse ? s : T - 1 - s; }

template <typename scalar_t, typename acc_t>
struct SequenceForward {
  const scalar_t* weight_hh;  // (G, KH, H) contiguous
  scalar_t* gates;
  int64_t gates_sg, gates_st, gates_sb;
  const scalar_t* bias;     // (G, KH) input side (b_ih, or b_ih + b_hh folded) or nullptr
  const scalar_t* bias_hh;  // (G, KH) recurrent side (cells with kRecBias) or nullptr
  scalar_t* h_states;
  int64_t h_sg, h_sslot;
  acc_t* aux;  // nullptr for cells without kAux
  int64_t aux_sg, aux_sslot;
  scalar_t* output;
  int64_t out_sg, out_st;
  const int64_t* lengths;
  int64_t lengths_sg;  // 0: (B,) lengths shared by the groups; B: (G, B)
  int64_t T, G, B, H;
  int64_t nslot;      // slots of h_states: T + 1, or 2 (inference)
  int64_t aux_nslot;  // slots of aux: the same, except on the projected LSTM's path
  int64_t t0;         // the time of local step 0 (for lengths)
  bool reverse;
};

// The storage slot of state slot `slot` (in [0, T]) in h_states / in aux.
template <typename Q>
MTL_HD int64_t state_slot(const Q& q, int64_t slot) {
  return slot % q.nslot;
}
template <typename Q>
MTL_HD int64_t aux_slot(const Q& q, int64_t slot) {
  return slot % q.aux_nslot;
}

template <typename scalar_t, typename acc_t>
struct SequenceBackward {
  const scalar_t* weight_hh;  // (G, KH, H) contiguous
  const scalar_t* gates;      // the saved values
  scalar_t* dgates;
  scalar_t* drec;
  int64_t gates_sg, gates_st, gates_sb;
  const scalar_t* h_states;
  int64_t h_sg, h_sslot;
  const acc_t* aux;
  int64_t aux_sg, aux_sslot;
  const scalar_t* grad_output;  // (G, T, B, H)
  int64_t gout_sg, gout_st;
  const scalar_t* grad_h_n;  // (G, B, H) contiguous
  const acc_t* grad_c_n;     // (G, B, H) contiguous, cell-state cells, else nullptr
  scalar_t* grad_h0;         // (G, B, H) contiguous, out
  acc_t* grad_c0;            // (G, B, H) contiguous, out, cell-state cells
  const int64_t* lengths;
  int64_t lengths_sg;  // as SequenceForward's
  int64_t T, G, B, H;
  bool reverse;
};

MTL_HD bool is_valid_step(const int64_t* lengths, int64_t lengths_sg, int64_t t, int64_t g,
                          int64_t b) {
  return lengths == nullptr || t < lengths[g * lengths_sg + b];
}

// The rows of one (group g, batch row b) at step t.
template <typename scalar_t, typename acc_t>
struct ForwardRow {
  scalar_t* gates;
  const scalar_t* bias;     // nullptr without bias
  const scalar_t* bias_hh;  // nullptr unless the cell keeps b_hh apart
  const scalar_t* h_prev;
  scalar_t* h_next;
  const acc_t* aux_prev;  // nullptr without aux
  acc_t* aux_next;
  scalar_t* out;
  bool valid;  // false on padding steps
};

template <typename scalar_t, typename acc_t>
MTL_HD ForwardRow<scalar_t, acc_t> forward_row(const SequenceForward<scalar_t, acc_t>& q, int64_t K,
                                               int64_t t, int64_t g, int64_t b) {
  ForwardRow<scalar_t, acc_t> r;
  const int64_t H = q.H, p = state_slot(q, prev_slot(t, q.reverse)),
                n = state_slot(q, next_slot(t, q.reverse));
  r.gates = q.gates + g * q.gates_sg + t * q.gates_st + b * q.gates_sb;
  r.bias = q.bias ? q.bias + g * K * H : nullptr;
  r.bias_hh = q.bias_hh ? q.bias_hh + g * K * H : nullptr;
  r.h_prev = q.h_states + g * q.h_sg + p * q.h_sslot + b * H;
  r.h_next = q.h_states + g * q.h_sg + n * q.h_sslot + b * H;
  const int64_t ap = aux_slot(q, prev_slot(t, q.reverse)), an = aux_slot(q, next_slot(t, q.reverse));
  r.aux_prev = q.aux ? q.aux + g * q.aux_sg + ap * q.aux_sslot + b * H : nullptr;
  r.aux_next = q.aux ? q.aux + g * q.aux_sg + an * q.aux_sslot + b * H : nullptr;
  r.out = q.output + g * q.out_sg + t * q.out_st + b * H;
  r.valid = is_valid_step(q.lengths, q.lengths_sg, q.t0 + t, g, b);
  return r;
}

template <typename scalar_t, typename acc_t>
struct BackwardRow {
  const scalar_t* gates;
  scalar_t* dgates;
  scalar_t* drec;
  const scalar_t* h_prev;
  const acc_t* aux_prev;
  const acc_t* aux_next;
  const scalar_t* grad_out;
  bool valid;
};

template <typename scalar_t, typename acc_t>
MTL_HD BackwardRow<scalar_t, acc_t> backward_row(const SequenceBackward<scalar_t, acc_t>& q, int64_t t,
                                                 int64_t g, int64_t b) {
  BackwardRow<scalar_t, acc_t> r;
  const int64_t H = q.H, p = prev_slot(t, q.reverse), n = next_slot(t, q.reverse);
  const int64_t off = g * q.gates_sg + t * q.gates_st + b * q.gates_sb;
  r.gates = q.gates + off;
  r.dgates = q.dgates + off;
  r.drec = q.drec + off;
  r.h_prev = q.h_states + g * q.h_sg + p * q.h_sslot + b * H;
  r.aux_prev = q.aux ? q.aux + g * q.aux_sg + p * q.aux_sslot + b * H : nullptr;
  r.aux_next = q.aux ? q.aux + g * q.aux_sg + n * q.aux_sslot + b * H : nullptr;
  r.grad_out = q.grad_output + g * q.gout_sg + t * q.gout_st + b * H;
  r.valid = is_valid_step(q.lengths, q.lengths_sg, t, g, b);
  return r;
}

}  // namespace mtl_kernels
