// The persistent kernel's tensor-core variant on the GPU: the launch of the per-warp work of
// persistent_mma.h (also run on the CPU by persistent_emulate.cpp), for every cell; bf16 and fp16
// on mma.m16n8k16, fp32 on mma.m16n8k8 with TF32 operands where the user allows TF32 for matmuls
// (torch.backends.cuda.matmul.allow_tf32 / torch.set_float32_matmul_precision("high"), read at
// each launch). The barrier, limits and cooperative launch are the FMA variant's
// (cuda_persistent_launch.cuh).
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>

#include "cells/cell.h"
#include "recurrence/cuda_persistent.h"
#include "recurrence/cuda_persistent_launch.cuh"
#include "recurrence/persistent_mma.h"
#include "recurrence/raw_views.h"

namespace mtl_kernels {
namespace {

using persistent_cuda::device_limits;
using persistent_cuda::group_barrier;
using persistent_cuda::launch_persistent;

constexpr int kMmaThreads = 32 * kMmaMaxWarps;

// Dynamic shared memory: the W_hh fragments beyond the registers' k-tiles, the A tile, the fp32
// per-element state (each 16-byte aligned).
template <typename scalar_t>
struct MmaSmem {
  scalar_t* w_s;
  scalar_t* tile;
  float* state;
  __device__ __forceinline__ MmaSmem(unsigned char* smem, const MmaPlan& plan) {
    const int64_t w_bytes = PersistentPlan::align16(plan.w_smem_elems * sizeof(scalar_t));
    const int64_t tile_bytes = PersistentPlan::align16(plan.tile_elems * sizeof(scalar_t));
    w_s = reinterpret_cast<scalar_t*>(smem);
    tile = reinterpret_cast<scalar_t*>(smem + w_bytes);
    state = reinterpret_cast<float*>(smem + w_bytes + tile_bytes);
  }
};

// One block per SM at most (the W_hh fragments take a large part of the register file): up to
// 255 registers per thread.
template <class Cell, int kK, typename scalar_t>
__global__ void __launch_bounds__(kMmaThreads, 1)
    persistent_mma_forward_kernel(const SequenceForward<scalar_t, float> q, const MmaPlan plan,
                                  unsigned int* counters) {
  extern __shared__ __align__(16) unsigned char smem[];
  const MmaSmem<scalar_t> sm(smem, plan);
  const PersistentBlock k = persistent_block(plan, q.B, q.H, blockIdx.x);
  const int tid = int(threadIdx.x), nthreads = int(blockDim.x), warp = tid >> 5;
  unsigned int* counter = counters + k.g * plan.tiles + k.tile;
  const bool alone = plan.slices == 1;

  MmaForwardWarp<Cell, DeviceWarp, kK, scalar_t, float> st;  // W_hh fragments: registers
  mma_forward_init<Cell, DeviceWarp, kK>(q, plan, k, warp, sm.w_s, sm.state, st);
  mma_zero_tile_padding(sm.tile, plan, k, tid, nthreads);
  for (int64_t s = 0; s < q.T; ++s) {
    const int64_t t = forward_time(s, q.T, q.reverse);
    mma_fill_h(sm.tile, q, plan, k, t, tid, nthreads);  // A: h_{t-1} of the tile
    __syncthreads();
    mma_forward_step<Cell, DeviceWarp, kK>(q, plan, k, warp, t, sm.tile, sm.w_s, sm.state, st);
    if (s + 1 < q.T) group_barrier(counter, static_cast<unsigned int>(s + 1) * plan.slices, alone);
  }
}

template <class Cell, int kK, typename scalar_t>
__global__ void __launch_bounds__(kMmaThreads, 1)
    persistent_mma_backward_kernel(const SequenceBackward<scalar_t, float> q, const MmaPlan plan,
                                   unsigned int* counters) {
  extern __shared__ __align__(16) unsigned char smem[];
  const MmaSmem<scalar_t> sm(smem, plan);
  const PersistentBlock k = persistent_block(plan, q.B, q.H, blockIdx.x);
  const int tid = int(threadIdx.x), nthreads = int(blockDim.x), warp = tid >> 5;
  unsigned int* counter = counters + k.g * plan.tiles + k.tile;
  const bool alone = plan.slices == 1;
  const int chunks = int(plan.chunks);

  MmaBackwardWarp<Cell, DeviceWarp, kK, scalar_t, float> st;  // W_hh fragments: registers
  mma_backward_init<Cell, DeviceWarp, kK>(q, plan, k, warp, sm.w_s, sm.state, st);
  mma_zero_tile_padding(sm.tile, plan, k, tid, nthreads);
  for (int64_t s = 0; s <= q.T; ++s) {  // s == T: grad_h0
    if (s > 0) {
      const int64_t t_prev = backward_time(s - 1, q.T, q.reverse);
      for (int c = 0; c < chunks; ++c) {  // A, then the product, a chunk of drec columns at a time
        if (c > 0) __syncthreads();       // every warp is done with the previous chunk
        mma_fill_drec(sm.tile, q, plan, k, t_prev, c, tid, nthreads);
        __syncthreads();
        mma_backward_product<Cell, DeviceWarp, kK>(plan, k, warp, c, sm.tile, sm.w_s, sm.state, st);
      }
    }
    mma_backward_elements<Cell, DeviceWarp, kK>(q, plan, k, warp, s, sm.state);  // B
    if (s < q.T) group_barrier(counter, static_cast<unsigned int>(s + 1) * plan.slices, alone);
  }
}

// Which mma the dtype takes: 16 (bf16, fp16: m16n8k16), 8 (fp32 with TF32 allowed: m16n8k8), or
// 0: none (fp64; fp32 without TF32; the switch off).
int64_t mma_k_for(at::ScalarType dtype) {
  if (mma_mode() == MmaMode::kOff) return 0;
  if (dtype == at::kBFloat16 || dtype == at::kHalf) return 16;
  if (dtype == at::kFloat && at::globalContext().allowTF32CuBLAS()) return 8;
  return 0;
}

template <class Cell, bool kBackward, typename Sequence>
bool run_persistent_mma(const Sequence& s) {
  const at::ScalarType dtype = s.gates.scalar_type();
  const int64_t mma_k = mma_k_for(dtype);
  if (mma_k == 0) return false;
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  if (!props->cooperativeLaunch || props->major < 8) return false;  // mma.sync bf16/tf32: sm_80+
  const int64_t elem_bytes = s.gates.element_size();
  PersistentLimits lim = device_limits(*props);
  for (int attempt = 0; attempt < 3; ++attempt) {
    const MmaPlan plan =
        persistent_mma_plan(Cell::kGates, s.G, s.B, s.H, elem_bytes, mma_k, kBackward, lim);
    if (!plan.fits) return false;
    if ((s.T + 1) * plan.slices >= (int64_t(1) << 31)) return false;  // the 32-bit barrier count
    bool launched = false;
    int resident_per_sm = 0;
    auto launch = [&](auto scalar, auto kk) {
      using scalar_t = decltype(scalar);
      constexpr int kK = decltype(kk)::value;
      if constexpr (kBackward) {
        launched = launch_persistent<&persistent_mma_backward_kernel<Cell, kK, scalar_t>>(
            raw_backward<scalar_t, float>(s), plan, elem_bytes, s.G * plan.tiles,
            s.gates.options(), &resident_per_sm);
      } else {
        launched = launch_persistent<&persistent_mma_forward_kernel<Cell, kK, scalar_t>>(
            raw_forward<scalar_t, float>(s), plan, elem_bytes, s.G * plan.tiles,
            s.gates.options(), &resident_per_sm);
      }
    };
    if (dtype == at::kBFloat16) {
      launch(c10::BFloat16(), std::integral_constant<int, 16>());
    } else if (dtype == at::kHalf) {
      launch(c10::Half(), std::integral_constant<int, 16>());
    } else {
      launch(float(), std::integral_constant<int, 8>());
    }
    if (launched) {
      count_tensor_core_run(kBackward);
      return true;
    }
    if (resident_per_sm < 1 || resident_per_sm >= lim.max_blocks_per_sm) return false;
    lim.max_blocks_per_sm = resident_per_sm;
  }
  return false;
}

}  // namespace

template <class Cell>
bool persistent_mma_forward_cuda(const ForwardSequence& s) {
  return run_persistent_mma<Cell, false>(s);
}

template <class Cell>
bool persistent_mma_backward_cuda(const BackwardSequence& s) {
  return run_persistent_mma<Cell, true>(s);
}

#define MTL_INSTANTIATE_PERSISTENT_MMA(Cell)                                  \
  template bool persistent_mma_forward_cuda<Cell>(const ForwardSequence&); \
  template bool persistent_mma_backward_cuda<Cell>(const BackwardSequence&);
MTL_INSTANTIATE_PERSISTENT_MMA(LstmCell)
MTL_INSTANTIATE_PERSISTENT_MMA(GruCell)
MTL_INSTANTIATE_PERSISTENT_MMA(RnnTanhCell)
MTL_INSTANTIATE_PERSISTENT_MMA(RnnReluCell)

}  // namespace mtl_kernels
