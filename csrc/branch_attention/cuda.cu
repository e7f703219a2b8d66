// CUDA kernels for attention over branches: one warp per row m; lane l holds features
// j = l + 32k (k < K) in registers, so each branch row is read from memory exactly once forward
// and once backward (the backward accumulates u = sum p a x and o = sum p x instead of re-reading x,
// since sum_g ds_g x_g = u - abar o). Sizes with H > 32 * kMaxK use the composite ATen path.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "branch_attention/math.h"
#include "branch_attention/checks.h"
#include "common/dispatch.h"
#include "common/poison.h"

namespace mtl_kernels {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kMaxK = 32;  // H <= 1024 on the fused path

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t, typename acc_t, int K>
__device__ __forceinline__ void load_row(const scalar_t* row, int lane, int64_t H, acc_t (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = lane + 32 * k;
    v[k] = j < H ? acc_t(row[j]) : acc_t(0);
  }
}

// Branch rows a warp keeps in flight: its loop over g is a chain (score -> softmax update), so
// with one row prefetched a grid of one wave (M = 8192 rows) was bound by that chain's latency,
// not by bandwidth (~40% of copy bandwidth on an H200). A ring of D rows keeps D loads in flight
// per warp; D * K registers per lane stay at or under 64.
template <int K>
constexpr int prefetch_depth() {
  return K <= 4 ? 8 : K <= 8 ? 4 : K <= 16 ? 2 : 1;
}

template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w_ptr,
                   const scalar_t* __restrict__ bias_ptr, int64_t G, int64_t M, int64_t H,
                   scalar_t* __restrict__ out, scalar_t* __restrict__ weights,
                   acc_t* __restrict__ lse, acc_t* __restrict__ scores) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  acc_t w[K];
  load_row(w_ptr, lane, H, w);
  const acc_t bias = bias_ptr ? acc_t(*bias_ptr) : acc_t(0);

  constexpr int D = prefetch_depth<K>();
  for (int64_t m = warp; m < M; m += nwarps) {
    acc_t acc[K], ring[D][K];  // ring[d]: branch g with g % D == d, loaded D branches ahead
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = acc_t(0);
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (d < G) load_row(x + (d * M + m) * H, lane, H, ring[d]);
    OnlineSoftmax<acc_t> sm;
    sm.init(-std::numeric_limits<acc_t>::infinity());
    for (int64_t g0 = 0; g0 < G; g0 += D) {
#pragma unroll
      for (int d = 0; d < D; ++d) {  // d is a constant after unrolling: ring stays in registers
        const int64_t g = g0 + d;
        if (g >= G) break;  // warp-uniform
        acc_t dot = 0;
#pragma unroll
        for (int k = 0; k < K; ++k) dot += ring[d][k] * w[k];
        const acc_t s = warp_sum(dot) + bias;
        if (lane == 0) scores[g * M + m] = s;
        acc_t rescale, p;
        sm.update(s, rescale, p);
#pragma unroll
        for (int k = 0; k < K; ++k) acc[k] = acc[k] * rescale + p * ring[d][k];
        if (g + D < G) load_row(x + ((g + D) * M + m) * H, lane, H, ring[d]);
      }
    }
    const acc_t inv = acc_t(1) / sm.sum;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = lane + 32 * k;
      if (j < H) out[m * H + j] = scalar_t(acc[k] * inv);
    }
    const acc_t l = sm.lse();
    if (lane == 0) lse[m] = l;
    __syncwarp();  // lane 0's score stores are visible to the warp
    for (int64_t g = lane; g < G; g += 32) weights[g * M + m] = scalar_t(exp_acc(scores[g * M + m] - l));
  }
}

