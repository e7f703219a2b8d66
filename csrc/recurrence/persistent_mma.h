// The persistent kernel's tensor-core variant: the recurrent products on mma.sync (bf16 / fp16:
// m16n8k16; fp32 where TF32 is allowed: m16n8k8 on TF32-rounded operands), fp32 accumulation; the
// cell math (recurrence/step.h) and the cell state in fp32, as in the FMA variant (persistent.h).
// As there, everything but the launch and the inter-block barrier is host+device code: the CPU
// emulator (persistent_emulate.cpp) runs every warp of a plan through the same functions, with
// each lane's fragment registers filled per the PTX ISA's documented layouts (MmaLayout below) and
// each mma and ldmatrix computed on the CPU from those registers.
//
// Work split: blocks as the FMA variant's (group g, batch tile, slice of hidden units); a block
// is `warps` warps of 32 lanes, warp w owning the slice's hidden units [8w, 8w + 8) (one octet,
// the N of one mma n-tile). Rows: the tile's batch rows, padded to m-tiles of 16 (zero rows).
//
// Forward, D (rows x 8K) = h_{t-1} (rows x H) . W^T: warp w's n-tiles are its octet's K gates
// (n-tile `gate`: columns = units 8w..8w+7 of that gate), k-tiles of kK columns of h. Its W_hh
// B-fragments are loaded once, for the whole sequence: k-tiles [0, reg_ktiles) into registers,
// the rest into shared memory in fragment order (each lane's fragment contiguous: one 8-byte load,
// a warp's 256 contiguous bytes). Per step: h_{t-1} of the tile's rows into a shared-memory tile
// (row stride padded by 16 bytes: ldmatrix conflict-free), A-fragments by ldmatrix.x4, mma into
// fp32 accumulators; then each lane holds, for each of its accumulator elements (row, unit), all K
// gates of that unit: it runs the cell (forward_element) right there, its c in registers.
// Backward, D (rows x 8) = drec_{t+1} (rows x KH) . W (KH x the octet's units): one n-tile per warp,
// k-tiles over the KH columns of drec; dc and dh_pass in registers, as the FMA variant.
//
// The per-warp code is written once over a warp policy W: DeviceWarp (the GPU: one lane per
// thread, kLanes = 1, inline PTX) and HostWarp (the emulator: a whole warp at once, kLanes = 32,
// Lanes<T> holding every lane's registers). Loops `for (i < W::kLanes)` with lane = W::lane(i) are
// the per-lane code; W::mma and W::load_a are the collective ops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/macros.h"
#include "recurrence/persistent.h"
#include "recurrence/sequence.h"
#include "recurrence/step.h"

