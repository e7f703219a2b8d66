// CPU kernels of the recurrence, for every cell, and the CPU registration of its ops.
//   per step : one cell pass over all (group, batch) rows per step (the driver does the GEMMs);
//   sequence : rows in parallel for the whole sequence, each thread doing its own rows' W_hh
//              products (the CPU's counterpart of the GPU's persistent kernel): in fp32 on AVX2
//              with W_hh packed once per call and register-tiled (cpu_tiles.h), else generic loops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "cells/cell.h"
#include "common/dispatch.h"
#include "recurrence/cpu_tiles.h"
#include "recurrence/driver.h"
#include "recurrence/raw_views.h"
#include "recurrence/registration.h"
#include "recurrence/step.h"

namespace mtl_kernels {
namespace {

// Rows (g, b) per parallel chunk: about 2k elements, so that small steps stay on one thread and
// pay no fork/join.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 2048 / H); }

// The row loops: each case (valid with or without bias; padding) is its own branch-free loop over
// the hidden units in a function whose pointer arguments are __restrict__, so GCC vectorises the
// shared unit math (it did not once these loops were inlined into the row loop). target_clones
// adds x86-64-v4 (AVX-512) and v3 (AVX2 + FMA) versions picked at load time, so one binary runs
// anywhere and uses the wide units where present.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MTL_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), noinline))
#else
#define MTL_CPU_CLONES __attribute__((noinline))
#endif

template <class Cell, bool kBias, typename scalar_t, typename acc_t>
MTL_CPU_CLONES void forward_valid_row(scalar_t* __restrict__ gates, const scalar_t* __restrict__ hproj,
                                      const scalar_t* __restrict__ bias,
                                      const scalar_t* __restrict__ bias_hh,
                                      const scalar_t* __restrict__ h_prev,
                                      const acc_t* __restrict__ aux_prev, acc_t* __restrict__ aux_next,
                                      scalar_t* __restrict__ h_next, scalar_t* __restrict__ out,
                                      int64_t H) {
  constexpr int K = Cell::kGates;
  for (int64_t j = 0; j < H; ++j) {
    acc_t rec[K];
    MTL_UNROLL
    for (int k = 0; k < K; ++k) rec[k] = acc_t(hproj[k * H + j]);
    const acc_t c_prev = Cell::kCellState ? aux_prev[j] : acc_t(0);
    forward_unit<Cell, kBias>(gates, bias, bias_hh, rec, acc_t(h_prev[j]), c_prev, aux_next, h_next,
                              out, j, H);
  }
}

// The gradients into dgates, or (kInPlace) into the saved values' own buffer `io`.
template <class Cell, bool kInPlace, typename scalar_t, typename acc_t>
MTL_CPU_CLONES void backward_valid_row(const scalar_t* __restrict__ gates,
                                       scalar_t* __restrict__ dgates_or_io,
                                       scalar_t* __restrict__ drec, const scalar_t* __restrict__ h_prev,
                                       const acc_t* __restrict__ aux_prev,
                                       const acc_t* __restrict__ aux_next,
                                       const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ dh_in,
                                       scalar_t* __restrict__ dh_pass, acc_t* __restrict__ dc,
                                       int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    acc_t daux = Cell::kCellState ? dc[j] : acc_t(0), pass;
    const acc_t ap = Cell::kAux ? aux_prev[j] : acc_t(0), an = Cell::kAux ? aux_next[j] : acc_t(0);
    const acc_t dh = acc_t(grad_out[j]) + acc_t(dh_in[j]);
    if constexpr (kInPlace) {  // `gates` is unused (nullptr): io alone reads and writes
      backward_unit_in_place<Cell>(dgates_or_io, drec, acc_t(h_prev[j]), ap, an, dh, daux, pass, j, H);
    } else {
      backward_unit<Cell>(gates, dgates_or_io, drec, acc_t(h_prev[j]), ap, an, dh, daux, pass, j, H);
    }
    if constexpr (Cell::kCellState) dc[j] = daux;
    dh_pass[j] = scalar_t(pass);
  }
}

// Rows [begin, end) of the flattened (G, B) rows at step t. hproj: (G, B, KH).
template <class Cell, typename scalar_t, typename acc_t>
void forward_rows(const SequenceForward<scalar_t, acc_t>& q, const scalar_t* hproj, int64_t t,
                  int64_t begin, int64_t end) {
  constexpr int K = Cell::kGates;
  const int64_t H = q.H;
  for (int64_t rw = begin; rw < end; ++rw) {
    const auto r = forward_row(q, K, t, rw / q.B, rw % q.B);
    const scalar_t* hp = hproj + rw * K * H;
    if (!r.valid) {  // forward_hold for the whole row, as copies and fills
      std::copy(r.h_prev, r.h_prev + H, r.h_next);
      if constexpr (Cell::kCellState) std::copy(r.aux_prev, r.aux_prev + H, r.aux_next);
      else if constexpr (Cell::kAux) std::fill(r.aux_next, r.aux_next + H, acc_t(0));
      std::fill(r.out, r.out + H, scalar_t(0));
      std::fill(r.gates, r.gates + K * H, scalar_t(0));
    } else if (r.bias) {
      forward_valid_row<Cell, true>(r.gates, hp, r.bias, r.bias_hh, r.h_prev, r.aux_prev, r.aux_next,
                                    r.h_next, r.out, H);
    } else {
      forward_valid_row<Cell, false>(r.gates, hp, r.bias, r.bias_hh, r.h_prev, r.aux_prev,
                                     r.aux_next, r.h_next, r.out, H);
    }
  }
}

// dh_in, dh_pass (G, B, H); dc (G, B, H) or nullptr.
template <class Cell, typename scalar_t, typename acc_t>
void backward_rows(const SequenceBackward<scalar_t, acc_t>& q, const scalar_t* dh_in,
                   scalar_t* dh_pass, acc_t* dc, int64_t t, int64_t begin, int64_t end) {
  const int64_t H = q.H;
  for (int64_t rw = begin; rw < end; ++rw) {
    const auto r = backward_row(q, t, rw / q.B, rw % q.B);
    const scalar_t* in = dh_in + rw * H;
    scalar_t* pass = dh_pass + rw * H;
    if (!r.valid) {  // backward_hold for the whole row: no gate gradients, dh passes on
      std::fill(r.dgates, r.dgates + Cell::kGates * H, scalar_t(0));
      if constexpr (Cell::kSplitRecGrad) std::fill(r.drec, r.drec + Cell::kGates * H, scalar_t(0));
      std::copy(in, in + H, pass);
    } else {
      acc_t* dcr = dc ? dc + rw * H : nullptr;
      if (r.gates == r.dgates) {
        backward_valid_row<Cell, true>(static_cast<const scalar_t*>(nullptr), r.dgates, r.drec,
                                       r.h_prev, r.aux_prev, r.aux_next, r.grad_out, in, pass, dcr,
                                       H);
      } else {
        backward_valid_row<Cell, false>(r.gates, r.dgates, r.drec, r.h_prev, r.aux_prev,
                                        r.aux_next, r.grad_out, in, pass, dcr, H);
      }
    }
  }
}

template <class Cell>
void forward_step_cpu(const ForwardSequence& s, const at::Tensor& hproj, int64_t t) {
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_rnn_forward_cpu", [&] {
    const auto q = raw_forward<scalar_t>(s);
    const scalar_t* hp = hproj.data_ptr<scalar_t>();
    at::parallel_for(0, q.G * q.B, row_grain(q.H),
                     [&](int64_t begin, int64_t end) { forward_rows<Cell>(q, hp, t, begin, end); });
  });
}

