// Host-side: turn a driver's sequence (and step t) into the raw pointers and strides of the kernels'
// parameter structs. Shared by the CPU and CUDA backends and the persistent kernel's emulator.
#pragma once

#include <ATen/OpMathType.h>

#include "grouped_lstm.h"
#include "lstm_cell.h"
#include "lstm_persistent.h"

namespace mtl_kernels {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
SequenceForward<scalar_t, acc_t> make_sequence_forward(const ForwardSequence& s) {
  SequenceForward<scalar_t, acc_t> q;
  q.weight_hh = s.weight_hh.data_ptr<scalar_t>();
  q.gates = s.gates.data_ptr<scalar_t>();
  q.gates_sg = s.layout.sg;
  q.gates_st = s.layout.st;
  q.gates_sb = s.layout.sb;
  q.bias = s.bias.defined() ? s.bias.data_ptr<scalar_t>() : nullptr;
  q.h_states = s.h_states.data_ptr<scalar_t>();
  q.h_sg = s.h_states.stride(0);
  q.h_sslot = s.h_states.stride(1);
  q.c_states = s.c_states.data_ptr<acc_t>();
  q.c_sg = s.c_states.stride(0);
  q.c_sslot = s.c_states.stride(1);
  q.output = s.output.data_ptr<scalar_t>();
  q.out_sg = s.output.stride(0);
  q.out_st = s.output.stride(1);
  q.lengths = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  q.G = s.h_states.size(0);
  q.T = s.h_states.size(1) - 1;
  q.B = s.h_states.size(2);
  q.H = s.h_states.size(3);
  q.reverse = s.reverse;
  return q;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
SequenceBackward<scalar_t, acc_t> make_sequence_backward(const BackwardSequence& s) {
  SequenceBackward<scalar_t, acc_t> q;
  q.weight_hh = s.weight_hh.data_ptr<scalar_t>();
  q.gates = s.gates.data_ptr<scalar_t>();
  q.dgates = s.dgates.data_ptr<scalar_t>();
  q.gates_sg = s.layout.sg;
  q.gates_st = s.layout.st;
  q.gates_sb = s.layout.sb;
  q.c_states = s.c_states.data_ptr<acc_t>();
  q.c_sg = s.c_states.stride(0);
  q.c_sslot = s.c_states.stride(1);
  q.grad_output = s.grad_output.data_ptr<scalar_t>();
  q.gout_sg = s.grad_output.stride(0);
  q.gout_st = s.grad_output.stride(1);
  q.grad_h_n = s.grad_h_n.data_ptr<scalar_t>();
  q.grad_c_n = s.grad_c_n.data_ptr<acc_t>();
  q.grad_h0 = s.grad_h0.data_ptr<scalar_t>();
  q.grad_c0 = s.grad_c0.data_ptr<acc_t>();
  q.lengths = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  q.G = s.c_states.size(0);
  q.T = s.c_states.size(1) - 1;
  q.B = s.c_states.size(2);
  q.H = s.c_states.size(3);
  q.reverse = s.reverse;
  return q;
}

// A per-step kernel's parameters: the sequence's pointers at step t (forward_step_at /
// backward_step_at, as the persistent kernel sees them) plus the per-step buffers.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
ForwardStepParams<scalar_t, acc_t> make_forward_params(const ForwardStep& s) {
  ForwardStepParams<scalar_t, acc_t> p = forward_step_at(make_sequence_forward<scalar_t>(*s.seq), s.t);
  p.hproj = s.hproj.data_ptr<scalar_t>();
  return p;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
BackwardStepParams<scalar_t, acc_t> make_backward_params(const BackwardStep& s) {
  BackwardStepParams<scalar_t, acc_t> p =
      backward_step_at(make_sequence_backward<scalar_t>(*s.seq), s.t);
  p.dh_in = s.dh_in.data_ptr<scalar_t>();
  p.dh_pass = s.dh_pass.data_ptr<scalar_t>();
  p.dc = s.dc.data_ptr<acc_t>();
  return p;
}

}  // namespace mtl_kernels