namespace mtl_kernels {

constexpr int kMmaMaxWarps = 8;   // warps per block at most (256 threads, 64 hidden units)
constexpr int kMmaMaxMTiles = 4;  // m-tiles of 16 rows per block at most (64 batch rows)
// Registers per thread for W_hh fragments (a B-fragment is 2 x 32-bit registers per k-tile and
// n-tile, for both layouts): the forward keeps 96 / 2K k-tiles of its K n-tiles there (LSTM 12,
// GRU 16, RNN 48), the backward 48 k-tiles of its one n-tile; further k-tiles come from shared
// memory. With 96, ptxas 13.0 (sm_90) compiles every instance without spills: 178-255 registers
// a thread, the LSTM's bf16/fp16 forward at the 255 cap (128 spilled: it keeps A fragments of
// several k-tiles in flight). A change that raises register use there shows as spills in the
// device check's ptxas table.
constexpr int kMmaWRegs = 96;
template <int K, bool kBackward>
constexpr int mma_reg_ktiles() {
  return kBackward ? kMmaWRegs / 2 : kMmaWRegs / (2 * K);
}
// What the planner assumes a thread of these kernels holds (allocation granularity included);
// the launch checks the compiled kernels' real count with the occupancy API and plans again.
constexpr int64_t kMmaRegsPerThread = 256;

#if defined(__CUDACC__)
#define MTL_NO_UNROLL MTL_PRAGMA(unroll 1)
#else
#define MTL_NO_UNROLL
#endif

// ---- fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8") -----------
// kK = 16: .bf16 / .f16 operands, two elements per 32-bit register; kK = 8: .tf32, one. With
// groupID g = lane / 4 and threadID_in_group t = lane % 4:
//   A (16 x kK, row-major), 4 registers: reg r holds row g + 8 (r % 2), columns
//     (r / 2) * kK/2 + t * kPack + [0, kPack)
//   B (kK x 8, "col"), 2 registers: reg r holds column (n) g, rows (k) r * kK/2 + t * kPack + [0, kPack)
//   C / D (16 x 8, fp32), 4 elements: element e at row g + 8 (e / 2), column 2t + e % 2.
// A fragment's element e is register e / kPack, half e % kPack (low half first).
template <int kK_>
struct MmaLayout {
  static_assert(kK_ == 16 || kK_ == 8, "m16n8k16 (16-bit types) or m16n8k8 (tf32)");
  static constexpr int kK = kK_;
  static constexpr int kPack = kK / 8;     // elements per 32-bit register
  static constexpr int kA = 4 * kPack;     // A elements per lane
  static constexpr int kB = 2 * kPack;     // B elements per lane
  static constexpr int kC = 4;             // C / D elements per lane
  MTL_HD static void a_coord(int lane, int e, int& row, int& col) {
    const int reg = e / kPack, half = e % kPack;
    row = (lane >> 2) + 8 * (reg & 1);
    col = (reg >> 1) * (kK / 2) + (lane & 3) * kPack + half;
  }
  MTL_HD static void b_coord(int lane, int e, int& k, int& n) {
    const int reg = e / kPack, half = e % kPack;
    k = reg * (kK / 2) + (lane & 3) * kPack + half;
    n = lane >> 2;
  }
  MTL_HD static void c_coord(int lane, int e, int& row, int& n) {
    row = (lane >> 2) + 8 * (e >> 1);
    n = 2 * (lane & 3) + (e & 1);
  }
  // ldmatrix.x4 of an A tile (16 rows from row0, kK columns from col0 of a row-major shared-memory
  // tile with row stride `stride` elements): the element offset of the row that lane supplies.
  // Lanes 8i..8i+7 give matrix i's rows: matrices 0, 1 = rows 0-7, 8-15 at col0; 2, 3 = the same
  // rows at col0 + kK/2. Each matrix row is 16 bytes (8 16-bit or 4 32-bit elements); lane l
  // receives from matrix i the 32-bit word l % 4 of its row l / 4, as register i: which is the A
  // layout above (checked by the tests through the emulated ldmatrix).
  MTL_HD static int ldmatrix_a_offset(int lane, int stride, int row0, int col0) {
    return (row0 + (lane & 15)) * stride + col0 + (lane >> 4) * (kK / 2);
  }
};

// One lane's fragment: N elements, aligned as its registers (so that it moves as whole words).
template <typename T, int N>
struct alignas(sizeof(T) * N) Frag {
  T e[N];
};

// A value per lane of a warp: one on the GPU (the thread's own), 32 in the emulator.
template <typename T, int N>
struct Lanes {
  T v[N];
  MTL_HD T& operator[](int i) { return v[i]; }
  MTL_HD const T& operator[](int i) const { return v[i]; }
};

// TF32 rounding of an fp32 operand: cvt.rna.tf32.f32 (round to nearest, ties away from zero, to
// 10 mantissa bits); the identity for the other types (bf16 / fp16 are operands as they are; fp64
// runs only in the emulator, exactly).
MTL_HD float tf32_round(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return x;  // no cvt.rna.tf32 before sm_80; run_persistent_mma never launches there
#elif defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
#else
  uint32_t b;
  std::memcpy(&b, &x, 4);
  if ((b & 0x7f800000u) != 0x7f800000u) {  // finite: add half an ulp of tf32 to the magnitude
    b += 0x1000u;
    b &= 0xffffe000u;
  }
  std::memcpy(&x, &b, 4);
  return x;
#endif
}

template <typename T>
MTL_HD T mma_operand(T x) {
  if constexpr (std::is_same<T, float>::value) {
    return tf32_round(x);
  } else {
    return x;
  }
}

// A fragment from shared memory: one 8- or 16-byte load on the GPU.
template <typename T, int N>
MTL_HD void load_frag(Frag<T, N>& f, const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(Frag<T, N>) == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    memcpy(&f, &v, 8);
    return;
  } else if constexpr (sizeof(Frag<T, N>) == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    memcpy(&f, &v, 16);
    return;
  }
#endif
  for (int e = 0; e < N; ++e) f.e[e] = p[e];
}

// ---- the warp policies ---------------------------------------------------------------------

// The emulator's warp: all 32 lanes' registers; ldmatrix and mma computed from them per the
// layouts above. acc_t: fp32 (fp64 for an fp64 emulation); products and sums in acc_t, in k order.
struct HostWarp {
  static constexpr int kLanes = 32;
  static int lane(int i) { return i; }

  template <class L, typename T>
  static void load_a(Lanes<Frag<T, L::kA>, 32>& a, const T* tile, int stride, int row0, int col0) {
    const T* rows[32];  // the row address each lane supplies
    for (int l = 0; l < 32; ++l) rows[l] = tile + L::ldmatrix_a_offset(l, stride, row0, col0);
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i)      // matrix i -> register i
        for (int h = 0; h < L::kPack; ++h)  // word l % 4 of row l / 4 of matrix i
          a[l].e[i * L::kPack + h] = rows[8 * i + l / 4][(l % 4) * L::kPack + h];
  }

  template <class L, typename T, typename A>
  static void mma(Lanes<Frag<A, 4>, 32>& d, const Lanes<Frag<T, L::kA>, 32>& a,
                  const Lanes<Frag<T, L::kB>, 32>& b) {
    A am[16][L::kK], bm[L::kK][8], cm[16][8];
    for (int l = 0; l < 32; ++l) {
      int r, c;
      for (int e = 0; e < L::kA; ++e) {
        L::a_coord(l, e, r, c);
        am[r][c] = A(a[l].e[e]);
      }
      for (int e = 0; e < L::kB; ++e) {
        L::b_coord(l, e, r, c);
        bm[r][c] = A(b[l].e[e]);
      }
      for (int e = 0; e < 4; ++e) {
        L::c_coord(l, e, r, c);
        cm[r][c] = d[l].e[e];
      }
    }
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 8; ++n) {
        A s = cm[r][n];
        for (int k = 0; k < L::kK; ++k) s += am[r][k] * bm[k][n];
        cm[r][n] = s;
      }
    for (int l = 0; l < 32; ++l)
      for (int e = 0; e < 4; ++e) {
        int r, n;
        L::c_coord(l, e, r, n);
        d[l].e[e] = cm[r][n];
      }
  }
};

