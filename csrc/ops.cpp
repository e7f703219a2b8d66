// Every op schema of the package, in one place. Kernels: *_cpu.cpp and *_cuda.cu
// (TORCH_LIBRARY_IMPL per backend); fake implementations and autograd: mtl_kernels/_ops.py.
#include <Python.h>
#include <torch/library.h>

#include "grouped_lstm.h"
#include "lstm_persistent.h"

namespace {

// _C.path_counts() -> (forward_sequence, forward_steps, backward_sequence, backward_steps): how
// many grouped-LSTM recurrences ran on the persistent and the per-step path.
PyObject* py_path_counts(PyObject*, PyObject*) {
  const mtl_kernels::PathCounts c = mtl_kernels::path_counts();
  return Py_BuildValue("(LLLL)", (long long)c.forward_sequence, (long long)c.forward_steps,
                       (long long)c.backward_sequence, (long long)c.backward_steps);
}

// _C.persistent_plan(G, B, H, elem_bytes, backward, num_sms, smem_per_block, smem_per_sm,
//                    max_threads_per_sm, max_threads_per_block) -> dict: the persistent kernel's
// plan for these sizes on a device with these limits (what the CUDA path computes; testable here).
PyObject* py_persistent_plan(PyObject*, PyObject* args) {
  long long G, B, H, elem_bytes, sms, smem_block, smem_sm, threads_sm, threads_block;
  int backward;
  if (!PyArg_ParseTuple(args, "LLLLpLLLLL", &G, &B, &H, &elem_bytes, &backward, &sms, &smem_block,
                        &smem_sm, &threads_sm, &threads_block))
    return nullptr;
  if (G < 1 || B < 1 || H < 1 || elem_bytes < 1 || sms < 1 || threads_block < 1) {
    PyErr_SetString(PyExc_ValueError, "persistent_plan: sizes and limits must be positive");
    return nullptr;
  }
  const mtl_kernels::PersistentLimits lim{sms, smem_block, smem_sm, threads_sm, threads_block};
  const mtl_kernels::PersistentPlan p =
      mtl_kernels::persistent_plan(G, B, H, elem_bytes, backward != 0, lim);
  return Py_BuildValue(
      "{s:O,s:s,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "fits", p.fits ? Py_True : Py_False,
      "reason", p.reason, "units", (long long)p.units, "slices", (long long)p.slices, "tile_rows",
      (long long)p.tile_rows, "tiles", (long long)p.tiles, "threads_y", (long long)p.threads_y,
      "rows_per_thread", (long long)p.rows_per_thread, "chunk", (long long)p.chunk,
      "threads", (long long)p.threads(),
      "smem_bytes", (long long)p.smem_bytes(elem_bytes), "blocks", (long long)p.blocks,
      "blocks_per_sm", (long long)p.blocks_per_sm);
}

PyMethodDef module_methods[] = {
    {"path_counts", py_path_counts, METH_NOARGS, "grouped-LSTM recurrences run per path"},
    {"persistent_plan", py_persistent_plan, METH_VARARGS, "the persistent kernel's plan"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import mtl_kernels._C` loads this shared object, which registers the ops below.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          module_methods};
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
  // Test hooks: the persistent kernel's work run on the CPU, block by block and thread by thread,
  // with the tiling given (csrc/grouped_lstm_persistent_emulate.cpp). Same arguments and results as
  // the two ops above plus the tiling; chunk: dgates columns per shared-memory fill (0: all 4H).
  m.def(
      "_grouped_lstm_forward_emulated(Tensor input, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias, Tensor h0, Tensor c0, Tensor? lengths, bool reverse, int units, "
      "int tile_rows, int threads_y) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor h_states, Tensor c_states)");
  m.def(
      "_grouped_lstm_backward_emulated(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, "
      "Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor gates, Tensor h_states, "
      "Tensor c_states, Tensor? lengths, bool reverse, int units, int tile_rows, int threads_y, "
      "int chunk) -> "
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
