// CPU kernels for attention over branches: one pass over the branches per row forward, one backward.
// Rows m are split across threads; a row's G x H block stays in cache between its short loops.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "branch_attention/math.h"
#include "branch_attention/checks.h"
#include "common/dispatch.h"
#include "common/poison.h"

namespace mtl_kernels {
namespace {

int64_t rows_grain(int64_t G, int64_t H) { return std::max<int64_t>(1, 16384 / (G * H)); }

template <typename scalar_t>
void forward_cpu_typed(const at::Tensor& x_t, const at::Tensor& w_t, const at::Tensor& b_t,
                       at::Tensor& out_t, at::Tensor& weights_t, at::Tensor& lse_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = x_t.size(0), M = x_t.size(1), H = x_t.size(2);
  const scalar_t* x = x_t.data_ptr<scalar_t>();
  const scalar_t* w_s = w_t.data_ptr<scalar_t>();
  const acc_t bias = b_t.defined() ? acc_t(b_t.item<scalar_t>()) : acc_t(0);
  scalar_t* out = out_t.data_ptr<scalar_t>();
  scalar_t* weights = weights_t.data_ptr<scalar_t>();
  acc_t* lse = lse_t.data_ptr<acc_t>();
  std::vector<acc_t> w(w_s, w_s + H);

  at::parallel_for(0, M, rows_grain(G, H), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> score(G), acc(H);
    for (int64_t m = begin; m < end; ++m) {
      // scores and their max
      acc_t smax = -std::numeric_limits<acc_t>::infinity();
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* xg = x + (g * M + m) * H;
        acc_t dot = 0;
        MTL_SIMD_SUM(dot)
        for (int64_t j = 0; j < H; ++j) dot += acc_t(xg[j]) * w[j];
        score[g] = dot + bias;
        smax = std::max(smax, score[g]);
      }
      acc_t sum = 0;
      for (int64_t g = 0; g < G; ++g) {
        score[g] = exp_acc(score[g] - smax);  // unnormalised p
        sum += score[g];
      }
      const acc_t inv = acc_t(1) / sum;
      lse[m] = smax + log_acc(sum);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t g = 0; g < G; ++g) {
        const acc_t p = score[g] * inv;
        weights[g * M + m] = scalar_t(p);
        const scalar_t* xg = x + (g * M + m) * H;
        acc_t* acc_p = acc.data();
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) acc_p[j] += p * acc_t(xg[j]);
      }
      scalar_t* om = out + m * H;
      for (int64_t j = 0; j < H; ++j) om[j] = scalar_t(acc[j]);
    }
  });
}