template <class Cell>
void backward_step_cpu(const BackwardSequence& s, const at::Tensor& dh_in, const at::Tensor& dh_pass,
                       const at::Tensor& dc, int64_t t) {
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_rnn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = raw_backward<scalar_t>(s);
    const scalar_t* in = dh_in.data_ptr<scalar_t>();
    scalar_t* pass = dh_pass.data_ptr<scalar_t>();
    acc_t* dcp = ptr_or_null<acc_t>(dc);
    at::parallel_for(0, q.G * q.B, row_grain(q.H), [&](int64_t begin, int64_t end) {
      backward_rows<Cell>(q, in, pass, dcp, t, begin, end);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// The whole sequence, rows in parallel.
//
// Each (group, batch) row's recurrence depends only on its own previous state, so a thread can own
// a range of rows for all T steps: one fork/join per call instead of two per step, and the
// recurrent product is this thread's own loop over a W_hh that stays in its cache, instead of an
// MKL batched GEMM call per step (whose fixed cost dominated at the seed models' sizes). The cell
// math is the per-step path's row loops on the same buffers. It wins while a group's W_hh stays in
// cache; `auto` measures which path wins per shape (driver.cpp), `sequence` always takes it.
// ---------------------------------------------------------------------------------------------

// acc[i] += x0 w0[i] + x1 w1[i] + x2 w2[i] + x3 w3[i]: four W rows per pass over acc.
template <typename scalar_t, typename acc_t>
MTL_CPU_CLONES void fma4(acc_t* __restrict__ acc, const scalar_t* __restrict__ w0,
                         const scalar_t* __restrict__ w1, const scalar_t* __restrict__ w2,
                         const scalar_t* __restrict__ w3, acc_t x0, acc_t x1, acc_t x2, acc_t x3,
                         int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    acc[i] += x0 * acc_t(w0[i]) + x1 * acc_t(w1[i]) + x2 * acc_t(w2[i]) + x3 * acc_t(w3[i]);
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
      fma4<scalar_t, acc_t>(acc + r * n, wr[0], wr[1], wr[2], wr[3], xv[0], xv[1], xv[2], xv[3], n);
    }
  }
}

// Rows per thread of the whole-sequence path: enough work (about 2^18 multiply-adds of a row's
// products over the sequence, each gate value `depth` deep: H for W_hh's, H + C where the kernel
// projects the input too) that a small call stays on one thread instead of paying a fork/join.
int64_t sequence_row_grain(int64_t T, int64_t KH, int64_t depth) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, T * KH * depth));
}

