// The persistent recurrence kernels (the GPU's sequence path): all T steps of one layer and
// direction, all G groups, one launch each way, for every cell. The work split, shared-memory
// layouts and per-thread math are in persistent.h (also run on the CPU by persistent_emulate.cpp);
// this file adds the launch (cuda_persistent_launch.cuh: the per-(group, tile) barrier and the
// cooperative launch, shared with the tensor-core variant) and the choice between the two variants
// and the per-step path: the tensor-core variant (cuda_persistent_mma.cu) first, where it applies
// and fits, then this FMA one, then per step.
//
// Co-residency: every block of a (group, tile) waits for the others each step, so all blocks must
// be resident at once. The plan sizes the grid from the device's limits, the occupancy API
// confirms it for the compiled kernel, and the launch is cooperative, which the driver refuses
// (rather than deadlocks) when the grid cannot be co-resident; any refusal means the per-step path.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cells/cell.h"
#include "common/dispatch.h"
#include "recurrence/cuda_persistent.h"
#include "recurrence/cuda_persistent_launch.cuh"
#include "recurrence/persistent.h"
#include "recurrence/raw_views.h"

namespace mtl_kernels {
namespace {

using persistent_cuda::device_limits;
using persistent_cuda::group_barrier;
using persistent_cuda::launch_persistent;

template <typename scalar_t>
__device__ __forceinline__ scalar_t* smem_tile(unsigned char* smem, const PersistentPlan& plan) {
  return reinterpret_cast<scalar_t*>(smem +
                                     PersistentPlan::align16(plan.weight_elems * sizeof(scalar_t)));
}

template <class Cell, int kRows, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPersistentMaxThreads)
    persistent_forward_kernel(const SequenceForward<scalar_t, acc_t> q, const PersistentPlan plan,
                              unsigned int* counters) {
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* w_s = reinterpret_cast<scalar_t*>(smem);  // (H / 4, K, units, 4)
  scalar_t* h_s = smem_tile<scalar_t>(smem, plan);    // (tile_rows, round4(H))
  const PersistentBlock k = persistent_block(plan, q.B, q.H, blockIdx.x);
  const int64_t tx = threadIdx.x, ty = threadIdx.y;
  const int64_t tid = ty * plan.units + tx, nthreads = plan.threads();
  unsigned int* counter = counters + k.g * plan.tiles + k.tile;
  const bool alone = plan.slices == 1;

  persistent_fill_weights_forward<Cell::kGates>(w_s, q.weight_hh, k, plan.units, q.H, tid, nthreads);
  persistent_zero_h_padding(h_s, plan, q.H, tid, nthreads);
  acc_t c[kRows];  // the cell state of the thread's (unit, rows), for the whole sequence
  persistent_forward_init<Cell, kRows>(q, k, plan.threads_y, tx, ty, c);
  for (int64_t s = 0; s < q.T; ++s) {
    const int64_t t = forward_time(s, q.T, q.reverse);
    persistent_fill_h(h_s, q, k, t, tid, nthreads);  // A: h_{t-1} of the tile
    __syncthreads();
    persistent_forward_thread<Cell, kRows>(q, k, plan.units, plan.threads_y, t, w_s, h_s, tx, ty, c);
    if (s + 1 < q.T) group_barrier(counter, static_cast<unsigned int>(s + 1) * plan.slices, alone);
  }
}

template <class Cell, int kRows, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPersistentMaxThreads)
    persistent_backward_kernel(const SequenceBackward<scalar_t, acc_t> q,
                               const PersistentPlan plan, unsigned int* counters) {
  extern __shared__ __align__(16) unsigned char smem[];
  scalar_t* wt_s = reinterpret_cast<scalar_t*>(smem);  // (KH / 4, units, 4)
  scalar_t* dr_s = smem_tile<scalar_t>(smem, plan);    // (tile_rows, round4(chunk))
  const PersistentBlock k = persistent_block(plan, q.B, q.H, blockIdx.x);
  const int64_t tx = threadIdx.x, ty = threadIdx.y;
  const int64_t tid = ty * plan.units + tx, nthreads = plan.threads();
  unsigned int* counter = counters + k.g * plan.tiles + k.tile;
  const bool alone = plan.slices == 1;

  persistent_fill_weights_backward<Cell::kGates>(wt_s, q.weight_hh, k, plan.units, q.H, tid,
                                                 nthreads);
  acc_t dc[kRows], dh_pass[kRows];
  persistent_backward_init<Cell, kRows>(q, k, plan.threads_y, tx, ty, dc, dh_pass);
  const int64_t chunks = (Cell::kGates * q.H + plan.chunk - 1) / plan.chunk;
  for (int64_t s = 0; s <= q.T; ++s) {  // s == T: grad_h0
    acc_t dh[kRows];  // W_hh^T drec of loop step s - 1, for the thread's (unit, rows)
#pragma unroll
    for (int r = 0; r < kRows; ++r) dh[r] = acc_t(0);
    if (s > 0) {
      const int64_t t_prev = backward_time(s - 1, q.T, q.reverse);
      for (int64_t c = 0; c < chunks; ++c) {  // A, a chunk of drec columns at a time
        const int64_t n0 = c * plan.chunk, ncols = chunk_cols(plan, q.H, c);
        persistent_fill_drec(dr_s, q, k, t_prev, n0, ncols, plan.tile_stride(), tid, nthreads);
        __syncthreads();
        persistent_recurrent_grad<kRows>(k, plan.units, plan.threads_y, n0, ncols,
                                         plan.tile_stride(), wt_s, dr_s, tx, ty, dh);
        __syncthreads();  // dr_s is refilled next
      }
    } else {
      __syncthreads();  // the weights fill, before the first use of wt_s at s == 1
    }
    if (s == q.T) {
      persistent_backward_finish<Cell, kRows>(q, k, plan.threads_y, dh, tx, ty, dc, dh_pass);
      break;
    }
    persistent_backward_thread<Cell, kRows>(q, k, plan.threads_y, backward_time(s, q.T, q.reverse),
                                            dh, tx, ty, dc, dh_pass);  // B
    group_barrier(counter, static_cast<unsigned int>(s + 1) * plan.slices, alone);
  }
}