#if defined(__CUDACC__)
// The GPU's warp: each thread is its lane.
struct DeviceWarp {
  static constexpr int kLanes = 1;
  __device__ __forceinline__ static int lane(int) { return int(threadIdx.x & 31); }

  template <class L, typename T>
  __device__ __forceinline__ static void load_a(Lanes<Frag<T, L::kA>, 1>& a, const T* tile,
                                                int stride, int row0, int col0) {
    static_assert(sizeof(Frag<T, L::kA>) == 16, "ldmatrix.x4: four 32-bit registers");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // the tensor-core variant needs sm_80 (mma.sync bf16 / tf32): never launched below
#else
    const T* p = tile + L::ldmatrix_a_offset(lane(0), stride, row0, col0);
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
    uint32_t r[4];
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
    memcpy(&a[0], r, 16);
#endif
  }

  template <class L, typename T, typename A>
  __device__ __forceinline__ static void mma(Lanes<Frag<A, 4>, 1>& d,
                                             const Lanes<Frag<T, L::kA>, 1>& a,
                                             const Lanes<Frag<T, L::kB>, 1>& b) {
    static_assert(std::is_same<A, float>::value, "fp32 accumulation");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();  // as load_a: sm_80 and later only
#else
    uint32_t ar[4], br[2];
    memcpy(ar, &a[0], 16);
    memcpy(br, &b[0], 8);
    float* c = d[0].e;
    if constexpr (std::is_same<T, float>::value) {
      static_assert(L::kK == 8, "tf32: m16n8k8");
      asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(ar[0]), "r"(ar[1]), "r"(ar[2]), "r"(ar[3]), "r"(br[0]), "r"(br[1]));
    } else if constexpr (std::is_same<T, c10::Half>::value) {
      static_assert(L::kK == 16, "f16: m16n8k16");
      asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(ar[0]), "r"(ar[1]), "r"(ar[2]), "r"(ar[3]), "r"(br[0]), "r"(br[1]));
    } else {
      static_assert(std::is_same<T, c10::BFloat16>::value && L::kK == 16, "bf16: m16n8k16");
      asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
          "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(ar[0]), "r"(ar[1]), "r"(ar[2]), "r"(ar[3]), "r"(br[0]), "r"(br[1]));
    }
#endif
  }
};
#endif

// ---- the plan --------------------------------------------------------------------------------

struct MmaPlan {
  bool fits = false;
  const char* reason = "";
  int64_t gates = 0;        // K
  int64_t mma_k = 0;        // 16 (bf16 / fp16) or 8 (tf32)
  int64_t units = 0;        // hidden units per block (slice width), <= 8 * warps
  int64_t warps = 0;        // ceil(units / 8): warp w owns units [8w, 8w + 8) of the slice
  int64_t slices = 0;       // ceil(H / units)
  int64_t tile_rows = 0;    // batch rows per tile
  int64_t tiles = 0;        // ceil(B / tile_rows)
  int64_t mtiles = 0;       // ceil(tile_rows / 16)
  int64_t kdim = 0;         // the product's K: H (forward) or K * H (backward)
  int64_t ktiles = 0;       // ceil(kdim / mma_k)
  int64_t reg_ktiles = 0;   // k-tiles of W_hh fragments in registers; the rest in shared memory
  int64_t chunk_ktiles = 0; // backward: k-tiles of drec per A-tile fill (forward: all)
  int64_t chunks = 0;       // ceil(ktiles / chunk_ktiles)
  int64_t tile_stride = 0;  // A tile row stride: chunk_ktiles * mma_k + 16 bytes of padding
  int64_t w_smem_elems = 0;  // (ktiles - reg_ktiles) x warps x n-tiles x 32 lanes x B-fragment
  int64_t tile_elems = 0;    // 16 * mtiles * tile_stride
  int64_t state_elems = 0;   // fp32 per-element state: warps x mtiles x 32 lanes x 4, per array
  int64_t state_arrays = 0;  // forward: c; backward: dc, dh_pass, dh (the product's sum)
  int64_t blocks = 0;
  int64_t blocks_per_sm = 0;
  MTL_HD int64_t threads() const { return 32 * warps; }
  int64_t block_x() const { return 32 * warps; }
  int64_t block_y() const { return 1; }
  // Dynamic shared memory on the GPU (fp32 state): W fragments, A tile, state, each 16-aligned.
  MTL_HD int64_t smem_bytes(int64_t elem_bytes) const {
    return PersistentPlan::align16(w_smem_elems * elem_bytes) +
           PersistentPlan::align16(tile_elems * elem_bytes) + state_arrays * state_elems * 4;
  }
};

// The register capacity in k-tiles (mma_reg_ktiles<K, backward>() at run time).
inline int64_t mma_reg_ktiles_max(int64_t K, bool backward) {
  return backward ? kMmaWRegs / 2 : kMmaWRegs / (2 * K);
}