// at::parallel_for(0, G * B, grain, f) over the flattened (G, B) rows, except for per-(group, row)
// lengths (a ragged call): there a row's work is its number of valid steps among [t0, t0 + T), and
// the rows are cut into one contiguous range per thread of about equal work, not of equal count
// (a task of long rows beside one of short rows or padding would leave a thread idle).
template <typename Q, typename F>
void parallel_over_rows(const Q& q, int64_t t0, int64_t grain, const F& f) {
  const int64_t rows = q.G * q.B;
  const int64_t chunks = std::min<int64_t>(at::get_num_threads(), rows / std::max<int64_t>(1, grain));
  if (q.lengths == nullptr || q.lengths_sg == 0 || chunks <= 1 || at::in_parallel_region())
    return at::parallel_for(0, rows, grain, f);
  const auto work = [&](int64_t rw) {
    const int64_t n = q.lengths[(rw / q.B) * q.lengths_sg + rw % q.B] - t0;
    return std::clamp<int64_t>(n, 0, q.T);
  };
  int64_t total = 0;
  for (int64_t rw = 0; rw < rows; ++rw) total += work(rw);
  std::vector<int64_t> bounds{0};  // range c: rows [bounds[c], bounds[c + 1])
  int64_t done = 0;
  for (int64_t rw = 0; rw < rows && int64_t(bounds.size()) < chunks; ++rw) {
    done += work(rw);
    if (done * chunks >= total * int64_t(bounds.size())) bounds.push_back(rw + 1);
  }
  bounds.push_back(rows);
  const int64_t n = int64_t(bounds.size()) - 1;
  at::parallel_for(0, n, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      if (bounds[c] < bounds[c + 1]) f(bounds[c], bounds[c + 1]);
  });
}

// Calls f(g, r0, r1) for each group's part [r0, r1) of the flattened (G, B) rows [begin, end).
template <typename F>
void for_group_rows(int64_t begin, int64_t end, int64_t B, const F& f) {
  for (int64_t r = begin; r < end;) {
    const int64_t g = r / B, r1 = std::min(end, (g + 1) * B);
    f(g, r, r1);
    r = r1;
  }
}

// The end of group g's rows [r0, r1) (flattened (G, B) rows) whose products step `time` needs:
// trailing rows for which the step is padding (time >= the row's length) are dropped, since a held
// row reads only its h_{t-1} (forward) and its drec is 0 (backward). Rows of a ragged list call
// are laid out so that what is dropped is the padding: rows past a task's B_k have length 0, and a
// packed entry's rows come longest first.
template <typename Q>
int64_t product_rows_end(const Q& q, int64_t time, int64_t g, int64_t r0, int64_t r1) {
  if (q.lengths == nullptr) return r1;
  while (r1 > r0 && !is_valid_step(q.lengths, q.lengths_sg, time, g, r1 - 1 - g * q.B)) --r1;
  return r1;
}

