// The device-agnostic recurrence driver (driver.cpp): argument checks, ATen GEMMs, the time loop,
// for any cell (cells/cell.h). One op call runs one layer and one direction for all G groups:
//   forward : gates = the input projection for all steps (one GEMM, or one batched GEMM for a
//             per-group input); then the recurrence on one of two paths:
//               sequence : the whole sequence in one backend call (GPU: the persistent kernel;
//                          CPU: rows in parallel), where the backend takes it;
//               per step : hproj = bmm(h_{t-1}, W_hh^T) over all G, then one cell kernel.
//   backward: the reverse recurrence the same two ways (per step: one cell kernel, then
//             dh_{t-1} = dh_pass + bmm(drec_t, W_hh)); after it dW_ih, dW_hh, the bias gradients
//             and dx as (batched) GEMMs or one reduction each.
//   inference: the forward keeping nothing for backward: the projection in chunks of steps.
//   Where a backend's sequence kernel projects the input itself (the CPU's fp32 tiles) and the
//   sequence path runs, both forwards hand it the input instead of running the projection GEMM.
// A backend supplies only the kernels of RecurrenceKernels; the GEMMs go through ATen.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/setting.h"

namespace mtl_kernels {

// Strides (elements) of the gate tensors, which follow the input projection's layout:
//   shared input (T, B, C)    -> gates (T, B, G, KH)
//   per-group    (G, T, B, C) -> gates (G, T, B, KH)
struct GateLayout {
  int64_t sg, st, sb;
};

// The whole recurrence of one call as tensors (recurrence/sequence.h has the raw view the kernels
// get, and the shapes).
struct ForwardSequence {
  at::Tensor gates;  // in: the input projection; out: the saved values
  GateLayout layout;
  at::Tensor weight_hh;  // (G, KH, H) contiguous
  at::Tensor bias;       // (G, KH) or undefined
  at::Tensor bias_hh;    // (G, KH) or undefined (cells with kRecBias)
  at::Tensor h_states;   // (G, T+1, B, H) [(G, 2, B, H) inference], the first slot filled
  at::Tensor aux;        // the same in acc dtype (cells with kAux), the first slot filled
  at::Tensor output;     // (G, T, B, H)
  at::Tensor lengths;    // (B,) int64 or undefined
  bool reverse;
  int64_t G, T, B, H;
  int64_t t0 = 0;  // the time of step 0 (an inference forward runs the sequence in chunks)
  // A backend's preparation of weight_hh for its sequence kernel (on the CPU the generic loops'
  // transposed copy, or packed panels for the tiles, though fp32 with the tiles projects in the
  // kernel and runs no chunks), made by the first chunk of an inference forward and reused by the
  // others; null: none kept.
  std::shared_ptr<at::Tensor> prepared_weight_hh;
  // Where the backend's sequence kernel projects the input itself (RecurrenceKernels::
  // projects_input): the input, contiguous, (T, B, C) shared or (G, T, B, C) per group, and
  // weight_ih (G, KH, C) contiguous. The kernel then computes each step's x_t W_ih^T into `gates`
  // just before the step: the forward's full gates buffer, or in an inference forward one step's,
  // (G, B, KH) with layout {B*KH, 0, KH}. Undefined: `gates` holds the driver's projection.
  at::Tensor projected_input, weight_ih;
};

struct BackwardSequence {
  at::Tensor gates, dgates, drec;  // GateLayout; drec is dgates unless the cell splits them
  GateLayout layout;
  at::Tensor weight_hh;    // (G, KH, H) contiguous
  at::Tensor h_states;     // (G, T+1, B, H)
  at::Tensor aux;          // (G, T+1, B, H) acc dtype, or undefined
  at::Tensor grad_output;  // (G, T, B, H)
  at::Tensor grad_h_n;     // (G, B, H)
  at::Tensor grad_c_n;     // (G, B, H) acc dtype (cell-state cells) or undefined
  at::Tensor grad_h0;      // (G, B, H) out
  at::Tensor grad_c0;      // (G, B, H) acc dtype, out (cell-state cells) or undefined
  at::Tensor lengths;
  bool reverse;
  int64_t G, T, B, H;
};

// What a backend supplies for one cell. The sequence functions may be nullptr, and return false
// when they cannot run these sizes (the per-step path then runs). `auto_path`: what the `auto`
// switch runs on this backend (AutoPath).
//
// AutoPath::kTuned     the driver times both paths on the first calls of each shape and then runs
//                      the faster (the CPU, where which one wins depends on the machine's GEMM and
//                      cache sizes)
// AutoPath::kPerStep   always per step; the sequence path only when asked for by name (the GPU until
//                      a recorded GPU run verifies its persistent kernels at the current code:
//                      benchmarks/RESULTS.md)
// AutoPath::kSequence  the sequence path wherever it can run
enum class AutoPath { kTuned, kPerStep, kSequence };

// The backward's weight and input gradients over all steps, for a backend that computes them
// itself (RecurrenceKernels::gradient_products): T*B rows per group, (G, T*B, .) views.
struct GradientProducts {
  at::Tensor dg, dr;      // (G, T*B, KH): dgates and drec, either layout (unit stride along KH)
  at::Tensor input;       // (T*B, C) shared or (G, T*B, C) per group, contiguous
  at::Tensor h_prev;      // (G, T*B, R): h_{t-1} of every step, rows contiguous
  at::Tensor weight_ih;   // (G, KH, C) contiguous
  const int64_t* rows;    // per group, its first rows that may be nonzero (a ragged call's first
                          // T_g * B; dg and dr are 0 past them); nullptr: all T*B
  bool shared, input_grad;
  // out: grad_w_ih (G, KH, C) = dg_g^T x_g, grad_w_hh (G, KH, R) = dr_g^T h_prev_g, and where
  // input_grad grad_input (T*B, C) = sum_g dg_g W_ih[g] (shared) or (G, T*B, C) = dg_g W_ih[g]
  at::Tensor grad_w_ih, grad_w_hh, grad_input;
};

struct RecurrenceKernels {
  // hproj (G, B, KH): h_{t-1} W_hh^T for step t.
  void (*forward_step)(const ForwardSequence&, const at::Tensor& hproj, int64_t t);
  // dh_in (G, B, H): the gradient reaching h_t from step t+1; dh_pass (G, B, H) out: the part of
  // dh_{t-1} that bypasses W_hh; dc (G, B, H) acc dtype, in/out (cell-state cells).
  void (*backward_step)(const BackwardSequence&, const at::Tensor& dh_in, const at::Tensor& dh_pass,
                        const at::Tensor& dc, int64_t t);
  bool (*forward_sequence)(const ForwardSequence&) = nullptr;
  bool (*backward_sequence)(const BackwardSequence&) = nullptr;
  AutoPath auto_path = AutoPath::kPerStep;
  // Whether forward_sequence takes ForwardSequence::projected_input for this input (nullptr: never).
  // Where it does and the sequence path runs, the forward and the inference forward hand it the
  // input instead of projecting it with GEMMs (the inference forward's in chunks).
  bool (*projects_input)(const at::Tensor& input) = nullptr;
  // Fills the outputs of GradientProducts and returns true, or returns false (these dtypes or
  // sizes: the driver's ATen GEMMs run them; the CPU's tiles take fp32).
  // nullptr: always the driver's.
  bool (*gradient_products)(GradientProducts&) = nullptr;
};

// One layer and direction's arguments, whichever the cell (the ops' schemas: csrc/ops.cpp).
// R: the width of h, H without a projection, P with one (the LSTM's proj_size).
struct ForwardArgs {
  const at::Tensor& input;      // (T, B, C) shared or (G, T, B, C) per group
  const at::Tensor& weight_ih;  // (G, KH, C)
  const at::Tensor& weight_hh;  // (G, KH, R)
  const std::optional<at::Tensor>& bias;       // (G, KH)
  const std::optional<at::Tensor>& bias_hh;    // (G, KH); cells without kRecBias: added to bias
  const std::optional<at::Tensor>& weight_hr;  // (G, P, H), LSTM only: h_t = W_hr (o tanh(c_t))
  const at::Tensor& h0;                        // (G, B, R)
  const std::optional<at::Tensor>& c0;         // (G, B, H), cell-state cells only
  const std::optional<at::Tensor>& lengths;    // (B,) int64
  bool reverse;
};

struct BackwardArgs {
  const at::Tensor& grad_output;               // (G, T, B, R)
  const at::Tensor& grad_h_n;                  // (G, B, R)
  const std::optional<at::Tensor>& grad_c_n;   // (G, B, H), cell-state cells only
  const at::Tensor& input;
  const at::Tensor& weight_ih;
  const at::Tensor& weight_hh;
  const std::optional<at::Tensor>& weight_hr;
  const at::Tensor& gates;     // the forward's saved values
  const at::Tensor& h_states;  // (G, T+1, B, R)
  const at::Tensor& aux;       // (G, T+1, B, H) acc dtype (cells with kAux), else ignored
  const std::optional<at::Tensor>& lengths;
  bool reverse;
  // false: no grad_input is computed (a (0,) placeholder is returned), which spares the
  // (T*B, G*KH) x (G*KH, C) product of a layer whose input needs no gradient (a model's data).
  bool input_grad = true;
};

// output (G, T, B, R), h_n (G, B, R), c_n (G, B, H) [(0,) without a cell state], gates,
// h_states (G, T+1, B, R), aux (G, T+1, B, H) acc dtype [(0,) without aux].
using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// grad_input [(0,) when not input_grad], grad_weight_ih, grad_weight_hh, grad_bias (G, KH),
// grad_bias_hh (G, KH) [(0,) for cells that fold b_hh], grad_weight_hr [(0,) without a
// projection], grad_h0, grad_c0 [(0,) without a cell state].
using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor>;

template <class Cell>
ForwardResult recurrence_forward(const ForwardArgs& args, const RecurrenceKernels& kernels);
// The forward without what backward needs: no gates or state sequences are kept (the states
// alternate between two slots; the input projection runs in chunks of steps into one reused
// buffer, or, where the backend's sequence kernel projects the input itself, step by step inside
// it). Returns output, h_n, c_n [(0,) without a cell state].
using InferenceResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
template <class Cell>
InferenceResult recurrence_inference(const ForwardArgs& args, const RecurrenceKernels& kernels);
// The size of an inference forward's chunk buffer (default 8 MB; tests make it small).
void set_inference_chunk_bytes(int64_t bytes);
// in_place: the pre-activation gradients overwrite the saved values in `gates` (the autograd's
// backward: it has no further use for them, and keeps no second buffer of that size).
template <class Cell>
BackwardResult recurrence_backward(const BackwardArgs& args, const RecurrenceKernels& kernels,
                                   bool in_place = false);

// The path switch: a setter on the extension (mtl_kernels._C.set_recurrence_path), atomic, with
// the default taken once from MTL_KERNELS_LSTM_PATH.
//   kAuto     what the backend's RecurrenceKernels::auto_path says: on the CPU the faster path,
//             measured per shape; on the GPU per step (its persistent kernel is opt-in)
//   kSequence the sequence path wherever the backend can run it
//   kPerStep  always per step
enum class RecurrencePath { kAuto, kSequence, kPerStep };
EnvSetting<RecurrencePath, 3>& recurrence_path_setting();  // "auto", "sequence", "per_step"
inline RecurrencePath recurrence_path() { return recurrence_path_setting().get(); }

// The CPU's `auto` choices so far: one entry per recurrence shape that has been timed on both
// paths (tests and benchmarks read it through mtl_kernels._C.tuned_paths()).
struct TunedPath {
  std::string key;  // "cell phase G B H dtype"
  double sequence_s, per_step_s;
  bool sequence;  // the choice
};
std::vector<TunedPath> tuned_paths();
void reset_tuned_paths();
// What `auto` runs on each backend (its RecurrenceKernels::auto_path), for _C.auto_paths().
AutoPath cpu_auto_path();
#ifdef MTL_KERNELS_WITH_CUDA
AutoPath cuda_auto_path();
#endif
// Which rows step t is valid for (t < the row's length), in `dtype`: a (1, B, 1) mask for (B,)
// lengths shared by the groups, (G, B, 1) for per-(group, row) (G, B) ones. The per-step path's
// masks and the differentiable composite's (autograd.cpp).
inline at::Tensor valid_rows(const at::Tensor& lengths, int64_t t, at::ScalarType dtype) {
  const at::Tensor valid = lengths.gt(t).to(dtype);
  return lengths.dim() == 1 ? valid.view({1, -1, 1}) : valid.unsqueeze(-1);
}
inline const char* auto_path_name(AutoPath p) {
  return p == AutoPath::kTuned ? "tuned" : p == AutoPath::kSequence ? "sequence" : "per_step";
}
// The tensor-core switch of the persistent kernel (persistent_mma.h): kAuto runs the tensor-core
// variant where its plan fits (bf16 / fp16; fp32 where the user allows TF32 for matmuls), kOff
// always the FMA variant. A setter on the extension (mtl_kernels._C.set_tensor_cores), atomic,
// default taken once from MTL_KERNELS_MMA (auto | off).
enum class MmaMode { kAuto, kOff };
EnvSetting<MmaMode, 2>& mma_mode_setting();  // "auto", "off"
inline MmaMode mma_mode() { return mma_mode_setting().get(); }
// How many persistent launches ran the tensor-core variant (each one is also a sequence-path run).
struct TensorCoreCounts {
  int64_t forward, backward;
};
TensorCoreCounts tensor_core_counts();
void count_tensor_core_run(bool backward);

// How many recurrences ran on each path since the module was loaded.
struct PathCounts {
  int64_t forward_sequence, forward_per_step, backward_sequence, backward_per_step;
};
PathCounts path_counts();

// Cell state / aux / gate arithmetic dtype: fp32 for the half types (as cuDNN), else the input's.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

}  // namespace mtl_kernels
