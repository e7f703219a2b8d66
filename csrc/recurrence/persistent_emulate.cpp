// The persistent kernel's work, run on the CPU: every block and thread of a plan, in order, through
// the same host+device functions the CUDA kernel calls (persistent.h), for any cell. The tiling,
// the shared-memory layouts, the index math, the register state and the dot products are thereby
// tested without a GPU; only the launch and the inter-block barrier are CUDA's alone.
//
// Order: for each loop step, for each block: phase A for all its threads, then phase B for all its
// threads. This is one order the barrier allows: within a step, a block's phase B writes (h_t /
// drec_t) never overlap another block's phase A reads (h_{t-1} / drec_{t+1}).
//
// The tensor-core variant (persistent_mma.h) likewise: every warp of its plan through the same
// per-warp functions, with HostWarp holding all 32 lanes' fragment registers and computing each
// ldmatrix and mma from them per the PTX ISA's fragment layouts (fp32 sums of the bf16 / fp16 /
// TF32-rounded operands; fp64 runs exactly, in either layout, to check the tiling and the mapping
// to fp64 rounding). Its shared memory starts NaN-filled, so a padding element it failed to zero
// shows up.
//
// Test hooks, registered as mtl_kernels::_grouped_recurrence_{forward,backward}_emulated and
// _grouped_recurrence_{forward,backward}_emulated_mma (CPU), with the tiling as arguments so that
// tests can sweep tile edges.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

#include "cells/cell.h"
#include "common/dispatch.h"
#include "recurrence/driver.h"
#include "recurrence/persistent.h"
#include "recurrence/persistent_mma.h"
#include "recurrence/raw_views.h"
#include "recurrence/registration.h"

