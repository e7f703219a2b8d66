// Host side: a driver's sequence tensors (driver.h) as the raw pointers and strides the kernels
// get (sequence.h). Shared by the CPU and CUDA backends and the persistent kernel's emulator.
#pragma once

#include <ATen/OpMathType.h>

#include "recurrence/driver.h"
#include "recurrence/sequence.h"

namespace mtl_kernels {

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// lengths' stride between groups: 0 for (B,) lengths shared by the groups (or none), B for (G, B).
inline int64_t lengths_group_stride(const at::Tensor& lengths) {
  return lengths.defined() && lengths.dim() == 2 ? lengths.stride(0) : 0;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
SequenceForward<scalar_t, acc_t> raw_forward(const ForwardSequence& s) {
  SequenceForward<scalar_t, acc_t> q;
  q.weight_hh = s.weight_hh.data_ptr<scalar_t>();
  q.gates = s.gates.data_ptr<scalar_t>();
  q.gates_sg = s.layout.sg;
  q.gates_st = s.layout.st;
  q.gates_sb = s.layout.sb;
  q.bias = ptr_or_null<scalar_t>(s.bias);
  q.bias_hh = ptr_or_null<scalar_t>(s.bias_hh);
  q.h_states = s.h_states.data_ptr<scalar_t>();
  q.h_sg = s.h_states.stride(0);
  q.h_sslot = s.h_states.stride(1);
  q.aux = ptr_or_null<acc_t>(s.aux);
  q.aux_sg = s.aux.defined() ? s.aux.stride(0) : 0;
  q.aux_sslot = s.aux.defined() ? s.aux.stride(1) : 0;
  q.output = s.output.data_ptr<scalar_t>();
  q.out_sg = s.output.stride(0);
  q.out_st = s.output.stride(1);
  q.lengths = ptr_or_null<int64_t>(s.lengths);
  q.lengths_sg = lengths_group_stride(s.lengths);
  q.T = s.T;
  q.G = s.G;
  q.B = s.B;
  q.H = s.H;
  q.nslot = s.h_states.size(1);
  q.aux_nslot = s.aux.defined() ? s.aux.size(1) : 1;
  q.t0 = s.t0;
  q.reverse = s.reverse;
  return q;
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
SequenceBackward<scalar_t, acc_t> raw_backward(const BackwardSequence& s) {
  SequenceBackward<scalar_t, acc_t> q;
  q.weight_hh = s.weight_hh.data_ptr<scalar_t>();
  q.gates = s.gates.data_ptr<scalar_t>();
  q.dgates = s.dgates.data_ptr<scalar_t>();
  q.drec = s.drec.data_ptr<scalar_t>();
  q.gates_sg = s.layout.sg;
  q.gates_st = s.layout.st;
  q.gates_sb = s.layout.sb;
  q.h_states = s.h_states.data_ptr<scalar_t>();
  q.h_sg = s.h_states.stride(0);
  q.h_sslot = s.h_states.stride(1);
  q.aux = ptr_or_null<acc_t>(s.aux);
  q.aux_sg = s.aux.defined() ? s.aux.stride(0) : 0;
  q.aux_sslot = s.aux.defined() ? s.aux.stride(1) : 0;
  q.grad_output = s.grad_output.data_ptr<scalar_t>();
  q.gout_sg = s.grad_output.stride(0);
  q.gout_st = s.grad_output.stride(1);
  q.grad_h_n = s.grad_h_n.data_ptr<scalar_t>();
  q.grad_c_n = ptr_or_null<acc_t>(s.grad_c_n);
  q.grad_h0 = s.grad_h0.data_ptr<scalar_t>();
  q.grad_c0 = ptr_or_null<acc_t>(s.grad_c0);
  q.lengths = ptr_or_null<int64_t>(s.lengths);
  q.lengths_sg = lengths_group_stride(s.lengths);
  q.T = s.T;
  q.G = s.G;
  q.B = s.B;
  q.H = s.H;
  q.reverse = s.reverse;
  return q;
}

}  // namespace mtl_kernels
