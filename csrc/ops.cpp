// Every op schema of the package, in one place; the per-cell public ops (composites of the generic
// recurrence op), the ops' autocast kernels, and the extension module's Python functions.
//
// Kernels: recurrence/{cpu.cpp, cuda_per_step.cu} and branch_attention/{cpu.cpp, cuda.cu}
// (TORCH_LIBRARY_IMPL per backend); autograd: recurrence/autograd.cpp and
// branch_attention/autograd.cpp (C++, the Autograd key); fake implementations: mtl_kernels/_ops.py.
#include <Python.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cells/cell.h"
#include "recurrence/cpu_tiles.h"
#include "recurrence/driver.h"
#include "recurrence/persistent.h"
#include "recurrence/persistent_mma.h"
#include "recurrence/registration.h"

TORCH_LIBRARY(mtl_kernels, m) {
  // ---- the recurrence, any cell (cell: lstm, gru, rnn_tanh, rnn_relu) -------------------------
  // One layer, one direction, all G groups (K = 4 lstm, 3 gru, 1 rnn_*):
  //   input (T, B, C) shared by the groups, or (G, T, B, C) one per group
  //   weight_ih (G, KH, C), weight_hh (G, KH, H)
  //   bias (G, KH): b_ih (or lstm / rnn: b_ih + b_hh, already summed); bias_hh (G, KH): b_hh or
  //   None [gru: inside r * (W_hn h + b_hn), so given with bias or not at all; lstm / rnn: the
  //   op adds it to bias, and its gradient in backward is grad_bias]
  //   weight_hr (G, P, H): lstm only, nn.LSTM's proj_size: h_t = W_hr (o * tanh(c_t)), P wide
  //   h0 (G, B, R) with R = P or H; c0 (G, B, H) for lstm only; lengths (B,) int64, or
  //   (G, B) per group (0 allowed: a row that holds no sequence): steps t >= the row's length
  //   are padding (state held, output 0)
  // Returns output (G, T, B, R), h_n (G, B, R), c_n (G, B, H) [lstm; else (0,)] and what the
  // backward needs: gates, the saved per-step values ((T, B, G, KH) for a shared input,
  // (G, T, B, KH) per group), h_states (G, T+1, B, R), and aux (G, T+1, B, H) in fp32 for the half
  // types [lstm: the cell states; gru: W_hn h + b_hn per step; rnn: (0,)].
  m.def(
      "grouped_recurrence_forward(str cell, Tensor input, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias, Tensor? bias_hh, Tensor? weight_hr, Tensor h0, Tensor? c0, Tensor? lengths, "
      "bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor h_states, Tensor aux)");
  // The same recurrence as the modules run it: output, h_n, c_n only. When a gradient is needed
  // (grad mode on, an argument requiring grad) its autograd saves what backward needs and keeps it
  // to itself (its backward then reuses the saved gates' buffer); otherwise (no_grad,
  // inference_mode, frozen weights) it saves nothing: no gates or state sequences are kept, the
  // states alternate between two slots and the input projection runs in chunks of steps.
  m.def(
      "grouped_recurrence(str cell, Tensor input, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? bias, Tensor? bias_hh, Tensor? weight_hr, Tensor h0, Tensor? c0, Tensor? lengths, "
      "bool reverse) -> (Tensor output, Tensor h_n, Tensor c_n)");
  // grad_c_n for lstm only. Returns grad_input [input_grad; else (0,): input_grad=False spares its
  // product where the input needs no gradient], grad_bias (G, KH), grad_bias_hh (G, KH) [gru;
  // else (0,)], grad_weight_hr [with weight_hr; else (0,)], grad_c0 [lstm; else (0,)].
  m.def(
      "grouped_recurrence_backward(str cell, Tensor grad_output, Tensor grad_h_n, Tensor? grad_c_n, "
      "Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, Tensor gates, "
      "Tensor h_states, Tensor aux, Tensor? lengths, bool reverse, bool input_grad=True) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_bias_hh, Tensor grad_weight_hr, Tensor grad_h0, Tensor grad_c0)");

  // ---- the same per cell, with each cell's own arguments ----------------------------------------
  m.def(
      "grouped_lstm_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias, "
      "Tensor h0, Tensor c0, Tensor? lengths, bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor h_states, Tensor c_states)");
  m.def(
      "grouped_lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor weight_ih, Tensor weight_hh, Tensor gates, Tensor h_states, Tensor c_states, "
      "Tensor? lengths, bool reverse) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_h0, Tensor grad_c0)");
  m.def(
      "grouped_gru_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias_ih, "
      "Tensor? bias_hh, Tensor h0, Tensor? lengths, bool reverse) -> "
      "(Tensor output, Tensor h_n, Tensor gates, Tensor h_states, Tensor hn_states)");
  m.def(
      "grouped_gru_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor gates, Tensor h_states, Tensor hn_states, Tensor? lengths, "
      "bool reverse) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias_ih, "
      "Tensor grad_bias_hh, Tensor grad_h0)");
  m.def(
      "grouped_rnn_forward(Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? bias, "
      "Tensor h0, Tensor? lengths, bool reverse, str nonlinearity=\"tanh\") -> "
      "(Tensor output, Tensor h_n, Tensor gates, Tensor h_states)");
  m.def(
      "grouped_rnn_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor gates, Tensor h_states, Tensor? lengths, bool reverse, "
      "str nonlinearity=\"tanh\") -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_h0)");

  // The backward writing the pre-activation gradients over `gates` (for the C++ autograd, which
  // needs the saved values no more: it spares a buffer of their size).
  m.def(
      "_grouped_recurrence_backward_in_place(str cell, Tensor grad_output, Tensor grad_h_n, "
      "Tensor? grad_c_n, Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, "
      "Tensor(a!) gates, Tensor h_states, Tensor aux, Tensor? lengths, bool reverse, "
      "bool input_grad=True) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_bias_hh, Tensor grad_weight_hr, Tensor grad_h0, Tensor grad_c0)");

  // Test hooks: the persistent kernel's work run on the CPU, block by block and thread by thread,
  // with the tiling given (recurrence/persistent_emulate.cpp). The recurrence ops' arguments and
  // results plus the tiling; chunk: drec columns per shared-memory fill (0: all KH).
  m.def(
      "_grouped_recurrence_forward_emulated(str cell, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias, Tensor? bias_hh, Tensor? weight_hr, Tensor h0, Tensor? c0, "
      "Tensor? lengths, bool reverse, int units, int tile_rows, int threads_y) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor h_states, Tensor aux)");
  m.def(
      "_grouped_recurrence_backward_emulated(str cell, Tensor grad_output, Tensor grad_h_n, "
      "Tensor? grad_c_n, Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, "
      "Tensor gates, Tensor h_states, Tensor aux, Tensor? lengths, bool reverse, int units, "
      "int tile_rows, int threads_y, int chunk) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_bias_hh, Tensor grad_weight_hr, Tensor grad_h0, Tensor grad_c0)");
  // The same for the tensor-core variant (recurrence/persistent_mma.h): units per block (<= 64,
  // warps = ceil(units / 8)), tile_rows (<= 64, m-tiles of 16), reg_ktiles (k-tiles of W_hh
  // fragments in registers, the rest in shared memory; -1: as many as the registers hold), mma_k
  // (16: m16n8k16 for bf16 / fp16, 8: m16n8k8 with TF32 rounding for fp32; fp64 runs either
  // exactly); backward chunk: k-tiles of drec per shared-memory fill (0: all).
  m.def(
      "_grouped_recurrence_forward_emulated_mma(str cell, Tensor input, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias, Tensor? bias_hh, Tensor? weight_hr, Tensor h0, Tensor? c0, "
      "Tensor? lengths, bool reverse, int units, int tile_rows, int reg_ktiles, int mma_k) -> "
      "(Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor h_states, Tensor aux)");
  m.def(
      "_grouped_recurrence_backward_emulated_mma(str cell, Tensor grad_output, Tensor grad_h_n, "
      "Tensor? grad_c_n, Tensor input, Tensor weight_ih, Tensor weight_hh, Tensor? weight_hr, "
      "Tensor gates, Tensor h_states, Tensor aux, Tensor? lengths, bool reverse, int units, "
      "int tile_rows, int reg_ktiles, int mma_k, int chunk=0) -> "
      "(Tensor grad_input, Tensor grad_weight_ih, Tensor grad_weight_hh, Tensor grad_bias, "
      "Tensor grad_bias_hh, Tensor grad_weight_hr, Tensor grad_h0, Tensor grad_c0)");

  // ---- attention over branches ---------------------------------------------------------------
  // branches (G, M, H), weight (H,), bias (1,) or None.
  // out[m] = sum_g softmax_g(branches[g, m] . weight + bias) * branches[g, m]  -> (M, H)
  // Also returns weights (G, M) (the softmax) and lse (M,) fp32 for the half types (its
  // log-normaliser, for backward).
  m.def(
      "branch_attention_forward(Tensor branches, Tensor weight, Tensor? bias) -> "
      "(Tensor out, Tensor weights, Tensor lse)");
  // grad_weights (G, M) or None: the gradient reaching the returned softmax weights.
  m.def(
      "branch_attention_backward(Tensor grad_out, Tensor? grad_weights, Tensor branches, "
      "Tensor weight, Tensor? bias, Tensor lse) -> "
      "(Tensor grad_branches, Tensor grad_weight, Tensor grad_bias)");
}

