// LSTM gate math shared by the CPU and CUDA cell kernels.
//
// Everything here is __host__ __device__ so that the arithmetic (activations, cell update, their
// derivatives, padding/hold semantics and even the per-row pointer arithmetic) is compiled into the
// CPU kernels as well: CPU tests cover it, and the CUDA kernels only add a thread -> (g, b, j) map and
// a launch.
//
// Gate order is nn.LSTM's: i, f, g, o (each H wide inside a 4H gate row).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MTL_HD __host__ __device__ __forceinline__
#else
#define MTL_HD inline __attribute__((always_inline))
#endif

// `#pragma omp simd reduction` for host loops only (nvcc's device pass ignores it).
#if defined(__CUDA_ARCH__)
#define MTL_SIMD_SUM(var)
#else
#define MTL_PRAGMA(x) _Pragma(#x)
#define MTL_SIMD_SUM(var) MTL_PRAGMA(omp simd reduction(+ : var))
#endif

namespace mtl_kernels {

// ---------------------------------------------------------------------------------------------
// Activations.
//
// float on the host: a branch-free Cephes-style exp (range reduction + degree-6 polynomial, about
// 1 ulp on its range) that GCC vectorises; libm's expf is a scalar call and would make the gate
// pass slower than the GEMMs. float on the device: expf/tanhf. double anywhere: libm.
// ---------------------------------------------------------------------------------------------
MTL_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // Written without branches or compare-selects beyond min/max so that GCC vectorises it: the
  // clamp compiles to min/max, round-to-nearest uses the 1.5 * 2^23 trick (r then lies in
  // [-ln2/2, ln2/2], the polynomial's range).
  x = std::min(x, 88.0f);  // keeps n <= 127: 2^n stays finite
  x = std::max(x, -87.3365447504f);  // exp(-87.34) is the smallest normal float
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  // y * 2^n, building 2^n from its exponent bits.
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return y * pow2;
#endif
}

MTL_HD float sigmoid(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
MTL_HD double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }

MTL_HD float tanh_act(float x) {
#if defined(__CUDA_ARCH__)
  return tanhf(x);
#else
  // tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error about 1e-7, no branch.
  return 1.0f - 2.0f / (exp_f32(2.0f * x) + 1.0f);
#endif
}
MTL_HD double tanh_act(double x) { return ::tanh(x); }

// ---------------------------------------------------------------------------------------------
// Time and state slots. The states around step t live in slots t and t+1 of (G, T+1, B, H)
// tensors; in the reverse direction slot t+1 is before step t and slot t after it. Loop step s of a
// forward runs time step forward_time(s); a backward runs them in the opposite order.
// ---------------------------------------------------------------------------------------------
MTL_HD int64_t prev_slot(int64_t t, bool reverse) { return reverse ? t + 1 : t; }
MTL_HD int64_t next_slot(int64_t t, bool reverse) { return reverse ? t : t + 1; }
MTL_HD int64_t forward_time(int64_t s, int64_t T, bool reverse) { return reverse ? T - 1 - s : s; }
MTL_HD int64_t backward_time(int64_t s, int64_t T, bool reverse) { return reverse ? s : T - 1 - s; }

// ---------------------------------------------------------------------------------------------
// One LSTM cell element (one hidden unit j of one (group, batch) row).
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct Gates {
  acc_t i, f, g, o;
};

// Pre-activations -> activated gates, new cell and hidden state.
template <typename acc_t>
MTL_HD void cell_forward(const Gates<acc_t>& pre, acc_t c_prev, Gates<acc_t>& act, acc_t& c_next,
                         acc_t& h_next) {
  act.i = sigmoid(pre.i);
  act.f = sigmoid(pre.f);
  act.g = tanh_act(pre.g);
  act.o = sigmoid(pre.o);
  c_next = act.f * c_prev + act.i * act.g;
  h_next = act.o * tanh_act(c_next);
}

// Gradients of one cell element. `dh` is the total gradient reaching h_t (from the output and from
// step t+1), `dc_next` the gradient reaching c_t from step t+1. Produces pre-activation gradients and
// the gradient reaching c_{t-1}. tanh(c_t) is recomputed instead of stored.
template <typename acc_t>
MTL_HD void cell_backward(const Gates<acc_t>& act, acc_t c_prev, acc_t c_next, acc_t dh,
                          acc_t dc_next, Gates<acc_t>& dpre, acc_t& dc_prev) {
  const acc_t one = acc_t(1);
  const acc_t tc = tanh_act(c_next);
  const acc_t dc = dc_next + dh * act.o * (one - tc * tc);
  dpre.o = dh * tc * act.o * (one - act.o);
  dpre.i = dc * act.g * act.i * (one - act.i);
  dpre.f = dc * c_prev * act.f * (one - act.f);
  dpre.g = dc * act.i * (one - act.g * act.g);
  dc_prev = dc * act.f;
}

