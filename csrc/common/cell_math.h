// Scalar activations for the cells (host and device), and the math policy the cells' templated
// forward takes (cells/*.h): ScalarMath here, a policy over at::Tensor in recurrence/autograd.cpp,
// so that the composite forward that double backward differentiates is the kernels' own formula.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace mtl_kernels {

// float on the host: a branch-free Cephes-style exp (range reduction + degree-6 polynomial, about
// 1 ulp on its range) that GCC vectorises; libm's expf is a scalar call and made the cell pass
// slower than the GEMMs. float on the device: expf / tanhf. double anywhere: libm.
MTL_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // Only min/max beyond arithmetic, so that GCC vectorises it; round-to-nearest uses the
  // 1.5 * 2^23 trick (r then lies in [-ln2/2, ln2/2], the polynomial's range).
  x = std::min(x, 88.0f);            // keeps n <= 127: 2^n stays finite
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
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n from its exponent bits
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
  return 1.0f - 2.0f / (exp_f32(2.0f * x) + 1.0f);  // absolute error about 1e-7, no branch
#endif
}
MTL_HD double tanh_act(double x) { return ::tanh(x); }

template <typename T>
MTL_HD T relu_act(T x) {
  return x > T(0) ? x : T(0);
}

// The scalar policy of the cells' templated forward (acc_t = float or double).
struct ScalarMath {
  template <typename T>
  MTL_HD static T sigmoid(T x) {
    return ::mtl_kernels::sigmoid(x);
  }
  template <typename T>
  MTL_HD static T tanh(T x) {
    return tanh_act(x);
  }
  template <typename T>
  MTL_HD static T relu(T x) {
    return relu_act(x);
  }
};

}  // namespace mtl_kernels
