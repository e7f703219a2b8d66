// Autograd of grouped_recurrence_forward and grouped_recurrence, in C++ (the Autograd key: every
// backend), for every cell.
//
// Why C++: the Python torch.library.register_autograd path's fixed cost per call was a fifth of a
// forward+backward at the seed models' sizes on the CPU (benchmarks/NOTES.md), and on a GPU, where
// the persistent kernel runs a small sequence in microseconds, such a cost decides the speed-up.
// The fake implementations stay in Python (_ops.py). Under backward(create_graph=True) the backward is a
// differentiable composite (the forward recomputed in ATen ops through the cell's own templated
// formula), so double backward works. torch.func transforms refuse C++ autograd Functions: the
// Python API goes through the autograd.Function of mtl_kernels/_functorch.py then.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cells/cell.h"
#include "common/autograd_util.h"
#include "common/functorch.h"
#include "recurrence/registration.h"
#include "recurrence/sequence.h"

namespace mtl_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
// The cells' templated forward over tensors: each value a (G, B, H) tensor.
struct TensorMath {
  static Tensor sigmoid(const Tensor& x) { return at::sigmoid(x); }
  static Tensor tanh(const Tensor& x) { return at::tanh(x); }
  static Tensor relu(const Tensor& x) { return at::relu(x); }
};

// The op's forward in differentiable ATen ops: output (G, T, B, R), h_n, c_n (G, B, H; undefined
// without a cell state). The test suite's Python oracle is reference.recurrence_composite.
template <class Cell>
std::vector<Tensor> composite_forward(const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                                      const Tensor& bias, const Tensor& bias_hh, const Tensor& w_hr,
                                      const Tensor& h0, const Tensor& c0, const Tensor& lengths,
                                      bool reverse) {
  constexpr int K = Cell::kGates;
  Tensor xp = input.dim() == 3 ? at::einsum("tbc,gnc->gtbn", {input, w_ih})  // (G, T, B, KH)
                               : at::einsum("gtbc,gnc->gtbn", {input, w_ih});
  if (bias.defined()) xp = xp + bias.unsqueeze(1).unsqueeze(1);
  const int64_t T = xp.size(1);
  const Tensor w_hh_t = w_hh.transpose(1, 2);  // (G, H, KH)
  Tensor h = h0, c = c0;
  std::vector<Tensor> outs(T);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = forward_time(s, T, reverse);
    Tensor rec = at::bmm(h, w_hh_t);  // (G, B, KH)
    if (bias_hh.defined()) rec = rec + bias_hh.unsqueeze(1);
    const std::vector<Tensor> xs = xp.select(1, t).chunk(K, -1), rs = rec.chunk(K, -1);
    Tensor x[K], r[K], act[K], h_t, aux_t;
    for (int k = 0; k < K; ++k) {
      x[k] = xs[k];
      r[k] = rs[k];
    }
    Cell::template forward<TensorMath>(x, r, h, c, act, h_t, aux_t);
    if (w_hr.defined()) h_t = at::bmm(h_t, w_hr.transpose(1, 2));  // the projection, (G, B, P)
    Tensor out_t = h_t;
    if (lengths.defined()) {  // padding steps hold the state and emit zeros
      const Tensor valid = valid_rows(lengths.to(xp.device()), t, xp.scalar_type());
      const Tensor held = at::rsub(valid, 1);
      if (Cell::kCellState) aux_t = valid * aux_t + held * c;
      out_t = valid * h_t;
      h_t = out_t + held * h;
    }
    outs[t] = out_t;
    h = h_t;
    if (Cell::kCellState) c = aux_t;
  }
  return {at::stack(outs, 1), h, Cell::kCellState ? c : Tensor()};
}

