// CPU cell kernels for the grouped-LSTM driver, and the CPU registration of the two ops.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.seq->gates.scalar_type(),
                                  "grouped_lstm_forward_cpu",
                                  [&] { forward_step_cpu_typed<scalar_t>(s); });
}

void backward_step_cpu(const BackwardStep& s) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.seq->gates.scalar_type(),
                                  "grouped_lstm_backward_cpu",
                                  [&] { backward_step_cpu_typed<scalar_t>(s); });
}

// ---------------------------------------------------------------------------------------------
// The whole sequence at once, rows in parallel (the CPU's counterpart of the persistent kernel).
//
// Each (group, batch) row's recurrence depends only on its own previous state, so a thread can own
// a range of rows for all T steps: one fork/join per call instead of two per step, and the
// recurrent product is this thread's own loop over a W_hh that stays in its cache, instead of an
// MKL batched GEMM call per step (whose fixed cost dominated at the seed models' sizes). The cell
// math is the per-step path's row loops (forward_rows / backward_rows) on the same buffers.
// Used while a group's W_hh fits in L2 (kRowParallelMaxH); larger H keeps the per-step GEMMs.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kRowParallelMaxH = 128;  // 4H x H fp32 = 256 KB

// acc[i] += x0 w0[i] + x1 w1[i] + x2 w2[i] + x3 w3[i]: four W rows per pass over acc.
#define MTL_FMA4_ARGS(scalar_t, acc_t)                                                          \
  acc_t *__restrict__ acc, const scalar_t *__restrict__ w0, const scalar_t *__restrict__ w1,   \
      const scalar_t *__restrict__ w2, const scalar_t *__restrict__ w3, acc_t x0, acc_t x1,     \
      acc_t x2, acc_t x3, int64_t n
template <typename scalar_t, typename acc_t>
__attribute__((noinline)) void fma4(MTL_FMA4_ARGS(scalar_t, acc_t)) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    acc[i] += x0 * acc_t(w0[i]) + x1 * acc_t(w1[i]) + x2 * acc_t(w2[i]) + x3 * acc_t(w3[i]);
}
MTL_CPU_CLONES void fma4_f32(MTL_FMA4_ARGS(float, float)) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += x0 * w0[i] + x1 * w1[i] + x2 * w2[i] + x3 * w3[i];
}

// For each of nr rows: acc[r] (n) += sum_k x[r][k] * w[k * ldw + 0 .. n), i.e. x (nr, K) @ W (K, n),
// four W rows at a time, all nr rows per quad of W rows so that the quad stays in L1 across them.
constexpr int64_t kRowBlock = 8;
template <typename scalar_t, typename acc_t>
void weighted_row_sums(acc_t* acc, const scalar_t* w, int64_t ldw, const scalar_t* const* x,
                       int64_t nr, int64_t K, int64_t n) {
  for (int64_t k = 0; k < K; k += 4) {
    const int64_t m = std::min<int64_t>(4, K - k);
    const scalar_t* wr[4];
    for (int q = 0; q < 4; ++q) wr[q] = w + (k + (q < m ? q : 0)) * ldw;  // past K: weight 0
    for (int64_t r = 0; r < nr; ++r) {
      acc_t xv[4];
      for (int q = 0; q < 4; ++q) xv[q] = q < m ? acc_t(x[r][k + q]) : acc_t(0);
      if constexpr (std::is_same_v<scalar_t, float>) {
        fma4_f32(acc + r * n, wr[0], wr[1], wr[2], wr[3], xv[0], xv[1], xv[2], xv[3], n);
      } else {
        fma4<scalar_t, acc_t>(acc + r * n, wr[0], wr[1], wr[2], wr[3], xv[0], xv[1], xv[2], xv[3],
                              n);
      }
    }
  }
}

// Calls f(r, nr, g) for blocks [r, r + nr) of at most kRowBlock rows of one group, covering
// [begin, end) of the flattened (G, B) rows.
template <typename F>
void for_row_blocks(int64_t begin, int64_t end, int64_t B, const F& f) {
  for (int64_t r = begin; r < end;) {
    const int64_t g = r / B;
    const int64_t nr = std::min({kRowBlock, end - r, (g + 1) * B - r});
    f(r, nr, g);
    r += nr;
  }
}

