// CUDA cell kernels for the grouped-LSTM driver (per-step path), and the CUDA registration.
// The arithmetic and the row pointer math live in lstm_cell.h (shared with the CPU kernels); this
// file only maps threads to (g, b, j) elements and launches on the current stream.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "grouped_lstm.h"
#include "lstm_cell.h"
#include "step_params.h"

namespace mtl_kernels {
namespace {

constexpr int kThreads = 256;

// One thread per (g, b, j); j fastest, so a warp touches consecutive hidden units (coalesced).
template <typename scalar_t, typename acc_t>
__global__ void forward_step_kernel(const ForwardStepParams<scalar_t, acc_t> p) {
  const int64_t total = p.G * p.B * p.H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % p.H, r = idx / p.H;
    forward_element(forward_row(p, r / p.B, r % p.B), j, p.H);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_step_kernel(const BackwardStepParams<scalar_t, acc_t> p) {
  const int64_t total = p.G * p.B * p.H;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = idx % p.H, r = idx / p.H;
    backward_element(backward_row(p, r / p.B, r % p.B), j, p.H);
  }
}

int blocks_for(int64_t total) {
  const int64_t max_blocks =
      int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return int(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, max_blocks)));
}

void forward_step_cuda(const ForwardStep& s) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.seq->gates.scalar_type(),
                                  "grouped_lstm_forward_cuda", [&] {
    const auto p = make_forward_params<scalar_t>(s);
    forward_step_kernel<<<blocks_for(p.G * p.B * p.H), kThreads, 0,
                          at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void backward_step_cuda(const BackwardStep& s) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.seq->gates.scalar_type(),
                                  "grouped_lstm_backward_cuda", [&] {
    const auto p = make_backward_params<scalar_t>(s);
    backward_step_kernel<<<blocks_for(p.G * p.B * p.H), kThreads, 0,
                           at::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr CellKernels kCudaKernels{&forward_step_cuda, &backward_step_cuda, &persistent_forward_cuda,
                                   &persistent_backward_cuda};

ForwardResult grouped_lstm_forward_cuda(const at::Tensor& input, const at::Tensor& weight_ih,
                                        const at::Tensor& weight_hh,
                                        const std::optional<at::Tensor>& bias,
                                        const at::Tensor& h0, const at::Tensor& c0,
                                        const std::optional<at::Tensor>& lengths, bool reverse) {
  const c10::cuda::CUDAGuard guard(input.device());
  return grouped_lstm_forward_driver(input, weight_ih, weight_hh, bias, h0, c0, lengths, reverse,
                                     kCudaKernels);
}

BackwardResult grouped_lstm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
    const at::Tensor& input, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const at::Tensor& gates, const at::Tensor& h_states, const at::Tensor& c_states,
    const std::optional<at::Tensor>& lengths, bool reverse) {
  const c10::cuda::CUDAGuard guard(input.device());
  return grouped_lstm_backward_driver(grad_output, grad_h_n, grad_c_n, input, weight_ih, weight_hh,
                                      gates, h_states, c_states, lengths, reverse, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) {
  m.impl("grouped_lstm_forward", &grouped_lstm_forward_cuda);
  m.impl("grouped_lstm_backward", &grouped_lstm_backward_cuda);
}

}  // namespace mtl_kernels
