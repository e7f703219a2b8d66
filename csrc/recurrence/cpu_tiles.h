// Register-tiled fp32 products for the CPU's recurrence: out (n, N) (+)= x (n, K) @ W (K, N)
// with W packed once per call into 16-column panels.
//
// Why: at multitask (G = 8, B = 64, H = 256) the recurrent product is most of the time. MKL's
// batched GEMM re-packs W_hh on every step (~14% of the forward's samples in `perf`) and the
// rows-in-parallel path's streaming loops (weighted_row_sums in cpu.cpp) are bound by loads and
// stores of their accumulator rows. Packing W_hh once per call and keeping a 6 x 16 block of the
// output in 12 AVX2 registers for the whole K loop runs (64 x 256) @ (256 x 1024) at ~74 GFLOP/s
// on one core of the CI machine, against ~64 for MKL's per-step bmm (benchmarks/NOTES.md).
//
// Two variants over the same packed panels, chosen at run time (the functions carry their own
// target attributes, so the rest of the build keeps its flags):
//   AVX2 + FMA : a 6 x 16 output block in 12 ymm accumulators (block);
//   AVX-512F   : a 12 x 32 block, two panels side by side, in 24 of the 32 zmm registers
//                (block512): per k two panel loads and 12 broadcasts feed 24 FMAs (AVX2's 6x16
//                block: 8 loads for 12 FMAs), and a partial panel is stored under a mask instead
//                of through a scratch block.
// Only float on x86-64; every other case keeps the generic loops.
// The backward's weight and input gradients run here too (cpu.cpp, cpu_gradient_products), all of
// a call's products in one pool split over the threads; the per-step path's input projection
// stays on MKL.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/setting.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MTL_CPU_TILES 1
#else
#define MTL_CPU_TILES 0
#endif

