// CPU cell kernels for the grouped-LSTM driver, and the CPU registration of the two ops.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "grouped_lstm.h"
#include "lstm_cell.h"
#include "step_params.h"

namespace mtl_kernels {
namespace {

// Rows (g, b) per parallel chunk: about 2k elements, so that small steps stay on one thread and
// pay no fork/join.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 2048 / H); }

// The row loops. Each case (padding / valid with or without bias) is its own branch-free loop over
// the hidden units in a function whose pointer arguments are __restrict__: GCC then vectorises the
// shared element math (it did not once these loops were inlined into the row loop). For float, the
// hot case, target_clones adds AVX2 and AVX-512 versions picked at load time, so one binary runs
// anywhere and uses the wide units where present.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MTL_CPU_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default"), noinline))
#else
#define MTL_CPU_CLONES __attribute__((noinline))
#endif

#define MTL_FORWARD_VALID_ROW_ARGS(scalar_t, acc_t)                                            \
  scalar_t *__restrict__ gates, const scalar_t *__restrict__ hproj,                           \
      const scalar_t *__restrict__ bias, const acc_t *__restrict__ c_prev,                    \
      acc_t *__restrict__ c_next, scalar_t *__restrict__ h_next, scalar_t *__restrict__ out, \
      int64_t H
#define MTL_BACKWARD_VALID_ROW_ARGS(scalar_t, acc_t)                                            \
  const scalar_t *__restrict__ gates, scalar_t *__restrict__ dgates,                           \
      const acc_t *__restrict__ c_prev, const acc_t *__restrict__ c_next,                      \
      const scalar_t *__restrict__ grad_out, const scalar_t *__restrict__ dh_in,               \
      scalar_t *__restrict__ dh_pass, acc_t *__restrict__ dc, int64_t H

template <bool kBias, typename scalar_t, typename acc_t>
__attribute__((noinline)) void forward_valid_row(MTL_FORWARD_VALID_ROW_ARGS(scalar_t, acc_t)) {
  for (int64_t j = 0; j < H; ++j)
    forward_compute<kBias>(gates, hproj, bias, c_prev, c_next, h_next, out, j, H);
}
MTL_CPU_CLONES void forward_valid_row_bias_f32(MTL_FORWARD_VALID_ROW_ARGS(float, float)) {
  for (int64_t j = 0; j < H; ++j)
    forward_compute<true>(gates, hproj, bias, c_prev, c_next, h_next, out, j, H);
}
MTL_CPU_CLONES void forward_valid_row_nobias_f32(MTL_FORWARD_VALID_ROW_ARGS(float, float)) {
  for (int64_t j = 0; j < H; ++j)
    forward_compute<false>(gates, hproj, bias, c_prev, c_next, h_next, out, j, H);
}

template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void backward_valid_row(MTL_BACKWARD_VALID_ROW_ARGS(scalar_t, acc_t)) {
  for (int64_t j = 0; j < H; ++j)
    backward_compute(gates, dgates, c_prev, c_next, grad_out, dh_in, dh_pass, dc, j, H);
}
MTL_CPU_CLONES void backward_valid_row_f32(MTL_BACKWARD_VALID_ROW_ARGS(float, float)) {
  for (int64_t j = 0; j < H; ++j)
    backward_compute(gates, dgates, c_prev, c_next, grad_out, dh_in, dh_pass, dc, j, H);
}

template <typename scalar_t, typename acc_t>
void forward_rows(const ForwardStepParams<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
  const int64_t H = p.H;
  for (int64_t r = begin; r < end; ++r) {
    const auto w = forward_row(p, r / p.B, r % p.B);
    if (!w.valid) {
      for (int64_t j = 0; j < H; ++j) forward_hold(w, j, H);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      (w.bias ? forward_valid_row_bias_f32 : forward_valid_row_nobias_f32)(
          w.gates, w.hproj, w.bias, w.c_prev, w.c_next, w.h_next, w.out, H);
    } else if (w.bias) {
      forward_valid_row<true>(w.gates, w.hproj, w.bias, w.c_prev, w.c_next, w.h_next, w.out, H);
    } else {
      forward_valid_row<false>(w.gates, w.hproj, w.bias, w.c_prev, w.c_next, w.h_next, w.out, H);
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_rows(const BackwardStepParams<scalar_t, acc_t>& p, int64_t begin, int64_t end) {
  const int64_t H = p.H;
  for (int64_t r = begin; r < end; ++r) {
    const auto w = backward_row(p, r / p.B, r % p.B);
    if (!w.valid) {
      for (int64_t j = 0; j < H; ++j) backward_hold(w, j, H);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      backward_valid_row_f32(w.gates, w.dgates, w.c_prev, w.c_next, w.grad_out, w.dh_in, w.dh_pass,
                             w.dc, H);
    } else {
      backward_valid_row(w.gates, w.dgates, w.c_prev, w.c_next, w.grad_out, w.dh_in, w.dh_pass,
                         w.dc, H);
    }
  }
}

template <typename scalar_t>
void forward_step_cpu_typed(const ForwardStep& s) {
  const auto p = make_forward_params<scalar_t>(s);
  at::parallel_for(0, p.G * p.B, row_grain(p.H),
                   [&](int64_t begin, int64_t end) { forward_rows(p, begin, end); });
}

template <typename scalar_t>
void backward_step_cpu_typed(const BackwardStep& s) {
  const auto p = make_backward_params<scalar_t>(s);
  at::parallel_for(0, p.G * p.B, row_grain(p.H),
                   [&](int64_t begin, int64_t end) { backward_rows(p, begin, end); });
}

void forward_step_cpu(const ForwardStep& s) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(),
                                  "grouped_lstm_forward_cpu",
                                  [&] { forward_step_cpu_typed<scalar_t>(s); });
}

void backward_step_cpu(const BackwardStep& s) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(),
                                  "grouped_lstm_backward_cpu",
                                  [&] { backward_step_cpu_typed<scalar_t>(s); });
}

constexpr CellKernels kCpuKernels{&forward_step_cpu, &backward_step_cpu};

ForwardResult grouped_lstm_forward_cpu(const at::Tensor& input, const at::Tensor& weight_ih,
                                       const at::Tensor& weight_hh,
                                       const std::optional<at::Tensor>& bias,
                                       const at::Tensor& h0, const at::Tensor& c0,
                                       const std::optional<at::Tensor>& lengths, bool reverse) {
  return grouped_lstm_forward_driver(input, weight_ih, weight_hh, bias, h0, c0, lengths, reverse,
                                     kCpuKernels);
}

BackwardResult grouped_lstm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& gates, const at::Tensor& h_states, const at::Tensor& c_states,
    const std::optional<at::Tensor>& lengths, bool reverse) {
  return grouped_lstm_backward_driver(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh,
                                      gates, h_states, c_states, lengths, reverse, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) {
  m.impl("grouped_lstm_forward", &grouped_lstm_forward_cpu);
  m.impl("grouped_lstm_backward", &grouped_lstm_backward_cpu);
}

}  // namespace mtl_kernels