namespace mtl_kernels {
namespace {

using AttentionForwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                               const OptTensor&);

// ---- the per-cell ops: CompositeImplicitAutograd over the generic op ---------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias,
    const Tensor& h0, const Tensor& c0, const OptTensor& lengths, bool reverse) {
  return recurrence_forward_op().call("lstm", input, weight_ih, weight_hh, bias, std::nullopt,
                                      std::nullopt, h0, c0, lengths, reverse);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& grad_c_n, const Tensor& input,
    const Tensor& weight_ih, const Tensor& weight_hh, const Tensor& gates, const Tensor& h_states,
    const Tensor& c_states, const OptTensor& lengths, bool reverse) {
  auto [dx, dw_ih, dw_hh, db, db_hh, dw_hr, dh0, dc0] = recurrence_backward_op().call(
      "lstm", grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, std::nullopt, gates,
      h_states, c_states, lengths, reverse, /*input_grad=*/true);
  return {dx, dw_ih, dw_hh, db, dh0, dc0};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gru_forward(
    const Tensor& input, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias_ih,
    const OptTensor& bias_hh, const Tensor& h0, const OptTensor& lengths, bool reverse) {
  auto [out, h_n, c_n, gates, h_states, hn_states] =
      recurrence_forward_op().call("gru", input, weight_ih, weight_hh, bias_ih, bias_hh,
                                   std::nullopt, h0, std::nullopt, lengths, reverse);
  return {out, h_n, gates, h_states, hn_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& input, const Tensor& weight_ih,
    const Tensor& weight_hh, const Tensor& gates, const Tensor& h_states, const Tensor& hn_states,
    const OptTensor& lengths, bool reverse) {
  auto [dx, dw_ih, dw_hh, db, db_hh, dw_hr, dh0, dc0] = recurrence_backward_op().call(
      "gru", grad_output, grad_h_n, std::nullopt, input, weight_ih, weight_hh, std::nullopt, gates,
      h_states, hn_states, lengths, reverse, /*input_grad=*/true);
  return {dx, dw_ih, dw_hh, db, db_hh, dh0};
}

std::string rnn_cell(c10::string_view nonlinearity, const char* op) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu", op,
              ": nonlinearity must be 'tanh' or 'relu', got '", std::string(nonlinearity), "'");
  return nonlinearity == "tanh" ? "rnn_tanh" : "rnn_relu";
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rnn_forward(const Tensor& input, const Tensor& weight_ih,
                                                       const Tensor& weight_hh, const OptTensor& bias,
                                                       const Tensor& h0, const OptTensor& lengths,
                                                       bool reverse, c10::string_view nonlinearity) {
  auto [out, h_n, c_n, gates, h_states, aux] = recurrence_forward_op().call(
      rnn_cell(nonlinearity, "grouped_rnn_forward"), input, weight_ih, weight_hh, bias, std::nullopt,
      std::nullopt, h0, std::nullopt, lengths, reverse);
  return {out, h_n, gates, h_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward(
    const Tensor& grad_output, const Tensor& grad_h_n, const Tensor& input, const Tensor& weight_ih,
    const Tensor& weight_hh, const Tensor& gates, const Tensor& h_states, const OptTensor& lengths,
    bool reverse, c10::string_view nonlinearity) {
  const Tensor no_aux = at::empty({0}, input.options().dtype(acc_dtype(input.scalar_type())));
  auto [dx, dw_ih, dw_hh, db, db_hh, dw_hr, dh0, dc0] = recurrence_backward_op().call(
      rnn_cell(nonlinearity, "grouped_rnn_backward"), grad_output, grad_h_n, std::nullopt, input,
      weight_ih, weight_hh, std::nullopt, gates, h_states, no_aux, lengths, reverse,
      /*input_grad=*/true);
  return {dx, dw_ih, dw_hh, db, dh0};
}

// ---- autocast: compute in the autocast dtype, as nn.LSTM / nn.Linear do -------------------------
// The casts are differentiable ATen ops, so gradients reach fp32 parameters.

// The dtype a recurrence computes in under autocast: the autocast dtype, as nn.LSTM and nn.RNN
// (and every cell on CUDA) do; but nn.GRU on the CPU is not autocast (it stays fp32), so there the
// GRU promotes instead: the widest floating dtype among its input, weights and state (an autocast
// nn.Linear's bf16 output then runs in the fp32 of the weights, where nn.GRU would refuse it).
template <c10::DeviceType kDevice>
at::ScalarType recurrence_autocast_dtype(c10::string_view cell, const Tensor& input,
                                         const Tensor& weight_ih, const Tensor& weight_hh,
                                         const Tensor& h0) {
  if (kDevice == c10::DeviceType::CPU && cell == "gru") {
    at::ScalarType dt = input.scalar_type();
    for (const Tensor* t : {&weight_ih, &weight_hh, &h0})
      if (at::isFloatingType(t->scalar_type())) dt = at::promote_types(dt, t->scalar_type());
    return dt;
  }
  return at::autocast::get_autocast_dtype(kDevice);
}

// The autocast kernel of a recurrence op (kOp: its handle, registration.h): the training forward
// (ForwardResult) or the inference forward (InferenceResult), which take the same arguments.
template <c10::DeviceType kDevice, c10::DispatchKey kKey, auto kOp>
auto recurrence_autocast(c10::string_view cell, const Tensor& input, const Tensor& weight_ih,
                         const Tensor& weight_hh, const OptTensor& bias, const OptTensor& bias_hh,
                         const OptTensor& weight_hr, const Tensor& h0, const OptTensor& c0,
                         const OptTensor& lengths, bool reverse) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  const at::ScalarType dt =
      recurrence_autocast_dtype<kDevice>(cell, input, weight_ih, weight_hh, h0);
  const auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dt, t, kDevice); };
  const auto cast_opt = [&](const OptTensor& t) {
    return t.has_value() ? OptTensor(cast(*t)) : std::nullopt;
  };
  // A b_hh that the op would add to the bias (lstm, rnn) is added here, before the cast, in the
  // parameters' dtype: one rounding to the autocast dtype, as for a bias summed by the caller.
  // Only biases of one shape (no broadcast): others go to the op as they are, which rejects them.
  if (bias.has_value() && bias_hh.has_value() && bias->sizes() == bias_hh->sizes() &&
      folds_bias_hh(parse_cell(std::string(cell)))) {
    return kOp().call(cell, cast(input), cast(weight_ih), cast(weight_hh),
                      OptTensor(cast(*bias + *bias_hh)), std::nullopt, cast_opt(weight_hr),
                      cast(h0), cast_opt(c0), lengths, reverse);
  }
  return kOp().call(cell, cast(input), cast(weight_ih), cast(weight_hh), cast_opt(bias),
                    cast_opt(bias_hh), cast_opt(weight_hr), cast(h0), cast_opt(c0), lengths,
                    reverse);
}