template <typename scalar_t, typename acc_t, int K>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    backward_kernel(const scalar_t* __restrict__ gout, const scalar_t* __restrict__ gweights,
                    const scalar_t* __restrict__ x, const scalar_t* __restrict__ w_ptr,
                    const scalar_t* __restrict__ bias_ptr, const acc_t* __restrict__ lse,
                    int64_t G, int64_t M, int64_t H, scalar_t* __restrict__ dx,
                    acc_t* __restrict__ pa_scratch,  // (2, G, M): p and a per (g, m)
                    acc_t* __restrict__ dw_partial,  // (gridDim.x, H)
                    acc_t* __restrict__ db_partial)  // (gridDim.x,)
{
  __shared__ acc_t dw_smem[32 * K];  // one row, summed into warp by warp (fits for double K=32)
  __shared__ acc_t db_smem;
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  acc_t w[K], dw[K];
  load_row(w_ptr, lane, H, w);
#pragma unroll
  for (int k = 0; k < K; ++k) dw[k] = acc_t(0);
  acc_t db = 0;
  const acc_t bias = bias_ptr ? acc_t(*bias_ptr) : acc_t(0);
  acc_t* p_s = pa_scratch;
  acc_t* a_s = pa_scratch + G * M;

  constexpr int D = prefetch_depth<K>();
  for (int64_t m = warp; m < M; m += nwarps) {
    acc_t dout[K], u[K], o[K], ring[D][K];
    load_row(gout + m * H, lane, H, dout);
#pragma unroll
    for (int k = 0; k < K; ++k) u[k] = o[k] = acc_t(0);
    const acc_t lse_m = lse[m];
    acc_t abar = 0;
#pragma unroll
    for (int d = 0; d < D; ++d)
      if (d < G) load_row(x + (d * M + m) * H, lane, H, ring[d]);
    for (int64_t g0 = 0; g0 < G; g0 += D) {  // pass 1: the only read of x
#pragma unroll
      for (int d = 0; d < D; ++d) {
        const int64_t g = g0 + d;
        if (g >= G) break;  // warp-uniform
        acc_t sdot = 0, adot = 0;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          sdot += ring[d][k] * w[k];
          adot += ring[d][k] * dout[k];
        }
        const acc_t s = warp_sum(sdot) + bias;
        const acc_t a = warp_sum(adot) + (gweights ? acc_t(gweights[g * M + m]) : acc_t(0));
        const acc_t p = exp_acc(s - lse_m);
        abar += p * a;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          o[k] += p * ring[d][k];
          u[k] += p * a * ring[d][k];
        }
        if (lane == 0) {
          p_s[g * M + m] = p;
          a_s[g * M + m] = a;
        }
        if (g + D < G) load_row(x + ((g + D) * M + m) * H, lane, H, ring[d]);
      }
    }
#pragma unroll
    for (int k = 0; k < K; ++k) dw[k] += u[k] - abar * o[k];
    __syncwarp();
    for (int64_t g = 0; g < G; ++g) {  // pass 2: write dx from registers and 2 scalars per branch
      const acc_t p = p_s[g * M + m];
      const acc_t ds = score_grad(p, a_s[g * M + m], abar);
      db += ds;  // identical in every lane
      scalar_t* dxg = dx + (g * M + m) * H;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t j = lane + 32 * k;
        if (j < H) dxg[j] = scalar_t(p * dout[k] + ds * w[k]);
      }
    }
  }
  // Block partials of dw and db; the host sums them over blocks (deterministic, no atomics).
  for (int i = 0; i < kWarpsPerBlock; ++i) {  // fixed order: deterministic
    if (wib == i) {
#pragma unroll
      for (int k = 0; k < K; ++k) dw_smem[lane + 32 * k] = (i == 0 ? acc_t(0) : dw_smem[lane + 32 * k]) + dw[k];
      if (lane == 0) db_smem = (i == 0 ? acc_t(0) : db_smem) + db;
    }
    __syncthreads();
  }
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) dw_partial[blockIdx.x * H + j] = dw_smem[j];
  if (threadIdx.x == 0) db_partial[blockIdx.x] = db_smem;
}