// A plan with the tiling given (the emulator's tests sweep these). reg_ktiles < 0: as many k-tiles
// in registers as they hold; chunk_ktiles <= 0: the whole K dimension in one fill (the forward's
// is always whole).
inline MmaPlan persistent_mma_plan_from_tiles(int64_t K, int64_t G, int64_t B, int64_t H,
                                              bool backward, int64_t units, int64_t tile_rows,
                                              int64_t reg_ktiles, int64_t mma_k,
                                              int64_t chunk_ktiles = 0) {
  MmaPlan p;
  p.reason = "invalid tiling";
  if (K < 1 || units < 1 || tile_rows < 1 || (mma_k != 8 && mma_k != 16)) return p;
  p.gates = K;
  p.mma_k = mma_k;
  p.units = units;
  p.warps = ceil_div(units, 8);
  p.slices = ceil_div(H, units);
  p.tile_rows = tile_rows;
  p.tiles = ceil_div(B, tile_rows);
  p.mtiles = ceil_div(tile_rows, 16);
  p.kdim = backward ? K * H : H;
  p.ktiles = ceil_div(p.kdim, mma_k);
  const int64_t reg_max = std::min(p.ktiles, mma_reg_ktiles_max(K, backward));
  p.reg_ktiles = reg_ktiles < 0 ? reg_max : reg_ktiles;
  p.chunk_ktiles = (!backward || chunk_ktiles <= 0) ? p.ktiles : std::min(chunk_ktiles, p.ktiles);
  p.chunks = ceil_div(p.ktiles, p.chunk_ktiles);
  p.tile_stride = p.chunk_ktiles * mma_k + mma_k / 2;  // + 16 bytes: an odd count of 16-byte words
  const int64_t n_tiles = backward ? 1 : K, b_elems = mma_k / 4;
  p.w_smem_elems = (p.ktiles - p.reg_ktiles) * p.warps * n_tiles * 32 * b_elems;
  p.tile_elems = 16 * p.mtiles * p.tile_stride;
  p.state_elems = p.warps * p.mtiles * 32 * 4;
  p.state_arrays = backward ? 3 : 1;
  p.blocks = G * p.tiles * p.slices;
  p.fits = units <= H && units <= 8 * kMmaMaxWarps && tile_rows <= B &&
           p.mtiles <= kMmaMaxMTiles && p.reg_ktiles >= 0 && p.reg_ktiles <= reg_max;
  p.reason = p.fits ? "" : "invalid tiling";
  return p;
}

// The plan for a device. Widest slices first (up to 8 warps = 64 units; one slice per group needs
// no inter-block barrier), then the fewest rows per tile (m-tiles of 16) that still keep one block
// per SM, else the fewest that keep every block resident; backward, whole drec rows per fill, else
// halves. A plan that does not fit leaves the FMA variant (and after it the per-step path) to run.
inline MmaPlan persistent_mma_plan(int64_t K, int64_t G, int64_t B, int64_t H, int64_t elem_bytes,
                                   int64_t mma_k, bool backward, const PersistentLimits& lim) {
  MmaPlan best;
  best.reason = "the W_hh fragments and tiles do not fit in shared memory";
  const int64_t reserved_per_block = 1024;
  const int64_t max_warps =
      std::min<int64_t>({kMmaMaxWarps, ceil_div(H, 8), lim.max_threads_per_block / 32});
  const int64_t ktiles = ceil_div(backward ? K * H : H, mma_k);
  const int64_t min_chunk = std::min<int64_t>(ktiles, 4);
  for (int64_t warps = max_warps; warps >= 1; --warps) {
    const int64_t units = std::min(H, 8 * warps);
    MmaPlan resident;  // the first tiling whose blocks are all resident, when none has one per SM
    for (int64_t mt = 1; mt <= kMmaMaxMTiles; ++mt) {
      const int64_t tiles = ceil_div(B, std::min(B, 16 * mt));
      const int64_t tile_rows = ceil_div(B, tiles);
      for (int64_t chunk = ktiles; chunk >= min_chunk;
           chunk = chunk > min_chunk ? std::max(min_chunk, ceil_div(chunk, 2)) : 0) {
        MmaPlan p = persistent_mma_plan_from_tiles(K, G, B, H, backward, units, tile_rows, -1,
                                                   mma_k, chunk);
        if (!p.fits || p.smem_bytes(elem_bytes) > lim.smem_per_block) continue;
        const int64_t smem = p.smem_bytes(elem_bytes) + reserved_per_block;
        p.blocks_per_sm = std::min({lim.smem_per_sm / smem, lim.max_threads_per_sm / p.threads(),
                                    lim.regs_per_sm / (kMmaRegsPerThread * p.threads()),
                                    lim.max_blocks_per_sm});
        if (p.blocks_per_sm < 1 || p.blocks > p.blocks_per_sm * lim.num_sms) {
          best.reason = "too many blocks to be resident at once";
          continue;
        }
        if (p.blocks <= lim.num_sms) return p;
        if (!resident.fits) resident = p;
        break;  // more chunks would not make this tiling more resident
      }
    }
    if (resident.fits) return resident;
  }
  best.fits = false;
  return best;
}

