// Host-side argument checks and shapes for the branch-attention ops, shared by both backends.
#pragma once

#include <ATen/ATen.h>

namespace mtl_kernels {

struct BranchAttentionShape {
  int64_t G, M, H;
};

inline BranchAttentionShape check_branch_attention_args(const at::Tensor& branches,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(branches.dim() == 3, "branch_attention: branches must be (G, M, H), got ",
              branches.sizes());
  TORCH_CHECK(branches.is_contiguous(), "branch_attention: branches must be contiguous");
  TORCH_CHECK(at::isFloatingType(branches.scalar_type()),
              "branch_attention: branches must be floating point, got ", branches.scalar_type());
  const int64_t G = branches.size(0), M = branches.size(1), H = branches.size(2);
  TORCH_CHECK(G >= 1 && H >= 1, "branch_attention: need at least one branch and one feature, got ",
              branches.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H, "branch_attention: weight must be (", H,
              ",), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == branches.scalar_type() &&
                  weight.device() == branches.device(),
              "branch_attention: weight must match branches in dtype and device");
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == 1, "branch_attention: bias must have one element, got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == branches.scalar_type() &&
                    bias->device() == branches.device(),
                "branch_attention: bias must match branches in dtype and device");
  }
  return {G, M, H};
}

}  // namespace mtl_kernels