template <c10::DeviceType kDevice, c10::DispatchKey kKey>
std::tuple<Tensor, Tensor, Tensor> attention_forward_autocast(const Tensor& branches,
                                                              const Tensor& weight,
                                                              const OptTensor& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mtl_kernels::branch_attention_forward", "")
                       .typed<AttentionForwardSig>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  const at::ScalarType dt = at::autocast::get_autocast_dtype(kDevice);
  const auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dt, t, kDevice); };
  return op.call(cast(branches), cast(weight),
                 bias.has_value() ? OptTensor(cast(*bias)) : std::nullopt);
}

// ---- the extension module's functions ------------------------------------------------------
// _C.path_counts() -> (forward_sequence, forward_per_step, backward_sequence, backward_per_step)
PyObject* py_path_counts(PyObject*, PyObject*) {
  const PathCounts c = path_counts();
  return Py_BuildValue("(LLLL)", (long long)c.forward_sequence, (long long)c.forward_per_step,
                       (long long)c.backward_sequence, (long long)c.backward_per_step);
}

// _C.set_recurrence_path(name) / _C.set_tensor_cores(name) / _C.set_cpu_tiles(name) -> the
// previous name, and the getters
// (common/setting.h): a ValueError for an invalid name, or on get for an invalid environment
// default; the setter replaces such a default.
template <auto kSetting>
PyObject* py_set_setting(PyObject*, PyObject* args) {
  auto& setting = kSetting();
  const char* name;
  if (!PyArg_ParseTuple(args, "s", &name)) return nullptr;
  decltype(setting.get()) value, old;
  try {
    value = setting.parse(name);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  try {
    old = setting.get();
  } catch (const c10::Error&) {
    old = setting.parse(nullptr);  // an invalid environment value is replaced: report the default
  }
  setting.set(value);
  return PyUnicode_FromString(setting.name(old));
}

template <auto kSetting>
PyObject* py_get_setting(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(kSetting().name(kSetting().get()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// _C.persistent_plan(G, B, H, elem_bytes, backward, num_sms, smem_per_block, smem_per_sm,
//                    max_threads_per_sm, max_threads_per_block, gates=4) -> dict: the persistent
// kernel's plan for these sizes on a device with these limits (what the CUDA path computes;
// testable here). gates: the cell's K (4 lstm, 3 gru, 1 rnn).
PyObject* py_persistent_plan(PyObject*, PyObject* args) {
  long long G, B, H, elem_bytes, sms, smem_block, smem_sm, threads_sm, threads_block, gates = 4;
  int backward;
  if (!PyArg_ParseTuple(args, "LLLLpLLLLL|L", &G, &B, &H, &elem_bytes, &backward, &sms, &smem_block,
                        &smem_sm, &threads_sm, &threads_block, &gates))
    return nullptr;
  if (G < 1 || B < 1 || H < 1 || elem_bytes < 1 || sms < 1 || threads_block < 1 || gates < 1) {
    PyErr_SetString(PyExc_ValueError, "persistent_plan: sizes and limits must be positive");
    return nullptr;
  }
  const PersistentLimits lim{sms, smem_block, smem_sm, threads_sm, threads_block};
  const PersistentPlan p = persistent_plan(gates, G, B, H, elem_bytes, backward != 0, lim);
  return Py_BuildValue(
      "{s:O,s:s,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "fits",
      p.fits ? Py_True : Py_False, "reason", p.reason, "gates", (long long)gates, "units",
      (long long)p.units, "slices", (long long)p.slices, "tile_rows", (long long)p.tile_rows,
      "tiles", (long long)p.tiles, "threads_y", (long long)p.threads_y, "rows_per_thread",
      (long long)p.rows_per_thread, "chunk", (long long)p.chunk, "threads", (long long)p.threads(),
      "smem_bytes", (long long)p.smem_bytes(elem_bytes), "blocks", (long long)p.blocks,
      "blocks_per_sm", (long long)p.blocks_per_sm);
}

// _C.tuned_paths() -> [(key, sequence_seconds, per_step_seconds, chose_sequence)]: the CPU's
// `auto` choices so far; _C._reset_tuned_paths() forgets them (tests).
PyObject* py_tuned_paths(PyObject*, PyObject*) {
  const std::vector<TunedPath> paths = tuned_paths();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(paths.size()));
  for (size_t i = 0; i < paths.size(); ++i)
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i),
                    Py_BuildValue("(sddO)", paths[i].key.c_str(), paths[i].sequence_s,
                                  paths[i].per_step_s, paths[i].sequence ? Py_True : Py_False));
  return list;
}

PyObject* py_reset_tuned_paths(PyObject*, PyObject*) {
  reset_tuned_paths();
  Py_RETURN_NONE;
}

// _C.persistent_mma_plan(G, B, H, elem_bytes, backward, num_sms, smem_per_block, smem_per_sm,
//                        max_threads_per_sm, max_threads_per_block, gates=4, mma_k=16) -> dict:
// the tensor-core variant's plan (persistent_mma.h) for these sizes and limits.
PyObject* py_persistent_mma_plan(PyObject*, PyObject* args) {
  long long G, B, H, elem_bytes, sms, smem_block, smem_sm, threads_sm, threads_block, gates = 4,
                                                                                     mma_k = 16;
  int backward;
  if (!PyArg_ParseTuple(args, "LLLLpLLLLL|LL", &G, &B, &H, &elem_bytes, &backward, &sms,
                        &smem_block, &smem_sm, &threads_sm, &threads_block, &gates, &mma_k))
    return nullptr;
  if (G < 1 || B < 1 || H < 1 || elem_bytes < 1 || sms < 1 || threads_block < 1 || gates < 1 ||
      (mma_k != 8 && mma_k != 16)) {
    PyErr_SetString(PyExc_ValueError,
                    "persistent_mma_plan: sizes and limits must be positive, mma_k 16 or 8");
    return nullptr;
  }
  const PersistentLimits lim{sms, smem_block, smem_sm, threads_sm, threads_block};
  const MmaPlan p = persistent_mma_plan(gates, G, B, H, elem_bytes, mma_k, backward != 0, lim);
  return Py_BuildValue(
      "{s:O,s:s,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "fits",
      p.fits ? Py_True : Py_False, "reason", p.reason, "gates", (long long)gates, "mma_k",
      (long long)p.mma_k, "units", (long long)p.units, "warps", (long long)p.warps, "slices",
      (long long)p.slices, "tile_rows", (long long)p.tile_rows, "tiles", (long long)p.tiles,
      "mtiles", (long long)p.mtiles, "ktiles", (long long)p.ktiles, "reg_ktiles",
      (long long)p.reg_ktiles, "chunk_ktiles", (long long)p.chunk_ktiles, "tile_stride",
      (long long)p.tile_stride, "threads",
      (long long)p.threads(), "smem_bytes", (long long)p.smem_bytes(elem_bytes), "w_smem_bytes",
      (long long)(p.w_smem_elems * elem_bytes), "state_bytes",
      (long long)(p.state_arrays * p.state_elems * 4), "blocks", (long long)p.blocks, "blocks_per_sm",
      (long long)p.blocks_per_sm);
}

// _C.mma_fragment_map(mma_k, operand) -> [(lane, element, row, col)]: which lane holds which
// element of A (16 x kK), B (kK x 8, as (k, n)) or C (16 x 8) of an mma (persistent_mma.h's
// MmaLayout); operand "a", "b", "c", or "ldmatrix": A as the emulated ldmatrix.x4 loads it from a
// tile through the kernels' row addresses (at row 16, column kK of a padded 32 x 3kK tile; the
// coordinates relative to that corner).
PyObject* py_mma_fragment_map(PyObject*, PyObject* args) {
  long long mma_k;
  const char* operand;
  if (!PyArg_ParseTuple(args, "Ls", &mma_k, &operand)) return nullptr;
  const std::string op(operand);
  if ((mma_k != 8 && mma_k != 16) || (op != "a" && op != "b" && op != "c" && op != "ldmatrix")) {
    PyErr_SetString(PyExc_ValueError, "mma_fragment_map: mma_k 16 or 8; operand a, b, c or ldmatrix");
    return nullptr;
  }
  PyObject* out = PyList_New(0);
  auto add = [&](int lane, int e, int r, int c) {
    PyObject* t = Py_BuildValue("(iiii)", lane, e, r, c);
    PyList_Append(out, t);
    Py_DECREF(t);
  };
  auto run = [&](auto layout) {
    using L = decltype(layout);
    for (int lane = 0; lane < 32; ++lane) {
      const int n = op == "b" ? L::kB : op == "c" ? L::kC : L::kA;
      for (int e = 0; e < n; ++e) {
        int r = 0, c = 0;
        if (op == "a") L::a_coord(lane, e, r, c);
        if (op == "b") L::b_coord(lane, e, r, c);
        if (op == "c") L::c_coord(lane, e, r, c);
        if (op != "ldmatrix") add(lane, e, r, c);
      }
    }
    if (op == "ldmatrix") {  // a tile whose element (r, c) holds r * 1000 + c
      const int stride = 3 * L::kK + L::kK / 2;
      std::vector<float> tile(32 * stride);
      for (int r = 0; r < 32; ++r)
        for (int c = 0; c < stride; ++c) tile[r * stride + c] = float(r * 1000 + c);
      Lanes<Frag<float, L::kA>, 32> a;
      HostWarp::load_a<L>(a, tile.data(), stride, 16, L::kK);
      for (int lane = 0; lane < 32; ++lane)
        for (int e = 0; e < L::kA; ++e) {
          const int v = int(a[lane].e[e]);
          add(lane, e, v / 1000 - 16, v % 1000 - L::kK);
        }
    }
  };
  if (mma_k == 16) {
    run(MmaLayout<16>());
  } else {
    run(MmaLayout<8>());
  }
  return out;
}

// _C.tensor_core_counts() -> (forward, backward): persistent launches on the tensor-core variant.
PyObject* py_tensor_core_counts(PyObject*, PyObject*) {
  const TensorCoreCounts c = tensor_core_counts();
  return Py_BuildValue("(LL)", (long long)c.forward, (long long)c.backward);
}

// _C._set_inference_chunk_bytes(n): the inference forward's input-projection chunk (a test hook).
PyObject* py_set_inference_chunk_bytes(PyObject*, PyObject* args) {
  long long n;
  if (!PyArg_ParseTuple(args, "L", &n)) return nullptr;
  set_inference_chunk_bytes(n);
  Py_RETURN_NONE;
}

// _C._cpu_tiles_supported(): whether this CPU runs the register-tiled fp32 products.
PyObject* py_cpu_tiles_supported(PyObject*, PyObject*) {
  return PyBool_FromLong(cpu_tiles::supported());
}

// _C._cpu_tiles_avx512_supported(): whether `auto` runs their AVX-512 variant on this CPU.
PyObject* py_cpu_tiles_avx512_supported(PyObject*, PyObject*) {
  return PyBool_FromLong(cpu_tiles::supported512());
}

// _C.auto_paths() -> {"cpu": ..., "cuda": ...}: what the `auto` recurrence path runs on each
// backend this build has ("tuned": timed per shape; "per_step"; "sequence").
PyObject* py_auto_paths(PyObject*, PyObject*) {
#ifdef MTL_KERNELS_WITH_CUDA
  return Py_BuildValue("{ssss}", "cpu", auto_path_name(cpu_auto_path()), "cuda",
                       auto_path_name(cuda_auto_path()));
#else
  return Py_BuildValue("{ss}", "cpu", auto_path_name(cpu_auto_path()));
#endif
}

// _C.cell_traits() -> {name: (gates, cell_state, aux, rec_bias)} for every cell the ops know, read
// from the cell structs (cells/*.h: kGates, kCellState, kAux, kRecBias), so that the Python side
// (the fake kernels, the torch.func path's b_hh gradient) follows the kernels instead of keeping
// tables of its own.
PyObject* py_cell_traits(PyObject*, PyObject*) {
  PyObject* traits = PyDict_New();
  if (!traits) return nullptr;
  for (const CellKind kind : kAllCellKinds) {
    const bool added = dispatch_cell(kind, [&](auto c) {
      using Cell = decltype(c);
      PyObject* entry =
          Py_BuildValue("(iOOO)", Cell::kGates, Cell::kCellState ? Py_True : Py_False,
                        Cell::kAux ? Py_True : Py_False, Cell::kRecBias ? Py_True : Py_False);
      const bool ok = entry && PyDict_SetItemString(traits, Cell::kName, entry) == 0;
      Py_XDECREF(entry);
      return ok;
    });
    if (!added) {
      Py_DECREF(traits);
      return nullptr;
    }
  }
  return traits;
}

PyMethodDef module_methods[] = {
    {"path_counts", py_path_counts, METH_NOARGS, "recurrences run per path since import"},
    {"set_recurrence_path", py_set_setting<&recurrence_path_setting>, METH_VARARGS,
     "set the recurrence path (auto, sequence, per_step); returns the previous one"},
    {"get_recurrence_path", py_get_setting<&recurrence_path_setting>, METH_NOARGS, "the recurrence path"},
    {"persistent_plan", py_persistent_plan, METH_VARARGS, "the persistent kernel's plan"},
    {"tuned_paths", py_tuned_paths, METH_NOARGS, "the CPU auto path's choices per shape"},
    {"auto_paths", py_auto_paths, METH_NOARGS, "what the auto path runs on each backend"},
    {"_reset_tuned_paths", py_reset_tuned_paths, METH_NOARGS, "forget the CPU auto choices"},
    {"persistent_mma_plan", py_persistent_mma_plan, METH_VARARGS,
     "the persistent kernel's tensor-core plan"},
    {"mma_fragment_map", py_mma_fragment_map, METH_VARARGS,
     "which lane holds which element of an mma fragment"},
    {"set_tensor_cores", py_set_setting<&mma_mode_setting>, METH_VARARGS,
     "the persistent kernel's tensor-core variant: auto or off; returns the previous mode"},
    {"get_tensor_cores", py_get_setting<&mma_mode_setting>, METH_NOARGS, "the tensor-core mode"},
    {"tensor_core_counts", py_tensor_core_counts, METH_NOARGS,
     "persistent launches on the tensor-core variant since import (forward, backward)"},
    {"_set_inference_chunk_bytes", py_set_inference_chunk_bytes, METH_VARARGS,
     "the inference forward's chunk size in bytes (a test hook)"},
    {"set_cpu_tiles", py_set_setting<&cpu_tiles::setting>, METH_VARARGS,
     "the CPU's register-tiled fp32 products: auto, off or avx2; returns the previous mode"},
    {"get_cpu_tiles", py_get_setting<&cpu_tiles::setting>, METH_NOARGS, "the CPU tiles mode"},
    {"cell_traits", py_cell_traits, METH_NOARGS,
     "{cell: (gates, cell_state, aux, rec_bias)} from the C++ cells"},
    {"_cpu_tiles_supported", py_cpu_tiles_supported, METH_NOARGS,
     "whether this CPU runs the register-tiled kernels (AVX2 and FMA)"},
    {"_cpu_tiles_avx512_supported", py_cpu_tiles_avx512_supported, METH_NOARGS,
     "whether the tiles' `auto` runs their AVX-512 variant on this CPU"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CompositeImplicitAutograd, m) {
  m.impl("grouped_lstm_forward", &lstm_forward);
  m.impl("grouped_lstm_backward", &lstm_backward);
  m.impl("grouped_gru_forward", &gru_forward);
  m.impl("grouped_gru_backward", &gru_backward);
  m.impl("grouped_rnn_forward", &rnn_forward);
  m.impl("grouped_rnn_backward", &rnn_backward);
}

TORCH_LIBRARY_IMPL(mtl_kernels, AutocastCPU, m) {
  m.impl("grouped_recurrence_forward",
         &recurrence_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU,
                             &recurrence_forward_op>);
  m.impl("grouped_recurrence",
         &recurrence_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU,
                             &recurrence_op>);
  m.impl("branch_attention_forward",
         &attention_forward_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(mtl_kernels, AutocastCUDA, m) {
  m.impl("grouped_recurrence_forward",
         &recurrence_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA,
                             &recurrence_forward_op>);
  m.impl("grouped_recurrence",
         &recurrence_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA,
                             &recurrence_op>);
  m.impl("branch_attention_forward",
         &attention_forward_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace mtl_kernels

// `import mtl_kernels._C` loads this shared object, which registers the ops above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          mtl_kernels::module_methods};
  return PyModule_Create(&module_def);
}
}
