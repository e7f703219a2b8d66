// What both persistent kernels (the FMA variant, cuda_persistent.cu; the tensor-core variant,
// cuda_persistent_mma.cu) share on the GPU: the per-(group, tile) barrier, the device limits and
// the cooperative launch after an occupancy check.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <atomic>

#include "recurrence/persistent.h"

namespace mtl_kernels {
namespace persistent_cuda {

// Barrier among the `slices` blocks of one (group, tile): a monotonically increasing arrival
// counter per (group, tile), zeroed before the launch; step s waits for (s + 1) * slices arrivals.
// The fence before the arrival publishes this block's writes (h_t or drec_t; __syncthreads first
// gathers them from all its threads); readers then load them with ld.cg (load_shared_state).
__device__ __forceinline__ void group_barrier(unsigned int* counter, unsigned int target,
                                              bool alone) {
  __syncthreads();
  if (alone) return;  // one slice: the block has all of its group's hidden units
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    __threadfence();
    atomicAdd(counter, 1u);
    unsigned int seen;
    do {  // a generic-address acquire load (counter is a generic pointer)
      asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen < target);
    __threadfence();
  }
  __syncthreads();
}

inline PersistentLimits device_limits(const cudaDeviceProp& p) {
  PersistentLimits lim{p.multiProcessorCount, static_cast<int64_t>(p.sharedMemPerBlockOptin),
                       static_cast<int64_t>(p.sharedMemPerMultiprocessor),
                       p.maxThreadsPerMultiProcessor, p.maxThreadsPerBlock};
  lim.regs_per_sm = p.regsPerMultiprocessor;
  return lim;
}

// Launches `kernel` cooperatively over the plan's grid (blockDim (plan.block_x(), plan.block_y()),
// plan.smem_bytes() of dynamic shared memory). Returns false, launching nothing, when the compiled
// kernel cannot have every block resident at once; *resident_per_sm then says how many blocks per
// SM it can have (its registers may allow fewer than the plan's estimate).
// kKernel is a template argument so that `configured` below is per kernel instance.
template <auto kKernel, typename Params, typename Plan>
bool launch_persistent(const Params& q, const Plan& plan, int64_t elem_bytes,
                       int64_t counters_count, const at::TensorOptions& opts,
                       int* resident_per_sm) {
  void (*kernel)(Params, Plan, unsigned int*) = kKernel;
  const int64_t smem = plan.smem_bytes(elem_bytes);
  // Allow the device's whole opt-in shared memory once per kernel instance and device (without it
  // a launch above 48 KB fails), so that no attribute call happens while a CUDA graph is being
  // captured (after the usual warm-up).
  static std::atomic<bool> configured[64] = {};  // host threads may launch concurrently
  const int device = at::cuda::current_device();
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  if (device >= 64 || !configured[device].load()) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(props->sharedMemPerBlockOptin)));
    if (device < 64) configured[device].store(true);
  }
  const int threads = static_cast<int>(plan.block_x() * plan.block_y());
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(resident_per_sm, kernel, threads,
                                                               static_cast<size_t>(smem)));
  if (int64_t(*resident_per_sm) * props->multiProcessorCount < plan.blocks) return false;

  at::Tensor counters = at::zeros({counters_count}, opts.dtype(at::kInt));
  unsigned int* counters_ptr = reinterpret_cast<unsigned int*>(counters.data_ptr<int>());
  Params q_arg = q;
  Plan plan_arg = plan;
  void* args[] = {&q_arg, &plan_arg, &counters_ptr};
  const cudaError_t err = cudaLaunchCooperativeKernel(
      reinterpret_cast<void*>(kernel), dim3(static_cast<unsigned int>(plan.blocks)),
      dim3(static_cast<unsigned int>(plan.block_x()), static_cast<unsigned int>(plan.block_y())),
      args, static_cast<size_t>(smem), at::cuda::getCurrentCUDAStream());
  if (err == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clear it: the per-step path runs instead
    *resident_per_sm = 0;
    return false;
  }
  C10_CUDA_CHECK(err);
  return true;
}

}  // namespace persistent_cuda
}  // namespace mtl_kernels
