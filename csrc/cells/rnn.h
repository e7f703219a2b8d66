// nn.RNN's cell: h_t = tanh(x + W_hh h_{t-1} + b) or relu(...).
#pragma once

#include "common/cell_math.h"

namespace mtl_kernels {

template <bool kRelu>
struct RnnCell {
  static constexpr const char* kName = kRelu ? "rnn_relu" : "rnn_tanh";
  static constexpr int kGates = 1;
  static constexpr bool kCellState = false;
  static constexpr bool kAux = false;
  static constexpr bool kRecBias = false;
  static constexpr bool kSplitRecGrad = false;

  // act: h_t itself (its derivative needs nothing else).
  template <class M, class V>
  MTL_HD static void forward(const V (&x)[1], const V (&r)[1], const V& /*h_prev*/, const V& /*aux*/,
                             V (&act)[1], V& h, V& /*aux_next*/) {
    if constexpr (kRelu) {
      h = M::relu(x[0] + r[0]);
    } else {
      h = M::tanh(x[0] + r[0]);
    }
    act[0] = h;
  }

  template <typename acc_t>
  MTL_HD static void backward(const acc_t (&act)[1], acc_t /*h_prev*/, acc_t /*aux_prev*/,
                              acc_t /*aux_next*/, acc_t dh, acc_t& /*daux*/, acc_t (&dx)[1],
                              acc_t (&drec)[1], acc_t& dh_direct) {
    const acc_t h = act[0];
    if constexpr (kRelu) {
      dx[0] = h > acc_t(0) ? dh : acc_t(0);
    } else {
      dx[0] = dh * (acc_t(1) - h * h);
    }
    drec[0] = dx[0];
    dh_direct = acc_t(0);
  }
};

using RnnTanhCell = RnnCell<false>;
using RnnReluCell = RnnCell<true>;

}  // namespace mtl_kernels