template <typename scalar_t>
void forward_sequence_cpu_typed(const ForwardSequence& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = s.h_states.size(0), T = s.h_states.size(1) - 1, B = s.h_states.size(2),
                H = s.h_states.size(3), H4 = 4 * H;
  const at::Tensor w_t = s.weight_hh.transpose(1, 2).contiguous();  // (G, H, 4H): 4H contiguous
  at::Tensor hproj = at::empty({G, B, H4}, s.gates.options());       // (G, B, 4H), rows per thread
  const scalar_t* w = w_t.data_ptr<scalar_t>();
  at::parallel_for(0, G * B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(kRowBlock * H4);
    for (int64_t i = 0; i < T; ++i) {
      const auto p =
          make_forward_params<scalar_t>(ForwardStep{&s, hproj, forward_time(i, T, s.reverse)});
      for_row_blocks(begin, end, B, [&](int64_t r, int64_t nr, int64_t g) {
        // hproj rows = h_{t-1} rows @ W_hh[g]^T
        const scalar_t* h_rows[kRowBlock];
        for (int64_t q = 0; q < nr; ++q) h_rows[q] = p.h_prev + g * p.h_sg + (r + q - g * B) * H;
        std::fill(acc.begin(), acc.begin() + nr * H4, acc_t(0));
        weighted_row_sums(acc.data(), w + g * H * H4, H4, h_rows, nr, H, H4);
        scalar_t* out = hproj.data_ptr<scalar_t>() + r * H4;
        for (int64_t n = 0; n < nr * H4; ++n) out[n] = scalar_t(acc[n]);
      });
      forward_rows(p, begin, end);
    }
  });
}

template <typename scalar_t>
void backward_sequence_cpu_typed(const BackwardSequence& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = s.c_states.size(0), T = s.c_states.size(1) - 1, B = s.c_states.size(2),
                H = s.c_states.size(3), H4 = 4 * H;
  // dh in / out per step, (G, B, H)
  at::Tensor dh_a = s.grad_h_n.clone(), dh_b = at::empty_like(dh_a);
  at::Tensor dc = s.grad_c_n.clone();  // (G, B, H) acc_t
  const scalar_t* w = s.weight_hh.data_ptr<scalar_t>();  // (G, 4H, H): H contiguous
  at::parallel_for(0, G * B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(kRowBlock * H);
    // each thread swaps its own rows' roles of the two dh buffers
    scalar_t* dh_in = dh_a.data_ptr<scalar_t>();
    scalar_t* dh_out = dh_b.data_ptr<scalar_t>();
    for (int64_t i = 0; i < T; ++i) {
      auto p = make_backward_params<scalar_t>(
          BackwardStep{&s, dh_a, dh_b, dc, backward_time(i, T, s.reverse)});
      p.dh_in = dh_in;
      p.dh_pass = dh_out;
      backward_rows(p, begin, end);  // dgates_t, dc, and dh_out = the pass-through part
      for_row_blocks(begin, end, B, [&](int64_t r, int64_t nr, int64_t g) {
        // dh_out rows += dgates_t rows @ W_hh[g]
        const scalar_t* dg_rows[kRowBlock];
        for (int64_t q = 0; q < nr; ++q)
          dg_rows[q] = p.dgates + g * p.gates_sg + (r + q - g * B) * p.gates_sb;
        std::fill(acc.begin(), acc.begin() + nr * H, acc_t(0));
        weighted_row_sums(acc.data(), w + g * H4 * H, H, dg_rows, nr, H4, H);
        scalar_t* o = dh_out + r * H;
        for (int64_t k = 0; k < nr * H; ++k) o[k] = scalar_t(acc_t(o[k]) + acc[k]);
      });
      std::swap(dh_in, dh_out);
    }
    // after the loop dh_in holds grad_h0 for these rows
    scalar_t* gh0 = s.grad_h0.data_ptr<scalar_t>();
    acc_t* gc0 = s.grad_c0.data_ptr<acc_t>();
    const acc_t* dcp = dc.data_ptr<acc_t>();
    std::copy(dh_in + begin * H, dh_in + end * H, gh0 + begin * H);
    std::copy(dcp + begin * H, dcp + end * H, gc0 + begin * H);
  });
}

bool use_row_parallel(int64_t H) {
  return H <= kRowParallelMaxH && recurrence_path() != RecurrencePath::kPerStep;
}

bool forward_sequence_cpu(const ForwardSequence& s) {
  if (!use_row_parallel(s.h_states.size(3))) return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(),
                                  "grouped_lstm_forward_sequence_cpu",
                                  [&] { forward_sequence_cpu_typed<scalar_t>(s); });
  return true;
}

bool backward_sequence_cpu(const BackwardSequence& s) {
  if (!use_row_parallel(s.c_states.size(3))) return false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.gates.scalar_type(),
                                  "grouped_lstm_backward_sequence_cpu",
                                  [&] { backward_sequence_cpu_typed<scalar_t>(s); });
  return true;
}

constexpr CellKernels kCpuKernels{&forward_step_cpu, &backward_step_cpu, &forward_sequence_cpu,
                                  &backward_sequence_cpu};

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
