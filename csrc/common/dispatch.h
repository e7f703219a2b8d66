// The dtype dispatch and the compile-time switches every kernel file uses.
#pragma once

#include <ATen/Dispatch.h>

#include <cstdint>
#include <type_traits>

// Every op runs in float32, float64, bfloat16 and float16 (the half types with fp32 arithmetic).
#define MTL_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace mtl_kernels {

// Calls f(std::integral_constant<int64_t, V>()) for the first V in kValues with value <= V (the
// last one otherwise): a runtime count mapped onto the template instances that cover it.
template <int64_t... kValues, typename F>
void static_switch_at_least(int64_t value, const F& f) {
  bool done = false;
  ((!done && (value <= kValues) ? (f(std::integral_constant<int64_t, kValues>()), done = true) : false),
   ...);
  if (!done) {
    constexpr int64_t values[] = {kValues...};
    f(std::integral_constant<int64_t, values[sizeof...(kValues) - 1]>());
  }
}

// Calls f(std::true_type()) or f(std::false_type()).
template <typename F>
void bool_switch(bool value, const F& f) {
  if (value) {
    f(std::true_type());
  } else {
    f(std::false_type());
  }
}

}  // namespace mtl_kernels
