// The persistent recurrence kernel (the GPU's sequence path): all T steps of one layer and
// direction, all G groups, one launch, for any cell. This header holds everything but the launch
// and the inter-block barrier (cuda_persistent.cu), as host+device code, so that the CPU runs it
// too (persistent_emulate.cpp runs every block and thread of a plan in order): the tiling, the
// shared-memory layouts, the index math and the dot products are tested without a GPU.
//
// Work split (K = Cell::kGates). Blocks own (group g, batch tile, slice of hidden units):
//   block = (g * tiles + tile) * slices + slice
//   slice s: hidden units [s * units, min(H, (s + 1) * units)), units <= 256
//   tile i : batch rows   [i * tile_rows, min(B, (i + 1) * tile_rows))
// A block's threads are (tx, ty), tx in [0, units) the hidden unit in the slice, ty in
// [0, threads_y); thread (tx, ty) owns rows ty, ty + threads_y, ... (at most kRows) of the tile.
//
// Forward, per block: its W_hh rows (K gates x its units, all H columns) sit in shared memory for
// the whole sequence, the cell state (if any) of its (unit, row) pairs in registers. Each step:
//   A. copy h_{t-1} of the tile's rows (all H units, written by the slice blocks of the same group
//      and tile in the previous step) into shared memory;
//   B. each thread: K dot products per row (W rows . h_{t-1}) + the cell (recurrence/step.h),
//      writes h_t, aux, the saved values and the output;
//   then a barrier among the `slices` blocks of the same (group, tile) only: groups and tiles never
//      wait for each other (none at all when slices == 1).
// Backward, per block: the W_hh columns of its units (all KH rows) in shared memory; the cell
// state's gradient and the pass-through part of dh in registers. Each step (forward's order
// reversed):
//   A. copy drec_{t+1} of the tile's rows (KH columns, written by the slice blocks in the previous
//      step) into shared memory, and sum W_hh^T drec_{t+1} for the thread's (unit, rows); in
//      chunks of columns when a whole row does not fit next to W_hh;
//   B. dh_t = dh_pass + that sum, the cell backward, writes dgates_t (and drec_t);
//   then the same barrier. A last A/B pair gives grad_h0 = dh_pass + W_hh^T drec_{first}.
// The saved and returned tensors are exactly the per-step path's, so the paths mix.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/macros.h"
#include "recurrence/sequence.h"
#include "recurrence/step.h"

namespace mtl_kernels {

// Rows per thread are a template argument (1, 2, 4 or 8) so that per-row accumulators and state
// stay in registers.
constexpr int64_t kPersistentMaxRows = 8;
// Threads per block at most (the kernels' __launch_bounds__).
constexpr int kPersistentMaxThreads = 256;

struct PersistentPlan {
  bool fits = false;
  const char* reason = "";
  int64_t gates = 0;            // K, the cell's gate blocks
  int64_t units = 0;            // hidden units per block (blockDim.x)
  int64_t slices = 0;           // blocks per (group, tile) = ceil(H / units)
  int64_t tile_rows = 0;        // batch rows per tile
  int64_t tiles = 0;            // ceil(B / tile_rows)
  int64_t threads_y = 0;        // blockDim.y
  int64_t rows_per_thread = 0;  // 1, 2, 4 or 8, >= ceil(tile_rows / threads_y)
  int64_t chunk = 0;            // backward: drec columns per shared-memory fill (KH: one fill)
  int64_t weight_elems = 0;     // shared memory: W_hh slice, K * units * round4(H) (forward) or
                                // round4(KH) * units (backward): zero-padded to column quads
  int64_t tile_elems = 0;       // shared memory: tile_rows * tile_stride()
  int64_t blocks = 0;           // G * tiles * slices
  int64_t blocks_per_sm = 0;    // estimated from the limits (the CUDA side checks with the driver)
  MTL_HD int64_t threads() const { return units * threads_y; }
  // Row stride of the shared-memory tile: H (forward) or chunk (backward), padded to a multiple
  // of 4 with zeros, so that the inner loops go 4 columns at a time without a tail.
  MTL_HD int64_t tile_stride() const { return round4(chunk); }
  MTL_HD static int64_t round4(int64_t x) { return (x + 3) & ~int64_t(3); }
  int64_t block_x() const { return units; }  // the launch's blockDim
  int64_t block_y() const { return threads_y; }
  MTL_HD int64_t smem_bytes(int64_t elem_bytes) const {
    return align16(weight_elems * elem_bytes) + tile_elems * elem_bytes;
  }
  MTL_HD static int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }
};

