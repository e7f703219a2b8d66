// The ops' unboxed signatures (csrc/ops.cpp has their schemas) around a backend's implementation
// of the driver's ForwardArgs / BackwardArgs: each backend registers these for its dispatch key.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

#include "recurrence/driver.h"

namespace mtl_kernels {

using OptTensor = std::optional<at::Tensor>;
using ForwardImpl = ForwardResult (*)(const std::string& cell, const ForwardArgs&);
using BackwardImpl = BackwardResult (*)(const std::string& cell, const BackwardArgs&);
using InferenceImpl = InferenceResult (*)(const std::string& cell, const ForwardArgs&);

// grouped_recurrence_forward(str cell, Tensor input, Tensor weight_ih, Tensor weight_hh,
//     Tensor? bias, Tensor? bias_hh, Tensor? weight_hr, Tensor h0, Tensor? c0, Tensor? lengths,
//     bool reverse)
template <ForwardImpl F>
ForwardResult forward_op(c10::string_view cell, const at::Tensor& input, const at::Tensor& weight_ih,
                         const at::Tensor& weight_hh, const OptTensor& bias, const OptTensor& bias_hh,
                         const OptTensor& weight_hr, const at::Tensor& h0, const OptTensor& c0,
                         const OptTensor& lengths, bool reverse) {
  return F(std::string(cell), ForwardArgs{input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0,
                                          c0, lengths, reverse});
}

// grouped_recurrence (its backend kernels: the inference forward): grouped_recurrence_forward's
// arguments; output, h_n, c_n.
template <InferenceImpl F>
InferenceResult inference_op(c10::string_view cell, const at::Tensor& input,
                             const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                             const OptTensor& bias, const OptTensor& bias_hh,
                             const OptTensor& weight_hr, const at::Tensor& h0, const OptTensor& c0,
                             const OptTensor& lengths, bool reverse) {
  return F(std::string(cell), ForwardArgs{input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0,
                                          c0, lengths, reverse});
}

// grouped_recurrence_backward(str cell, Tensor grad_output, Tensor grad_h_n, Tensor? grad_c_n,
//     Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, Tensor gates,
//     Tensor h_states, Tensor aux, Tensor? lengths, bool reverse, bool input_grad=True)
template <BackwardImpl F>
BackwardResult backward_op(c10::string_view cell, const at::Tensor& grad_output,
                           const at::Tensor& grad_h_n, const OptTensor& grad_c_n,
                           const at::Tensor& input, const at::Tensor& weight_ih,
                           const at::Tensor& weight_hh, const OptTensor& weight_hr,
                           const at::Tensor& gates, const at::Tensor& h_states,
                           const at::Tensor& aux, const OptTensor& lengths, bool reverse,
                           bool input_grad) {
  return F(std::string(cell), BackwardArgs{grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                           weight_hh, weight_hr, gates, h_states, aux, lengths,
                                           reverse, input_grad});
}

// _grouped_recurrence_backward_in_place: the same arguments, gates mutated (Tensor(a!)).
template <BackwardImpl F>
BackwardResult backward_in_place_op(c10::string_view cell, const at::Tensor& grad_output,
                                    const at::Tensor& grad_h_n, const OptTensor& grad_c_n,
                                    const at::Tensor& input, const at::Tensor& weight_ih,
                                    const at::Tensor& weight_hh, const OptTensor& weight_hr,
                                    at::Tensor& gates, const at::Tensor& h_states,
                                    const at::Tensor& aux, const OptTensor& lengths, bool reverse,
                                    bool input_grad) {
  return F(std::string(cell), BackwardArgs{grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                           weight_hh, weight_hr, gates, h_states, aux, lengths,
                                           reverse, input_grad});
}

// The ops' unboxed signatures, and their handles for calls from C++ (the autograd, the per-cell
// composites, the autocast kernels).
using Tensor = at::Tensor;
using ForwardSig = ForwardResult(c10::string_view, const Tensor&, const Tensor&, const Tensor&,
                                 const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                 const OptTensor&, const OptTensor&, bool);
using InferenceSig = InferenceResult(c10::string_view, const Tensor&, const Tensor&, const Tensor&,
                                     const OptTensor&, const OptTensor&, const OptTensor&,
                                     const Tensor&, const OptTensor&, const OptTensor&, bool);
using BackwardSig = BackwardResult(c10::string_view, const Tensor&, const Tensor&, const OptTensor&,
                                   const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                   const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                                   bool, bool);
using BackwardInPlaceSig = BackwardResult(c10::string_view, const Tensor&, const Tensor&,
                                          const OptTensor&, const Tensor&, const Tensor&,
                                          const Tensor&, const OptTensor&, Tensor&, const Tensor&,
                                          const Tensor&, const OptTensor&, bool, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}
inline const c10::TypedOperatorHandle<ForwardSig>& recurrence_forward_op() {
  static const auto op = find_op<ForwardSig>("mtl_kernels::grouped_recurrence_forward");
  return op;
}
inline const c10::TypedOperatorHandle<InferenceSig>& recurrence_op() {
  static const auto op = find_op<InferenceSig>("mtl_kernels::grouped_recurrence");
  return op;
}
inline const c10::TypedOperatorHandle<BackwardSig>& recurrence_backward_op() {
  static const auto op = find_op<BackwardSig>("mtl_kernels::grouped_recurrence_backward");
  return op;
}
inline const c10::TypedOperatorHandle<BackwardInPlaceSig>& recurrence_backward_in_place_op() {
  static const auto op =
      find_op<BackwardInPlaceSig>("mtl_kernels::_grouped_recurrence_backward_in_place");
  return op;
}

// The backends (recurrence/cpu.cpp, recurrence/cuda_per_step.cu).
ForwardResult grouped_recurrence_forward_cpu(const std::string& cell, const ForwardArgs& args);
InferenceResult grouped_recurrence_inference_cpu(const std::string& cell, const ForwardArgs& args);
BackwardResult grouped_recurrence_backward_cpu(const std::string& cell, const BackwardArgs& args);
BackwardResult grouped_recurrence_backward_in_place_cpu(const std::string& cell,
                                                        const BackwardArgs& args);
ForwardResult grouped_recurrence_forward_cuda(const std::string& cell, const ForwardArgs& args);
InferenceResult grouped_recurrence_inference_cuda(const std::string& cell, const ForwardArgs& args);
BackwardResult grouped_recurrence_backward_cuda(const std::string& cell, const BackwardArgs& args);
BackwardResult grouped_recurrence_backward_in_place_cuda(const std::string& cell,
                                                         const BackwardArgs& args);
// The persistent kernel's work run on the CPU with a given tiling (persistent_emulate.cpp).
ForwardResult grouped_recurrence_forward_emulated(const std::string& cell, const ForwardArgs& args,
                                                  int64_t units, int64_t tile_rows,
                                                  int64_t threads_y);
BackwardResult grouped_recurrence_backward_emulated(const std::string& cell, const BackwardArgs& args,
                                                    int64_t units, int64_t tile_rows,
                                                    int64_t threads_y, int64_t chunk);
// Its tensor-core variant (persistent_mma.h) on the CPU: reg_ktiles < 0 = as many as registers
// hold; mma_k 16 (bf16 / fp16 / fp64) or 8 (TF32 for fp32, fp64); chunk_ktiles: backward k-tiles
// of drec per shared-memory fill (<= 0: all).
ForwardResult grouped_recurrence_forward_emulated_mma(const std::string& cell,
                                                      const ForwardArgs& args, int64_t units,
                                                      int64_t tile_rows, int64_t reg_ktiles,
                                                      int64_t mma_k);
BackwardResult grouped_recurrence_backward_emulated_mma(const std::string& cell,
                                                        const BackwardArgs& args, int64_t units,
                                                        int64_t tile_rows, int64_t reg_ktiles,
                                                        int64_t mma_k, int64_t chunk_ktiles);

}  // namespace mtl_kernels
