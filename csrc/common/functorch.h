// torch.func transforms (grad, vjp, vmap, ...) refuse C++ autograd Functions, which is what the
// ops' eager autograd is (kept for its speed). The Python API (mtl_kernels: the modules,
// recurrence_layer, branch_attention) goes through Python autograd.Functions when a transform is
// active (mtl_kernels/_functorch.py); the ops' C++ autograd kernels say so when called directly.
#pragma once

#include <ATen/FuncTorchTLS.h>
#include <c10/util/Exception.h>

namespace mtl_kernels {

// Whether a torch.func transform is active on this thread: exactly when the C++ autograd Function
// would refuse to run (ATen/functorch's own check, asked without its heavier headers).
inline bool functorch_transform_active() {
  const auto& tls = at::functorch::functorchTLSAccessor();
  if (!tls) return false;
  try {
    tls->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

inline void check_no_functorch(const char* op, const char* python_api) {
  TORCH_CHECK(!functorch_transform_active(), "mtl_kernels::", op,
              " called directly under a torch.func transform: call it through ", python_api,
              ", whose Python autograd.Function supports torch.func");
}

}  // namespace mtl_kernels
