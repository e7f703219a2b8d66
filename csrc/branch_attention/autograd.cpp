// Autograd for branch_attention_forward, in C++ (one kernel for every backend: the Autograd key).
//
// Why not torch.library.register_autograd in Python: at the seed models' size the Python autograd
// path (setup_context, the backward closure, the custom-op machinery) cost more per call than the
// kernels and than the whole unfused stack + Linear + softmax + sum it replaces
// (benchmarks/NOTES.md). A C++ Function is what
// the built-in ops use; torch.compile and opcheck see it like any autograd kernel (as in
// torchvision's ops), and the fake implementations stay in Python (_ops.py). Under
// backward(create_graph=True) the backward is a differentiable composite, so double backward works.
// Under torch.func transforms the Python API goes through mtl_kernels/_functorch.py instead.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>


#include "common/autograd_util.h"
#include "common/functorch.h"

namespace mtl_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, const at::Tensor&);

// A backward that autograd can differentiate again: the forward recomputed from the saved inputs
// in differentiable ATen ops (scores, softmax over branches, weighted sum), then its
// vector-Jacobian product with create_graph. Only runs under backward(create_graph=True).
variable_list composite_backward(const at::Tensor& branches, const at::Tensor& weight,
                                 const at::Tensor& bias, const variable_list& grads) {
  at::Tensor scores = at::matmul(branches, weight);  // (G, M)
  if (bias.defined()) scores = scores + bias;
  const at::Tensor p = at::softmax(scores, 0);                 // (G, M)
  const at::Tensor out = (p.unsqueeze(-1) * branches).sum(0);  // (M, H)
  return vjp_create_graph({out, p}, {grads[0], grads[1]}, {branches, weight, bias});
}

class BranchAttentionFunction : public torch::autograd::Function<BranchAttentionFunction> {
 public:
  // branches (G, M, H), weight (H,), bias (1,) or none -> out (M, H), weights (G, M), lse (M,)
  static variable_list forward(AutogradContext* ctx, const at::Tensor& branches,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mtl_kernels::branch_attention_forward", "")
                         .typed<ForwardSig>();
    at::Tensor out, weights, lse;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out, weights, lse) = op.call(branches, weight, bias);
    }
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->save_for_backward({branches, weight, bias.has_value() ? *bias : at::Tensor(), lse});
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // no zero (G, M) tensor when only `out` is used
    return {out, weights, lse};
  }

  // grads: d out (M, H) or undefined, d weights (G, M) or undefined, d lse (never differentiable)
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mtl_kernels::branch_attention_backward", "")
                         .typed<BackwardSig>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& branches = saved[0];
    const at::Tensor& weight = saved[1];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::optional<at::Tensor> bias = has_bias ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const at::Tensor& lse = saved[3];
    if (at::GradMode::is_enabled()) {  // backward(create_graph=True): for a double backward
      return composite_backward(branches, weight, has_bias ? saved[2] : at::Tensor(), grads);
    }
    at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(branches[0]);
    const std::optional<at::Tensor> grad_weights =
        grads[1].defined() ? std::optional<at::Tensor>(grads[1]) : std::nullopt;
    auto [d_branches, d_weight, d_bias] = op.call(grad_out, grad_weights, branches, weight, bias, lse);
    return {d_branches, d_weight, has_bias ? d_bias : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_attention_forward_autograd(
    const at::Tensor& branches, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  check_no_functorch("branch_attention_forward", "mtl_kernels.branch_attention / BranchAttention");
  variable_list result = BranchAttentionFunction::apply(branches, weight, bias);
  return {result[0], result[1], result[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, Autograd, m) {
  m.impl("branch_attention_forward", &branch_attention_forward_autograd);
}

}  // namespace mtl_kernels
