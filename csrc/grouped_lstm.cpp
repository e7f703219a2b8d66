// Device-agnostic grouped-LSTM driver: argument checks, ATen GEMMs, the time loop. See grouped_lstm.h.
#include "grouped_lstm.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

namespace mtl_kernels {

void poison_if_enabled(at::Tensor& t) {
  static const bool enabled = [] {
    const char* v = std::getenv("MTL_KERNELS_POISON");
    return v != nullptr && v[0] == '1';
  }();
  if (enabled) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

RecurrencePath recurrence_path() {
  const char* v = std::getenv("MTL_KERNELS_LSTM_PATH");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return RecurrencePath::kAuto;
  if (std::strcmp(v, "persistent") == 0) return RecurrencePath::kPersistent;
  if (std::strcmp(v, "per_step") == 0 || std::strcmp(v, "per-step") == 0)
    return RecurrencePath::kPerStep;
  TORCH_CHECK(false, "MTL_KERNELS_LSTM_PATH must be auto, persistent or per_step, got '", v, "'");
}

namespace {

std::atomic<int64_t> g_forward_sequence{0}, g_forward_steps{0}, g_backward_sequence{0},
    g_backward_steps{0};

void check_same_device_dtype(const at::Tensor& ref, const at::Tensor& t, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "grouped_lstm: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "grouped_lstm: ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

void check_lengths(const std::optional<at::Tensor>& lengths, const at::Tensor& input, int64_t B,
                   int64_t T) {
  if (!lengths.has_value()) return;
  const at::Tensor& l = *lengths;
  TORCH_CHECK(l.scalar_type() == at::kLong, "grouped_lstm: lengths must be int64, got ",
              l.scalar_type());
  TORCH_CHECK(l.dim() == 1 && l.size(0) == B, "grouped_lstm: lengths must have shape (", B,
              ",), got ", l.sizes());
  TORCH_CHECK(l.device() == input.device(), "grouped_lstm: lengths is on ", l.device(),
              " but input is on ", input.device());
  if (l.device().is_cpu() && B > 0) {  // on a GPU the Python layer checks (a sync here would
                                       // break CUDA-graph capture)
    const int64_t lo = l.min().item<int64_t>(), hi = l.max().item<int64_t>();
    TORCH_CHECK(lo >= 1 && hi <= T, "grouped_lstm: lengths must lie in [1, ", T, "], got [", lo,
                ", ", hi, "]");
  }
}

GateLayout gate_layout(bool shared, int64_t G, int64_t T, int64_t B, int64_t H4) {
  if (shared) return GateLayout{H4, B * G * H4, G * H4};  // (T, B, G, 4H)
  return GateLayout{T * B * H4, B * H4, H4};              // (G, T, B, 4H)
}

}  // namespace

PathCounts path_counts() {
  return {g_forward_sequence.load(), g_forward_steps.load(), g_backward_sequence.load(),
          g_backward_steps.load()};
}

ForwardResult grouped_lstm_forward_driver(const at::Tensor& input_, const at::Tensor& weight_ih_,
                                          const at::Tensor& weight_hh_,
                                          const std::optional<at::Tensor>& bias_,
                                          const at::Tensor& h0, const at::Tensor& c0,
                                          const std::optional<at::Tensor>& lengths, bool reverse,
                                          const CellKernels& kernels) {
  // ---- argument checks -------------------------------------------------------------------
  TORCH_CHECK(weight_ih_.dim() == 3, "grouped_lstm: weight_ih must be (G, 4H, C), got ",
              weight_ih_.sizes());
  TORCH_CHECK(weight_hh_.dim() == 3, "grouped_lstm: weight_hh must be (G, 4H, H), got ",
              weight_hh_.sizes());
  const int64_t G = weight_ih_.size(0), H4 = weight_ih_.size(1), C = weight_ih_.size(2);
  const int64_t H = H4 / 4;
  TORCH_CHECK(H4 % 4 == 0 && H > 0, "grouped_lstm: weight_ih.size(1) must be 4*hidden_size, got ",
              H4);
  TORCH_CHECK(weight_hh_.size(0) == G && weight_hh_.size(1) == H4 && weight_hh_.size(2) == H,
              "grouped_lstm: weight_hh must be (", G, ", ", H4, ", ", H, "), got ",
              weight_hh_.sizes());
  TORCH_CHECK(input_.dim() == 3 || input_.dim() == 4,
              "grouped_lstm: input must be (T, B, C) shared or (G, T, B, C) per group, got ",
              input_.sizes());
  const bool shared = input_.dim() == 3;
  TORCH_CHECK(shared || input_.size(0) == G, "grouped_lstm: per-group input has ",
              input_.size(0), " groups but the weights have ", G);
  const int64_t T = input_.size(shared ? 0 : 1), B = input_.size(shared ? 1 : 2);
  TORCH_CHECK(input_.size(-1) == C, "grouped_lstm: input has ", input_.size(-1),
              " features but weight_ih expects ", C);
  TORCH_CHECK(T >= 1, "grouped_lstm: input must have at least one time step");
  const at::ScalarType dtype = input_.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "grouped_lstm: input must be floating point, got ", dtype);
  check_same_device_dtype(input_, weight_ih_, "weight_ih", "input");
  check_same_device_dtype(input_, weight_hh_, "weight_hh", "input");
  check_same_device_dtype(input_, h0, "h0", "input");
  check_same_device_dtype(input_, c0, "c0", "input");
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == G && h0.size(1) == B && h0.size(2) == H,
              "grouped_lstm: h0 must be (", G, ", ", B, ", ", H, "), got ", h0.sizes());
  TORCH_CHECK(c0.sizes() == h0.sizes(), "grouped_lstm: c0 must be (", G, ", ", B, ", ", H,
              "), got ", c0.sizes());
  at::Tensor bias;
  if (bias_.has_value()) {
    bias = bias_->contiguous();
    check_same_device_dtype(input_, bias, "bias", "input");
    TORCH_CHECK(bias.dim() == 2 && bias.size(0) == G && bias.size(1) == H4,
                "grouped_lstm: bias must be (", G, ", ", H4, "), got ", bias.sizes());
  }
  check_lengths(lengths, input_, B, T);

  const at::Tensor input = input_.contiguous();
  const at::Tensor weight_ih = weight_ih_.contiguous();
  const at::Tensor weight_hh = weight_hh_.contiguous();
  const auto opts = input.options();
  const auto acc_opts = opts.dtype(opmath_dtype(dtype));

  // ---- (1) input projection for all steps: one GEMM --------------------------------------
  at::Tensor gates;
  if (shared) {  // x: (T*B, C) @ W_ih^T: (C, G*4H) -> (T, B, G, 4H)
    gates = at::mm(input.view({T * B, C}), weight_ih.view({G * H4, C}).t()).view({T, B, G, H4});
  } else {  // per group: (G, T*B, C) @ (G, C, 4H) -> (G, T, B, 4H)
    gates = at::bmm(input.view({G, T * B, C}), weight_ih.transpose(1, 2)).view({G, T, B, H4});
  }
  const GateLayout layout = gate_layout(shared, G, T, B, H4);

  // ---- (2) recurrence ----------------------------------------------------------------------
  at::Tensor h_states = at::empty({G, T + 1, B, H}, opts);      // (G, T+1, B, H)
  at::Tensor c_states = at::empty({G, T + 1, B, H}, acc_opts);  // (G, T+1, B, H)
  at::Tensor output = at::empty({G, T, B, H}, opts);            // (G, T, B, H)
  poison_if_enabled(h_states);
  poison_if_enabled(c_states);
  poison_if_enabled(output);
  const int64_t first = reverse ? T : 0;  // slot of the initial state
  h_states.select(1, first).copy_(h0);
  c_states.select(1, first).copy_(c0);
  const at::Tensor lengths_t = lengths.has_value() ? *lengths : at::Tensor();

  const ForwardSequence seq{gates, layout, weight_hh, bias, h_states, c_states, output, lengths_t,
                            reverse};
  if (kernels.forward_sequence && kernels.forward_sequence(seq)) {
    ++g_forward_sequence;
  } else {  // per step: one batched GEMM over all groups, one cell kernel
    ++g_forward_steps;
    at::Tensor hproj = at::empty({G, B, H4}, opts);        // (G, B, 4H)
    const at::Tensor w_hh_t = weight_hh.transpose(1, 2);  // (G, H, 4H)
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = forward_time(s, T, reverse);
      at::bmm_out(hproj, h_states.select(1, prev_slot(t, reverse)), w_hh_t);
      kernels.forward_step(ForwardStep{&seq, hproj, t});
    }
  }
  const int64_t last = reverse ? 0 : T;
  at::Tensor h_n = h_states.select(1, last).clone();
  at::Tensor c_n = c_states.select(1, last).to(dtype, /*non_blocking=*/false, /*copy=*/true);
  return {output, h_n, c_n, gates, h_states, c_states};
}