// ---------------------------------------------------------------------------------------------
// One time step for all G groups: the parameters the cell kernels see, and the per-row / per-element
// work shared by the CPU loop and the CUDA thread grid.
//
// Layouts (H hidden, 4H gate width):
//   gates   : the input projection at step t, overwritten in place with the activated gates;
//             row (g, b) starts at gates + g * gates_sg + b * gates_sb, 4H contiguous.
//   hproj   : (G, B, 4H) contiguous, h_{t-1} @ W_hh^T for this step.
//   bias    : (G, 4H) or nullptr (b_ih + b_hh).
//   h_prev/h_next, c_prev/c_next: state slots, row (g, b) at + g * state_sg + b * H.
//   out     : output at step t, row (g, b) at + g * out_sg + b * H.
//   lengths : (B,) or nullptr. Steps t >= lengths[b] are padding: state held, output 0.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename acc_t>
struct ForwardStepParams {
  scalar_t* gates;
  int64_t gates_sg, gates_sb;
  const scalar_t* hproj;
  const scalar_t* bias;
  const scalar_t* h_prev;
  scalar_t* h_next;
  int64_t h_sg;
  const acc_t* c_prev;
  acc_t* c_next;
  int64_t c_sg;
  scalar_t* out;
  int64_t out_sg;
  const int64_t* lengths;
  int64_t t, G, B, H;
};

template <typename scalar_t, typename acc_t>
struct ForwardRow {
  scalar_t* gates;
  const scalar_t* hproj;
  const scalar_t* bias;  // nullptr when the LSTM has no bias
  const scalar_t* h_prev;
  scalar_t* h_next;
  const acc_t* c_prev;
  acc_t* c_next;
  scalar_t* out;
  bool valid;  // false on padding steps
};

template <typename scalar_t, typename acc_t>
MTL_HD ForwardRow<scalar_t, acc_t> forward_row(const ForwardStepParams<scalar_t, acc_t>& p,
                                               int64_t g, int64_t b) {
  ForwardRow<scalar_t, acc_t> r;
  const int64_t H = p.H;
  r.gates = p.gates + g * p.gates_sg + b * p.gates_sb;
  r.hproj = p.hproj ? p.hproj + (g * p.B + b) * 4 * H : nullptr;  // none in the persistent kernel
  r.bias = p.bias ? p.bias + g * 4 * H : nullptr;
  r.h_prev = p.h_prev + g * p.h_sg + b * H;
  r.h_next = p.h_next + g * p.h_sg + b * H;
  r.c_prev = p.c_prev + g * p.c_sg + b * H;
  r.c_next = p.c_next + g * p.c_sg + b * H;
  r.out = p.out + g * p.out_sg + b * H;
  r.valid = p.lengths == nullptr || p.t < p.lengths[b];
  return r;
}

// Padding step: hold the state, emit zeros (and zero gates, so saved tensors hold no garbage).
template <typename scalar_t, typename acc_t>
MTL_HD void forward_hold(const ForwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H) {
  r.h_next[j] = r.h_prev[j];
  r.c_next[j] = r.c_prev[j];
  r.out[j] = scalar_t(0);
  r.gates[j] = r.gates[H + j] = r.gates[2 * H + j] = r.gates[3 * H + j] = scalar_t(0);
}

// A valid step for hidden unit j. Plain __restrict__ pointers and no branch (bias presence is a
// template argument) so that the host row loop vectorises.
template <bool kBias, typename scalar_t, typename acc_t>
MTL_HD void forward_compute(scalar_t* __restrict__ gates, const scalar_t* __restrict__ hproj,
                            const scalar_t* __restrict__ bias, const acc_t* __restrict__ c_prev,
                            acc_t* __restrict__ c_next, scalar_t* __restrict__ h_next,
                            scalar_t* __restrict__ out, int64_t j, int64_t H) {
  Gates<acc_t> pre;
  pre.i = acc_t(gates[j]) + acc_t(hproj[j]);
  pre.f = acc_t(gates[H + j]) + acc_t(hproj[H + j]);
  pre.g = acc_t(gates[2 * H + j]) + acc_t(hproj[2 * H + j]);
  pre.o = acc_t(gates[3 * H + j]) + acc_t(hproj[3 * H + j]);
  if (kBias) {
    pre.i += acc_t(bias[j]);
    pre.f += acc_t(bias[H + j]);
    pre.g += acc_t(bias[2 * H + j]);
    pre.o += acc_t(bias[3 * H + j]);
  }
  Gates<acc_t> act;
  acc_t c, h;
  cell_forward(pre, c_prev[j], act, c, h);
  gates[j] = scalar_t(act.i);
  gates[H + j] = scalar_t(act.f);
  gates[2 * H + j] = scalar_t(act.g);
  gates[3 * H + j] = scalar_t(act.o);
  c_next[j] = c;
  h_next[j] = scalar_t(h);
  out[j] = scalar_t(h);
}