namespace mtl_kernels {
namespace cpu_tiles {

constexpr int64_t kPanel = 16;  // output columns per panel: two 8-float AVX2 vectors
constexpr int64_t kRows = 6;    // output rows per register block: 6 x 2 accumulators + 2 W vectors

inline int64_t panel_count(int64_t N) { return (N + kPanel - 1) / kPanel; }

// Floats of one packed matrix: (panel_count(N), K, kPanel).
inline int64_t packed_size(int64_t K, int64_t N) { return panel_count(N) * K * kPanel; }

// True where the tiled products can run: an x86-64 CPU with AVX2 and FMA.
inline bool supported() {
#if MTL_CPU_TILES
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// True where the AVX-512 variant can run (AVX-512F; its masks and FMAs need nothing more).
inline bool supported512() {
#if MTL_CPU_TILES
  static const bool ok = supported() && __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

// auto: the widest variant the CPU has; avx2: the AVX2 variant even where AVX-512 runs (tests and
// benchmarks compare the two on one machine); off: no tiles (MKL and the generic loops).
enum class TilesMode { kAuto, kOff, kAvx2 };

// A process-wide switch (common/setting.h), so that tests and benchmarks can run the same call with
// and without the tiles: _C.set_cpu_tiles("auto" | "off" | "avx2"), default from
// MTL_KERNELS_CPU_TILES.
inline EnvSetting<TilesMode, 3>& setting() {
  static EnvSetting<TilesMode, 3> s("MTL_KERNELS_CPU_TILES", "CPU tiles mode (MTL_KERNELS_CPU_TILES)",
                                    {"auto", "off", "avx2"});
  return s;
}

// Whether the CPU's fp32 products take the tiles.
inline bool available() { return supported() && setting().get() != TilesMode::kOff; }

// Which variant rows_times_packed runs: the ISA is read once per call (by the caller that packs
// W), so one call never mixes variants.
enum class Variant { kAvx2, kAvx512 };
inline Variant chosen_variant() {
  return supported512() && setting().get() == TilesMode::kAuto ? Variant::kAvx512 : Variant::kAvx2;
}

// Rows [k0, k1) of W (K, N), row k at w + k * sk, unit stride along N, into pack_panels' layout,
// the last panel's padding columns zero: one contiguous copy per row and panel, and separate row
// ranges may pack on separate threads.
inline void pack_panel_rows(const float* w, int64_t K, int64_t N, int64_t sk, float* packed,
                            int64_t k0, int64_t k1) {
  for (int64_t p = 0; p < panel_count(N); ++p) {
    const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
    float* dst = packed + p * K * kPanel;
    for (int64_t k = k0; k < k1; ++k) {
      std::copy(w + k * sk + n0, w + k * sk + n0 + nc, dst + k * kPanel);
      std::fill(dst + k * kPanel + nc, dst + (k + 1) * kPanel, 0.f);
    }
  }
}

// W (K, N), element (k, n) at w[k * sk + n * sn], into panels: packed[(p * K + k) * kPanel + c] =
// W(k, p * kPanel + c), zero past N (the last panel's padding columns are computed and dropped).
// Reads along whichever of k and n is contiguous: the transposed read strode by rows and was ~10x
// slower.
inline void pack_panels(const float* w, int64_t K, int64_t N, int64_t sk, int64_t sn, float* packed) {
  if (sn == 1) return pack_panel_rows(w, K, N, sk, packed, 0, K);
  std::fill(packed, packed + packed_size(K, N), 0.f);
  if (sk == 1) {
    for (int64_t n = 0; n < N; ++n) {
      float* dst = packed + (n / kPanel) * K * kPanel + n % kPanel;
      for (int64_t k = 0; k < K; ++k) dst[k * kPanel] = w[n * sn + k];
    }
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < N; ++n) packed[((n / kPanel) * K + k) * kPanel + n % kPanel] = w[k * sk + n * sn];
  }
}

#if MTL_CPU_TILES
// out rows r < NR, columns [0, 16): (+)= sum_k x[r * sm + k * sk] * panel[k * 16 + 0 .. 16).
// Named accumulators, not an array: GCC spilled an array of __m256 to the stack on every k.
template <int NR>
__attribute__((target("avx2,fma"))) inline void block(const float* x, int64_t sm, int64_t sk,
                                                      const float* panel, int64_t K, float* out,
                                                      int64_t ldo, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float* x0 = x;
  const float* x1 = x + (NR > 1 ? 1 : 0) * sm;
  const float* x2 = x + (NR > 2 ? 2 : 0) * sm;
  const float* x3 = x + (NR > 3 ? 3 : 0) * sm;
  const float* x4 = x + (NR > 4 ? 4 : 0) * sm;
  const float* x5 = x + (NR > 5 ? 5 : 0) * sm;
#define MTL_TILE_ROW(r)                                    \
  if constexpr (NR > r) {                                  \
    const __m256 a = _mm256_broadcast_ss(x##r + xk);       \
    c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);             \
    c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);             \
  }
  for (int64_t k = 0, xk = 0; k < K; ++k, xk += sk) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kPanel);
    const __m256 b1 = _mm256_loadu_ps(panel + k * kPanel + 8);
    MTL_TILE_ROW(0) MTL_TILE_ROW(1) MTL_TILE_ROW(2) MTL_TILE_ROW(3) MTL_TILE_ROW(4) MTL_TILE_ROW(5)
  }
#undef MTL_TILE_ROW
#define MTL_TILE_STORE(r)                                                \
  if constexpr (NR > r) {                                                \
    float* o = out + r * ldo;                                            \
    if (accumulate) {                                                    \
      c##r##0 = _mm256_add_ps(c##r##0, _mm256_loadu_ps(o));              \
      c##r##1 = _mm256_add_ps(c##r##1, _mm256_loadu_ps(o + 8));          \
    }                                                                    \
    _mm256_storeu_ps(o, c##r##0);                                        \
    _mm256_storeu_ps(o + 8, c##r##1);                                    \
  }
  MTL_TILE_STORE(0) MTL_TILE_STORE(1) MTL_TILE_STORE(2) MTL_TILE_STORE(3) MTL_TILE_STORE(4)
  MTL_TILE_STORE(5)
#undef MTL_TILE_STORE
}

inline void block_rows(int64_t nr, const float* x, int64_t sm, int64_t sk, const float* panel,
                       int64_t K, float* out, int64_t ldo, bool accumulate) {
  switch (nr) {
    case 6: return block<6>(x, sm, sk, panel, K, out, ldo, accumulate);
    case 5: return block<5>(x, sm, sk, panel, K, out, ldo, accumulate);
    case 4: return block<4>(x, sm, sk, panel, K, out, ldo, accumulate);
    case 3: return block<3>(x, sm, sk, panel, K, out, ldo, accumulate);
    case 2: return block<2>(x, sm, sk, panel, K, out, ldo, accumulate);
    case 1: return block<1>(x, sm, sk, panel, K, out, ldo, accumulate);
    default: TORCH_INTERNAL_ASSERT(false, "cpu_tiles: a block of ", nr, " rows (1 to ", kRows, ")");
  }
}

constexpr int64_t kRows512 = 12;  // output rows per AVX-512 block: 12 x 2 accumulators + 2 W + 1 x

// out rows r < NR, columns [0, 16 * NP): (+)= sum_k x[r * sm + k * sk] * panel_p[k * 16 + 0 .. 16)
// for panels p < NP, panel p at panel + p * pstride. mask0 / mask1: the columns of panel 0 / 1 that
// exist (a partial last panel's padding columns are computed from its zero W and not stored).
template <int NR, int NP>
__attribute__((target("avx512f"))) inline void block512(const float* x, int64_t sm, int64_t sk,
                                                        const float* panel, int64_t pstride,
                                                        int64_t K, float* out, int64_t ldo,
                                                        bool accumulate, __mmask16 mask0,
                                                        __mmask16 mask1) {
  static_assert(NR >= 1 && NR <= kRows512 && (NP == 1 || NP == 2));
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  __m512 a8 = a0, a9 = a0, a10 = a0, a11 = a0;
  __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0, b6 = a0, b7 = a0, b8 = a0, b9 = a0;
  __m512 b10 = a0, b11 = a0;
  const float* p1 = panel + (NP > 1 ? pstride : 0);
#define MTL_TILE_ROW512(r)                                          \
  if constexpr (NR > r) {                                           \
    const __m512 v = _mm512_set1_ps(x[r * sm + xk]);                \
    a##r = _mm512_fmadd_ps(v, w0, a##r);                            \
    if constexpr (NP > 1) b##r = _mm512_fmadd_ps(v, w1, b##r);      \
  }
  for (int64_t k = 0, xk = 0; k < K; ++k, xk += sk) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * kPanel);
    const __m512 w1 = NP > 1 ? _mm512_loadu_ps(p1 + k * kPanel) : w0;
    MTL_TILE_ROW512(0) MTL_TILE_ROW512(1) MTL_TILE_ROW512(2) MTL_TILE_ROW512(3)
    MTL_TILE_ROW512(4) MTL_TILE_ROW512(5) MTL_TILE_ROW512(6) MTL_TILE_ROW512(7)
    MTL_TILE_ROW512(8) MTL_TILE_ROW512(9) MTL_TILE_ROW512(10) MTL_TILE_ROW512(11)
  }
#undef MTL_TILE_ROW512
#define MTL_TILE_STORE512(r)                                                          \
  if constexpr (NR > r) {                                                             \
    float* o = out + r * ldo;                                                         \
    if (accumulate) a##r = _mm512_add_ps(a##r, _mm512_maskz_loadu_ps(mask0, o));      \
    _mm512_mask_storeu_ps(o, mask0, a##r);                                            \
    if constexpr (NP > 1) {                                                           \
      if (accumulate) b##r = _mm512_add_ps(b##r, _mm512_maskz_loadu_ps(mask1, o + 16)); \
      _mm512_mask_storeu_ps(o + 16, mask1, b##r);                                     \
    }                                                                                 \
  }
  MTL_TILE_STORE512(0) MTL_TILE_STORE512(1) MTL_TILE_STORE512(2) MTL_TILE_STORE512(3)
  MTL_TILE_STORE512(4) MTL_TILE_STORE512(5) MTL_TILE_STORE512(6) MTL_TILE_STORE512(7)
  MTL_TILE_STORE512(8) MTL_TILE_STORE512(9) MTL_TILE_STORE512(10) MTL_TILE_STORE512(11)
#undef MTL_TILE_STORE512
}

template <int NP>
inline void block512_rows(int64_t nr, const float* x, int64_t sm, int64_t sk, const float* panel,
                          int64_t pstride, int64_t K, float* out, int64_t ldo, bool accumulate,
                          __mmask16 mask0, __mmask16 mask1) {
  switch (nr) {
#define MTL_TILE_CASE512(n) \
  case n: return block512<n, NP>(x, sm, sk, panel, pstride, K, out, ldo, accumulate, mask0, mask1);
    MTL_TILE_CASE512(12) MTL_TILE_CASE512(11) MTL_TILE_CASE512(10) MTL_TILE_CASE512(9)
    MTL_TILE_CASE512(8) MTL_TILE_CASE512(7) MTL_TILE_CASE512(6) MTL_TILE_CASE512(5)
    MTL_TILE_CASE512(4) MTL_TILE_CASE512(3) MTL_TILE_CASE512(2) MTL_TILE_CASE512(1)
#undef MTL_TILE_CASE512
    default: TORCH_INTERNAL_ASSERT(false, "cpu_tiles: a block of ", nr, " rows (1 to ", kRows512, ")");
  }
}

// The rows of the next block when `left` rows remain, blocks of at most `most`: the remaining
// blocks about equal (64 rows: 11, 11, 11, 11, 10, 10 rather than 12 x 5 and a 4-row block, whose
// few rows per W load leave the FMA units idle).
inline int64_t even_block_rows(int64_t left, int64_t most) {
  const int64_t blocks = (left + most - 1) / most;
  return (left + blocks - 1) / blocks;
}

// The columns of a panel that exist, as a mask: the first nc of 16 (nc <= 0: none).
inline __mmask16 column_mask(int64_t nc) {
  return nc >= kPanel ? __mmask16(0xFFFF) : nc <= 0 ? __mmask16(0) : __mmask16((1u << nc) - 1);
}
#endif

constexpr int64_t kDepth = 256;  // K per pass: a panel's part (16 KB) stays in L1 across row blocks
constexpr int64_t kRowChunk = 96;  // rows per chunk: 96 x kDepth floats of x (96 KB) stay in L2

// out (n, N), row stride ldo: out (+)= x (n, K) @ W, element (r, k) of x at x[r * sm + k * sk], W
// packed by pack_panels. Rows in chunks of kRowChunk, K in passes of kDepth, panels within a pass,
// row blocks within a panel: the panel's part stays in L1 across the chunk's rows, and the chunk's
// part of x in L2 across the panels. The AVX-512 variant takes two panels per block. Call only
// where available(), with the variant chosen_variant() gave (supported512() for kAvx512).
inline void rows_times_packed(const float* x, int64_t n, int64_t sm, int64_t sk, const float* packed,
                              int64_t K, int64_t N, float* out, int64_t ldo, bool accumulate,
                              Variant variant) {
#if MTL_CPU_TILES
  if (K == 0) {  // an empty sum
    if (!accumulate)
      for (int64_t r = 0; r < n; ++r) std::fill(out + r * ldo, out + r * ldo + N, 0.f);
    return;
  }
  if (n > kRowChunk) {
    for (int64_t r = 0; r < n; r += kRowChunk)
      rows_times_packed(x + r * sm, std::min(kRowChunk, n - r), sm, sk, packed, K, N, out + r * ldo,
                        ldo, accumulate, variant);
    return;
  }
  // both variants: the same passes, and within a pass each output element's products added in k
  // order from zero, then to out: their results are the same bits
  // x read across a long stride of k with its rows adjacent (the weight gradients' dg^T: sk = KH):
  // each k of a pass is another cache line and, past 1k floats, another page. Such a pass's part
  // (n x kd) is first copied into a thread's scratch with k rows n floats apart, which the blocks
  // of all panels then read: n * kd floats copied against n * kd * N multiply-adds, so only for
  // wide outputs (on one core, dg^T of 4H = 1024 times (2048, 128): 67-73 -> 72-88 GFLOP/s; at
  // 4H = 200 and N = 100 the copy cost 8%).
  const bool gather = sm == 1 && sk >= 4 * kRowChunk && N >= 8 * kPanel;
  thread_local std::vector<float> scratch_x;
  if (gather && scratch_x.size() < size_t(kRowChunk * kDepth)) scratch_x.resize(kRowChunk * kDepth);
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t kd = std::min(kDepth, K - k0);
    const bool acc = accumulate || k0 > 0;
    const float* xp = x;  // x, or the gathered pass (then xs_m = 1, xs_k = n, from k0)
    int64_t xs_m = sm, xs_k = sk, xk0 = k0;
    if (gather) {
      float* g = scratch_x.data();
      for (int64_t k = 0; k < kd; ++k) std::copy(x + (k0 + k) * sk, x + (k0 + k) * sk + n, g + k * n);
      xp = g, xs_m = 1, xs_k = n, xk0 = 0;
    }
    if (variant == Variant::kAvx512) {
      for (int64_t p = 0; p < panel_count(N); p += 2) {
        const float* panel = packed + (p * K + k0) * kPanel;
        const int64_t n0 = p * kPanel;
        const __mmask16 m0 = column_mask(N - n0), m1 = column_mask(N - n0 - kPanel);
        const bool pair = p + 1 < panel_count(N);
        for (int64_t r = 0, nr; r < n; r += nr) {
          nr = even_block_rows(n - r, kRows512);
          const float* xr = xp + r * xs_m + xk0 * xs_k;
          float* o = out + r * ldo + n0;
          if (pair)
            block512_rows<2>(nr, xr, xs_m, xs_k, panel, K * kPanel, kd, o, ldo, acc, m0, m1);
          else
            block512_rows<1>(nr, xr, xs_m, xs_k, panel, K * kPanel, kd, o, ldo, acc, m0, m1);
        }
      }
      continue;
    }
    for (int64_t p = 0; p < panel_count(N); ++p) {
      const float* panel = packed + (p * K + k0) * kPanel;
      const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
      for (int64_t r = 0, nr; r < n; r += nr) {
        nr = even_block_rows(n - r, kRows);
        const float* xr = xp + r * xs_m + xk0 * xs_k;
        if (nc == kPanel) {
          block_rows(nr, xr, xs_m, xs_k, panel, kd, out + r * ldo + n0, ldo, acc);
        } else {  // the last, partial panel: through a 16-wide scratch block, then its nc columns
          float scratch[kRows * kPanel];
          block_rows(nr, xr, xs_m, xs_k, panel, kd, scratch, kPanel, false);
          for (int64_t i = 0; i < nr; ++i) {
            float* o = out + (r + i) * ldo + n0;
            for (int64_t c = 0; c < nc; ++c) o[c] = acc ? o[c] + scratch[i * kPanel + c]
                                                        : scratch[i * kPanel + c];
          }
        }
      }
    }
  }
#else
  (void)x, (void)n, (void)sm, (void)sk, (void)packed, (void)K, (void)N, (void)out, (void)ldo,
      (void)accumulate, (void)variant;
#endif
}

}  // namespace cpu_tiles
}  // namespace mtl_kernels