// Shared-memory W_hh fragments beyond the registers: [kt - reg_ktiles][warp][n-tile][lane][kB].
MTL_HD int mma_w_smem_offset(const MmaPlan& p, int kt, int warp, int nt, int n_tiles, int lane) {
  return ((((kt - int(p.reg_ktiles)) * int(p.warps) + warp) * n_tiles + nt) * 32 + lane) *
         (int(p.mma_k) / 4);
}

// A lane's 4 fp32 state values of m-tile mt in a state array: [warp][mt][lane][4] (one 16-byte
// access per lane, a warp's 512 contiguous bytes).
MTL_HD int mma_state_offset(const MmaPlan& p, int warp, int mt, int lane) {
  return ((warp * int(p.mtiles) + mt) * 32 + lane) * 4;
}

template <typename T>
MTL_HD void store_frag(T* p, const Frag<T, 4>& f) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4) {
    float4 v;
    memcpy(&v, &f, 16);
    *reinterpret_cast<float4*>(p) = v;
    return;
  }
#endif
  for (int e = 0; e < 4; ++e) p[e] = f.e[e];
}

// The A tile's padding: rows [rows, 16 mtiles) of every column, zeroed once at the start (the
// fills write only the tile's rows; a NaN there would spoil nothing stored, but is kept out).
// Columns past kdim are zeroed by the fills (mma_fill_tile).
template <typename T>
MTL_HD void mma_zero_tile_padding(T* tile, const MmaPlan& p, const PersistentBlock& k, int tid,
                                  int nthreads) {
  zero_rect(tile, int(p.tile_stride), int(k.rows), int(16 * p.mtiles), 0,
            int(p.chunk_ktiles * p.mma_k), tid, nthreads);
}

// Phase A: columns [col0, col0 + chunk_ktiles * kK) of the tile's rows (row r at src + r * stride),
// those past kdim zero, into the A tile.
template <typename T>
MTL_HD void mma_fill_tile(T* tile, const MmaPlan& p, const PersistentBlock& k, const T* src,
                          int64_t src_stride, int col0, int tid, int nthreads) {
  const int width = int(p.chunk_ktiles * p.mma_k);
  const int n = std::min(width, int(p.kdim) - col0);
  fill_rows_cg(tile, int(p.tile_stride), src + col0, src_stride, int(k.rows), n, tid, nthreads);
  zero_rect(tile, int(p.tile_stride), 0, int(k.rows), n, width, tid, nthreads);
}

// D = C + A(m-tile mt) . B over k-tiles [kt0, kt1) (the A tile holds columns from k-tile kt0 on):
// the registers' k-tiles (a static index each: an unrolled loop with a run-time guard), then
// shared memory's.
template <int kN, int kRegKT, class W, class L, typename scalar_t, typename acc_t>
MTL_HD void mma_tile_product(Lanes<Frag<acc_t, 4>, W::kLanes> (&acc)[kN],
                             const Lanes<Frag<scalar_t, L::kB>, W::kLanes> (&w)[kRegKT][kN],
                             const scalar_t* tile, const scalar_t* w_s, const MmaPlan& p, int mt,
                             int warp, int kt0, int kt1) {
  constexpr int kK = L::kK;
  const int stride = int(p.tile_stride), reg_kt = int(p.reg_ktiles);
  MTL_UNROLL
  for (int kt = 0; kt < kRegKT; ++kt) {
    if (kt >= kt0 && kt < kt1 && kt < reg_kt) {
      Lanes<Frag<scalar_t, L::kA>, W::kLanes> a;
      W::template load_a<L>(a, tile, stride, 16 * mt, (kt - kt0) * kK);
      MTL_UNROLL
      for (int i = 0; i < W::kLanes; ++i)
        MTL_UNROLL
        for (int e = 0; e < L::kA; ++e) a[i].e[e] = mma_operand(a[i].e[e]);
      MTL_UNROLL
      for (int nt = 0; nt < kN; ++nt) W::template mma<L>(acc[nt], a, w[kt][nt]);
    }
  }
  for (int kt = kt0 > reg_kt ? kt0 : reg_kt; kt < kt1; ++kt) {
    Lanes<Frag<scalar_t, L::kA>, W::kLanes> a;
    W::template load_a<L>(a, tile, stride, 16 * mt, (kt - kt0) * kK);
    MTL_UNROLL
    for (int i = 0; i < W::kLanes; ++i)
      MTL_UNROLL
      for (int e = 0; e < L::kA; ++e) a[i].e[e] = mma_operand(a[i].e[e]);
    MTL_UNROLL
    for (int nt = 0; nt < kN; ++nt) {
      Lanes<Frag<scalar_t, L::kB>, W::kLanes> b;
      MTL_UNROLL
      for (int i = 0; i < W::kLanes; ++i)
        load_frag(b[i], w_s + mma_w_smem_offset(p, kt, warp, nt, kN, W::lane(i)));
      W::template mma<L>(acc[nt], a, b);
    }
  }
}

template <int kN, class W, typename acc_t>
MTL_HD void zero_acc(Lanes<Frag<acc_t, 4>, W::kLanes> (&acc)[kN]) {
  MTL_UNROLL
  for (int nt = 0; nt < kN; ++nt)
    MTL_UNROLL
    for (int i = 0; i < W::kLanes; ++i)
      MTL_UNROLL
      for (int e = 0; e < 4; ++e) acc[nt][i].e[e] = acc_t(0);
}