Tensor defined_or_null(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The autograd of both forward ops:
//   grouped_recurrence_forward (kHidden = false) returns the saved tensors (gates, h_states, aux)
//     with its results, so its backward must leave them as they are;
//   grouped_recurrence (kHidden = true), what the modules run, returns output, h_n, c_n only and
//     keeps the saved tensors to itself: its backward writes the pre-activation gradients over the
//     saved gates (no second buffer of their size). A second backward through the same graph
//     (retain_graph=True) finds them consumed and runs the forward again first.
template <bool kHidden>
class RecurrenceFunction : public torch::autograd::Function<RecurrenceFunction<kHidden>> {
 public:
  static variable_list forward(AutogradContext* ctx, const std::string& cell, const Tensor& input,
                               const Tensor& weight_ih, const Tensor& weight_hh,
                               const OptTensor& bias, const OptTensor& bias_hh,
                               const OptTensor& weight_hr, const Tensor& h0, const OptTensor& c0,
                               const OptTensor& lengths, bool reverse) {
    Tensor output, h_n, c_n, gates, h_states, aux;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, h_n, c_n, gates, h_states, aux) = recurrence_forward_op().call(
          cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths, reverse);
    }
    ctx->saved_data["cell"] = cell;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["has_bias_hh"] = bias_hh.has_value();
    // bias, bias_hh, h0, c0: for the composite (double) backward and a recomputed forward only;
    // references, not copies
    ctx->save_for_backward({input, weight_ih, weight_hh, gates, h_states, aux, defined_or_null(lengths),
                            defined_or_null(bias), defined_or_null(bias_hh), h0, defined_or_null(c0),
                            defined_or_null(weight_hr)});
    if (!c0.has_value()) ctx->mark_non_differentiable({c_n});  // a (0,) placeholder
    ctx->set_materialize_grads(false);  // no zero tensors for outputs nobody used
    if constexpr (kHidden) return {output, h_n, c_n};
    ctx->mark_non_differentiable({gates, h_states, aux});
    return {output, h_n, c_n, gates, h_states, aux};
  }

  // grads: d output (G, T, B, R), d h_n, d c_n, each possibly undefined; the rest unused.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight_ih = saved[1], &weight_hh = saved[2];
    Tensor gates = saved[3], h_states = saved[4], aux = saved[5];
    const Tensor& lengths = saved[6];
    const Tensor &bias = saved[7], &bias_hh = saved[8], &h0 = saved[9], &c0 = saved[10];
    const Tensor& weight_hr = saved[11];
    const std::string cell = ctx->saved_data["cell"].toStringRef();
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool has_bias_hh = ctx->saved_data["has_bias_hh"].toBool();
    const bool cell_state = c0.defined();
    if (at::GradMode::is_enabled()) {  // backward(create_graph=True): for a double backward
      const std::vector<Tensor> outs = dispatch_cell(parse_cell(cell), [&](auto c) {
        return composite_forward<decltype(c)>(input, weight_ih, weight_hh, bias, bias_hh, weight_hr,
                                              h0, c0, lengths, reverse);
      });
      const Tensor no_grad;
      variable_list d = vjp_create_graph(
          outs, {grads[0], grads[1], cell_state ? grads[2] : no_grad},
          {input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0});
      return {Tensor(), d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], Tensor(), Tensor()};
    }
    // Missing incoming gradients are zeros: grad_output (G, T, B, R) from h_states (G, T+1, B, R),
    // grad_h_n like h0, grad_c_n like c0. Symbolic sizes, so that torch.compile(dynamic=True)
    // traces this without specialising T or B.
    const Tensor grad_output =
        grads[0].defined() ? grads[0]
                           : input.new_zeros_symint({h_states.sym_size(0), h_states.sym_size(1) - 1,
                                                     h_states.sym_size(2), h_states.sym_size(3)});
    const Tensor grad_h_n = grads[1].defined() ? grads[1] : at::zeros_like(h0);
    OptTensor grad_c_n;
    if (cell_state) grad_c_n = grads[2].defined() ? grads[2] : at::zeros_like(c0);
    // Edge 0 is the input (the first tensor argument: `cell` has none). False where it needs no
    // gradient, or this backward (autograd.grad over the weights) asks for none: its product is
    // skipped.
    const bool input_grad = ctx->needs_input_grad(0);
    BackwardResult d;
    if constexpr (kHidden) {
      if (ctx->saved_data.count("gates_consumed")) {  // retain_graph: the forward again
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        std::tie(std::ignore, std::ignore, std::ignore, gates, h_states, aux) =
            recurrence_forward_op().call(cell, input, weight_ih, weight_hh, opt(bias), opt(bias_hh),
                              opt(weight_hr), h0, opt(c0), opt(lengths), reverse);
      }
      ctx->saved_data["gates_consumed"] = true;
      d = recurrence_backward_in_place_op().call(cell, grad_output, grad_h_n, grad_c_n, input,
                                                 weight_ih, weight_hh, opt(weight_hr), gates,
                                                 h_states, aux, opt(lengths), reverse, input_grad);
    } else {
      d = recurrence_backward_op().call(cell, grad_output, grad_h_n, grad_c_n, input, weight_ih,
                                        weight_hh, opt(weight_hr), gates, h_states, aux,
                                        opt(lengths), reverse, input_grad);
    }
    auto [d_input, d_w_ih, d_w_hh, d_bias, d_bias_hh, d_w_hr, d_h0, d_c0] = d;
    const bool folded_bias_hh = folds_bias_hh(parse_cell(cell));  // then b_hh's grad is the bias's
    return {Tensor(),
            input_grad ? d_input : Tensor(),
            d_w_ih,
            d_w_hh,
            has_bias ? d_bias : Tensor(),
            has_bias_hh ? (folded_bias_hh ? d_bias : d_bias_hh) : Tensor(),
            weight_hr.defined() ? d_w_hr : Tensor(),
            d_h0,
            cell_state ? d_c0 : Tensor(),
            Tensor(),
            Tensor()};
  }
};