// What the plan needs to know of the device.
struct PersistentLimits {
  int64_t num_sms;
  int64_t smem_per_block;  // opt-in maximum of dynamic shared memory per block
  int64_t smem_per_sm;
  int64_t max_threads_per_sm;
  int64_t max_threads_per_block;
  // Blocks per SM at most: the hardware's limit, or fewer once the occupancy API has said what the
  // compiled kernel's registers allow (cuda_persistent.cu plans again with that).
  int64_t max_blocks_per_sm = 32;
  int64_t regs_per_sm = 65536;  // 32-bit registers per SM (sm_80 and later)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t rows_template(int64_t rows) {  // the kRows instance that covers `rows`
  return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
}

// A plan with the tiling given (the emulator's tests sweep these; the CUDA plan below picks them).
// chunk: the backward's drec columns per fill, in [1, KH] (ignored forward).
inline PersistentPlan persistent_plan_from_tiles(int64_t K, int64_t G, int64_t B, int64_t H,
                                                 bool backward, int64_t units, int64_t tile_rows,
                                                 int64_t threads_y, int64_t chunk) {
  PersistentPlan p;
  if (!backward) chunk = H;
  if (K < 1 || units < 1 || tile_rows < 1 || threads_y < 1 || chunk < 1) {  // before dividing
    p.reason = "invalid tiling";
    return p;
  }
  p.gates = K;
  p.units = units;
  p.slices = ceil_div(H, units);
  p.tile_rows = tile_rows;
  p.tiles = ceil_div(B, tile_rows);
  p.threads_y = threads_y;
  p.rows_per_thread = rows_template(ceil_div(tile_rows, threads_y));
  p.weight_elems = backward ? PersistentPlan::round4(K * H) * units
                            : K * units * PersistentPlan::round4(H);
  p.chunk = chunk;
  p.tile_elems = tile_rows * p.tile_stride();
  p.blocks = G * p.tiles * p.slices;
  p.fits = units <= H && tile_rows <= B && threads_y <= tile_rows &&
           ceil_div(tile_rows, threads_y) <= kPersistentMaxRows && chunk <= (backward ? K * H : H);
  p.reason = p.fits ? "" : "invalid tiling";
  return p;
}

