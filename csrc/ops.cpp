// Every op schema of the package, in one place. Kernels: *_cpu.cpp and *_cuda.cu
// (TORCH_LIBRARY_IMPL per backend); fake implementations and autograd: mtl_kernels/_ops.py.
#include <Python.h>
#include <torch/library.h>

// `import mtl_kernels._C` loads this shared object, which registers the ops below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mtl_kernels, m) {
  // One layer, one direction, all G groups.
  //   input (T, B, C) shared by all groups, or (G, T, B, C) one per group
  //   weight_ih (G, 4H, C), weight_hh (G, 4H, H), bias (G, 4H) = b_ih + b_hh, h0/c0 (G, B, H)
  //   lengths (B,) int64 on the input's device: steps t >= lengths[b] are padding
  // Returns output (G, T, B, H), h_n, c_n (G, B, H), and what backward needs:
  //   gates: activated gates, (T, B, G, 4H) for shared input, (G, T, B, 4H) per group;
  //   h_states / c_states (G, T+1, B, H): the states between steps (c in fp32 for half types).
  m.def(
      "grouped_lstm_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias, "
      "Tensor h0, Tensor c0, Tensor? lengths, bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor h_states, Tensor c_states)");
  // Returns grad_input, grad_weight_ih, grad_weight_hh, grad_bias (G, 4H), grad_h0, grad_c0.
  m.def(
      "grouped_lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor weight_ih, Tensor weight_hh, Tensor gates, Tensor h_states, Tensor c_states, "
      "Tensor? lengths, bool reverse) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_h0, Tensor grad_c0)");
  // branches (G, M, H) contiguous, weight (H,), bias (1,) or None.
  // out[m] = sum_g softmax_g(branches[g, m] . weight + bias) * branches[g, m]  -> (M, H)
  // Also returns weights (G, M) (the softmax) and lse (M,) fp32 (its log-normaliser, for backward).
  m.def(
      "branch_attention_forward(Tensor branches, Tensor weight, Tensor? bias) -> "
      "(Tensor out, Tensor weights, Tensor lse)");
  // grad_weights (G, M) or None: the gradient reaching the returned softmax weights.
  m.def(
      "branch_attention_backward(Tensor grad_out, Tensor? grad_weights, Tensor branches, "
      "Tensor weight, Tensor? bias, Tensor lse) -> "
      "(Tensor grad_branches, Tensor grad_weight, Tensor grad_bias)");
}
