// Autograd for grouped_lstm_forward, in C++ (the Autograd key: every backend).
//
// Why C++: the Python torch.library.register_autograd path cost ~250 us per layer and direction
// forward+backward on the CPU at seed-branches size (1.34 ms in all, 1.08 ms of it the two ops),
// and on a GPU, where the persistent kernel runs a small sequence in tens of microseconds, such a
// fixed cost decides the speed-up at the seed models' sizes. The fake implementations stay in
// Python (_ops.py). Under backward(create_graph=True) the backward is a differentiable composite
// (the forward recomputed in ATen ops), so double backward works.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <vector>

#include "autograd_util.h"
#include "lstm_cell.h"  // forward_time

namespace mtl_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

using ForwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
    const OptTensor&, bool);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool);

// The op's forward in differentiable ATen ops: output (G, T, B, H), h_n, c_n (G, B, H).
// Same arguments as the op; the test suite's Python oracle is reference.grouped_lstm_composite.
std::vector<Tensor> grouped_lstm_composite(const Tensor& input, const Tensor& w_ih,
                                           const Tensor& w_hh, const Tensor& bias,
                                           const Tensor& h0, const Tensor& c0,
                                           const Tensor& lengths, bool reverse) {
  Tensor xp = input.dim() == 3 ? at::einsum("tbc,gnc->gtbn", {input, w_ih})   // (G, T, B, 4H)
                               : at::einsum("gtbc,gnc->gtbn", {input, w_ih});
  if (bias.defined()) xp = xp + bias.unsqueeze(1).unsqueeze(1);
  const int64_t T = xp.size(1);
  const Tensor w_hh_t = w_hh.transpose(1, 2);  // (G, H, 4H)
  Tensor h = h0, c = c0;
  std::vector<Tensor> outs(T);
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = forward_time(s, T, reverse);
    const std::vector<Tensor> gate = (xp.select(1, t) + at::bmm(h, w_hh_t)).chunk(4, -1);
    Tensor c_t = at::sigmoid(gate[1]) * c + at::sigmoid(gate[0]) * at::tanh(gate[2]);
    Tensor h_t = at::sigmoid(gate[3]) * at::tanh(c_t);
    Tensor out_t = h_t;
    if (lengths.defined()) {  // padding steps hold the state and emit zeros
      const Tensor valid = lengths.to(xp.device()).gt(t).to(xp.scalar_type()).view({1, -1, 1});
      const Tensor held = at::rsub(valid, 1);
      c_t = valid * c_t + held * c;
      out_t = valid * h_t;
      h_t = out_t + held * h;
    }
    outs[t] = out_t;
    h = h_t;
    c = c_t;
  }
  return {at::stack(outs, 1), h, c};
}

class GroupedLSTMFunction : public torch::autograd::Function<GroupedLSTMFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& weight_ih,
                               const Tensor& weight_hh, const OptTensor& bias, const Tensor& h0,
                               const Tensor& c0, const OptTensor& lengths, bool reverse) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mtl_kernels::grouped_lstm_forward", "")
                         .typed<ForwardSig>();
    Tensor output, h_n, c_n, gates, h_states, c_states;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(output, h_n, c_n, gates, h_states, c_states) =
          op.call(input, weight_ih, weight_hh, bias, h0, c0, lengths, reverse);
    }
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = bias.has_value();
    // bias, h0, c0: for the composite (double) backward only; references, not copies
    ctx->save_for_backward({input, weight_ih, weight_hh, gates, h_states, c_states,
                            lengths.value_or(Tensor()), bias.value_or(Tensor()), h0, c0});
    ctx->mark_non_differentiable({gates, h_states, c_states});
    ctx->set_materialize_grads(false);  // no zero tensors for outputs nobody used (gates is large)
    return {output, h_n, c_n, gates, h_states, c_states};
  }

  // grads: d output (G, T, B, H), d h_n, d c_n (G, B, H), each possibly undefined; the rest unused.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight_ih = saved[1], &weight_hh = saved[2];
    const Tensor &gates = saved[3], &h_states = saved[4], &c_states = saved[5];
    const Tensor &lengths = saved[6], &bias = saved[7], &h0 = saved[8], &c0 = saved[9];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    if (at::GradMode::is_enabled()) {  // backward(create_graph=True): for a double backward
      const std::vector<Tensor> outs =
          grouped_lstm_composite(input, weight_ih, weight_hh, bias, h0, c0, lengths, reverse);
      variable_list d = vjp_create_graph(outs, {grads[0], grads[1], grads[2]},
                                         {input, weight_ih, weight_hh, bias, h0, c0});
      d.resize(8);  // lengths, reverse: no gradient
      return d;
    }
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("mtl_kernels::grouped_lstm_backward", "")
                         .typed<BackwardSig>();
    const int64_t G = h_states.size(0), T = h_states.size(1) - 1, B = h_states.size(2),
                  H = h_states.size(3);
    const Tensor grad_output = grads[0].defined() ? grads[0] : input.new_zeros({G, T, B, H});
    const Tensor grad_h_n = grads[1].defined() ? grads[1] : input.new_zeros({G, B, H});
    const Tensor grad_c_n = grads[2].defined() ? grads[2] : input.new_zeros({G, B, H});
    auto [d_input, d_w_ih, d_w_hh, d_bias, d_h0, d_c0] =
        op.call(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, gates, h_states,
                c_states, lengths.defined() ? OptTensor(lengths) : std::nullopt, reverse);
    return {d_input, d_w_ih, d_w_hh, has_bias ? d_bias : Tensor(), d_h0, d_c0, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> grouped_lstm_forward_autograd(
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias,
    const Tensor& h0, const Tensor& c0, const OptTensor& lengths, bool reverse) {
  const variable_list r =
      GroupedLSTMFunction::apply(input, weight_ih, weight_hh, bias, h0, c0, lengths, reverse);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, Autograd, m) {
  m.impl("grouped_lstm_forward", &grouped_lstm_forward_autograd);
}

}  // namespace mtl_kernels
