// Helpers for the ops' C++ autograd (branch_attention_autograd.cpp, grouped_lstm_autograd.cpp).
#pragma once

#include <torch/autograd.h>

#include <vector>

namespace mtl_kernels {

// The vector-Jacobian product of `outputs` (recomputed with differentiable ATen ops from the saved
// inputs) with `grads`, with create_graph, for the `candidates` that require grad (undefined for
// the rest). What a backward returns under backward(create_graph=True), so that a double backward
// differentiates it. Outputs whose incoming gradient is undefined are left out.
inline torch::autograd::variable_list vjp_create_graph(const std::vector<at::Tensor>& outputs,
                                                       const std::vector<at::Tensor>& grads,
                                                       const std::vector<at::Tensor>& candidates) {
  torch::autograd::variable_list inputs, outs, grad_outs, result;
  for (const auto& t : candidates)
    if (t.defined() && t.requires_grad()) inputs.push_back(t);
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (grads[i].defined()) {
      outs.push_back(outputs[i]);
      grad_outs.push_back(grads[i]);
    }
  }
  torch::autograd::variable_list d;
  if (!inputs.empty() && !outs.empty())
    d = torch::autograd::grad(outs, inputs, grad_outs, /*retain_graph=*/true,
                              /*create_graph=*/true, /*allow_unused=*/true);
  size_t next = 0;
  for (const auto& t : candidates)
    result.push_back(t.defined() && t.requires_grad() && !d.empty() ? d[next++] : at::Tensor());
  return result;
}

}  // namespace mtl_kernels
