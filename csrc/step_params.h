// Host-side: turn a driver step (whole-sequence tensors + t) into the raw pointers and strides of the
// cell kernels' parameter structs. Shared by the CPU and CUDA backends.
#pragma once

#include <ATen/OpMathType.h>

#include "grouped_lstm.h"
#include "lstm_cell.h"

namespace mtl_kernels {

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
ForwardStepParams<scalar_t, acc_t> make_forward_params(const ForwardStep& s) {
  ForwardStepParams<scalar_t, acc_t> p;
  const int64_t prev = prev_slot(s.t, s.reverse), next = next_slot(s.t, s.reverse);
  p.gates = s.gates.data_ptr<scalar_t>() + s.t * s.layout.st;
  p.gates_sg = s.layout.sg;
  p.gates_sb = s.layout.sb;
  p.hproj = s.hproj.data_ptr<scalar_t>();
  p.bias = s.bias.defined() ? s.bias.data_ptr<scalar_t>() : nullptr;
  p.h_sg = s.h_states.stride(0);
  p.h_prev = s.h_states.data_ptr<scalar_t>() + prev * s.h_states.stride(1);
  p.h_next = s.h_states.data_ptr<scalar_t>() + next * s.h_states.stride(1);
  p.c_sg = s.c_states.stride(0);
  p.c_prev = s.c_states.data_ptr<acc_t>() + prev * s.c_states.stride(1);
  p.c_next = s.c_states.data_ptr<acc_t>() + next * s.c_states.stride(1);
  p.out = s.output.data_ptr<scalar_t>() + s.t * s.output.stride(1);
  p.out_sg = s.output.stride(0);
  p.lengths = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  p.t = s.t;
  p.G = s.h_states.size(0);
  p.B = s.h_states.size(2);
  p.H = s.h_states.size(3);
  return p;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
BackwardStepParams<scalar_t, acc_t> make_backward_params(const BackwardStep& s) {
  BackwardStepParams<scalar_t, acc_t> p;
  const int64_t prev = prev_slot(s.t, s.reverse), next = next_slot(s.t, s.reverse);
  const int64_t off_t = s.t * s.layout.st;
  p.gates = s.gates.data_ptr<scalar_t>() + off_t;
  p.dgates = s.dgates.data_ptr<scalar_t>() + off_t;
  p.gates_sg = s.layout.sg;
  p.gates_sb = s.layout.sb;
  p.c_sg = s.c_states.stride(0);
  p.c_prev = s.c_states.data_ptr<acc_t>() + prev * s.c_states.stride(1);
  p.c_next = s.c_states.data_ptr<acc_t>() + next * s.c_states.stride(1);
  p.grad_out = s.grad_output.data_ptr<scalar_t>() + s.t * s.grad_output.stride(1);
  p.gout_sg = s.grad_output.stride(0);
  p.dh_in = s.dh_in.data_ptr<scalar_t>();
  p.dh_pass = s.dh_pass.data_ptr<scalar_t>();
  p.dc = s.dc.data_ptr<acc_t>();
  p.lengths = s.lengths.defined() ? s.lengths.data_ptr<int64_t>() : nullptr;
  p.t = s.t;
  p.G = s.c_states.size(0);
  p.B = s.c_states.size(2);
  p.H = s.c_states.size(3);
  return p;
}

}  // namespace mtl_kernels