// Loads the warp's W_hh B-fragments: k-tiles [0, reg_ktiles) into registers, the rest into shared
// memory. value(nt, k, n): B[k][n] of n-tile nt (zero outside the matrix), before operand rounding.
template <int kN, int kRegKT, class W, class L, typename scalar_t, typename F>
MTL_HD void mma_load_weights(Lanes<Frag<scalar_t, L::kB>, W::kLanes> (&w)[kRegKT][kN],
                             scalar_t* w_s, const MmaPlan& p, int warp, const F& value) {
  const int reg_kt = int(p.reg_ktiles), ktiles = int(p.ktiles);
  MTL_UNROLL
  for (int i = 0; i < W::kLanes; ++i) {
    const int lane = W::lane(i);
    MTL_UNROLL
    for (int kt = 0; kt < kRegKT; ++kt) {
      MTL_UNROLL
      for (int nt = 0; nt < kN; ++nt) {
        MTL_UNROLL
        for (int e = 0; e < L::kB; ++e) {
          int kk, n;
          L::b_coord(lane, e, kk, n);
          w[kt][nt][i].e[e] =
              kt < reg_kt ? mma_operand(value(nt, kt * L::kK + kk, n)) : scalar_t(0);
        }
      }
    }
    for (int kt = reg_kt; kt < ktiles; ++kt)
      for (int nt = 0; nt < kN; ++nt) {
        scalar_t* dst = w_s + mma_w_smem_offset(p, kt, warp, nt, kN, lane);
        for (int e = 0; e < L::kB; ++e) {
          int kk, n;
          L::b_coord(lane, e, kk, n);
          dst[e] = mma_operand(value(nt, kt * L::kK + kk, n));
        }
      }
  }
}

// ---- forward ---------------------------------------------------------------------------------

// A warp's registers for the whole sequence: its W_hh fragments (the octet's K gates x the
// registers' k-tiles). Its cell state lives in shared memory (state array 0).
template <class Cell, class W, int kK, typename scalar_t, typename acc_t>
struct MmaForwardWarp {
  using L = MmaLayout<kK>;
  static constexpr int kN = Cell::kGates;  // n-tiles: the octet's K gates
  static constexpr int kRegKT = mma_reg_ktiles<Cell::kGates, false>();
  Lanes<Frag<scalar_t, L::kB>, W::kLanes> w[kRegKT][kN];
};

// Kernel start, per warp: its W_hh fragments (registers and shared memory) and the cell state of
// its (row, unit) elements (c0; zero for cells without a cell state).
template <class Cell, class W, int kK, typename scalar_t, typename acc_t>
MTL_HD void mma_forward_init(const SequenceForward<scalar_t, acc_t>& q, const MmaPlan& p,
                             const PersistentBlock& k, int warp, scalar_t* w_s, acc_t* state,
                             MmaForwardWarp<Cell, W, kK, scalar_t, acc_t>& st) {
  using L = MmaLayout<kK>;
  using S = MmaForwardWarp<Cell, W, kK, scalar_t, acc_t>;
  constexpr int K = Cell::kGates;
  const int H = int(q.H), units = int(k.units), unit0 = int(k.unit0), base = 8 * warp;
  const scalar_t* w_g = q.weight_hh + k.g * K * q.H * q.H;
  // B[kk][n] of n-tile `gate` = W_hh[g][gate * H + unit0 + base + n][kk]
  mma_load_weights<K, S::kRegKT, W, L>(st.w, w_s, p, warp, [&](int gate, int kk, int n) {
    const int jj = base + n;
    return (jj < units && kk < H) ? w_g[int64_t(gate * H + unit0 + jj) * H + kk] : scalar_t(0);
  });
  const int64_t first = aux_slot(q, first_slot(q.T, q.reverse));
  MTL_UNROLL
  for (int i = 0; i < W::kLanes; ++i) {
    const int lane = W::lane(i);
    for (int mt = 0; mt < int(p.mtiles); ++mt) {
      Frag<acc_t, 4> c;
      MTL_UNROLL
      for (int e = 0; e < 4; ++e) {
        int r, n;
        L::c_coord(lane, e, r, n);
        const int row = 16 * mt + r, jj = base + n;
        c.e[e] = (Cell::kCellState && row < k.rows && jj < units)
                     ? q.aux[k.g * q.aux_sg + first * q.aux_sslot + (k.row0 + row) * q.H + unit0 + jj]
                     : acc_t(0);
      }
      store_frag(state + mma_state_offset(p, warp, mt, lane), c);
    }
  }
}

// Forward, phase A of step t: h_{t-1} of the tile's rows (all H units) into the A tile.
template <typename scalar_t, typename acc_t>
MTL_HD void mma_fill_h(scalar_t* tile, const SequenceForward<scalar_t, acc_t>& q, const MmaPlan& p,
                       const PersistentBlock& k, int64_t t, int tid, int nthreads) {
  const scalar_t* src = q.h_states + k.g * q.h_sg +
                        state_slot(q, prev_slot(t, q.reverse)) * q.h_sslot + k.row0 * q.H;
  mma_fill_tile(tile, p, k, src, q.H, 0, tid, nthreads);
}