BackwardResult grouped_lstm_backward_driver(
    const at::Tensor& grad_output_, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input_, const at::Tensor& weight_ih_, const at::Tensor& weight_hh_,
    const at::Tensor& gates, const at::Tensor& h_states, const at::Tensor& c_states,
    const std::optional<at::Tensor>& lengths, bool reverse, const CellKernels& kernels) {
  const bool shared = input_.dim() == 3;
  const int64_t G = weight_ih_.size(0), H4 = weight_ih_.size(1), C = weight_ih_.size(2);
  const int64_t H = H4 / 4;
  const int64_t T = input_.size(shared ? 0 : 1), B = input_.size(shared ? 1 : 2);
  TORCH_CHECK(grad_output_.dim() == 4 && grad_output_.size(0) == G && grad_output_.size(1) == T &&
                  grad_output_.size(2) == B && grad_output_.size(3) == H,
              "grouped_lstm_backward: grad_output must be (", G, ", ", T, ", ", B, ", ", H,
              "), got ", grad_output_.sizes());
  TORCH_CHECK(gates.numel() == T * B * G * H4 && h_states.size(1) == T + 1 &&
                  c_states.size(1) == T + 1,
              "grouped_lstm_backward: saved tensors do not match the input's shape");
  const at::Tensor input = input_.contiguous();
  const at::Tensor weight_ih = weight_ih_.contiguous();
  const at::Tensor weight_hh = weight_hh_.contiguous();
  const at::Tensor grad_output = grad_output_.contiguous();
  const auto opts = input.options();
  const at::ScalarType acc = opmath_dtype(input.scalar_type());
  const GateLayout layout = gate_layout(shared, G, T, B, H4);

  at::Tensor dgates = at::empty(gates.sizes(), opts);  // same layout as gates
  poison_if_enabled(dgates);
  const at::Tensor lengths_t = lengths.has_value() ? *lengths : at::Tensor();
  at::Tensor grad_h0 = at::empty({G, B, H}, opts), grad_c0 = at::empty({G, B, H}, opts.dtype(acc));
  poison_if_enabled(grad_h0);
  poison_if_enabled(grad_c0);

  const BackwardSequence seq{gates, dgates, layout, weight_hh, c_states, grad_output,
                             grad_h_n.to(input.scalar_type()).contiguous(),
                             grad_c_n.to(acc).contiguous(), grad_h0, grad_c0, lengths_t, reverse};
  if (kernels.backward_sequence && kernels.backward_sequence(seq)) {
    ++g_backward_sequence;
    grad_c0 = grad_c0.to(input.scalar_type());
  } else {
    ++g_backward_steps;
    at::Tensor dh_in = seq.grad_h_n.clone();  // (G, B, H)
    // The cell kernel writes the pass-through part of dh_{t-1} into dh_next; the recurrent GEMM
    // then accumulates onto it in place.
    at::Tensor dh_next = at::empty({G, B, H}, opts);
    at::Tensor dc = seq.grad_c_n.clone();  // (G, B, H)
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = backward_time(s, T, reverse);
      kernels.backward_step(BackwardStep{&seq, dh_in, dh_next, dc, t});
      // dgates at step t as (G, B, 4H): a strided view in either layout.
      const at::Tensor dg_t = shared ? dgates.select(0, t).transpose(0, 1) : dgates.select(1, t);
      dh_next.baddbmm_(dg_t, weight_hh);  // dh_{t-1} = dh_pass + dg_t @ W_hh
      std::swap(dh_in, dh_next);
    }
    grad_h0 = dh_in;
    grad_c0 = dc.to(input.scalar_type());
  }

  // ---- weight, bias and input gradients: one (batched) GEMM or reduction each ---------------
  // dgates per group as (G, T*B, 4H): a view in both layouts.
  const at::Tensor dg = shared ? dgates.view({T * B, G, H4}).transpose(0, 1)
                               : dgates.view({G, T * B, H4});
  // h_{t-1} for every step t, as (G, T*B, H): slots 0..T-1 forward, 1..T reverse.
  const at::Tensor h_prev = h_states.narrow(1, reverse ? 1 : 0, T).reshape({G, T * B, H});
  at::Tensor grad_w_hh = at::bmm(dg.transpose(1, 2), h_prev);  // (G, 4H, H)
  at::Tensor grad_bias = dg.sum(1);                            // (G, 4H)
  at::Tensor grad_w_ih, grad_input;
  if (shared) {
    const at::Tensor dg2 = dgates.view({T * B, G * H4});
    grad_w_ih = at::mm(dg2.t(), input.view({T * B, C})).view({G, H4, C});
    grad_input = at::mm(dg2, weight_ih.view({G * H4, C})).view({T, B, C});  // sums over groups
  } else {
    grad_w_ih = at::bmm(dg.transpose(1, 2), input.view({G, T * B, C}));  // (G, 4H, C)
    grad_input = at::bmm(dg, weight_ih).view({G, T, B, C});
  }
  return {grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_h0, grad_c0};
}

}  // namespace mtl_kernels