namespace mtl_kernels {
namespace {

struct Tiling {
  int64_t units, tile_rows, threads_y, chunk;
  int64_t reg_ktiles = -1, mma_k = 0;  // the tensor-core variant's (mma_k 0: the FMA variant)
  int64_t chunk_ktiles = 0;
};
thread_local Tiling g_tiling;  // the tiling of the emulated op being run

PersistentPlan checked_plan(int64_t K, int64_t G, int64_t B, int64_t H, bool backward) {
  const int64_t chunk = g_tiling.chunk == 0 ? K * H : g_tiling.chunk;
  const PersistentPlan plan = persistent_plan_from_tiles(
      K, G, B, H, backward, g_tiling.units, g_tiling.tile_rows, g_tiling.threads_y, chunk);
  TORCH_CHECK(plan.fits, "persistent emulation: invalid tiling units=", g_tiling.units,
              " tile_rows=", g_tiling.tile_rows, " threads_y=", g_tiling.threads_y,
              " chunk=", g_tiling.chunk, " for B=", B, ", H=", H,
              " (need 1 <= units <= H, 1 <= threads_y <= tile_rows <= B, at most ",
              kPersistentMaxRows, " rows per thread, and 0 <= chunk <= ", K, "H)");
  return plan;
}

// What the emulated shared memory holds before the kernel writes it: NaN, so that an element read
// before it was written (a padding element not zeroed) shows up in the results.
template <typename scalar_t>
std::vector<scalar_t> poisoned(int64_t n) {
  return std::vector<scalar_t>(std::max<int64_t>(n, 1), std::numeric_limits<scalar_t>::quiet_NaN());
}

template <int kRows, typename acc_t>
struct Registers {
  acc_t a[kRows];
  acc_t b[kRows];
  acc_t c[kRows];
};

template <class Cell, int kRows, typename scalar_t, typename acc_t>
void emulate_forward(const SequenceForward<scalar_t, acc_t>& q, const PersistentPlan& plan) {
  constexpr int K = Cell::kGates;
  const int64_t nthreads = plan.threads(), units = plan.units, ty_n = plan.threads_y;
  std::vector<scalar_t> w_s = poisoned<scalar_t>(plan.blocks * plan.weight_elems);
  std::vector<scalar_t> h_s = poisoned<scalar_t>(plan.blocks * plan.tile_elems);
  std::vector<Registers<kRows, acc_t>> regs(plan.blocks * nthreads);  // .a = the carried aux
  auto block = [&](int64_t b) { return persistent_block(plan, q.B, q.H, b); };
  for (int64_t b = 0; b < plan.blocks; ++b) {  // kernel start
    const PersistentBlock k = block(b);
    for (int64_t tid = 0; tid < nthreads; ++tid)
      persistent_fill_weights_forward<K>(&w_s[b * plan.weight_elems], q.weight_hh, k, units, q.H,
                                         tid, nthreads);
    for (int64_t tid = 0; tid < nthreads; ++tid)
      persistent_zero_h_padding(&h_s[b * plan.tile_elems], plan, q.H, tid, nthreads);
    for (int64_t tid = 0; tid < nthreads; ++tid)
      persistent_forward_init<Cell, kRows>(q, k, ty_n, tid % units, tid / units,
                                           regs[b * nthreads + tid].a);
  }
  for (int64_t s = 0; s < q.T; ++s) {
    const int64_t t = forward_time(s, q.T, q.reverse);
    for (int64_t b = 0; b < plan.blocks; ++b) {
      const PersistentBlock k = block(b);
      scalar_t* tile = &h_s[b * plan.tile_elems];
      for (int64_t tid = 0; tid < nthreads; ++tid) persistent_fill_h(tile, q, k, t, tid, nthreads);
      for (int64_t tid = 0; tid < nthreads; ++tid)
        persistent_forward_thread<Cell, kRows>(q, k, units, ty_n, t, &w_s[b * plan.weight_elems],
                                               tile, tid % units, tid / units,
                                               regs[b * nthreads + tid].a);
    }
  }
}

template <class Cell, int kRows, typename scalar_t, typename acc_t>
void emulate_backward(const SequenceBackward<scalar_t, acc_t>& q, const PersistentPlan& plan) {
  constexpr int K = Cell::kGates;
  const int64_t nthreads = plan.threads(), units = plan.units, ty_n = plan.threads_y;
  std::vector<scalar_t> w_s = poisoned<scalar_t>(plan.blocks * plan.weight_elems);
  std::vector<scalar_t> dr_s = poisoned<scalar_t>(plan.blocks * plan.tile_elems);
  std::vector<Registers<kRows, acc_t>> regs(plan.blocks * nthreads);  // .a = dc, .b = dh_pass
  auto block = [&](int64_t b) { return persistent_block(plan, q.B, q.H, b); };
  for (int64_t b = 0; b < plan.blocks; ++b) {
    const PersistentBlock k = block(b);
    for (int64_t tid = 0; tid < nthreads; ++tid)
      persistent_fill_weights_backward<K>(&w_s[b * plan.weight_elems], q.weight_hh, k, units, q.H,
                                          tid, nthreads);
    for (int64_t tid = 0; tid < nthreads; ++tid) {
      auto& r = regs[b * nthreads + tid];
      persistent_backward_init<Cell, kRows>(q, k, ty_n, tid % units, tid / units, r.a, r.b);
    }
  }
  const int64_t chunks = ceil_div(K * q.H, plan.chunk);
  for (int64_t s = 0; s <= q.T; ++s) {  // s == T: the grad_h0 pass
    for (int64_t b = 0; b < plan.blocks; ++b) {
      const PersistentBlock k = block(b);
      scalar_t* tile = &dr_s[b * plan.tile_elems];
      const scalar_t* w = &w_s[b * plan.weight_elems];
      for (int64_t tid = 0; tid < nthreads; ++tid)  // .c = dh, W_hh^T drec of step s - 1
        for (int r = 0; r < kRows; ++r) regs[b * nthreads + tid].c[r] = acc_t(0);
      if (s > 0) {
        const int64_t t_prev = backward_time(s - 1, q.T, q.reverse);
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t n0 = c * plan.chunk, ncols = chunk_cols(plan, q.H, c);
          for (int64_t tid = 0; tid < nthreads; ++tid)
            persistent_fill_drec(tile, q, k, t_prev, n0, ncols, plan.tile_stride(), tid, nthreads);
          for (int64_t tid = 0; tid < nthreads; ++tid)
            persistent_recurrent_grad<kRows>(k, units, ty_n, n0, ncols, plan.tile_stride(), w, tile,
                                             tid % units, tid / units, regs[b * nthreads + tid].c);
        }
      }
      for (int64_t tid = 0; tid < nthreads; ++tid) {
        auto& r = regs[b * nthreads + tid];
        if (s < q.T) {
          persistent_backward_thread<Cell, kRows>(q, k, ty_n, backward_time(s, q.T, q.reverse), r.c,
                                                  tid % units, tid / units, r.a, r.b);
        } else {
          persistent_backward_finish<Cell, kRows>(q, k, ty_n, r.c, tid % units, tid / units, r.a,
                                                  r.b);
        }
      }
    }
  }
}

// ---- the tensor-core variant -------------------------------------------------------------------

MmaPlan checked_mma_plan(int64_t K, int64_t G, int64_t B, int64_t H, bool backward) {
  const MmaPlan plan = persistent_mma_plan_from_tiles(K, G, B, H, backward, g_tiling.units,
                                                      g_tiling.tile_rows, g_tiling.reg_ktiles,
                                                      g_tiling.mma_k, g_tiling.chunk_ktiles);
  TORCH_CHECK(plan.fits, "persistent mma emulation: invalid tiling units=", g_tiling.units,
              " tile_rows=", g_tiling.tile_rows, " reg_ktiles=", g_tiling.reg_ktiles,
              " mma_k=", g_tiling.mma_k, " for B=", B, ", H=", H, " (need 1 <= units <= min(H, ",
              8 * kMmaMaxWarps, "), 1 <= tile_rows <= min(B, ", 16 * kMmaMaxMTiles,
              "), reg_ktiles < 0 or at most the k-tiles the registers hold, mma_k 16 or 8)");
  (void)G;
  return plan;
}

template <class Cell, int kK, typename scalar_t, typename acc_t>
void emulate_mma_forward(const SequenceForward<scalar_t, acc_t>& q, const MmaPlan& plan) {
  using Warp = MmaForwardWarp<Cell, HostWarp, kK, scalar_t, acc_t>;
  const int warps = int(plan.warps), nthreads = int(plan.threads());
  const int64_t w_n = std::max<int64_t>(plan.w_smem_elems, 1), s_n = plan.state_elems;
  std::vector<scalar_t> w_s = poisoned<scalar_t>(plan.blocks * w_n);
  std::vector<scalar_t> tiles = poisoned<scalar_t>(plan.blocks * plan.tile_elems);
  std::vector<acc_t> state = poisoned<acc_t>(plan.blocks * s_n);
  std::vector<Warp> regs(plan.blocks * warps);
  auto block = [&](int64_t b) { return persistent_block(plan, q.B, q.H, b); };
  for (int64_t b = 0; b < plan.blocks; ++b) {  // kernel start
    const PersistentBlock k = block(b);
    for (int w = 0; w < warps; ++w)
      mma_forward_init<Cell, HostWarp, kK>(q, plan, k, w, &w_s[b * w_n], &state[b * s_n],
                                           regs[b * warps + w]);
    for (int tid = 0; tid < nthreads; ++tid)
      mma_zero_tile_padding(&tiles[b * plan.tile_elems], plan, k, tid, nthreads);
  }
  for (int64_t s = 0; s < q.T; ++s) {
    const int64_t t = forward_time(s, q.T, q.reverse);
    for (int64_t b = 0; b < plan.blocks; ++b) {
      const PersistentBlock k = block(b);
      scalar_t* tile = &tiles[b * plan.tile_elems];
      for (int tid = 0; tid < nthreads; ++tid) mma_fill_h(tile, q, plan, k, t, tid, nthreads);
      for (int w = 0; w < warps; ++w)
        mma_forward_step<Cell, HostWarp, kK>(q, plan, k, w, t, tile, &w_s[b * w_n],
                                             &state[b * s_n], regs[b * warps + w]);
    }
  }
}

template <class Cell, int kK, typename scalar_t, typename acc_t>
void emulate_mma_backward(const SequenceBackward<scalar_t, acc_t>& q, const MmaPlan& plan) {
  using Warp = MmaBackwardWarp<Cell, HostWarp, kK, scalar_t, acc_t>;
  const int warps = int(plan.warps), nthreads = int(plan.threads());
  const int64_t w_n = std::max<int64_t>(plan.w_smem_elems, 1);
  const int64_t s_n = plan.state_arrays * plan.state_elems;
  std::vector<scalar_t> w_s = poisoned<scalar_t>(plan.blocks * w_n);
  std::vector<scalar_t> tiles = poisoned<scalar_t>(plan.blocks * plan.tile_elems);
  std::vector<acc_t> state = poisoned<acc_t>(plan.blocks * s_n);
  std::vector<Warp> regs(plan.blocks * warps);
  auto block = [&](int64_t b) { return persistent_block(plan, q.B, q.H, b); };
  for (int64_t b = 0; b < plan.blocks; ++b) {
    const PersistentBlock k = block(b);
    for (int w = 0; w < warps; ++w)
      mma_backward_init<Cell, HostWarp, kK>(q, plan, k, w, &w_s[b * w_n], &state[b * s_n],
                                            regs[b * warps + w]);
    for (int tid = 0; tid < nthreads; ++tid)
      mma_zero_tile_padding(&tiles[b * plan.tile_elems], plan, k, tid, nthreads);
  }
  for (int64_t s = 0; s <= q.T; ++s) {  // s == T: grad_h0
    for (int64_t b = 0; b < plan.blocks; ++b) {
      const PersistentBlock k = block(b);
      scalar_t* tile = &tiles[b * plan.tile_elems];
      acc_t* st = &state[b * s_n];
      if (s > 0) {
        const int64_t t_prev = backward_time(s - 1, q.T, q.reverse);
        for (int c = 0; c < int(plan.chunks); ++c) {
          for (int tid = 0; tid < nthreads; ++tid)
            mma_fill_drec(tile, q, plan, k, t_prev, c, tid, nthreads);
          for (int w = 0; w < warps; ++w)
            mma_backward_product<Cell, HostWarp, kK>(plan, k, w, c, tile, &w_s[b * w_n], st,
                                                     regs[b * warps + w]);
        }
      }
      for (int w = 0; w < warps; ++w)
        mma_backward_elements<Cell, HostWarp, kK>(q, plan, k, w, s, st);
    }
  }
}

// The layouts each dtype takes: bf16 / fp16 m16n8k16, fp32 m16n8k8 (TF32), fp64 either (exact).
template <typename scalar_t, typename F>
void with_mma_k(int64_t mma_k, const char* op, const F& f) {
  constexpr bool k16 = !std::is_same<scalar_t, float>::value;
  constexpr bool k8 = std::is_same<scalar_t, float>::value || std::is_same<scalar_t, double>::value;
  if constexpr (k16) {
    if (mma_k == 16) return f(std::integral_constant<int, 16>());
  }
  if constexpr (k8) {
    if (mma_k == 8) return f(std::integral_constant<int, 8>());
  }
  TORCH_CHECK(false, op, ": mma_k=", mma_k, " does not apply to this dtype (bfloat16 / float16: 16;"
              " float32: 8, TF32; float64: 16 or 8, exact)");
}

template <class Cell>
bool emulate_mma_forward_sequence(const ForwardSequence& s) {
  const MmaPlan plan = checked_mma_plan(Cell::kGates, s.G, s.B, s.H, false);
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_recurrence_forward_emulated_mma", [&] {
    const auto q = raw_forward<scalar_t>(s);
    with_mma_k<scalar_t>(plan.mma_k, "grouped_recurrence_forward_emulated_mma", [&](auto kk) {
      emulate_mma_forward<Cell, decltype(kk)::value>(q, plan);
    });
  });
  return true;
}