// One element, whatever the case: what a CUDA thread runs.
template <typename scalar_t, typename acc_t>
MTL_HD void forward_element(const ForwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H) {
  if (!r.valid) {
    forward_hold(r, j, H);
  } else if (r.bias) {
    forward_compute<true>(r.gates, r.hproj, r.bias, r.c_prev, r.c_next, r.h_next, r.out, j, H);
  } else {
    forward_compute<false>(r.gates, r.hproj, r.bias, r.c_prev, r.c_next, r.h_next, r.out, j, H);
  }
}

// Backward step. Reads the activated gates saved at step t, the cell states around it, and the
// gradients arriving at h_t (grad_out at t plus dh_in, the recurrent part) and c_t (dc, updated in
// place to the gradient reaching c_{t-1}). Writes the pre-activation gradients `dgates` (same layout
// as gates) and `dh_pass`: the part of the gradient reaching h_{t-1} that does not go through the
// recurrent GEMM (all of dh on padding steps, where the state was held; 0 elsewhere).
template <typename scalar_t, typename acc_t>
struct BackwardStepParams {
  const scalar_t* gates;
  scalar_t* dgates;
  int64_t gates_sg, gates_sb;
  const acc_t* c_prev;
  const acc_t* c_next;
  int64_t c_sg;
  const scalar_t* grad_out;  // (G, B, H) rows at + g * gout_sg + b * H
  int64_t gout_sg;
  const scalar_t* dh_in;  // (G, B, H) contiguous
  scalar_t* dh_pass;      // (G, B, H) contiguous
  acc_t* dc;              // (G, B, H) contiguous, in/out
  const int64_t* lengths;
  int64_t t, G, B, H;
};

template <typename scalar_t, typename acc_t>
struct BackwardRow {
  const scalar_t* gates;
  scalar_t* dgates;
  const acc_t* c_prev;
  const acc_t* c_next;
  const scalar_t* grad_out;
  const scalar_t* dh_in;
  scalar_t* dh_pass;
  acc_t* dc;
  bool valid;
};

template <typename scalar_t, typename acc_t>
MTL_HD BackwardRow<scalar_t, acc_t> backward_row(const BackwardStepParams<scalar_t, acc_t>& p,
                                                 int64_t g, int64_t b) {
  BackwardRow<scalar_t, acc_t> r;
  const int64_t H = p.H;
  const int64_t off = g * p.gates_sg + b * p.gates_sb;
  r.gates = p.gates + off;
  r.dgates = p.dgates + off;
  r.c_prev = p.c_prev + g * p.c_sg + b * H;
  r.c_next = p.c_next + g * p.c_sg + b * H;
  r.grad_out = p.grad_out + g * p.gout_sg + b * H;
  const int64_t row = (g * p.B + b) * H;
  // The persistent kernel keeps dh and dc in registers and passes no buffers.
  r.dh_in = p.dh_in ? p.dh_in + row : nullptr;
  r.dh_pass = p.dh_pass ? p.dh_pass + row : nullptr;
  r.dc = p.dc ? p.dc + row : nullptr;
  r.valid = p.lengths == nullptr || p.t < p.lengths[b];
  return r;
}

// Padding step: gradients pass straight through the held state.
template <typename scalar_t, typename acc_t>
MTL_HD void backward_hold(const BackwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H) {
  r.dh_pass[j] = r.dh_in[j];
  r.dgates[j] = r.dgates[H + j] = r.dgates[2 * H + j] = r.dgates[3 * H + j] = scalar_t(0);
}

template <typename scalar_t, typename acc_t>
MTL_HD void backward_compute(const scalar_t* __restrict__ gates, scalar_t* __restrict__ dgates,
                             const acc_t* __restrict__ c_prev, const acc_t* __restrict__ c_next,
                             const scalar_t* __restrict__ grad_out,
                             const scalar_t* __restrict__ dh_in, scalar_t* __restrict__ dh_pass,
                             acc_t* __restrict__ dc, int64_t j, int64_t H) {
  Gates<acc_t> act;
  act.i = acc_t(gates[j]);
  act.f = acc_t(gates[H + j]);
  act.g = acc_t(gates[2 * H + j]);
  act.o = acc_t(gates[3 * H + j]);
  const acc_t dh = acc_t(grad_out[j]) + acc_t(dh_in[j]);
  Gates<acc_t> dpre;
  acc_t dc_prev;
  cell_backward(act, c_prev[j], c_next[j], dh, dc[j], dpre, dc_prev);
  dgates[j] = scalar_t(dpre.i);
  dgates[H + j] = scalar_t(dpre.f);
  dgates[2 * H + j] = scalar_t(dpre.g);
  dgates[3 * H + j] = scalar_t(dpre.o);
  dc[j] = dc_prev;
  dh_pass[j] = scalar_t(0);
}