// Each group's W_hh (G, KH, H) packed once per call for cpu_tiles (fp32, AVX2): as the forward's
// (H, KH) right operand (transposed) or as the backward's (KH, H). (G, packed_size) floats.
at::Tensor pack_weight_hh(const at::Tensor& weight_hh, bool transposed) {
  const int64_t G = weight_hh.size(0), KH = weight_hh.size(1), H = weight_hh.size(2);
  const int64_t K = transposed ? H : KH, N = transposed ? KH : H;
  const at::Tensor w = weight_hh.contiguous();
  at::Tensor packed = at::empty({G, cpu_tiles::packed_size(K, N)}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  // threads only past ~8k floats a thread: a fork/join costs more than packing a small weight
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 13) / std::max<int64_t>(1, KH * H));
  at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      cpu_tiles::pack_panels(src + g * KH * H, K, N, transposed ? 1 : H, transposed ? H : 1,
                             dst + g * packed.size(1));
  });
  return packed;
}

// The whole-sequence path's recurrent product for n rows of one group g: out (n, N) (+)= x (n, K)
// @ W_g, x's rows sx apart, out's ldo apart. W is W_hh (G, KH, H) prepared once per call: the
// forward's is its transpose (K = H, N = KH), the backward's itself (K = KH, N = H). In fp32 on an
// AVX2 CPU packed panels for cpu_tiles; otherwise a contiguous (G, K, N) copy for the generic
// loops (weighted_row_sums, kRowBlock rows at a time into acc_t scratch). `prepared`, where given,
// keeps that W across calls on the same weight_hh (the chunks of one inference forward): filled by
// the first, reused by the others.
template <typename scalar_t>
class RecurrentProduct {
 public:
  using acc_t = at::opmath_type<scalar_t>;

  RecurrentProduct(const at::Tensor& weight_hh, bool transposed, at::Tensor* prepared = nullptr)
      : K_(weight_hh.size(transposed ? 2 : 1)),
        N_(weight_hh.size(transposed ? 1 : 2)),
        w_(prepared && prepared->defined() ? *prepared : prepare(weight_hh, transposed)),
        tiled_(w_.dim() == 2),  // a reused W keeps its layout, whatever the switch says now
        variant_(cpu_tiles::chosen_variant()) {
    if (prepared) *prepared = w_;
  }

  // A thread's scratch for the generic loops (none for the tiles).
  std::vector<acc_t> scratch() const { return std::vector<acc_t>(tiled_ ? 0 : kRowBlock * N_); }

  void operator()(int64_t g, const scalar_t* x, int64_t n, int64_t sx, scalar_t* out, int64_t ldo,
                  bool accumulate, std::vector<acc_t>& acc) const {
    const scalar_t* w = w_.data_ptr<scalar_t>() + g * w_.stride(0);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (tiled_)
        return cpu_tiles::rows_times_packed(x, n, sx, 1, w, K_, N_, out, ldo, accumulate, variant_);
    }
    for (int64_t r = 0; r < n; r += kRowBlock) {
      const int64_t nr = std::min(kRowBlock, n - r);
      const scalar_t* rows[kRowBlock];
      for (int64_t i = 0; i < nr; ++i) rows[i] = x + (r + i) * sx;
      std::fill(acc.begin(), acc.begin() + nr * N_, acc_t(0));
      weighted_row_sums(acc.data(), w, N_, rows, nr, K_, N_);
      for (int64_t i = 0; i < nr; ++i) {
        scalar_t* o = out + (r + i) * ldo;
        const acc_t* a = acc.data() + i * N_;
        for (int64_t c = 0; c < N_; ++c)
          o[c] = accumulate ? scalar_t(acc_t(o[c]) + a[c]) : scalar_t(a[c]);
      }
    }
  }

 private:
  // Packed panels (G, packed_size) in fp32 where the tiles are available, else (G, K, N).
  static at::Tensor prepare(const at::Tensor& weight_hh, bool transposed) {
    if (std::is_same_v<scalar_t, float> && cpu_tiles::available())
      return pack_weight_hh(weight_hh, transposed);
    return (transposed ? weight_hh.transpose(1, 2) : weight_hh).contiguous();
  }

  int64_t K_, N_;
  at::Tensor w_;  // (G, K, N) contiguous, or (G, packed_size) panels where tiled_
  bool tiled_;
  cpu_tiles::Variant variant_;  // read once: one call runs one variant throughout
};