// The plan for a device. Prefers wide slices (fewer blocks per barrier), then (backward) whole
// drec rows per fill, takes as many rows per tile as shared memory allows, then splits the batch
// while that still leaves SMs idle. The plan does not fit (and the per-step path runs) when the
// W_hh slice of even one unit does not fit in shared memory, or when the blocks cannot all be
// resident at once (the barrier would deadlock).
inline PersistentPlan persistent_plan(int64_t K, int64_t G, int64_t B, int64_t H, int64_t elem_bytes,
                                      bool backward, const PersistentLimits& lim) {
  PersistentPlan best;
  best.reason = "the W_hh slice of one hidden unit does not fit in shared memory";
  const int64_t reserved_per_block = 1024;  // the runtime's own shared memory per block (sm_80+)
  const int64_t max_threads = std::min<int64_t>(lim.max_threads_per_block, kPersistentMaxThreads);
  // Widest slices first: units = H (one block per group and tile) needs no inter-block barrier at
  // all, which at small sizes is most of a step's time.
  for (int64_t units = std::min<int64_t>(H, max_threads); units >= 1;
       units = units > 1 ? (units + 1) / 2 : 0) {
    const int64_t w_bytes = PersistentPlan::align16(
        (backward ? PersistentPlan::round4(K * H) * units : K * units * PersistentPlan::round4(H)) *
        elem_bytes);
    const int64_t threads_y_max = std::max<int64_t>(1, max_threads / units);
    const int64_t slices = ceil_div(H, units);
    // Backward: KH columns of drec per fill, else halves of that down to 32 (or KH if smaller),
    // all multiples of 4 so that every chunk takes the 4-wide path.
    const int64_t min_chunk = backward ? std::min<int64_t>(32, K * H) : H;
    for (int64_t chunk = backward ? K * H : H; chunk >= min_chunk;
         chunk = chunk > min_chunk ? std::max(min_chunk, 4 * ceil_div(ceil_div(chunk, 2), 4)) : 0) {
      const int64_t rows_smem =
          (lim.smem_per_block - w_bytes) / (PersistentPlan::round4(chunk) * elem_bytes);
      int64_t tile_rows = std::min({B, rows_smem, threads_y_max * kPersistentMaxRows});
      if (tile_rows < 1) continue;
      while (G * slices * ceil_div(B, ceil_div(tile_rows, 2)) <= lim.num_sms && tile_rows > 4)
        tile_rows = ceil_div(tile_rows, 2);  // more tiles: more SMs at work, fewer rows per block
      tile_rows = ceil_div(B, ceil_div(B, tile_rows));  // the same tile count, balanced
      // As many threads as allowed, but no more than kPersistentMaxRows rows per thread.
      int64_t threads_y = std::min(tile_rows, threads_y_max);
      threads_y = std::max(threads_y, ceil_div(tile_rows, kPersistentMaxRows));
      PersistentPlan p =
          persistent_plan_from_tiles(K, G, B, H, backward, units, tile_rows, threads_y, chunk);
      if (!p.fits) continue;
      const int64_t smem = p.smem_bytes(elem_bytes) + reserved_per_block;
      p.blocks_per_sm = std::min({lim.smem_per_sm / smem, lim.max_threads_per_sm / p.threads(),
                                  lim.max_blocks_per_sm});
      if (p.blocks_per_sm < 1 || p.blocks > p.blocks_per_sm * lim.num_sms) {
        best.reason = "too many blocks to be resident at once";
        continue;
      }
      return p;
    }
  }
  best.fits = false;
  return best;
}

struct PersistentBlock {
  int64_t g, tile, slice;
  int64_t unit0, units;  // hidden units [unit0, unit0 + units)
  int64_t row0, rows;    // batch rows [row0, row0 + rows)
};

// Plan: PersistentPlan, or the tensor-core variant's MmaPlan (persistent_mma.h): the same split.
template <class Plan>
MTL_HD PersistentBlock persistent_block(const Plan& p, int64_t B, int64_t H, int64_t block) {
  PersistentBlock k;
  k.slice = block % p.slices;
  k.tile = (block / p.slices) % p.tiles;
  k.g = block / (p.slices * p.tiles);
  k.unit0 = k.slice * p.units;
  k.units = (H - k.unit0) < p.units ? (H - k.unit0) : p.units;
  k.row0 = k.tile * p.tile_rows;
  k.rows = (B - k.row0) < p.tile_rows ? (B - k.row0) : p.tile_rows;
  return k;
}

// A load of data that other blocks wrote during this launch: through L2 on the GPU (L1 is not
// coherent across SMs), a plain load on the host.
template <typename T>
MTL_HD T load_shared_state(const T* p) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 2) {
    const unsigned short bits = __ldcg(reinterpret_cast<const unsigned short*>(p));
    T v;
    memcpy(&v, &bits, 2);
    return v;
  } else {
    return __ldcg(p);
  }
#else
  return *p;
#endif
}

// ---- shared-memory fills (all threads of a block, tid in [0, nthreads)) ----------------------

// How a block's threads cover `rows` rows of `items` items each without a division per item: tpr
// threads per row (a power of two, at least the items if the block has that many threads), so
// thread tid starts at row tid / tpr and item tid % tpr and steps by nthreads / tpr rows and by tpr
// items: one division per fill, none per element. All in 32-bit.
struct RowCover {
  int row0, row_step, item0, item_step;
  MTL_HD RowCover(int items, int tid, int nthreads) {
    int tpr = 1;
    while (tpr < items && tpr * 2 <= nthreads) tpr *= 2;
    row_step = nthreads / tpr;
    row0 = tid / tpr;
    item0 = tid & (tpr - 1);
    item_step = tpr;
    if (row0 >= row_step) row0 = 1 << 30;  // the threads past the last whole group of tpr: idle
  }
};