template <typename scalar_t, typename acc_t>
MTL_HD void backward_element(const BackwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H) {
  if (!r.valid) {
    backward_hold(r, j, H);
  } else {
    backward_compute(r.gates, r.dgates, r.c_prev, r.c_next, r.grad_out, r.dh_in, r.dh_pass, r.dc,
                     j, H);
  }
}

// ---------------------------------------------------------------------------------------------
// The same steps with the recurrent state in registers (the persistent kernel, lstm_persistent.h):
// the recurrent pre-activations `rec` = (h_{t-1} W_hh^T)[j] arrive summed in acc_t instead of from
// an hproj buffer, and c (forward) or dh / dc (backward) live in the caller's registers. What they
// write to memory (activated gates, h, c, output, dgates) is what the per-step kernels write, so the
// two paths' saved tensors mix.
// ---------------------------------------------------------------------------------------------

// Forward step of unit j; returns c_t (c_prev itself on a padding step, where the state is held).
template <typename scalar_t, typename acc_t>
MTL_HD acc_t forward_unit_registers(const ForwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H,
                                    const Gates<acc_t>& rec, acc_t c_prev) {
  if (!r.valid) {
    r.h_next[j] = r.h_prev[j];
    r.c_next[j] = c_prev;
    r.out[j] = scalar_t(0);
    r.gates[j] = r.gates[H + j] = r.gates[2 * H + j] = r.gates[3 * H + j] = scalar_t(0);
    return c_prev;
  }
  Gates<acc_t> pre;
  pre.i = acc_t(r.gates[j]) + rec.i;
  pre.f = acc_t(r.gates[H + j]) + rec.f;
  pre.g = acc_t(r.gates[2 * H + j]) + rec.g;
  pre.o = acc_t(r.gates[3 * H + j]) + rec.o;
  if (r.bias) {
    pre.i += acc_t(r.bias[j]);
    pre.f += acc_t(r.bias[H + j]);
    pre.g += acc_t(r.bias[2 * H + j]);
    pre.o += acc_t(r.bias[3 * H + j]);
  }
  Gates<acc_t> act;
  acc_t c, h;
  cell_forward(pre, c_prev, act, c, h);
  r.gates[j] = scalar_t(act.i);
  r.gates[H + j] = scalar_t(act.f);
  r.gates[2 * H + j] = scalar_t(act.g);
  r.gates[3 * H + j] = scalar_t(act.o);
  r.c_next[j] = c;
  r.h_next[j] = scalar_t(h);
  r.out[j] = scalar_t(h);
  return c;
}

// Backward step of unit j. dh_in: the gradient reaching h_t from step t+1 (or grad_h_n). dc: in,
// the gradient reaching c_t; out, the one reaching c_{t-1}. dh_pass: out, the part of dh_{t-1}
// that bypasses W_hh (all of dh_in on a padding step, else 0).
template <typename scalar_t, typename acc_t>
MTL_HD void backward_unit_registers(const BackwardRow<scalar_t, acc_t>& r, int64_t j, int64_t H,
                                    acc_t dh_in, acc_t& dc, acc_t& dh_pass) {
  if (!r.valid) {
    r.dgates[j] = r.dgates[H + j] = r.dgates[2 * H + j] = r.dgates[3 * H + j] = scalar_t(0);
    dh_pass = dh_in;
    return;
  }
  Gates<acc_t> act;
  act.i = acc_t(r.gates[j]);
  act.f = acc_t(r.gates[H + j]);
  act.g = acc_t(r.gates[2 * H + j]);
  act.o = acc_t(r.gates[3 * H + j]);
  Gates<acc_t> dpre;
  acc_t dc_prev;
  cell_backward(act, r.c_prev[j], r.c_next[j], acc_t(r.grad_out[j]) + dh_in, dc, dpre, dc_prev);
  r.dgates[j] = scalar_t(dpre.i);
  r.dgates[H + j] = scalar_t(dpre.f);
  r.dgates[2 * H + j] = scalar_t(dpre.g);
  r.dgates[3 * H + j] = scalar_t(dpre.o);
  dc = dc_prev;
  dh_pass = acc_t(0);
}

}  // namespace mtl_kernels