template <typename scalar_t>
void backward_cpu_typed(const at::Tensor& gout_t, const at::Tensor& gw_t, const at::Tensor& x_t,
                        const at::Tensor& w_t, const at::Tensor& b_t, const at::Tensor& lse_t,
                        at::Tensor& dx_t, at::Tensor& dw_t, at::Tensor& db_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = x_t.size(0), M = x_t.size(1), H = x_t.size(2);
  const scalar_t* x = x_t.data_ptr<scalar_t>();
  const scalar_t* gout = gout_t.data_ptr<scalar_t>();
  const scalar_t* gw = gw_t.defined() ? gw_t.data_ptr<scalar_t>() : nullptr;
  const scalar_t* w_s = w_t.data_ptr<scalar_t>();
  const acc_t bias = b_t.defined() ? acc_t(b_t.item<scalar_t>()) : acc_t(0);
  const acc_t* lse = lse_t.data_ptr<acc_t>();
  scalar_t* dx = dx_t.data_ptr<scalar_t>();
  std::vector<acc_t> w(w_s, w_s + H);

  // Per-thread partial sums of dw and db, added up at the end (deterministic for a thread count).
  const int nthreads = at::get_num_threads();
  std::vector<acc_t> dw_part(size_t(nthreads) * H, acc_t(0)), db_part(nthreads, acc_t(0));

  at::parallel_for(0, M, rows_grain(G, H), [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    acc_t* dw = dw_part.data() + size_t(tid) * H;
    acc_t db = 0;
    std::vector<acc_t> p(G), a(G), dout(H);
    for (int64_t m = begin; m < end; ++m) {
      const scalar_t* gm = gout + m * H;
      for (int64_t j = 0; j < H; ++j) dout[j] = acc_t(gm[j]);
      // recompute the softmax; a = dout . x_g (+ the weights' own gradient)
      acc_t abar = 0;
      for (int64_t g = 0; g < G; ++g) {
        const scalar_t* xg = x + (g * M + m) * H;
        acc_t s = 0, ag = 0;
        MTL_SIMD_SUM(s)
        for (int64_t j = 0; j < H; ++j) s += acc_t(xg[j]) * w[j];
        MTL_SIMD_SUM(ag)
        for (int64_t j = 0; j < H; ++j) ag += acc_t(xg[j]) * dout[j];  // both dots hit x in L1
        p[g] = exp_acc(s + bias - lse[m]);
        a[g] = ag + (gw ? acc_t(gw[g * M + m]) : acc_t(0));
        abar += p[g] * a[g];
      }
      for (int64_t g = 0; g < G; ++g) {
        const acc_t ds = score_grad(p[g], a[g], abar);
        db += ds;
        const scalar_t* xg = x + (g * M + m) * H;
        scalar_t* dxg = dx + (g * M + m) * H;
        const acc_t pg = p[g];
        const acc_t* dout_p = dout.data();
        const acc_t* w_p = w.data();
#pragma omp simd  // dx, dw, x, dout, w never overlap
        for (int64_t j = 0; j < H; ++j) {
          dxg[j] = scalar_t(pg * dout_p[j] + ds * w_p[j]);
          dw[j] += ds * acc_t(xg[j]);
        }
      }
    }
    db_part[tid] += db;
  });
  acc_t* dw_out = dw_t.data_ptr<acc_t>();
  acc_t db_total = 0;
  for (int j = 0; j < H; ++j) dw_out[j] = 0;
  for (int t = 0; t < nthreads; ++t) {
    for (int64_t j = 0; j < H; ++j) dw_out[j] += dw_part[size_t(t) * H + j];
    db_total += db_part[t];
  }
  db_t.fill_(db_total);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_attention_forward_cpu(
    const at::Tensor& branches_, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const BranchAttentionShape shape =
      check_branch_attention_args("branch_attention_forward", branches_, weight, bias);
  const int64_t G = shape.G, M = shape.M, H = shape.H;
  const at::Tensor branches = branches_.contiguous();  // the kernels index rows as (G, M, H)
  at::Tensor out = at::empty({M, H}, branches.options());
  at::Tensor weights = at::empty({G, M}, branches.options());
  at::Tensor lse = at::empty({M}, branches.options().dtype(at::toOpMathType(branches.scalar_type())));
  poison_if_enabled(out);
  poison_if_enabled(weights);
  poison_if_enabled(lse);
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  MTL_DISPATCH_FLOATING_TYPES(branches.scalar_type(), "branch_attention_forward_cpu", [&] {
    forward_cpu_typed<scalar_t>(branches, weight.contiguous(), b, out, weights, lse);
  });
  return {out, weights, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& branches_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse) {
  const BranchAttentionShape shape =
      check_branch_attention_backward_args(grad_out, grad_weights, branches_, weight, bias, lse);
  const int64_t H = shape.H;
  const at::Tensor branches = branches_.contiguous();
  const at::Tensor gw = grad_weights.has_value() && grad_weights->defined()
                            ? grad_weights->contiguous() : at::Tensor();
  const auto acc = at::toOpMathType(branches.scalar_type());
  at::Tensor dx = at::empty_like(branches);
  poison_if_enabled(dx);
  at::Tensor dw = at::empty({H}, branches.options().dtype(acc));
  at::Tensor db = at::empty({1}, branches.options().dtype(acc));
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  MTL_DISPATCH_FLOATING_TYPES(branches.scalar_type(), "branch_attention_backward_cpu", [&] {
    backward_cpu_typed<scalar_t>(grad_out.contiguous(), gw, branches, weight.contiguous(), b,
                                 lse.contiguous(), dx, dw, db);
  });
  const auto dtype = branches.scalar_type();
  return {dx, dw.to(dtype), db.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) {
  m.impl("branch_attention_forward", &branch_attention_forward_cpu);
  m.impl("branch_attention_backward", &branch_attention_backward_cpu);
}

}  // namespace mtl_kernels
