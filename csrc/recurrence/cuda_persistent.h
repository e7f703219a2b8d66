// The persistent kernel's entry points (cuda_persistent.cu): false when the per-step path must run
// (the path is per_step, the plan does not fit, or its blocks cannot all be resident).
#pragma once

#include "recurrence/driver.h"

namespace mtl_kernels {

template <class Cell>
bool persistent_forward_cuda(const ForwardSequence& s);
template <class Cell>
bool persistent_backward_cuda(const BackwardSequence& s);

// The tensor-core variant alone (cuda_persistent_mma.cu): false, launching nothing, unless the
// switch allows it (mma_mode()), the dtype has tensor-core operands (bf16, fp16; fp32 where TF32
// is allowed for matmuls), its plan fits and all its blocks can be resident.
template <class Cell>
bool persistent_mma_forward_cuda(const ForwardSequence& s);
template <class Cell>
bool persistent_mma_backward_cuda(const BackwardSequence& s);

}  // namespace mtl_kernels
