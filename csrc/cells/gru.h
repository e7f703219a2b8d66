// nn.GRU's cell: gates r, z, n;  r = s(x_r + W_hr h + b_hr), z = s(x_z + W_hz h + b_hz),
// n = tanh(x_n + r (W_hn h + b_hn)), h_t = (1 - z) n + z h_{t-1}. b_hn stays inside r (...), so
// the recurrent bias is applied apart from the input-side one, and the n gate's recurrent-side
// gradient (r dn) differs from its input-side one (dn).
#pragma once

#include "common/cell_math.h"

namespace mtl_kernels {

struct GruCell {
  static constexpr const char* kName = "gru";
  static constexpr int kGates = 3;
  static constexpr bool kCellState = false;
  static constexpr bool kAux = true;  // hn = W_hn h_{t-1} + b_hn, for the backward of r
  static constexpr bool kRecBias = true;
  static constexpr bool kSplitRecGrad = true;

  // act: r, z, n; aux: hn.
  template <class M, class V>
  MTL_HD static void forward(const V (&x)[3], const V (&r)[3], const V& h_prev, const V& /*aux_prev*/,
                             V (&act)[3], V& h, V& hn) {
    act[0] = M::sigmoid(x[0] + r[0]);
    act[1] = M::sigmoid(x[1] + r[1]);
    act[2] = M::tanh(x[2] + act[0] * r[2]);
    hn = r[2];
    h = act[2] + act[1] * (h_prev - act[2]);  // (1 - z) n + z h_prev
  }

  template <typename acc_t>
  MTL_HD static void backward(const acc_t (&act)[3], acc_t h_prev, acc_t /*aux_prev*/, acc_t hn,
                              acc_t dh, acc_t& /*daux*/, acc_t (&dx)[3], acc_t (&drec)[3],
                              acc_t& dh_direct) {
    const acc_t one = acc_t(1);
    const acc_t r = act[0], z = act[1], n = act[2];
    const acc_t dn = dh * (one - z) * (one - n * n);  // at n's pre-activation
    const acc_t dz = dh * (h_prev - n) * z * (one - z);
    const acc_t dr = dn * hn * r * (one - r);
    dx[0] = dr;
    dx[1] = dz;
    dx[2] = dn;
    drec[0] = dr;
    drec[1] = dz;
    drec[2] = dn * r;
    dh_direct = dh * z;
  }
};

}  // namespace mtl_kernels
