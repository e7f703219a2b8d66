// Test aid: when MTL_KERNELS_POISON=1, every buffer a kernel must write is NaN-filled first, so
// that an element no kernel wrote shows up in the results (the test suite sets it).
#pragma once

#include <ATen/ATen.h>

namespace mtl_kernels {

void poison_if_enabled(at::Tensor& t);

}  // namespace mtl_kernels