// Copies `rows` rows of n elements from global memory (row r at src + r * src_stride), which other
// blocks wrote during this launch (read through L2), into shared memory (row r at
// dst + r * dst_stride). On the GPU in 16-byte vectors wherever every row is 16-byte aligned and n
// a whole number of them; row starts in 64-bit pointers, offsets within a row in 32 bits.
template <typename T>
MTL_HD void fill_rows_cg(T* dst, int dst_stride, const T* src, int64_t src_stride, int rows, int n,
                         int tid, int nthreads) {
#if defined(__CUDA_ARCH__)
  constexpr int kVec = 16 / int(sizeof(T));
  if (kVec > 1 && n % kVec == 0 && dst_stride % kVec == 0 && src_stride % kVec == 0 &&
      reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
    const int nv = n / kVec;
    const RowCover rc(nv, tid, nthreads);
    for (int r = rc.row0; r < rows; r += rc.row_step) {
      const int4* s = reinterpret_cast<const int4*>(src + r * src_stride);
      int4* d = reinterpret_cast<int4*>(dst + r * dst_stride);
      for (int c = rc.item0; c < nv; c += rc.item_step) d[c] = __ldcg(s + c);
    }
    return;
  }
#endif
  const RowCover rc(n, tid, nthreads);
  for (int r = rc.row0; r < rows; r += rc.row_step) {
    const T* s = src + r * src_stride;
    T* d = dst + r * dst_stride;
    for (int c = rc.item0; c < n; c += rc.item_step) d[c] = load_shared_state(s + c);
  }
}

// Zeroes rows [r0, r1) x columns [c0, c1) of a shared-memory tile with row stride `stride`.
template <typename T>
MTL_HD void zero_rect(T* dst, int stride, int r0, int r1, int c0, int c1, int tid, int nthreads) {
  if (r0 >= r1 || c0 >= c1) return;
  const RowCover rc(c1 - c0, tid, nthreads);
  for (int r = r0 + rc.row0; r < r1; r += rc.row_step)
    for (int c = c0 + rc.item0; c < c1; c += rc.item_step) dst[r * stride + c] = T(0);
}

// Forward weights, by column quads: w_s[((c4 * K + gate) * units + jj) * 4 + cc] =
// W_hh[g][gate * H + unit0 + jj][4 c4 + cc], zero past H and past the slice's units, so that
// thread jj loads the 4 columns of a gate as one 16-byte (fp32) or 8-byte (16-bit) word, a warp's
// lanes consecutive. Rows (gate, jj) outside (one division per row), columns by thread inside
// (coalesced global reads).
template <int K, typename scalar_t>
MTL_HD void persistent_fill_weights_forward(scalar_t* w_s, const scalar_t* weight_hh,
                                            const PersistentBlock& k, int64_t units_, int64_t H_,
                                            int64_t tid, int64_t nthreads) {
  const int units = int(units_), H = int(H_), H4 = int(PersistentPlan::round4(H_));
  const scalar_t* w_g = weight_hh + k.g * K * H_ * H_;
  const RowCover rc(H4, int(tid), int(nthreads));
  for (int row = rc.row0; row < K * units; row += rc.row_step) {
    const int gate = row / units, jj = row - gate * units;
    const scalar_t* src = jj < k.units ? w_g + int64_t(gate * H + int(k.unit0) + jj) * H : nullptr;
    scalar_t* dst = w_s + (gate * units + jj) * 4;
    for (int col = rc.item0; col < H4; col += rc.item_step)
      dst[(col >> 2) * (K * units * 4) + (col & 3)] = (src && col < H) ? src[col] : scalar_t(0);
  }
}

