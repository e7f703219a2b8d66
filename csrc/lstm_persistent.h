// The persistent grouped-LSTM recurrence: all T steps of one layer and direction, all G groups, in
// one kernel launch (grouped_lstm_persistent.cu). This header holds everything but the launch and
// the inter-block barrier, as host+device code, so that the CPU can run it too
// (grouped_lstm_persistent_emulate.cpp runs every block and thread of a plan in order): the tiling,
// the shared-memory layouts, the index math and the dot products are then tested without a GPU.
//
// Work split. Blocks own (group g, batch tile, slice of hidden units):
//   block = (g * tiles + tile) * slices + slice
//   slice s: hidden units [s * units, min(H, (s + 1) * units)), units <= 256
//   tile i : batch rows   [i * tile_rows, min(B, (i + 1) * tile_rows))
// A block's threads are (tx, ty), tx in [0, units) the hidden unit in the slice, ty in
// [0, threads_y); thread (tx, ty) owns rows ty, ty + threads_y, ... (at most kRows) of the tile.
//
// Forward, per block: its W_hh rows (4 gates x its units, all H columns) sit in shared memory for
// the whole sequence, the cell state of its (unit, row) pairs in registers. Each step:
//   A. copy h_{t-1} of the tile's rows (all H units, written by the slice blocks of the same group
//      and tile in the previous step) into shared memory;
//   B. each thread: 4 dot products per row (W rows . h_{t-1}) + the cell (lstm_cell.h), writes h_t,
//      c_t, the activated gates and the output;
//   then a barrier among the `slices` blocks of the same (group, tile) only: groups and tiles never
//      wait for each other (none at all when slices == 1).
// Backward, per block: the W_hh columns of its units (all 4H rows) in shared memory; dc and the
// pass-through part of dh in registers. Each step (forward's order reversed):
//   A. copy dgates_{t+1} of the tile's rows (4H columns, written by the slice blocks in the
//      previous step) into shared memory, and sum W_hh^T dgates_{t+1} for the thread's
//      (unit, rows); in chunks of columns when a whole row does not fit next to W_hh;
//   B. dh_t = dh_pass + that sum, the cell backward, writes dgates_t;
//   then the same barrier. A last A/B pair gives grad_h0 = dh_pass + W_hh^T dgates_{first}.
// The saved and returned tensors are exactly the per-step path's (grouped_lstm.h), so forward and
// backward paths mix.
#pragma once

#include <cstdint>
#include <type_traits>

#include "lstm_cell.h"

// Full unrolling of the loops over a thread's rows (a template count), so their state stays in
// registers on the GPU.
#if defined(__CUDACC__)
#define MTL_UNROLL _Pragma("unroll")
#else
#define MTL_UNROLL _Pragma("GCC unroll 8")
#endif