template <class Cell>
bool emulate_mma_backward_sequence(const BackwardSequence& s) {
  const MmaPlan plan = checked_mma_plan(Cell::kGates, s.G, s.B, s.H, true);
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_recurrence_backward_emulated_mma", [&] {
    const auto q = raw_backward<scalar_t>(s);
    with_mma_k<scalar_t>(plan.mma_k, "grouped_recurrence_backward_emulated_mma", [&](auto kk) {
      emulate_mma_backward<Cell, decltype(kk)::value>(q, plan);
    });
  });
  return true;
}

template <class Cell>
constexpr RecurrenceKernels kEmulatedMmaKernels{nullptr, nullptr, &emulate_mma_forward_sequence<Cell>,
                                                &emulate_mma_backward_sequence<Cell>,
                                                AutoPath::kSequence};  // it has no per-step kernels

template <class Cell>
bool emulate_forward_sequence(const ForwardSequence& s) {
  const PersistentPlan plan = checked_plan(Cell::kGates, s.G, s.B, s.H, false);
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_recurrence_forward_emulated", [&] {
    const auto q = raw_forward<scalar_t>(s);
    static_switch_at_least<1, 2, 4, 8>(plan.rows_per_thread, [&](auto rows) {
      emulate_forward<Cell, decltype(rows)::value>(q, plan);
    });
  });
  return true;
}

