// Attention over branches: the scalar math shared by the CPU and CUDA kernels.
//
//   branches x: (G, M, H), weight w: (H,), bias b: scalar
//   s[g, m] = x[g, m] . w + b,   p = softmax_g(s),   out[m] = sum_g p[g, m] x[g, m]
//
// Backward, with a[g, m] = dout[m] . x[g, m] + dweights[g, m] and abar[m] = sum_g p a:
//   ds[g, m]  = p (a - abar)                         (softmax backward)
//   dx[g, m]  = p dout[m] + ds[g, m] w
//   dw        = sum_{g,m} ds[g, m] x[g, m]
//   db        = sum_{g,m} ds[g, m]   (zero up to rounding: a shared shift does not move a softmax)
// The softmax is recomputed from the saved log-normaliser lse[m] = log sum_g exp(s[g, m]).
#pragma once

#include <cmath>

#include "common/macros.h"

namespace mtl_kernels {

MTL_HD float exp_acc(float x) { return expf(x); }
MTL_HD double exp_acc(double x) { return ::exp(x); }
MTL_HD float log_acc(float x) { return logf(x); }
MTL_HD double log_acc(double x) { return ::log(x); }

// Running (max, sum) of a streamed softmax. `update` returns the factor by which every quantity
// accumulated so far with weights exp(s - old max) must be rescaled.
template <typename acc_t>
struct OnlineSoftmax {
  acc_t max;
  acc_t sum;
  MTL_HD void init(acc_t s) {
    max = s;
    sum = acc_t(0);
  }
  // Adds score s; returns (rescale of the old terms, weight of s), both relative to the new max.
  MTL_HD void update(acc_t s, acc_t& rescale, acc_t& weight) {
    const acc_t new_max = s > max ? s : max;
    rescale = exp_acc(max - new_max);
    weight = exp_acc(s - new_max);
    sum = sum * rescale + weight;
    max = new_max;
  }
  MTL_HD acc_t lse() const { return max + log_acc(sum); }
};

template <typename acc_t>
MTL_HD acc_t score_grad(acc_t p, acc_t a, acc_t abar) {
  return p * (a - abar);
}

}  // namespace mtl_kernels