int num_blocks(int64_t M) {
  const int64_t by_rows = (M + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  return int(std::max<int64_t>(1, std::min(by_rows, cap)));
}

// Composite path for H > 32 * kMaxK: correct, not fused.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_composite(const at::Tensor& x,
                                                                 const at::Tensor& w,
                                                                 const std::optional<at::Tensor>& b) {
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor s = at::matmul(x.to(acc), w.to(acc));  // (G, M)
  if (b.has_value()) s = s + b->to(acc).reshape({});
  at::Tensor lse = at::logsumexp(s, 0);
  at::Tensor p = at::exp(s - lse);
  at::Tensor out = (p.unsqueeze(-1) * x.to(acc)).sum(0).to(x.scalar_type());
  return {out, p.to(x.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_attention_forward_cuda(
    const at::Tensor& branches_, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const BranchAttentionShape shape =
      check_branch_attention_args("branch_attention_forward", branches_, weight, bias);
  const int64_t G = shape.G, M = shape.M, H = shape.H;
  const c10::cuda::CUDAGuard guard(branches_.device());
  const at::Tensor branches = branches_.contiguous();  // the kernels index rows as (G, M, H)
  if (H > 32 * kMaxK) return forward_composite(branches, weight, bias);
  const auto acc = at::toOpMathType(branches.scalar_type());
  at::Tensor out = at::empty({M, H}, branches.options());
  at::Tensor weights = at::empty({G, M}, branches.options());
  at::Tensor lse = at::empty({M}, branches.options().dtype(acc));
  at::Tensor scores = at::empty({G, M}, branches.options().dtype(acc));
  poison_if_enabled(out);
  poison_if_enabled(weights);
  poison_if_enabled(lse);
  if (M == 0) return {out, weights, lse};
  const at::Tensor w = weight.contiguous();
  MTL_DISPATCH_FLOATING_TYPES(branches.scalar_type(),
                                  "branch_attention_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    static_switch_at_least<1, 2, 4, 8, 16, 32>((H + 31) / 32, [&](auto k) {  // K = features per lane
      forward_kernel<scalar_t, acc_t, decltype(k)::value>
          <<<num_blocks(M), kWarpsPerBlock * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
              branches.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
              bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, G, M, H,
              out.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(),
              scores.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, weights, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> branch_attention_backward_cuda(
    const at::Tensor& grad_out_, const std::optional<at::Tensor>& grad_weights,
    const at::Tensor& branches_, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& lse_) {
  const BranchAttentionShape shape =
      check_branch_attention_backward_args(grad_out_, grad_weights, branches_, weight, bias, lse_);
  const int64_t G = shape.G, M = shape.M, H = shape.H;
  const c10::cuda::CUDAGuard guard(branches_.device());
  const auto acc = at::toOpMathType(branches_.scalar_type());
  const at::Tensor branches = branches_.contiguous();
  const at::Tensor grad_out = grad_out_.contiguous();
  const at::Tensor lse = lse_.contiguous();
  const at::Tensor gw = grad_weights.has_value() && grad_weights->defined()
                            ? grad_weights->contiguous() : at::Tensor();
  at::Tensor dx, dw, db;
  if (H > 32 * kMaxK) {  // composite path, same formulas as the kernel
    const at::Tensor x = branches.to(acc), wv = weight.to(acc), go = grad_out.to(acc);
    at::Tensor s = at::matmul(x, wv);
    if (bias.has_value()) s = s + bias->to(acc).reshape({});
    const at::Tensor p = at::exp(s - lse);             // (G, M)
    at::Tensor a = (x * go).sum(-1);                   // (G, M): dout . x per branch
    if (gw.defined()) a = a + gw.to(acc);
    const at::Tensor ds = p * (a - (p * a).sum(0));    // (G, M)
    dx = (p.unsqueeze(-1) * go + ds.unsqueeze(-1) * wv).to(branches.scalar_type());
    dw = (ds.unsqueeze(-1) * x).sum(at::IntArrayRef{0, 1});
    db = ds.sum();
  } else {
    dx = at::empty_like(branches);
    poison_if_enabled(dx);
    const int blocks = num_blocks(M);
    at::Tensor pa = at::empty({2, G, M}, branches.options().dtype(acc));
    at::Tensor dw_partial = at::empty({blocks, H}, branches.options().dtype(acc));
    at::Tensor db_partial = at::empty({blocks}, branches.options().dtype(acc));
    const at::Tensor w = weight.contiguous();
    MTL_DISPATCH_FLOATING_TYPES(branches.scalar_type(),
                                    "branch_attention_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      static_switch_at_least<1, 2, 4, 8, 16, 32>((H + 31) / 32, [&](auto k) {  // K = features per lane
        backward_kernel<scalar_t, acc_t, decltype(k)::value>
            <<<blocks, kWarpsPerBlock * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
                grad_out.data_ptr<scalar_t>(), gw.defined() ? gw.data_ptr<scalar_t>() : nullptr,
                branches.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr, lse.data_ptr<acc_t>(), G,
                M, H, dx.data_ptr<scalar_t>(), pa.data_ptr<acc_t>(), dw_partial.data_ptr<acc_t>(),
                db_partial.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    dw = dw_partial.sum(0);
    db = db_partial.sum();
  }
  const auto dtype = branches.scalar_type();
  return {dx, dw.to(dtype), db.to(dtype).view({1})};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtl_kernels, CUDA, m) {
  m.impl("branch_attention_forward", &branch_attention_forward_cuda);
  m.impl("branch_attention_backward", &branch_attention_backward_cuda);
}

}  // namespace mtl_kernels
