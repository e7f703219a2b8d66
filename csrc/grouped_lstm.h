// Device-agnostic grouped-LSTM driver (grouped_lstm.cpp) and the per-backend cell kernels it calls.
//
// One op call runs one layer and one direction for all G groups:
//   forward : gates = input projection for all steps (one GEMM, or one batched GEMM per-group input),
//             then per step: hproj = bmm(h_{t-1}, W_hh^T) over all G, and one cell kernel.
//   backward: per step (reverse order): one cell kernel, then dh_{t-1} = dh_pass + bmm(dgates_t, W_hh);
//             after the loop dW_ih, dW_hh, db and dx as (batched) GEMMs / one reduction.
// The GEMMs go through ATen (MKL / cuBLAS); a backend only supplies the two step kernels.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "lstm_cell.h"  // prev_slot, next_slot, forward_time, backward_time

namespace mtl_kernels {

// Strides (in elements) of the gate tensors, which follow the input projection's layout:
//   shared input (T, B, C)    -> gates (T, B, G, 4H)
//   per-group    (G, T, B, C) -> gates (G, T, B, 4H)
struct GateLayout {
  int64_t sg, st, sb;
};

// The whole recurrence of one call: what a whole-sequence kernel (GPU persistent kernel, CPU rows in
// parallel) gets, and what the per-step kernels see through ForwardStep / BackwardStep.
// State slots: h_states / c_states slot t and t+1 are the states around step t (forward direction;
// reversed for reverse, see prev_slot / next_slot in lstm_cell.h).
struct ForwardSequence {
  at::Tensor gates;      // see GateLayout; in: input projection, out: activated gates
  GateLayout layout;
  at::Tensor weight_hh;  // (G, 4H, H) contiguous
  at::Tensor bias;       // (G, 4H) or undefined
  at::Tensor h_states;   // (G, T+1, B, H), the initial slot filled
  at::Tensor c_states;   // (G, T+1, B, H) opmath dtype, the initial slot filled
  at::Tensor output;     // (G, T, B, H)
  at::Tensor lengths;    // (B,) int64 or undefined
  bool reverse;
};

struct BackwardSequence {
  at::Tensor gates, dgates;  // see GateLayout
  GateLayout layout;
  at::Tensor weight_hh;      // (G, 4H, H) contiguous
  at::Tensor c_states;       // (G, T+1, B, H) opmath dtype
  at::Tensor grad_output;    // (G, T, B, H) contiguous
  at::Tensor grad_h_n;       // (G, B, H) contiguous, input dtype
  at::Tensor grad_c_n;       // (G, B, H) contiguous, opmath dtype
  at::Tensor grad_h0;        // (G, B, H) out, input dtype
  at::Tensor grad_c0;        // (G, B, H) out, opmath dtype
  at::Tensor lengths;
  bool reverse;
};

// Everything a per-step cell kernel needs for step t: the call's sequence tensors (the kernel
// offsets them by t) and the per-step buffers.
struct ForwardStep {
  const ForwardSequence* seq;
  at::Tensor hproj;  // (G, B, 4H): h_{t-1} @ W_hh^T for this step
  int64_t t;
};

struct BackwardStep {
  const BackwardSequence* seq;
  at::Tensor dh_in;    // (G, B, H): gradient reaching h_t from step t+1
  at::Tensor dh_pass;  // (G, B, H): out, the part of dh_{t-1} that bypasses W_hh
  at::Tensor dc;       // (G, B, H) opmath dtype, in/out
  int64_t t;
};

// What a backend supplies. The sequence functions are optional (nullptr): they return false when
// they do not apply (not selected, or the sizes do not fit on chip), and the driver then runs the
// per-step loop with the step kernels.
struct CellKernels {
  void (*forward_step)(const ForwardStep&);
  void (*backward_step)(const BackwardStep&);
  bool (*forward_sequence)(const ForwardSequence&) = nullptr;
  bool (*backward_sequence)(const BackwardSequence&) = nullptr;
};

// MTL_KERNELS_LSTM_PATH: auto (default) | persistent | per_step, read on every call so that tests
// and benchmarks can switch it (mtl_kernels.recurrence_path). auto and persistent run a backend's
// whole-sequence kernel wherever it applies (README, "The recurrence: ...").
enum class RecurrencePath { kAuto, kPersistent, kPerStep };
RecurrencePath recurrence_path();

#if defined(MTL_KERNELS_WITH_CUDA)
// The persistent kernel (grouped_lstm_persistent.cu): false when the per-step path must run
// (MTL_KERNELS_LSTM_PATH=per_step, or the sizes do not fit on chip / cannot be co-resident).
bool persistent_forward_cuda(const ForwardSequence& s);
bool persistent_backward_cuda(const BackwardSequence& s);
#endif

// How many recurrences ran on each path since the module was loaded (tests and benchmarks read it
// through mtl_kernels._C.path_counts()).
struct PathCounts {
  int64_t forward_sequence, forward_steps, backward_sequence, backward_steps;
};
PathCounts path_counts();

using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardResult = ForwardResult;

ForwardResult grouped_lstm_forward_driver(const at::Tensor& input, const at::Tensor& weight_ih,
                                          const at::Tensor& weight_hh,
                                          const std::optional<at::Tensor>& bias,
                                          const at::Tensor& h0, const at::Tensor& c0,
                                          const std::optional<at::Tensor>& lengths, bool reverse,
                                          const CellKernels& kernels);

BackwardResult grouped_lstm_backward_driver(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& gates, const at::Tensor& h_states, const at::Tensor& c_states,
    const std::optional<at::Tensor>& lengths, bool reverse, const CellKernels& kernels);

// Cell state / gate arithmetic dtype: fp32 for half types (as cuDNN), the input dtype otherwise.
inline at::ScalarType opmath_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// When MTL_KERNELS_POISON=1, buffers that a kernel must write are filled with NaN first, so that
// an element no kernel wrote shows up in the results (used by the test suite).
void poison_if_enabled(at::Tensor& t);

}  // namespace mtl_kernels