// The input projection inside the sequence kernel (ForwardSequence::projected_input; the training
// forward and the inference forward): W_ih[g]^T prepared as W_hh's is, and each step's x_t rows ->
// that step's gates rows (the full gates buffer, or the inference forward's one-step gates). Only
// where the tiles run (cpu_projects_input): elsewhere MKL's GEMM is faster than the generic loops,
// and the driver projects.
template <typename scalar_t>
class InputProjection {
 public:
  explicit InputProjection(const ForwardSequence& s)
      : on_(s.projected_input.defined()),
        shared_(on_ && s.projected_input.dim() == 3),
        x_(on_ ? s.projected_input.data_ptr<scalar_t>() : nullptr),
        T_(on_ ? s.projected_input.size(shared_ ? 0 : 1) : 0),
        C_(on_ ? s.projected_input.size(-1) : 0) {
    if (on_) product_.emplace(s.weight_ih, /*transposed=*/true);  // W_ih[g]^T: (C, KH)
  }

  bool on() const { return on_; }
  int64_t depth() const { return C_; }  // multiply-adds per gate value: the input's features
  std::vector<at::opmath_type<scalar_t>> scratch() const {
    return on_ ? product_->scratch() : std::vector<at::opmath_type<scalar_t>>();
  }

  // gates rows [r0, r1) of group g (flattened (G, B) rows, `gates` at row r0, rows ldg apart) =
  // x_t rows @ W_ih[g]^T, for time t.
  void operator()(int64_t g, int64_t r0, int64_t r1, int64_t B, int64_t t, scalar_t* gates,
                  int64_t ldg, std::vector<at::opmath_type<scalar_t>>& scratch) const {
    const int64_t b0 = r0 - g * B;
    const scalar_t* x = x_ + (shared_ ? (t * B + b0) * C_ : ((g * T_ + t) * B + b0) * C_);
    (*product_)(g, x, r1 - r0, C_, gates, ldg, /*accumulate=*/false, scratch);
  }

 private:
  bool on_, shared_;
  const scalar_t* x_;  // (T, B, C) shared or (G, T, B, C) per group, contiguous
  int64_t T_, C_;
  std::optional<RecurrentProduct<scalar_t>> product_;
};

bool cpu_projects_input(const at::Tensor& input) {
  return input.scalar_type() == at::kFloat && cpu_tiles::available();
}

// ---- the backward's gradient products in the tiles ------------------------------------------
// grad_w_ih[g] = dg_g^T x_g, grad_w_hh[g] = dr_g^T h_prev_g and grad_input = dg W_ih (GradientProducts
// in driver.h), fp32 where the tiles run. Why not MKL's batched GEMMs: at the seed models' sizes
// (G = 2, T*B = 320, KH = 200) they ran these at ~1.1 of the 2 threads on average, one GEMM at a time;
// here all of them are one pool of row blocks split over the threads by their multiply-adds, in
// two parallel regions (packing the right operands into panels, then the products).

// One product: out rows [0, n) (n, N), row stride ldo, = x (n, K) @ W, element (r, k) of x at
// x[r * sm + k * sk], W packed by cpu_tiles::pack_panel_rows.
struct TiledProduct {
  const float* x;
  int64_t sm, sk, n, K, N;
  const float* packed;
  float* out;
  int64_t ldo;
};

// Runs work(i) for i in [0, cost.size()) on at::parallel_for's threads, each thread a contiguous
// run of items of about the same total cost (item i goes to the thread whose share holds the
// middle of its cost). Every item runs once, on one thread, whatever the thread count. Below
// kSerialCost in all, on the calling thread: a fork/join costs more than such work.
template <typename Work>
void run_balanced(const std::vector<int64_t>& cost, const Work& work) {
  constexpr int64_t kSerialCost = int64_t(1) << 15;
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  std::vector<int64_t> start(n + 1, 0);  // prefix sums of cost
  for (int64_t i = 0; i < n; ++i) start[i + 1] = start[i] + cost[i];
  const int64_t total = std::max<int64_t>(1, start[n]);
  const int64_t threads = total < kSerialCost ? 1 : std::min<int64_t>(at::get_num_threads(), n);
  const auto owner = [&](int64_t i) {  // the thread of item i
    return std::min(threads - 1, (2 * start[i] + cost[i]) * threads / (2 * total));
  };
  if (threads == 1) {
    for (int64_t i = 0; i < n; ++i) work(i);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t i = 0; i < n; ++i)
      if (const int64_t o = owner(i); o >= t0 && o < t1) work(i);
  });
}

