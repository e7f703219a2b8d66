// The per-unit work of one step, for any cell (host and device): what a CPU row loop runs per
// hidden unit, what a CUDA thread of the per-step kernel runs, and what a thread of the persistent
// kernel runs per row. Only where the recurrent pre-activations come from differs (the per-step
// path's GEMM buffer `hproj`, or the persistent kernel's registers), so they arrive as values.
#pragma once

#include "cells/cell.h"
#include "common/cell_math.h"
#include "recurrence/sequence.h"

namespace mtl_kernels {

// A valid forward step of hidden unit j. rec[k] = (W_hh h_{t-1})[k*H + j]. Plain __restrict__
// pointers and no branch (bias presence is a template argument), so that a host loop over j
// vectorises. Returns the aux value (the LSTM's c_t), which the persistent kernel keeps in a
// register.
template <class Cell, bool kBias, typename scalar_t, typename acc_t>
MTL_HD acc_t forward_unit(scalar_t* __restrict__ gates, const scalar_t* __restrict__ bias,
                          const scalar_t* __restrict__ bias_hh, const acc_t (&rec)[Cell::kGates],
                          acc_t h_prev, acc_t aux_prev, acc_t* __restrict__ aux_next,
                          scalar_t* __restrict__ h_next, scalar_t* __restrict__ out, int64_t j,
                          int64_t H) {
  constexpr int K = Cell::kGates;
  acc_t x[K], r[K], act[K];
  MTL_UNROLL
  for (int k = 0; k < K; ++k) {
    x[k] = acc_t(gates[k * H + j]);
    r[k] = rec[k];
    if constexpr (kBias) {
      x[k] += acc_t(bias[k * H + j]);
      if constexpr (Cell::kRecBias) r[k] += acc_t(bias_hh[k * H + j]);
    }
  }
  acc_t h, aux = acc_t(0);
  Cell::template forward<ScalarMath>(x, r, h_prev, aux_prev, act, h, aux);
  MTL_UNROLL
  for (int k = 0; k < K; ++k) gates[k * H + j] = scalar_t(act[k]);
  if constexpr (Cell::kAux) aux_next[j] = aux;
  h_next[j] = scalar_t(h);
  out[j] = scalar_t(h);
  return aux;
}

// A padding step (t >= lengths[b]): hold the state, emit zeros, and zero the saved values so that
// no garbage is saved. Returns the held aux value.
template <class Cell, typename scalar_t, typename acc_t>
MTL_HD acc_t forward_hold(const ForwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H, acc_t h_prev,
                          acc_t aux_prev) {
  const acc_t aux = Cell::kCellState ? aux_prev : acc_t(0);
  r.h_next[j] = scalar_t(h_prev);
  if constexpr (Cell::kAux) r.aux_next[j] = aux;
  r.out[j] = scalar_t(0);
  MTL_UNROLL
  for (int k = 0; k < Cell::kGates; ++k) r.gates[k * H + j] = scalar_t(0);
  return aux;
}

// Either case, for hidden unit j of a row: what a GPU thread runs.
template <class Cell, typename scalar_t, typename acc_t>
MTL_HD acc_t forward_element(const ForwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H,
                             const acc_t (&rec)[Cell::kGates], acc_t h_prev, acc_t aux_prev) {
  if (!r.valid) return forward_hold<Cell>(r, j, H, h_prev, aux_prev);
  if (r.bias)
    return forward_unit<Cell, true>(r.gates, r.bias, r.bias_hh, rec, h_prev, aux_prev, r.aux_next,
                                    r.h_next, r.out, j, H);
  return forward_unit<Cell, false>(r.gates, r.bias, r.bias_hh, rec, h_prev, aux_prev, r.aux_next,
                                   r.h_next, r.out, j, H);
}

// A valid backward step of hidden unit j from its saved values act[k]. dh: the whole gradient
// reaching h_t[j] (output and recurrent); daux in/out: the cell-state gradient (c_t in, c_{t-1}
// out); dh_pass out: the part of dh_{t-1}[j] that bypasses W_hh. Writes the input-side
// pre-activation gradients to dgates and, for cells whose recurrent side differs, the
// recurrent-side ones to drec (otherwise drec is dgates itself and is not touched here).
template <class Cell, typename scalar_t, typename acc_t>
MTL_HD void backward_unit_values(const acc_t (&act)[Cell::kGates], scalar_t* __restrict__ dgates,
                                 scalar_t* __restrict__ drec, acc_t h_prev, acc_t aux_prev,
                                 acc_t aux_next, acc_t dh, acc_t& daux, acc_t& dh_pass, int64_t j,
                                 int64_t H) {
  constexpr int K = Cell::kGates;
  acc_t dx[K], dr[K];
  Cell::backward(act, h_prev, aux_prev, aux_next, dh, daux, dx, dr, dh_pass);
  MTL_UNROLL
  for (int k = 0; k < K; ++k) {
    dgates[k * H + j] = scalar_t(dx[k]);
    if constexpr (Cell::kSplitRecGrad) drec[k * H + j] = scalar_t(dr[k]);
  }
}

// The saved values read from `gates`, the gradients written to a separate `dgates`.
template <class Cell, typename scalar_t, typename acc_t>
MTL_HD void backward_unit(const scalar_t* __restrict__ gates, scalar_t* __restrict__ dgates,
                          scalar_t* __restrict__ drec, acc_t h_prev, acc_t aux_prev, acc_t aux_next,
                          acc_t dh, acc_t& daux, acc_t& dh_pass, int64_t j, int64_t H) {
  acc_t act[Cell::kGates];
  MTL_UNROLL
  for (int k = 0; k < Cell::kGates; ++k) act[k] = acc_t(gates[k * H + j]);
  backward_unit_values<Cell>(act, dgates, drec, h_prev, aux_prev, aux_next, dh, daux, dh_pass, j, H);
}

// In place: `io` holds the saved values and receives the gradients (the autograd's backward,
// which has no further use for the saved values, keeps no second buffer of their size).
template <class Cell, typename scalar_t, typename acc_t>
MTL_HD void backward_unit_in_place(scalar_t* __restrict__ io, scalar_t* __restrict__ drec,
                                   acc_t h_prev, acc_t aux_prev, acc_t aux_next, acc_t dh,
                                   acc_t& daux, acc_t& dh_pass, int64_t j, int64_t H) {
  acc_t act[Cell::kGates];
  MTL_UNROLL
  for (int k = 0; k < Cell::kGates; ++k) act[k] = acc_t(io[k * H + j]);
  backward_unit_values<Cell>(act, io, drec, h_prev, aux_prev, aux_next, dh, daux, dh_pass, j, H);
}

// A padding step: the gradient passes straight through the held state (the output there was a
// constant 0, so its gradient is dropped); no pre-activation gradient.
template <class Cell, typename scalar_t, typename acc_t>
MTL_HD void backward_hold(const BackwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H, acc_t dh_in,
                          acc_t& dh_pass) {
  MTL_UNROLL
  for (int k = 0; k < Cell::kGates; ++k) {
    r.dgates[k * H + j] = scalar_t(0);
    if constexpr (Cell::kSplitRecGrad) r.drec[k * H + j] = scalar_t(0);
  }
  dh_pass = dh_in;
}

// Either case, for hidden unit j of a row. dh_in: the recurrent part of the gradient reaching h_t.
template <class Cell, typename scalar_t, typename acc_t>
MTL_HD void backward_element(const BackwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H,
                             acc_t dh_in, acc_t& daux, acc_t& dh_pass) {
  if (!r.valid) {
    backward_hold<Cell>(r, j, H, dh_in, dh_pass);
    return;
  }
  const acc_t aux_prev = Cell::kAux ? r.aux_prev[j] : acc_t(0);
  const acc_t aux_next = Cell::kAux ? r.aux_next[j] : acc_t(0);
  const acc_t dh = acc_t(r.grad_out[j]) + dh_in;
  if (r.gates == r.dgates) {
    backward_unit_in_place<Cell>(r.dgates, r.drec, acc_t(r.h_prev[j]), aux_prev, aux_next, dh, daux,
                                 dh_pass, j, H);
  } else {
    backward_unit<Cell>(r.gates, r.dgates, r.drec, acc_t(r.h_prev[j]), aux_prev, aux_next, dh, daux,
                        dh_pass, j, H);
  }
}

}  // namespace mtl_kernels
