#include "common/poison.h"

#include <cstdlib>
#include <limits>

namespace mtl_kernels {

void poison_if_enabled(at::Tensor& t) {
  static const bool enabled = [] {
    const char* v = std::getenv("MTL_KERNELS_POISON");
    return v != nullptr && v[0] == '1';
  }();
  if (enabled && t.defined()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

}  // namespace mtl_kernels
