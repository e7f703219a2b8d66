// nn.LSTM's cell: gates i, f, g, o; c_t = f c_{t-1} + i g, h_t = o tanh(c_t).
#pragma once

#include "common/cell_math.h"

namespace mtl_kernels {

struct LstmCell {
  static constexpr const char* kName = "lstm";
  static constexpr int kGates = 4;
  static constexpr bool kCellState = true;
  static constexpr bool kAux = true;  // c
  static constexpr bool kRecBias = false;
  static constexpr bool kSplitRecGrad = false;

  // act: the activated gates i, f, g, o; aux: c_t.
  template <class M, class V>
  MTL_HD static void forward(const V (&x)[4], const V (&r)[4], const V& /*h_prev*/, const V& c_prev,
                             V (&act)[4], V& h, V& c) {
    act[0] = M::sigmoid(x[0] + r[0]);
    act[1] = M::sigmoid(x[1] + r[1]);
    act[2] = M::tanh(x[2] + r[2]);
    act[3] = M::sigmoid(x[3] + r[3]);
    c = act[1] * c_prev + act[0] * act[2];
    h = act[3] * M::tanh(c);
  }

  // tanh(c_t) is recomputed rather than saved.
  template <typename acc_t>
  MTL_HD static void backward(const acc_t (&act)[4], acc_t /*h_prev*/, acc_t c_prev, acc_t c_next,
                              acc_t dh, acc_t& dc, acc_t (&dx)[4], acc_t (&drec)[4],
                              acc_t& dh_direct) {
    const acc_t one = acc_t(1);
    const acc_t i = act[0], f = act[1], g = act[2], o = act[3];
    const acc_t tc = tanh_act(c_next);
    const acc_t dc_t = dc + dh * o * (one - tc * tc);
    dx[0] = dc_t * g * i * (one - i);
    dx[1] = dc_t * c_prev * f * (one - f);
    dx[2] = dc_t * i * (one - g * g);
    dx[3] = dh * tc * o * (one - o);
    MTL_UNROLL
    for (int k = 0; k < 4; ++k) drec[k] = dx[k];
    dc = dc_t * f;
    dh_direct = acc_t(0);
  }
};

}  // namespace mtl_kernels