// Backward weights, by row quads: wt_s[((n >> 2) * units + jj) * 4 + (n & 3)] =
// W_hh[g][n][unit0 + jj], n in [0, round4(KH)), zero past KH and past the slice's units: thread jj
// loads 4 consecutive n as one word. Rows n outside, jj by thread inside (coalesced).
template <int K, typename scalar_t>
MTL_HD void persistent_fill_weights_backward(scalar_t* wt_s, const scalar_t* weight_hh,
                                             const PersistentBlock& k, int64_t units_, int64_t H_,
                                             int64_t tid, int64_t nthreads) {
  const int units = int(units_), H = int(H_), KH = K * H, KH4 = int(PersistentPlan::round4(KH));
  const scalar_t* w_g = weight_hh + k.g * K * H_ * H_;
  const RowCover rc(units, int(tid), int(nthreads));
  for (int n = rc.row0; n < KH4; n += rc.row_step) {
    const scalar_t* src = n < KH ? w_g + int64_t(n) * H + k.unit0 : nullptr;
    scalar_t* dst = wt_s + (n >> 2) * (units * 4) + (n & 3);
    for (int jj = rc.item0; jj < units; jj += rc.item_step)
      dst[jj * 4] = (src && jj < k.units) ? src[jj] : scalar_t(0);
  }
}

// Forward, once at the start: the h tile's padding columns [H, round4(H)), which the per-step
// fills never write.
template <typename scalar_t>
MTL_HD void persistent_zero_h_padding(scalar_t* h_s, const PersistentPlan& p, int64_t H,
                                      int64_t tid, int64_t nthreads) {
  zero_rect(h_s, int(p.tile_stride()), 0, int(p.tile_rows), int(H), int(p.tile_stride()), int(tid),
            int(nthreads));
}

// Forward, phase A: h_s[r * stride + col] = h_{t-1}[g][row0 + r][col], col < H.
template <typename scalar_t, typename acc_t>
MTL_HD void persistent_fill_h(scalar_t* h_s, const SequenceForward<scalar_t, acc_t>& q,
                              const PersistentBlock& k, int64_t t, int64_t tid, int64_t nthreads) {
  const scalar_t* src = q.h_states + k.g * q.h_sg + state_slot(q, prev_slot(t, q.reverse)) * q.h_sslot +
                        k.row0 * q.H;
  fill_rows_cg(h_s, int(PersistentPlan::round4(q.H)), src, q.H, int(k.rows), int(q.H), int(tid),
               int(nthreads));
}

// Backward, phase A, one chunk: dr_s[r * stride + n] = drec_t[g][row0 + r][n0 + n] for n < ncols,
// zero for n in [ncols, round4(ncols)).
template <typename scalar_t, typename acc_t>
MTL_HD void persistent_fill_drec(scalar_t* dr_s, const SequenceBackward<scalar_t, acc_t>& q,
                                 const PersistentBlock& k, int64_t t, int64_t n0, int64_t ncols,
                                 int64_t stride, int64_t tid, int64_t nthreads) {
  const scalar_t* src = q.drec + t * q.gates_st + k.g * q.gates_sg + k.row0 * q.gates_sb + n0;
  fill_rows_cg(dr_s, int(stride), src, q.gates_sb, int(k.rows), int(ncols), int(tid), int(nthreads));
  zero_rect(dr_s, int(stride), 0, int(k.rows), int(ncols), int(PersistentPlan::round4(ncols)),
            int(tid), int(nthreads));
}

// Backward: the number of columns in chunk c of the plan.
MTL_HD int64_t chunk_cols(const PersistentPlan& p, int64_t H, int64_t c) {
  const int64_t left = p.gates * H - c * p.chunk;
  return left < p.chunk ? left : p.chunk;
}

// ---- per-thread work ------------------------------------------------------------------------

// Four consecutive shared-memory values, as acc_t. p must be 4-element aligned (the tiles' rows
// are when their length is a multiple of 4, and the tiles start 16-byte aligned): one 16-byte load
// for float and one 8-byte load for the half types on the GPU, plain loads elsewhere.
template <typename scalar_t, typename acc_t>
MTL_HD void load4(const scalar_t* p, acc_t (&v)[4]) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x;
    v[1] = x.y;
    v[2] = x.z;
    v[3] = x.w;
    return;
  } else if constexpr (sizeof(scalar_t) == 2) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    scalar_t x[4];
    memcpy(x, &raw, sizeof(raw));
    v[0] = acc_t(x[0]);
    v[1] = acc_t(x[1]);
    v[2] = acc_t(x[2]);
    v[3] = acc_t(x[3]);
    return;
  }
