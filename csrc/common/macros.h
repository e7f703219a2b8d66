// Annotations shared by host and device code: every file that holds math compiled for both the
// CPU and the GPU uses these.
#pragma once

// A function compiled for the host and, under nvcc, for the device too; always inlined, so that
// the host row loops that call it vectorise.
#if defined(__CUDACC__)
#define MTL_HD __host__ __device__ __forceinline__
#else
#define MTL_HD inline __attribute__((always_inline))
#endif

#define MTL_PRAGMA(x) _Pragma(#x)

// Full unrolling of short loops whose trip count is a template argument (per-thread rows, gates),
// so that their values stay in registers on the GPU.
#if defined(__CUDACC__)
#define MTL_UNROLL MTL_PRAGMA(unroll)
#else
#define MTL_UNROLL MTL_PRAGMA(GCC unroll 8)
#endif

// `#pragma omp simd reduction` for host loops only (nvcc's device pass ignores it).
#if defined(__CUDA_ARCH__)
#define MTL_SIMD_SUM(var)
#else
#define MTL_SIMD_SUM(var) MTL_PRAGMA(omp simd reduction(+ : var))
#endif