// Forward, phase B of step t for one warp: per m-tile, the recurrent products of its K n-tiles,
// then the cell of each of the lane's (row, unit) elements (forward_element) with all K gates of
// the unit in the lane's accumulators.
template <class Cell, class W, int kK, typename scalar_t, typename acc_t>
MTL_HD void mma_forward_step(const SequenceForward<scalar_t, acc_t>& q, const MmaPlan& p,
                             const PersistentBlock& k, int warp, int64_t t, const scalar_t* tile,
                             const scalar_t* w_s, acc_t* state,
                             const MmaForwardWarp<Cell, W, kK, scalar_t, acc_t>& st) {
  using L = MmaLayout<kK>;
  using S = MmaForwardWarp<Cell, W, kK, scalar_t, acc_t>;
  constexpr int K = Cell::kGates;
  const int base = 8 * warp, units = int(k.units), rows = int(k.rows);
  const int stride = int(p.tile_stride), mtiles = int(p.mtiles), ktiles = int(p.ktiles);
  if (base >= units) return;  // a narrower last slice: this warp has no unit (warp-uniform)
  MTL_NO_UNROLL
  for (int mt = 0; mt < mtiles; ++mt) {
    Lanes<Frag<acc_t, 4>, W::kLanes> acc[K];
    zero_acc<K, W>(acc);
    mma_tile_product<K, S::kRegKT, W, L>(acc, st.w, tile, w_s, p, mt, warp, 0, ktiles);
    MTL_UNROLL
    for (int i = 0; i < W::kLanes; ++i) {
      const int lane = W::lane(i);
      acc_t* c_ptr = state + mma_state_offset(p, warp, mt, lane);
      Frag<acc_t, 4> c;
      load_frag(c, c_ptr);
      MTL_UNROLL
      for (int e = 0; e < 4; ++e) {
        int r, n;
        L::c_coord(lane, e, r, n);
        const int row = 16 * mt + r, jj = base + n;
        if (row < rows && jj < units) {
          acc_t rec[K];
          MTL_UNROLL
          for (int gate = 0; gate < K; ++gate) rec[gate] = acc[gate][i].e[e];
          const int j = int(k.unit0) + jj;
          c.e[e] = forward_element<Cell>(forward_row(q, K, t, k.g, k.row0 + row), j, q.H, rec,
                                         acc_t(tile[row * stride + j]), c.e[e]);
        }
      }
      store_frag(c_ptr, c);
    }
  }
}

// ---- backward --------------------------------------------------------------------------------

// A warp's registers for the whole sequence: its W_hh fragments (its octet's units x the
// registers' k-tiles of KH). dc, dh_pass and the product dh live in shared memory (state arrays
// 0, 1, 2).
template <class Cell, class W, int kK, typename scalar_t, typename acc_t>
struct MmaBackwardWarp {
  using L = MmaLayout<kK>;
  static constexpr int kRegKT = mma_reg_ktiles<Cell::kGates, true>();
  Lanes<Frag<scalar_t, L::kB>, W::kLanes> w[kRegKT][1];
};

// Kernel start, per warp: its W_hh fragments (B[kk][n] = W_hh[g][kk][unit0 + 8 warp + n], kk in
// [0, KH)) and grad_c_n / grad_h_n of its elements.
template <class Cell, class W, int kK, typename scalar_t, typename acc_t>
MTL_HD void mma_backward_init(const SequenceBackward<scalar_t, acc_t>& q, const MmaPlan& p,
                              const PersistentBlock& k, int warp, scalar_t* w_s, acc_t* state,
                              MmaBackwardWarp<Cell, W, kK, scalar_t, acc_t>& st) {
  using L = MmaLayout<kK>;
  using S = MmaBackwardWarp<Cell, W, kK, scalar_t, acc_t>;
  constexpr int K = Cell::kGates;
  const int H = int(q.H), KH = K * H, units = int(k.units), unit0 = int(k.unit0), base = 8 * warp;
  const scalar_t* w_g = q.weight_hh + k.g * K * q.H * q.H;
  mma_load_weights<1, S::kRegKT, W, L>(st.w, w_s, p, warp, [&](int, int kk, int n) {
    const int jj = base + n;
    return (jj < units && kk < KH) ? w_g[int64_t(kk) * H + unit0 + jj] : scalar_t(0);
  });
  const int64_t arr = p.state_elems;
  MTL_UNROLL
  for (int i = 0; i < W::kLanes; ++i) {
    const int lane = W::lane(i);
    for (int mt = 0; mt < int(p.mtiles); ++mt) {
      Frag<acc_t, 4> dc, dh_pass;
      MTL_UNROLL
      for (int e = 0; e < 4; ++e) {
        int r, n;
        L::c_coord(lane, e, r, n);
        const int row = 16 * mt + r, jj = base + n;
        const bool mine = row < k.rows && jj < units;
        const int64_t off = (k.g * q.B + k.row0 + row) * q.H + unit0 + jj;
        dc.e[e] = (Cell::kCellState && mine) ? q.grad_c_n[off] : acc_t(0);
        dh_pass.e[e] = mine ? acc_t(q.grad_h_n[off]) : acc_t(0);
      }
      const int o = mma_state_offset(p, warp, mt, lane);
      store_frag(state + o, dc);
      store_frag(state + arr + o, dh_pass);
    }
  }
}