#endif
  v[0] = acc_t(p[0]);
  v[1] = acc_t(p[1]);
  v[2] = acc_t(p[2]);
  v[3] = acc_t(p[3]);
}

// Forward: the carried aux (the cell state) of the thread's rows at the start (c0's slot).
template <class Cell, int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_forward_init(const SequenceForward<scalar_t, acc_t>& q,
                                    const PersistentBlock& k, int64_t threads_y, int64_t tx,
                                    int64_t ty, acc_t (&c)[kRows]) {
  const int64_t first = aux_slot(q, first_slot(q.T, q.reverse));
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = ty + r * threads_y;
    c[r] = (Cell::kCellState && tx < k.units && row < k.rows)
               ? q.aux[k.g * q.aux_sg + first * q.aux_sslot + (k.row0 + row) * q.H + k.unit0 + tx]
               : acc_t(0);
  }
}

// Forward, phase B of step t for thread (tx, ty): K dot products per row over the column quads
// (K 4-wide W loads, one 4-wide h load per row, 4K FMAs per row), then the cell. 32-bit offsets,
// pointers stepped, nothing recomputed per column.
template <class Cell, int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_forward_thread(const SequenceForward<scalar_t, acc_t>& q,
                                      const PersistentBlock& k, int64_t units_, int64_t threads_y,
                                      int64_t t, const scalar_t* w_s, const scalar_t* h_s,
                                      int64_t tx_, int64_t ty_, acc_t (&c)[kRows]) {
  constexpr int K = Cell::kGates;
  const int tx = int(tx_), ty = int(ty_);
  if (tx >= k.units) return;
  const int units = int(units_), rows = int(k.rows), ty_n = int(threads_y);
  const int H4 = int(PersistentPlan::round4(q.H));
  acc_t rec[kRows][K];
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    MTL_UNROLL
    for (int gate = 0; gate < K; ++gate) rec[r][gate] = acc_t(0);
  }
  const int gate_step = units * 4, quad_step = K * units * 4, row_step = ty_n * H4;
  const scalar_t* wp = w_s + tx * 4;   // column quad 0, gate 0, unit tx
  const scalar_t* hp = h_s + ty * H4;  // the thread's first row, column 0
  for (int col = 0; col < H4; col += 4, wp += quad_step, hp += 4) {
    acc_t w[K][4];
    MTL_UNROLL
    for (int gate = 0; gate < K; ++gate) load4(wp + gate * gate_step, w[gate]);
    MTL_UNROLL
    for (int r = 0; r < kRows; ++r) {
      if (ty + r * ty_n < rows) {
        acc_t h[4];
        load4(hp + r * row_step, h);
        MTL_UNROLL
        for (int kk = 0; kk < 4; ++kk) {
          MTL_UNROLL
          for (int gate = 0; gate < K; ++gate) rec[r][gate] += w[gate][kk] * h[kk];
        }
      }
    }
  }
  const int j = int(k.unit0) + tx;
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int row = ty + r * ty_n;
    if (row < rows)
      c[r] = forward_element<Cell>(forward_row(q, K, t, k.g, k.row0 + row), j, q.H, rec[r],
                                   acc_t(h_s[row * H4 + j]), c[r]);
  }
}

// Backward: the cell-state gradient and dh_pass of the thread's rows at the start (grad_c_n,
// grad_h_n).
template <class Cell, int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_backward_init(const SequenceBackward<scalar_t, acc_t>& q,
                                     const PersistentBlock& k, int64_t threads_y, int64_t tx,
                                     int64_t ty, acc_t (&dc)[kRows], acc_t (&dh_pass)[kRows]) {
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = ty + r * threads_y;
    const bool mine = tx < k.units && row < k.rows;
    const int64_t off = (k.g * q.B + k.row0 + row) * q.H + k.unit0 + tx;
    dc[r] = (Cell::kCellState && mine) ? q.grad_c_n[off] : acc_t(0);
    dh_pass[r] = mine ? acc_t(q.grad_h_n[off]) : acc_t(0);
  }
}

