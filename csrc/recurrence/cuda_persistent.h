// The persistent kernel's entry points (cuda_persistent.cu): false when the per-step path must run
// (the path is per_step, the plan does not fit, or its blocks cannot all be resident).
#pragma once

#include "recurrence/driver.h"

namespace mtl_kernels {

template <class Cell>
bool persistent_forward_cuda(const ForwardSequence& s);
template <class Cell>
bool persistent_backward_cuda(const BackwardSequence& s);

}  // namespace mtl_kernels