bool cpu_gradient_products(GradientProducts& a) {
  if (a.dg.scalar_type() != at::kFloat || !cpu_tiles::available()) return false;
  const auto variant = cpu_tiles::chosen_variant();
  const int64_t G = a.dg.size(0), TB = a.dg.size(1), KH = a.dg.size(2);
  const int64_t C = a.input.size(-1), R = a.h_prev.size(2);
  TORCH_INTERNAL_ASSERT(a.dg.stride(2) == 1 && a.dr.stride(2) == 1 && a.h_prev.stride(2) == 1 &&
                        a.dg.strides() == a.dr.strides() && a.h_prev.stride(1) == R &&
                        a.input.is_contiguous() && a.weight_ih.is_contiguous());
  const auto rows = [&](int64_t g) { return a.rows ? a.rows[g] : TB; };  // group g's nonzero rows
  const at::TensorOptions opts = a.dg.options();
  // the right operands, packed: x_g (rows_g, C) [one x for a shared input], h_prev_g (rows_g, R),
  // and W_ih[g] (KH, C) [W_ih as one (G*KH, C) for a shared input, whose grad_input sums the groups]
  struct Pack {
    const float* w;
    int64_t K, N, sk;
    int64_t offset;  // where its panels start in `packed`
  };
  std::vector<Pack> packs;
  int64_t floats = 0;
  const auto add_pack = [&](const float* w, int64_t K, int64_t N, int64_t sk) {
    packs.push_back({w, K, N, sk, floats});
    floats += cpu_tiles::packed_size(K, N);
    return packs.size() - 1;
  };
  const float* x = a.input.data_ptr<float>();
  const float* hp = a.h_prev.data_ptr<float>();
  const float* wih = a.weight_ih.data_ptr<float>();
  std::vector<size_t> pack_x(G), pack_h(G), pack_w(G);
  for (int64_t g = 0; g < G; ++g) {
    pack_x[g] = a.shared && g > 0 ? pack_x[0]
                                  : add_pack(x + (a.shared ? 0 : g * TB * C), rows(g), C, C);
    pack_h[g] = add_pack(hp + g * a.h_prev.stride(0), rows(g), R, R);
    if (a.input_grad && (!a.shared || g == 0))
      pack_w[g] = add_pack(wih + g * KH * C, a.shared ? G * KH : KH, C, C);
  }
  // The panels copy whole operands, padded to 16 columns: past twice the operands' own size (a
  // C or R well below 16) and 4 MB, MKL's GEMMs (which pack in bounded blocks) run them instead.
  const int64_t operands =
      a.input.numel() + a.h_prev.numel() + (a.input_grad ? a.weight_ih.numel() : 0);
  if (floats > std::max<int64_t>(2 * operands, int64_t(1) << 20)) return false;
  at::Tensor packed = at::empty({floats}, opts);
  a.grad_w_ih = at::empty({G, KH, C}, opts);
  a.grad_w_hh = at::empty({G, KH, R}, opts);
  if (a.input_grad) {
    a.grad_input = a.shared ? at::empty({TB, C}, opts)
                            : (a.rows ? at::zeros({G, TB, C}, opts) : at::empty({G, TB, C}, opts));
  }
  // pack in slices of rows, so that one large operand spreads over the threads
  constexpr int64_t kPackRows = 256;
  std::vector<std::array<int64_t, 3>> slices;  // pack, k0, k1
  std::vector<int64_t> slice_cost;
  for (size_t i = 0; i < packs.size(); ++i)
    for (int64_t k0 = 0; k0 < packs[i].K; k0 += kPackRows) {
      slices.push_back({int64_t(i), k0, std::min(packs[i].K, k0 + kPackRows)});
      slice_cost.push_back((slices.back()[2] - k0) * packs[i].N);
    }
  float* const base = packed.data_ptr<float>();
  run_balanced(slice_cost, [&](int64_t i) {
    const Pack& pk = packs[slices[i][0]];
    cpu_tiles::pack_panel_rows(pk.w, pk.K, pk.N, pk.sk, base + pk.offset, slices[i][1],
                               slices[i][2]);
  });

  // the products, each in blocks of kRowChunk output rows
  const float* dg = a.dg.data_ptr<float>();
  const float* dr = a.dr.data_ptr<float>();
  const int64_t sg = a.dg.stride(0), srow = a.dg.stride(1);
  std::vector<TiledProduct> blocks;
  std::vector<int64_t> cost;
  const auto add = [&](const TiledProduct& p) {
    for (int64_t r = 0; r < p.n; r += cpu_tiles::kRowChunk) {
      const int64_t nr = std::min(cpu_tiles::kRowChunk, p.n - r);
      blocks.push_back({p.x + r * p.sm, p.sm, p.sk, nr, p.K, p.N, p.packed, p.out + r * p.ldo, p.ldo});
      cost.push_back(nr * std::max<int64_t>(1, p.K) * p.N);
    }
  };
  for (int64_t g = 0; g < G; ++g) {
    // grad_w_ih[g] (KH, C) = dg_g^T (KH, rows) @ x_g (rows, C): x's element (unit, row) at unit + row * srow
    add({dg + g * sg, 1, srow, KH, rows(g), C, base + packs[pack_x[g]].offset,
         a.grad_w_ih.data_ptr<float>() + g * KH * C, C});
    add({dr + g * sg, 1, srow, KH, rows(g), R, base + packs[pack_h[g]].offset,
         a.grad_w_hh.data_ptr<float>() + g * KH * R, R});
    if (a.input_grad && !a.shared)  // grad_input[g] rows (rows, C) = dg_g (rows, KH) @ W_ih[g]
      add({dg + g * sg, srow, 1, rows(g), KH, C, base + packs[pack_w[g]].offset,
           a.grad_input.data_ptr<float>() + g * TB * C, C});
  }
  if (a.input_grad && a.shared)  // grad_input (T*B, C) = dgates (T*B, G*KH) @ W_ih (G*KH, C)
    add({dg, srow, 1, TB, G * KH, C, base + packs[pack_w[0]].offset,
         a.grad_input.data_ptr<float>(), C});
  run_balanced(cost, [&](int64_t i) {
    const TiledProduct& p = blocks[i];
    cpu_tiles::rows_times_packed(p.x, p.n, p.sm, p.sk, p.packed, p.K, p.N, p.out, p.ldo,
                                 /*accumulate=*/false, variant);
  });
  return true;
}

