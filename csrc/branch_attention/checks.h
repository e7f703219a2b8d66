// Argument checks of the branch-attention ops, shared by both backends: every argument's shape,
// dtype, device and layout, with messages that name it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/checks.h"

namespace mtl_kernels {

struct BranchAttentionShape {
  int64_t G, M, H;
};

// branches (G, M, H) floating, weight (H,), bias (1,) or None: same dtype and device.
inline BranchAttentionShape check_branch_attention_args(const char* op, const at::Tensor& branches,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias) {
  check_dense_floating(branches, op, "branches");
  TORCH_CHECK(branches.dim() == 3, op, ": branches must be (G, M, H), got shape ", branches.sizes());
  const int64_t G = branches.size(0), M = branches.size(1), H = branches.size(2);
  TORCH_CHECK(G >= 1 && H >= 1, op, ": need at least one branch and one feature, got shape ",
              branches.sizes());
  const at::ScalarType dtype = branches.scalar_type();
  const at::Device device = branches.device();
  check_arg(weight, {op, "weight", {H}, dtype, device});
  if (bias.has_value() && bias->defined()) check_arg(*bias, {op, "bias", {1}, dtype, device});
  return {G, M, H};
}

// The backward's extra arguments: grad_out (M, H), grad_weights (G, M) or None in branches'
// dtype, lse (M,) in the accumulation dtype (fp32 for the half types).
inline BranchAttentionShape check_branch_attention_backward_args(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& branches, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse) {
  const char* op = "branch_attention_backward";
  const BranchAttentionShape s = check_branch_attention_args(op, branches, weight, bias);
  const at::ScalarType dtype = branches.scalar_type();
  const at::Device device = branches.device();
  check_arg(grad_out, {op, "grad_out", {s.M, s.H}, dtype, device});
  if (grad_weights.has_value() && grad_weights->defined())
    check_arg(*grad_weights, {op, "grad_weights", {s.G, s.M}, dtype, device});
  check_arg(lse, {op, "lse", {s.M}, at::toOpMathType(dtype), device});
  return s;
}

}  // namespace mtl_kernels