// Plans and launches one direction of the recurrence; false when the per-step path must run.
template <class Cell, bool kBackward, typename Sequence>
bool run_persistent(const Sequence& s) {
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  if (!props->cooperativeLaunch) return false;
  const int64_t elem_bytes = s.gates.element_size();
  PersistentLimits lim = device_limits(*props);
  // The planner estimates blocks per SM from shared memory and threads; the compiled kernel's
  // registers may allow fewer. Then plan again under what the occupancy API reported.
  for (int attempt = 0; attempt < 3; ++attempt) {
    const PersistentPlan plan =
        persistent_plan(Cell::kGates, s.G, s.B, s.H, elem_bytes, kBackward, lim);
    if (!plan.fits) return false;
    // The barrier counts arrivals in 32 bits: (T + 1) * slices of them per (group, tile).
    if ((s.T + 1) * plan.slices >= (int64_t(1) << 31)) return false;
    bool launched = false;
    int resident_per_sm = 0;
    MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_recurrence_persistent", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      static_switch_at_least<1, 2, 4, 8>(plan.rows_per_thread, [&](auto rows) {
        constexpr int kRows = decltype(rows)::value;
        if constexpr (kBackward) {
          launched = launch_persistent<&persistent_backward_kernel<Cell, kRows, scalar_t, acc_t>>(
              raw_backward<scalar_t>(s), plan, elem_bytes, s.G * plan.tiles, s.gates.options(),
              &resident_per_sm);
        } else {
          launched = launch_persistent<&persistent_forward_kernel<Cell, kRows, scalar_t, acc_t>>(
              raw_forward<scalar_t>(s), plan, elem_bytes, s.G * plan.tiles, s.gates.options(),
              &resident_per_sm);
        }
      });
    });
    if (launched) return true;
    if (resident_per_sm < 1 || resident_per_sm >= lim.max_blocks_per_sm) return false;
    lim.max_blocks_per_sm = resident_per_sm;
  }
  return false;
}

}  // namespace

template <class Cell>
bool persistent_forward_cuda(const ForwardSequence& s) {
  if (recurrence_path() == RecurrencePath::kPerStep) return false;
  return persistent_mma_forward_cuda<Cell>(s) || run_persistent<Cell, false>(s);
}

template <class Cell>
bool persistent_backward_cuda(const BackwardSequence& s) {
  if (recurrence_path() == RecurrencePath::kPerStep) return false;
  return persistent_mma_backward_cuda<Cell>(s) || run_persistent<Cell, true>(s);
}

#define MTL_INSTANTIATE_PERSISTENT(Cell)                                  \
  template bool persistent_forward_cuda<Cell>(const ForwardSequence&); \
  template bool persistent_backward_cuda<Cell>(const BackwardSequence&);
MTL_INSTANTIATE_PERSISTENT(LstmCell)
MTL_INSTANTIATE_PERSISTENT(GruCell)
MTL_INSTANTIATE_PERSISTENT(RnnTanhCell)
MTL_INSTANTIATE_PERSISTENT(RnnReluCell)

}  // namespace mtl_kernels