namespace mtl_kernels {

// Rows per thread are a template argument (1, 2, 4 or 8) so that the per-row accumulators and
// state stay in registers.
constexpr int64_t kPersistentMaxRows = 8;
// Threads per block at most (the kernels' __launch_bounds__): leaves up to 255 registers per
// thread for kRows rows x 4 gates of accumulators.
constexpr int kPersistentMaxThreads = 256;

struct PersistentPlan {
  bool fits = false;
  const char* reason = "";
  int64_t units = 0;            // hidden units per block (blockDim.x)
  int64_t slices = 0;           // blocks per (group, tile) = ceil(H / units)
  int64_t tile_rows = 0;        // batch rows per tile
  int64_t tiles = 0;            // ceil(B / tile_rows)
  int64_t threads_y = 0;        // blockDim.y
  int64_t rows_per_thread = 0;  // 1, 2, 4 or 8, >= ceil(tile_rows / threads_y)
  int64_t chunk = 0;            // backward: dgates columns per shared-memory fill (4H: one fill)
  int64_t weight_elems = 0;     // shared memory: W_hh slice, 4 * units * H
  int64_t tile_elems = 0;       // shared memory: tile_rows * H (forward) or tile_rows * chunk
  int64_t blocks = 0;           // G * tiles * slices
  int64_t blocks_per_sm = 0;    // estimated from the limits (the CUDA side checks with the driver)
  MTL_HD int64_t threads() const { return units * threads_y; }
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
  // compiled kernel's registers allow (grouped_lstm_persistent.cu plans again with that).
  int64_t max_blocks_per_sm = 32;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t rows_template(int64_t rows) {  // the kRows instance that covers `rows`
  return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
}

// A plan with the tiling given (the emulator's tests sweep these; the CUDA plan below picks them).
// chunk: the backward's dgates columns per fill, in [1, 4H] (ignored forward).
inline PersistentPlan persistent_plan_from_tiles(int64_t G, int64_t B, int64_t H, bool backward,
                                                 int64_t units, int64_t tile_rows,
                                                 int64_t threads_y, int64_t chunk) {
  PersistentPlan p;
  if (!backward) chunk = H;
  if (units < 1 || tile_rows < 1 || threads_y < 1 || chunk < 1) {  // before dividing by them
    p.reason = "invalid tiling";
    return p;
  }
  p.units = units;
  p.slices = ceil_div(H, units);
  p.tile_rows = tile_rows;
  p.tiles = ceil_div(B, tile_rows);
  p.threads_y = threads_y;
  p.rows_per_thread = rows_template(ceil_div(tile_rows, threads_y));
  p.weight_elems = 4 * units * H;
  p.chunk = chunk;
  p.tile_elems = tile_rows * chunk;
  p.blocks = G * p.tiles * p.slices;
  p.fits = units <= H && tile_rows <= B && threads_y <= tile_rows &&
           ceil_div(tile_rows, threads_y) <= kPersistentMaxRows && chunk <= (backward ? 4 * H : H);
  p.reason = p.fits ? "" : "invalid tiling";
  return p;
}

// The plan for a device. Prefers wide slices (fewer blocks per barrier), then (backward) whole
// dgates rows per fill, takes as many rows per tile as shared memory allows, then splits the batch
// while that still leaves SMs idle. The plan does not fit (and the per-step path runs) when the
// W_hh slice of even one unit does not fit in shared memory, or when the blocks cannot all be
// resident at once (the barrier would deadlock).
inline PersistentPlan persistent_plan(int64_t G, int64_t B, int64_t H, int64_t elem_bytes,
                                      bool backward, const PersistentLimits& lim) {
  PersistentPlan best;
  best.reason = "the W_hh slice of one hidden unit does not fit in shared memory";
  const int64_t reserved_per_block = 1024;  // the runtime's own shared memory per block (sm_80+)
  const int64_t max_threads = std::min<int64_t>(lim.max_threads_per_block, kPersistentMaxThreads);
  // Widest slices first: units = H (one block per group and tile) needs no inter-block barrier at
  // all, which at small sizes is most of a step's time.
  for (int64_t units = std::min<int64_t>(H, max_threads); units >= 1;
       units = units > 1 ? (units + 1) / 2 : 0) {
    const int64_t w_bytes = PersistentPlan::align16(4 * units * H * elem_bytes);
    const int64_t threads_y_max = std::max<int64_t>(1, max_threads / units);
    const int64_t slices = ceil_div(H, units);
    // Backward: 4H columns of dgates per fill, else halves of that down to 32 (or 4H if smaller),
    // all multiples of 4 so that every chunk takes the 4-wide path.
    const int64_t min_chunk = backward ? std::min<int64_t>(32, 4 * H) : H;
    for (int64_t chunk = backward ? 4 * H : H; chunk >= min_chunk;
         chunk = chunk > min_chunk ? std::max(min_chunk, 4 * ceil_div(ceil_div(chunk, 2), 4)) : 0) {
      const int64_t rows_smem = (lim.smem_per_block - w_bytes) / (chunk * elem_bytes);
      int64_t tile_rows = std::min({B, rows_smem, threads_y_max * kPersistentMaxRows});
      if (tile_rows < 1) continue;
      while (G * slices * ceil_div(B, ceil_div(tile_rows, 2)) <= lim.num_sms && tile_rows > 4)
        tile_rows = ceil_div(tile_rows, 2);  // more tiles: more SMs at work, fewer rows per block
      tile_rows = ceil_div(B, ceil_div(B, tile_rows));  // the same tile count, balanced
      // As many threads as allowed, but no more than kPersistentMaxRows rows per thread.
      int64_t threads_y = std::min(tile_rows, threads_y_max);
      threads_y = std::max(threads_y, ceil_div(tile_rows, kPersistentMaxRows));
      PersistentPlan p =
          persistent_plan_from_tiles(G, B, H, backward, units, tile_rows, threads_y, chunk);
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

// Calls f(std::integral_constant<int, kRows>) for the plan's rows_per_thread (host side).
template <typename F>
void dispatch_rows(int64_t rows_per_thread, const F& f) {
  switch (rows_per_thread) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

struct PersistentBlock {
  int64_t g, tile, slice;
  int64_t unit0, units;  // hidden units [unit0, unit0 + units)
  int64_t row0, rows;    // batch rows [row0, row0 + rows)
};

MTL_HD PersistentBlock persistent_block(const PersistentPlan& p, int64_t B, int64_t H,
                                        int64_t block) {
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

// Whole-sequence tensors as raw pointers and strides (built on the host by
// make_sequence_forward / make_sequence_backward in step_params.h).
template <typename scalar_t, typename acc_t>
struct SequenceForward {
  const scalar_t* weight_hh;  // (G, 4H, H) contiguous
  scalar_t* gates;            // GateLayout: in, the input projection; out, the activated gates
  int64_t gates_sg, gates_st, gates_sb;
  const scalar_t* bias;       // (G, 4H) or nullptr
  scalar_t* h_states;         // (G, T+1, B, H), rows contiguous
  int64_t h_sg, h_sslot;
  acc_t* c_states;            // (G, T+1, B, H)
  int64_t c_sg, c_sslot;
  scalar_t* output;           // (G, T, B, H)
  int64_t out_sg, out_st;
  const int64_t* lengths;     // (B,) or nullptr
  int64_t T, G, B, H;
  bool reverse;
};

template <typename scalar_t, typename acc_t>
struct SequenceBackward {
  const scalar_t* weight_hh;  // (G, 4H, H) contiguous
  const scalar_t* gates;      // activated gates, GateLayout
  scalar_t* dgates;           // same layout
  int64_t gates_sg, gates_st, gates_sb;
  const acc_t* c_states;      // (G, T+1, B, H)
  int64_t c_sg, c_sslot;
  const scalar_t* grad_output;  // (G, T, B, H)
  int64_t gout_sg, gout_st;
  const scalar_t* grad_h_n;   // (G, B, H) contiguous
  const acc_t* grad_c_n;      // (G, B, H) contiguous
  scalar_t* grad_h0;          // (G, B, H) contiguous, out
  acc_t* grad_c0;             // (G, B, H) contiguous, out
  const int64_t* lengths;
  int64_t T, G, B, H;
  bool reverse;
};

// The per-step view of step t, for lstm_cell.h's row functions (also what the per-step kernels get:
// step_params.h adds their buffers).
template <typename scalar_t, typename acc_t>
MTL_HD ForwardStepParams<scalar_t, acc_t> forward_step_at(const SequenceForward<scalar_t, acc_t>& q,
                                                          int64_t t) {
  ForwardStepParams<scalar_t, acc_t> p;
  p.gates = q.gates + t * q.gates_st;
  p.gates_sg = q.gates_sg;
  p.gates_sb = q.gates_sb;
  p.hproj = nullptr;
  p.bias = q.bias;
  p.h_prev = q.h_states + prev_slot(t, q.reverse) * q.h_sslot;
  p.h_next = q.h_states + next_slot(t, q.reverse) * q.h_sslot;
  p.h_sg = q.h_sg;
  p.c_prev = q.c_states + prev_slot(t, q.reverse) * q.c_sslot;
  p.c_next = q.c_states + next_slot(t, q.reverse) * q.c_sslot;
  p.c_sg = q.c_sg;
  p.out = q.output + t * q.out_st;
  p.out_sg = q.out_sg;
  p.lengths = q.lengths;
  p.t = t;
  p.G = q.G;
  p.B = q.B;
  p.H = q.H;
  return p;
}

template <typename scalar_t, typename acc_t>
MTL_HD BackwardStepParams<scalar_t, acc_t> backward_step_at(
    const SequenceBackward<scalar_t, acc_t>& q, int64_t t) {
  BackwardStepParams<scalar_t, acc_t> p;
  p.gates = q.gates + t * q.gates_st;
  p.dgates = q.dgates + t * q.gates_st;
  p.gates_sg = q.gates_sg;
  p.gates_sb = q.gates_sb;
  p.c_prev = q.c_states + prev_slot(t, q.reverse) * q.c_sslot;
  p.c_next = q.c_states + next_slot(t, q.reverse) * q.c_sslot;
  p.c_sg = q.c_sg;
  p.grad_out = q.grad_output + t * q.gout_st;
  p.gout_sg = q.gout_sg;
  p.dh_in = nullptr;
  p.dh_pass = nullptr;
  p.dc = nullptr;
  p.lengths = q.lengths;
  p.t = t;
  p.G = q.G;
  p.B = q.B;
  p.H = q.H;
  return p;
}

// ---- shared-memory fills (all threads of a block, tid in [0, nthreads)) ----------------------

// Forward weights: w_s[(k * 4 + gate) * units + jj] = W_hh[g][gate * H + unit0 + jj][k], so that a
// warp's lanes (consecutive jj) read consecutive words. Global reads go along k (coalesced).
template <typename scalar_t>
MTL_HD void persistent_fill_weights_forward(scalar_t* w_s, const scalar_t* weight_hh,
                                            const PersistentBlock& k, int64_t units, int64_t H,
                                            int64_t tid, int64_t nthreads) {
  const scalar_t* w_g = weight_hh + k.g * 4 * H * H;
  for (int64_t idx = tid; idx < 4 * units * H; idx += nthreads) {
    const int64_t col = idx % H, rest = idx / H;
    const int64_t jj = rest % units, gate = rest / units;
    w_s[(col * 4 + gate) * units + jj] =
        jj < k.units ? w_g[(gate * H + k.unit0 + jj) * H + col] : scalar_t(0);
  }
}

// Backward weights: wt_s[n * units + jj] = W_hh[g][n][unit0 + jj], n in [0, 4H).
template <typename scalar_t>
MTL_HD void persistent_fill_weights_backward(scalar_t* wt_s, const scalar_t* weight_hh,
                                             const PersistentBlock& k, int64_t units, int64_t H,
                                             int64_t tid, int64_t nthreads) {
  const scalar_t* w_g = weight_hh + k.g * 4 * H * H;
  for (int64_t idx = tid; idx < 4 * H * units; idx += nthreads) {
    const int64_t jj = idx % units, n = idx / units;
    wt_s[idx] = jj < k.units ? w_g[n * H + k.unit0 + jj] : scalar_t(0);
  }
}

// Forward, phase A: h_s[r * H + col] = h_{t-1}[g][row0 + r][col].
template <typename scalar_t, typename acc_t>
MTL_HD void persistent_fill_h(scalar_t* h_s, const SequenceForward<scalar_t, acc_t>& q,
                              const PersistentBlock& k, int64_t t, int64_t tid, int64_t nthreads) {
  const scalar_t* src = q.h_states + k.g * q.h_sg + prev_slot(t, q.reverse) * q.h_sslot +
                        k.row0 * q.H;
  for (int64_t idx = tid; idx < k.rows * q.H; idx += nthreads) h_s[idx] = load_shared_state(src + idx);
}

// Backward, phase A, one chunk: dg_s[r * ncols + n] = dgates_t[g][row0 + r][n0 + n], n < ncols.
template <typename scalar_t, typename acc_t>
MTL_HD void persistent_fill_dgates(scalar_t* dg_s, const SequenceBackward<scalar_t, acc_t>& q,
                                   const PersistentBlock& k, int64_t t, int64_t n0, int64_t ncols,
                                   int64_t tid, int64_t nthreads) {
  const scalar_t* src = q.dgates + t * q.gates_st + k.g * q.gates_sg + n0;
  for (int64_t idx = tid; idx < k.rows * ncols; idx += nthreads) {
    const int64_t r = idx / ncols, n = idx % ncols;
    dg_s[idx] = load_shared_state(src + (k.row0 + r) * q.gates_sb + n);
  }
}

// Backward: the number of columns in chunk c of the plan.
MTL_HD int64_t chunk_cols(const PersistentPlan& p, int64_t H, int64_t c) {
  const int64_t left = 4 * H - c * p.chunk;
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

// Forward: the cell state of the thread's rows at the start (slot of h0/c0).
template <int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_forward_init(const SequenceForward<scalar_t, acc_t>& q,
                                    const PersistentBlock& k, int64_t threads_y, int64_t tx,
                                    int64_t ty, acc_t (&c)[kRows]) {
  const int64_t first = q.reverse ? q.T : 0;
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = ty + r * threads_y;
    c[r] = (tx < k.units && row < k.rows)
               ? q.c_states[k.g * q.c_sg + first * q.c_sslot + (k.row0 + row) * q.H + k.unit0 + tx]
               : acc_t(0);
  }
}

// Forward, phase B of step t for thread (tx, ty).
template <int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_forward_thread(const SequenceForward<scalar_t, acc_t>& q,
                                      const PersistentBlock& k, int64_t units, int64_t threads_y,
                                      int64_t t, const scalar_t* w_s, const scalar_t* h_s,
                                      int64_t tx, int64_t ty, acc_t (&c)[kRows]) {
  if (tx >= k.units) return;
  const int64_t H = q.H;
  Gates<acc_t> rec[kRows];
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) rec[r].i = rec[r].f = rec[r].g = rec[r].o = acc_t(0);
  int64_t col = 0;
  if (H % 4 == 0) {
    // Four columns at a time: 16 W values in registers, one 4-wide h load per row. Shared-memory
    // loads per FMA drop from (4 + rows) / (4 rows) to (16 + rows) / (16 rows).
    for (; col < H; col += 4) {
      acc_t w[4][4];  // [column][gate]
      MTL_UNROLL
      for (int kk = 0; kk < 4; ++kk) {
        const scalar_t* wp = w_s + (col + kk) * 4 * units + tx;
        w[kk][0] = acc_t(wp[0]);
        w[kk][1] = acc_t(wp[units]);
        w[kk][2] = acc_t(wp[2 * units]);
        w[kk][3] = acc_t(wp[3 * units]);
      }
      MTL_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = ty + r * threads_y;
        if (row < k.rows) {
          acc_t h[4];
          load4(h_s + row * H + col, h);
          MTL_UNROLL
          for (int kk = 0; kk < 4; ++kk) {
            rec[r].i += w[kk][0] * h[kk];
            rec[r].f += w[kk][1] * h[kk];
            rec[r].g += w[kk][2] * h[kk];
            rec[r].o += w[kk][3] * h[kk];
          }
        }
      }
    }
  }
  for (; col < H; ++col) {
    const scalar_t* w = w_s + col * 4 * units + tx;
    const acc_t wi = acc_t(w[0]), wf = acc_t(w[units]), wg = acc_t(w[2 * units]),
                wo = acc_t(w[3 * units]);
    MTL_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = ty + r * threads_y;
      if (row < k.rows) {
        const acc_t h = acc_t(h_s[row * H + col]);
        rec[r].i += wi * h;
        rec[r].f += wf * h;
        rec[r].g += wg * h;
        rec[r].o += wo * h;
      }
    }
  }
  const ForwardStepParams<scalar_t, acc_t> p = forward_step_at(q, t);
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = ty + r * threads_y;
    if (row < k.rows)
      c[r] = forward_unit_registers(forward_row(p, k.g, k.row0 + row), k.unit0 + tx, H, rec[r], c[r]);
  }
}

// Backward: dc and dh_pass of the thread's rows at the start (grad_c_n, grad_h_n).
template <int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_backward_init(const SequenceBackward<scalar_t, acc_t>& q,
                                     const PersistentBlock& k, int64_t threads_y, int64_t tx,
                                     int64_t ty, acc_t (&dc)[kRows], acc_t (&dh_pass)[kRows]) {
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = ty + r * threads_y;
    const bool mine = tx < k.units && row < k.rows;
    const int64_t off = (k.g * q.B + k.row0 + row) * q.H + k.unit0 + tx;
    dc[r] = mine ? q.grad_c_n[off] : acc_t(0);
    dh_pass[r] = mine ? acc_t(q.grad_h_n[off]) : acc_t(0);
  }
}

// dh += (W_hh^T dgates)[row][unit0 + tx] over columns [n0, n0 + ncols) of dgates, for the
// thread's rows; dg_s holds that chunk of the tile's dgates (phase A).
template <int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_recurrent_grad(const PersistentBlock& k, int64_t units, int64_t threads_y,
                                      int64_t n0, int64_t ncols, const scalar_t* wt_s,
                                      const scalar_t* dg_s, int64_t tx, int64_t ty,
                                      acc_t (&dh)[kRows]) {
  if (tx >= k.units) return;
  int64_t n = 0;
  if (ncols % 4 == 0) {  // four columns at a time: one 4-wide dgates load per row
    for (; n < ncols; n += 4) {
      acc_t w[4];
      MTL_UNROLL
      for (int kk = 0; kk < 4; ++kk) w[kk] = acc_t(wt_s[(n0 + n + kk) * units + tx]);
      MTL_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int64_t row = ty + r * threads_y;
        if (row < k.rows) {
          acc_t d[4];
          load4(dg_s + row * ncols + n, d);
          dh[r] += w[0] * d[0] + w[1] * d[1] + w[2] * d[2] + w[3] * d[3];
        }
      }
    }
  }
  for (; n < ncols; ++n) {
    const acc_t w = acc_t(wt_s[(n0 + n) * units + tx]);
    MTL_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = ty + r * threads_y;
      if (row < k.rows) dh[r] += w * acc_t(dg_s[row * ncols + n]);
    }
  }
}

