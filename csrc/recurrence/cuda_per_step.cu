// CUDA kernels of the per-step path, for every cell, and the CUDA registration of the recurrence
// ops. The unit math and the row pointers live in recurrence/step.h and sequence.h (shared with
// the CPU kernels); this file only maps threads to (g, b, j) elements and launches on the current
// stream. The sequence path is the persistent kernel (cuda_persistent.cu).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cells/cell.h"
#include "common/dispatch.h"
#include "recurrence/cuda_persistent.h"
#include "recurrence/driver.h"
#include "recurrence/raw_views.h"
#include "recurrence/registration.h"
#include "recurrence/step.h"

namespace mtl_kernels {
namespace {

constexpr int kThreads = 256;

// One thread per (g, b, j); j fastest, so a warp touches consecutive hidden units (coalesced).
// hproj: (G, B, KH), h_{t-1} W_hh^T of this step.
template <class Cell, typename scalar_t, typename acc_t>
__global__ void forward_step_kernel(const SequenceForward<scalar_t, acc_t> q,
                                    const scalar_t* __restrict__ hproj, int64_t t) {
  constexpr int K = Cell::kGates;
  const int64_t H = q.H, total = q.G * q.B * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % H, rw = idx / H;
    const auto r = forward_row(q, K, t, rw / q.B, rw % q.B);
    acc_t rec[K];
#pragma unroll
    for (int k = 0; k < K; ++k) rec[k] = acc_t(hproj[rw * K * H + k * H + j]);
    const acc_t c_prev = Cell::kCellState ? r.aux_prev[j] : acc_t(0);
    forward_element<Cell>(r, j, H, rec, acc_t(r.h_prev[j]), c_prev);
  }
}

// dh_in, dh_pass: (G, B, H); dc: (G, B, H) acc_t (cell-state cells) or nullptr.
template <class Cell, typename scalar_t, typename acc_t>
__global__ void backward_step_kernel(const SequenceBackward<scalar_t, acc_t> q,
                                     const scalar_t* __restrict__ dh_in,
                                     scalar_t* __restrict__ dh_pass, acc_t* __restrict__ dc,
                                     int64_t t) {
  const int64_t H = q.H, total = q.G * q.B * H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % H, rw = idx / H;
    acc_t daux = Cell::kCellState ? dc[idx] : acc_t(0), pass;
    backward_element<Cell>(backward_row(q, t, rw / q.B, rw % q.B), j, H, acc_t(dh_in[idx]), daux,
                           pass);
    if constexpr (Cell::kCellState) dc[idx] = daux;
    dh_pass[idx] = scalar_t(pass);
  }
}

int blocks_for(int64_t total) {
  const int64_t max_blocks =
      int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return int(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks)));
}

template <class Cell>
void forward_step_cuda(const ForwardSequence& s, const at::Tensor& hproj, int64_t t) {
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_recurrence_forward_cuda", [&] {
    const auto q = raw_forward<scalar_t>(s);
    forward_step_kernel<Cell><<<blocks_for(q.G * q.B * q.H), kThreads, 0,
                                at::cuda::getCurrentCUDAStream()>>>(q, hproj.data_ptr<scalar_t>(), t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <class Cell>
void backward_step_cuda(const BackwardSequence& s, const at::Tensor& dh_in, const at::Tensor& dh_pass,
                        const at::Tensor& dc, int64_t t) {
  MTL_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "grouped_recurrence_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto q = raw_backward<scalar_t>(s);
    backward_step_kernel<Cell><<<blocks_for(q.G * q.B * q.H), kThreads, 0,
                                 at::cuda::getCurrentCUDAStream()>>>(
        q, dh_in.data_ptr<scalar_t>(), dh_pass.data_ptr<scalar_t>(), ptr_or_null<acc_t>(dc), t);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// `auto` runs per step: the persistent kernels have run only in the CPU emulator, never on a GPU
// (benchmarks/RESULTS.md lists what has), so they stay opt-in (recurrence_path("sequence")) until a
// recorded GPU run at the current code shows them correct and faster; the GPU-proof issue changes
// this line with that evidence.
template <class Cell>
constexpr RecurrenceKernels kCudaKernels{&forward_step_cuda<Cell>, &backward_step_cuda<Cell>,
                                         &persistent_forward_cuda<Cell>,
                                         &persistent_backward_cuda<Cell>, AutoPath::kPerStep};

}  // namespace

AutoPath cuda_auto_path() { return kCudaKernels<LstmCell>.auto_path; }

ForwardResult grouped_recurrence_forward_cuda(const std::string& cell, const ForwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.input.device());
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_forward<Cell>(args, kCudaKernels<Cell>);
  });
}

InferenceResult grouped_recurrence_inference_cuda(const std::string& cell, const ForwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.input.device());
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_inference<Cell>(args, kCudaKernels<Cell>);
  });
}

BackwardResult grouped_recurrence_backward_cuda(const std::string& cell, const BackwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.input.device());
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_backward<Cell>(args, kCudaKernels<Cell>);
  });
}

BackwardResult grouped_recurrence_backward_in_place_cuda(const std::string& cell,
                                                       const BackwardArgs& args) {
  const c10::cuda::CUDAGuard guard(args.input.device());
  return dispatch_cell(parse_cell(cell), [&](auto c) {
    using Cell = decltype(c);
    return recurrence_backward<Cell>(args, kCudaKernels<Cell>, /*in_place=*/true);
  });
}

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) {
  m.impl("grouped_recurrence_forward", &forward_op<&grouped_recurrence_forward_cuda>);
  m.impl("grouped_recurrence", &inference_op<&grouped_recurrence_inference_cuda>);
  m.impl("grouped_recurrence_backward", &backward_op<&grouped_recurrence_backward_cuda>);
  m.impl("_grouped_recurrence_backward_in_place",
         &backward_in_place_op<&grouped_recurrence_backward_in_place_cuda>);
}

}  // namespace mtl_kernels