template <class Cell>
bool emulate_backward_sequence(const BackwardSequence& s) {
  const PersistentPlan plan = checked_plan(Cell::kGates, s.G, s.B, s.H, true);
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_recurrence_backward_emulated", [&] {
    const auto q = raw_backward<scalar_t>(s);
    static_switch_at_least<1, 2, 4, 8>(plan.rows_per_thread, [&](auto rows) {
      emulate_backward<Cell, decltype(rows)::value>(q, plan);
    });
  });
  return true;
}

template <class Cell>
constexpr RecurrenceKernels kEmulatedKernels{nullptr, nullptr, &emulate_forward_sequence<Cell>,
                                             &emulate_backward_sequence<Cell>,
                                             AutoPath::kSequence};  // it has no per-step kernels

}  // namespace

ForwardResult grouped_recurrence_forward_emulated(const std::string& cell, const ForwardArgs& args,
                                                  int64_t units, int64_t tile_rows,
                                                  int64_t threads_y) {
  g_tiling = {units, tile_rows, threads_y, 0};
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_forward<Cell>(args, kEmulatedKernels<Cell>);
  });
}

BackwardResult grouped_recurrence_backward_emulated(const std::string& cell, const BackwardArgs& args,
                                                    int64_t units, int64_t tile_rows,
                                                    int64_t threads_y, int64_t chunk) {
  g_tiling = {units, tile_rows, threads_y, chunk};
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_backward<Cell>(args, kEmulatedKernels<Cell>);
  });
}