// dh += (W_hh^T drec)[row][unit0 + tx] over columns [n0, n0 + ncols) of drec, for the thread's
// rows; dr_s holds that chunk of the tile's drec (phase A), row stride `stride`. Four columns at a
// time (one 4-wide W load, one 4-wide drec load per row) where n0 is a multiple of 4 (every chunk
// of the planner's plans), else one at a time (the emulator's odd chunks).
template <int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_recurrent_grad(const PersistentBlock& k, int64_t units_, int64_t threads_y,
                                      int64_t n0_, int64_t ncols_, int64_t stride_,
                                      const scalar_t* wt_s, const scalar_t* dr_s, int64_t tx_,
                                      int64_t ty_, acc_t (&dh)[kRows]) {
  const int tx = int(tx_), ty = int(ty_);
  if (tx >= k.units) return;
  const int units = int(units_), rows = int(k.rows), ty_n = int(threads_y);
  const int n0 = int(n0_), ncols = int(ncols_), stride = int(stride_), row_step = ty_n * stride;
  const scalar_t* dp = dr_s + ty * stride;  // the thread's first row
  if ((n0 & 3) == 0) {
    const int n4 = int(PersistentPlan::round4(ncols));  // dr_s and wt_s are zero past the data
    const scalar_t* wp = wt_s + ((n0 >> 2) * units + tx) * 4;
    for (int n = 0; n < n4; n += 4, wp += units * 4, dp += 4) {
      acc_t w[4];
      load4(wp, w);
      MTL_UNROLL
      for (int r = 0; r < kRows; ++r) {
        if (ty + r * ty_n < rows) {
          acc_t d[4];
          load4(dp + r * row_step, d);
          dh[r] += w[0] * d[0] + w[1] * d[1] + w[2] * d[2] + w[3] * d[3];
        }
      }
    }
    return;
  }
  for (int n = 0; n < ncols; ++n) {
    const int nn = n0 + n;
    const acc_t w = acc_t(wt_s[((nn >> 2) * units + tx) * 4 + (nn & 3)]);
    MTL_UNROLL
    for (int r = 0; r < kRows; ++r) {
      if (ty + r * ty_n < rows) dh[r] += w * acc_t(dp[r * row_step + n]);
    }
  }
}

// Backward, phase B of loop step s (time t) for thread (tx, ty): dh is W_hh^T drec of the
// previous loop step (0 at s == 0, where only grad_h_n, already in dh_pass, reaches h_t).
template <class Cell, int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_backward_thread(const SequenceBackward<scalar_t, acc_t>& q,
                                       const PersistentBlock& k, int64_t threads_y, int64_t t,
                                       const acc_t (&dh)[kRows], int64_t tx, int64_t ty,
                                       acc_t (&dc)[kRows], acc_t (&dh_pass)[kRows]) {
  if (tx >= k.units) return;
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = ty + r * threads_y;
    if (row < k.rows)
      backward_element<Cell>(backward_row(q, t, k.g, k.row0 + row), k.unit0 + tx, q.H,
                             dh_pass[r] + dh[r], dc[r], dh_pass[r]);
  }
}

// Backward, after the loop: grad_h0 = dh_pass + W_hh^T drec of the last loop step, grad_c0 = dc.
template <class Cell, int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_backward_finish(const SequenceBackward<scalar_t, acc_t>& q,
                                       const PersistentBlock& k, int64_t threads_y,
                                       const acc_t (&dh)[kRows], int64_t tx, int64_t ty,
                                       const acc_t (&dc)[kRows], const acc_t (&dh_pass)[kRows]) {
  if (tx >= k.units) return;
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = ty + r * threads_y;
    if (row < k.rows) {
      const int64_t off = (k.g * q.B + k.row0 + row) * q.H + k.unit0 + tx;
      q.grad_h0[off] = scalar_t(dh_pass[r] + dh[r]);
      if constexpr (Cell::kCellState) q.grad_c0[off] = dc[r];
    }
  }
}

}  // namespace mtl_kernels