template <class Cell>
bool forward_sequence_cpu(const ForwardSequence& s) {
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_rnn_forward_sequence_cpu", [&] {
    const int64_t G = s.G, T = s.T, B = s.B, H = s.H, KH = Cell::kGates * H;
    const RecurrentProduct<scalar_t> product(s.weight_hh, /*transposed=*/true,  // W_hh[g]^T
                                             s.prepared_weight_hh.get());
    const InputProjection<scalar_t> project(s);  // off unless the driver handed over the input
    at::Tensor hproj = at::empty({G, B, KH}, s.gates.options());                 // (G, B, KH)
    const auto q = raw_forward<scalar_t>(s);
    scalar_t* hp = hproj.data_ptr<scalar_t>();
    // a row's work per step: its W_hh product, and its input projection where the kernel runs it
    const int64_t depth = H + (project.on() ? project.depth() : 0);
    parallel_over_rows(q, q.t0, sequence_row_grain(T, KH, depth), [&](int64_t begin, int64_t end) {
      auto scratch = product.scratch();
      auto project_scratch = project.scratch();
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = forward_time(step, T, s.reverse);
        const int64_t prev = state_slot(q, prev_slot(t, s.reverse));
        for_group_rows(begin, end, B, [&](int64_t g, int64_t r0, int64_t r1) {
          const int64_t rp = product_rows_end(q, q.t0 + t, g, r0, r1);  // rows [rp, r1): padding
          if (project.on() && rp > r0) {  // this step's gates rows = x_t rows @ W_ih[g]^T
            scalar_t* gate_rows = q.gates + g * q.gates_sg + t * q.gates_st + (r0 - g * B) * q.gates_sb;
            project(g, r0, rp, B, q.t0 + t, gate_rows, q.gates_sb, project_scratch);
          }
          // hproj rows = h_{t-1} rows @ W_hh[g]^T
          const scalar_t* h_rows = q.h_states + g * q.h_sg + prev * q.h_sslot + (r0 - g * B) * H;
          if (rp > r0) product(g, h_rows, rp - r0, H, hp + r0 * KH, KH, /*accumulate=*/false, scratch);
          forward_rows<Cell>(q, hp, t, r0, r1);  // while this group's hproj rows are in L2
        });
      }
    });
  });
  return true;
}