// Backward, phase B of loop step s (time t) for thread (tx, ty): dh is W_hh^T dgates of the
// previous loop step (0 at s == 0, where only grad_h_n, already in dh_pass, reaches h_t).
template <int kRows, typename scalar_t, typename acc_t>
MTL_HD void persistent_backward_thread(const SequenceBackward<scalar_t, acc_t>& q,
                                       const PersistentBlock& k, int64_t threads_y, int64_t t,
                                       const acc_t (&dh)[kRows], int64_t tx, int64_t ty,
                                       acc_t (&dc)[kRows], acc_t (&dh_pass)[kRows]) {
  if (tx >= k.units) return;
  const BackwardStepParams<scalar_t, acc_t> p = backward_step_at(q, t);
  MTL_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = ty + r * threads_y;
    if (row < k.rows)
      backward_unit_registers(backward_row(p, k.g, k.row0 + row), k.unit0 + tx, q.H,
                              dh_pass[r] + dh[r], dc[r], dh_pass[r]);
  }
}

// Backward, after the loop: grad_h0 = dh_pass + W_hh^T dgates of the last loop step, grad_c0 = dc.
template <int kRows, typename scalar_t, typename acc_t>
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
      q.grad_c0[off] = dc[r];
    }
  }
}

}  // namespace mtl_kernels