ForwardResult grouped_recurrence_forward_emulated_mma(const std::string& cell,
                                                      const ForwardArgs& args, int64_t units,
                                                      int64_t tile_rows, int64_t reg_ktiles,
                                                      int64_t mma_k) {
  g_tiling = {units, tile_rows, 1, 0, reg_ktiles, mma_k, 0};
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_forward<Cell>(args, kEmulatedMmaKernels<Cell>);
  });
}

BackwardResult grouped_recurrence_backward_emulated_mma(const std::string& cell,
                                                        const BackwardArgs& args, int64_t units,
                                                        int64_t tile_rows, int64_t reg_ktiles,
                                                        int64_t mma_k, int64_t chunk_ktiles) {
  g_tiling = {units, tile_rows, 1, 0, reg_ktiles, mma_k, chunk_ktiles};
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_backward<Cell>(args, kEmulatedMmaKernels<Cell>);
  });
}

namespace {

ForwardResult forward_emulated_op(c10::string_view cell, const at::Tensor& input,
                                  const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                  const OptTensor& bias, const OptTensor& bias_hh,
                                  const OptTensor& weight_hr, const at::Tensor& h0,
                                  const OptTensor& c0, const OptTensor& lengths, bool reverse,
                                  int64_t units, int64_t tile_rows, int64_t threads_y) {
  return grouped_recurrence_forward_emulated(
      std::string(cell),
      ForwardArgs{input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths, reverse},
      units, tile_rows, threads_y);
}

BackwardResult backward_emulated_op(c10::string_view cell, const at::Tensor& grad_output,
                                    const at::Tensor& grad_h_n, const OptTensor& grad_c_n,
                                    const at::Tensor& input, const at::Tensor& weight_ih,
                                    const at::Tensor& weight_hh, const OptTensor& weight_hr,
                                    const at::Tensor& gates, const at::Tensor& h_states,
                                    const at::Tensor& aux, const OptTensor& lengths, bool reverse,
                                    int64_t units, int64_t tile_rows, int64_t threads_y,
                                    int64_t chunk) {
  return grouped_recurrence_backward_emulated(
      std::string(cell),
      BackwardArgs{grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, gates,
                   h_states, aux, lengths, reverse},
      units, tile_rows, threads_y, chunk);
}

ForwardResult forward_emulated_mma_op(c10::string_view cell, const at::Tensor& input,
                                      const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                                      const OptTensor& bias, const OptTensor& bias_hh,
                                      const OptTensor& weight_hr, const at::Tensor& h0,
                                      const OptTensor& c0, const OptTensor& lengths, bool reverse,
                                      int64_t units, int64_t tile_rows, int64_t reg_ktiles,
                                      int64_t mma_k) {
  return grouped_recurrence_forward_emulated_mma(
      std::string(cell),
      ForwardArgs{input, weight_ih, weight_hh, bias, bias_hh, weight_hr, h0, c0, lengths, reverse},
      units, tile_rows, reg_ktiles, mma_k);
}

BackwardResult backward_emulated_mma_op(c10::string_view cell, const at::Tensor& grad_output,
                                        const at::Tensor& grad_h_n, const OptTensor& grad_c_n,
                                        const at::Tensor& input, const at::Tensor& weight_ih,
                                        const at::Tensor& weight_hh, const OptTensor& weight_hr,
                                        const at::Tensor& gates, const at::Tensor& h_states,
                                        const at::Tensor& aux, const OptTensor& lengths,
                                        bool reverse, int64_t units, int64_t tile_rows,
                                        int64_t reg_ktiles, int64_t mma_k, int64_t chunk_ktiles) {
  return grouped_recurrence_backward_emulated_mma(
      std::string(cell),
      BackwardArgs{grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh, weight_hr, gates,
                   h_states, aux, lengths, reverse},
      units, tile_rows, reg_ktiles, mma_k, chunk_ktiles);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CPU, m) {
  m.impl("_grouped_recurrence_forward_emulated", &forward_emulated_op);
  m.impl("_grouped_recurrence_backward_emulated", &backward_emulated_op);
  m.impl("_grouped_recurrence_forward_emulated_mma", &forward_emulated_mma_op);
  m.impl("_grouped_recurrence_backward_emulated_mma", &backward_emulated_mma_op);
}

}  // namespace mtl_kernels