template <class Cell>
bool backward_sequence_cpu(const BackwardSequence& s) {
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_rnn_backward_sequence_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t T = s.T, B = s.B, H = s.H, KH = Cell::kGates * H;
    const RecurrentProduct<scalar_t> product(s.weight_hh, /*transposed=*/false);  // W_hh[g]
    at::Tensor dh_a = s.grad_h_n.clone(), dh_b = at::empty_like(dh_a);  // dh in / out, (G, B, H)
    at::Tensor dc = Cell::kCellState ? s.grad_c_n.clone() : at::Tensor();  // (G, B, H) acc_t
    const auto q = raw_backward<scalar_t>(s);
    parallel_over_rows(q, 0, sequence_row_grain(T, KH, H), [&](int64_t begin, int64_t end) {
      auto scratch = product.scratch();
      // each thread swaps its own rows' roles of the two dh buffers
      scalar_t* dh_in = dh_a.data_ptr<scalar_t>();
      scalar_t* dh_out = dh_b.data_ptr<scalar_t>();
      acc_t* dcp = ptr_or_null<acc_t>(dc);
      for (int64_t step = 0; step < T; ++step) {
        const int64_t t = backward_time(step, T, s.reverse);
        for_group_rows(begin, end, B, [&](int64_t g, int64_t r0, int64_t r1) {
          backward_rows<Cell>(q, dh_in, dh_out, dcp, t, r0, r1);  // drec_t, dc, dh_out = pass
          // dh_out rows += drec_t rows @ W_hh[g], while this group's drec_t rows are in L2 (rows
          // [rp, r1) are padding: drec 0, dh_out = pass already)
          const int64_t rp = product_rows_end(q, t, g, r0, r1);
          const scalar_t* drec_rows =
              q.drec + g * q.gates_sg + t * q.gates_st + (r0 - g * B) * q.gates_sb;
          if (rp > r0)
            product(g, drec_rows, rp - r0, q.gates_sb, dh_out + r0 * H, H, /*accumulate=*/true,
                    scratch);
        });
        std::swap(dh_in, dh_out);
      }
      // after the loop dh_in holds grad_h0 for these rows
      std::copy(dh_in + begin * H, dh_in + end * H, s.grad_h0.data_ptr<scalar_t>() + begin * H);
      if (dcp) std::copy(dcp + begin * H, dcp + end * H, s.grad_c0.data_ptr<acc_t>() + begin * H);
    });
  });
  return true;
}

// `auto` times both paths per shape (which wins depends on this machine's GEMM and caches).
template <class Cell>
constexpr RecurrenceKernels kCpuKernels{&forward_step_cpu<Cell>,     &backward_step_cpu<Cell>,
                                        &forward_sequence_cpu<Cell>, &backward_sequence_cpu<Cell>,
                                        AutoPath::kTuned,            &cpu_projects_input,
                                        &cpu_gradient_products};

}  // namespace

AutoPath cpu_auto_path() { return kCpuKernels<LstmCell>.auto_path; }

ForwardResult grouped_recurrence_forward_cpu(const std::string& cell, const ForwardArgs& args) {
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_forward<Cell>(args, kCpuKernels<Cell>);
  });
}

InferenceResult grouped_recurrence_inference_cpu(const std::string& cell, const ForwardArgs& args) {
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_inference<Cell>(args, kCpuKernels<Cell>);
  });
}

BackwardResult grouped_recurrence_backward_cpu(const std::string& cell, const BackwardArgs& args) {
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_backward<Cell>(args, kCpuKernels<Cell>);
  });
}

BackwardResult grouped_recurrence_backward_in_place_cpu(const std::string& cell,
                                                       const BackwardArgs& args) {
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_backward<Cell>(args, kCpuKernels<Cell>, /*in_place=*/true);
  });
}

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) {
  m.impl("grouped_recurrence_forward", &forward_op<&grouped_recurrence_forward_cpu>);
  m.impl("grouped_recurrence", &inference_op<&grouped_recurrence_inference_cpu>);
  m.impl("grouped_recurrence_backward", &backward_op<&grouped_recurrence_backward_cpu>);
  m.impl("_grouped_recurrence_backward_in_place",
         &backward_in_place_op<&grouped_recurrence_backward_in_place_cpu>);
}

}  // namespace mtl_kernels