// Backward, phase A of loop step s > 0, chunk c: drec of time t_prev (the previous loop step's),
// the tile's rows, columns [c * chunk_ktiles * kK, ...) of KH, into the A tile.
template <typename scalar_t, typename acc_t>
MTL_HD void mma_fill_drec(scalar_t* tile, const SequenceBackward<scalar_t, acc_t>& q,
                          const MmaPlan& p, const PersistentBlock& k, int64_t t_prev, int c,
                          int tid, int nthreads) {
  const scalar_t* src = q.drec + t_prev * q.gates_st + k.g * q.gates_sg + k.row0 * q.gates_sb;
  mma_fill_tile(tile, p, k, src, q.gates_sb, int(c * p.chunk_ktiles * p.mma_k), tid, nthreads);
}

// Backward, phase B (the product) of loop step s > 0, chunk c, for one warp: dh (state array 2)
// += drec_{t_prev}(chunk c) . W_hh(chunk c rows, the octet's units), per m-tile.
template <class Cell, class W, int kK, typename scalar_t, typename acc_t>
MTL_HD void mma_backward_product(const MmaPlan& p, const PersistentBlock& k, int warp, int c,
                                 const scalar_t* tile, const scalar_t* w_s, acc_t* state,
                                 const MmaBackwardWarp<Cell, W, kK, scalar_t, acc_t>& st) {
  using L = MmaLayout<kK>;
  using S = MmaBackwardWarp<Cell, W, kK, scalar_t, acc_t>;
  if (8 * warp >= k.units) return;  // warp-uniform
  const int kt0 = int(c * p.chunk_ktiles);
  const int kt1 = kt0 + int(p.chunk_ktiles) < int(p.ktiles) ? kt0 + int(p.chunk_ktiles)
                                                            : int(p.ktiles);
  acc_t* dh = state + 2 * p.state_elems;
  MTL_NO_UNROLL
  for (int mt = 0; mt < int(p.mtiles); ++mt) {
    Lanes<Frag<acc_t, 4>, W::kLanes> acc[1];
    if (c == 0) {
      zero_acc<1, W>(acc);
    } else {
      MTL_UNROLL
      for (int i = 0; i < W::kLanes; ++i)
        load_frag(acc[0][i], dh + mma_state_offset(p, warp, mt, W::lane(i)));
    }
    mma_tile_product<1, S::kRegKT, W, L>(acc, st.w, tile, w_s, p, mt, warp, kt0, kt1);
    MTL_UNROLL
    for (int i = 0; i < W::kLanes; ++i)
      store_frag(dh + mma_state_offset(p, warp, mt, W::lane(i)), acc[0][i]);
  }
}

// Backward, the elements of loop step s in [0, T] for one warp: with dh = W_hh^T drec of loop step
// s - 1 (state array 2; 0 at s = 0), the cell backward at time backward_time(s) (s < T), or
// grad_h0 = dh_pass + dh and grad_c0 = dc (s = T).
template <class Cell, class W, int kK, typename scalar_t, typename acc_t>
MTL_HD void mma_backward_elements(const SequenceBackward<scalar_t, acc_t>& q, const MmaPlan& p,
                                  const PersistentBlock& k, int warp, int64_t s, acc_t* state) {
  using L = MmaLayout<kK>;
  const int base = 8 * warp, units = int(k.units), rows = int(k.rows);
  if (base >= units) return;  // warp-uniform
  const bool finish = s == q.T;
  const int64_t t = finish ? 0 : backward_time(s, q.T, q.reverse);
  const int64_t arr = p.state_elems;
  MTL_NO_UNROLL
  for (int mt = 0; mt < int(p.mtiles); ++mt) {
    MTL_UNROLL
    for (int i = 0; i < W::kLanes; ++i) {
      const int lane = W::lane(i);
      const int o = mma_state_offset(p, warp, mt, lane);
      Frag<acc_t, 4> dc, dh_pass, dh;
      load_frag(dc, state + o);
      load_frag(dh_pass, state + arr + o);
      if (s > 0) {
        load_frag(dh, state + 2 * arr + o);
      } else {
        MTL_UNROLL
        for (int e = 0; e < 4; ++e) dh.e[e] = acc_t(0);
      }
      MTL_UNROLL
      for (int e = 0; e < 4; ++e) {
        int r, n;
        L::c_coord(lane, e, r, n);
        const int row = 16 * mt + r, jj = base + n;
        if (row < rows && jj < units) {
          const int64_t j = k.unit0 + jj;
          if (!finish) {
            backward_element<Cell>(backward_row(q, t, k.g, k.row0 + row), j, q.H,
                                   dh_pass.e[e] + dh.e[e], dc.e[e], dh_pass.e[e]);
          } else {
            const int64_t off = (k.g * q.B + k.row0 + row) * q.H + j;
            q.grad_h0[off] = scalar_t(dh_pass.e[e] + dh.e[e]);
            if constexpr (Cell::kCellState) q.grad_c0[off] = dc.e[e];
          }
        }
      }
      store_frag(state + o, dc);
      store_frag(state + arr + o, dh_pass);
    }
  }
}

}  // namespace mtl_kernels