ForwardResult grouped_recurrence_forward_autograd(c10::string_view cell, const Tensor& input,
                                                  const Tensor& weight_ih, const Tensor& weight_hh,
                                                  const OptTensor& bias, const OptTensor& bias_hh,
                                                  const OptTensor& weight_hr, const Tensor& h0,
                                                  const OptTensor& c0, const OptTensor& lengths,
                                                  bool reverse) {
  check_no_functorch("grouped_recurrence_forward",
                     "the modules or mtl_kernels._ops.recurrence_layer");
  const variable_list r = RecurrenceFunction<false>::apply(
      std::string(cell), input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths,
      reverse);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

// grouped_recurrence: the training forward (saving what backward needs, kept to itself) when a
// gradient is needed, else the inference forward (saving nothing).
InferenceResult grouped_recurrence_autograd(c10::string_view cell, const Tensor& input,
                                            const Tensor& weight_ih, const Tensor& weight_hh,
                                            const OptTensor& bias, const OptTensor& bias_hh,
                                            const OptTensor& weight_hr, const Tensor& h0,
                                            const OptTensor& c0, const OptTensor& lengths,
                                            bool reverse) {
  const auto needs_grad = [](const Tensor& t) { return t.defined() && t.requires_grad(); };
  const auto opt_needs_grad = [&](const OptTensor& t) { return t.has_value() && needs_grad(*t); };
  const bool grad = at::GradMode::is_enabled() &&
                    (needs_grad(input) || needs_grad(weight_ih) || needs_grad(weight_hh) ||
                     opt_needs_grad(bias) || opt_needs_grad(bias_hh) || opt_needs_grad(weight_hr) ||
                     needs_grad(h0) || opt_needs_grad(c0));
  if (!grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return recurrence_op().call(cell, input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths,
                   reverse);
  }
  check_no_functorch("grouped_recurrence", "the modules or mtl_kernels._ops.recurrence_layer");
  const variable_list r = RecurrenceFunction<true>::apply(
      std::string(cell), input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths,
      reverse);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, Autograd, m) {
  m.impl("grouped_recurrence_forward", &grouped_recurrence_forward_autograd);
  m.impl("grouped_recurrence", &grouped_recurrence_autograd);
}

}  // namespace mtl_kernels
