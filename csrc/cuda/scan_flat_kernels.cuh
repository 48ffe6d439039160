// Forward of the multiaxial selective scan, "flat" form (scan v6, benchmarks/notes/scan.md, "v6").
//
// Why: the staged forward (v4) issues ~51 thread instructions per (position, state) (Nsight Compute, sixth
// session) where the arithmetic needs ~10: one state per lane pays every per-position cost (the loads of x
// and delta, the index arithmetic, the sum over states) once per state. Here one thread owns all N <= 16
// states of one (batch, direction, channel) on one segment of one line (a row along the row directions, a
// column along the column directions), in registers. Per position it loads x, delta and the position's B
// and C once (16-byte vector loads where a position's states are adjacent, as in the wrapper's channel-last
// projection); per state it spends one exp2, two multiplies and two fmas. No staging in shared memory, no
// look-back between blocks: three launches.
//   1. aggregate: each thread walks its segment from a zero state and writes the segment's end state and
//      its delta sum (the segment's decay of state n is exp(A_n * sum delta)).
//   2. carry: one thread per (batch, direction, channel, state) folds the segments of its sequence in scan
//      order, turning each segment's aggregate into the state entering it (in place).
//   3. output: each thread walks its segment again from its entering state: y (the sum over states of
//      C h, + D x, added into the zeroed y with fp32 atomics: the four directions' sum) and chunk_states
//      (the state entering every chunk of chunk_size positions in scan order: what every backward reads).
// The lanes of a warp own 32 adjacent lines, one channel per warp. Along the column directions the lanes
// read x and delta and add into y at adjacent places each step (coalesced). Along the row directions each
// lane streams its own row (L1 keeps each 32-byte sector for the following steps), and y goes through a
// per-warp shared-memory transpose so that its atomics stay coalesced there too.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype_convert.cuh"
#include "scan_kernels.cuh"
#include "scan_kind_access.cuh"
#include "scan_flat_layout.h"
#include "scan_params.h"

namespace dermomamba {
namespace cuda {
namespace flat {

template <typename T2, typename T>
__device__ __forceinline__ float2 pair_to_float2(T2 v);
template <>
__device__ __forceinline__ float2 pair_to_float2<__half2, __half>(__half2 v) { return __half22float2(v); }
template <>
__device__ __forceinline__ float2 pair_to_float2<__nv_bfloat162, __nv_bfloat16>(__nv_bfloat162 v) {
  return __bfloat1622float2(v);
}

template <typename T>
struct PairOf;
template <>
struct PairOf<__half> { using type = __half2; };
template <>
struct PairOf<__nv_bfloat16> { using type = __nv_bfloat162; };

// A position's N states of B or C as fp32, one load per state: rows that are not 16-byte aligned with adjacent
// states (any layout; the wrapper's aligned rows take the warp gathers below).
template <typename T>
__device__ __forceinline__ void load_state_row(const T* row, int64_t state_stride, int N, float (&v)[kStates]) {
#pragma unroll
  for (int n = 0; n < kStates; ++n) {
    if constexpr (sizeof(T) == sizeof(float)) {
      v[n] = n < N ? __ldg(row + n * state_stride) : 0.f;
    } else {
      v[n] = n < N ? to_float(row[n * state_stride]) : 0.f;
    }
  }
}

// One thread's share of the work: (batch, direction, channel) and a segment of a line, with the element
// offsets of its first position and the per-step offset increments (one step along the line, in scan order).
struct Walk {
  bool active;       // a real line and channel (idle lanes still join the warp's transposes)
  bool rows;         // directions 0 and 2
  int batch, direction, channel, seq, line, segment, steps;
  int q_first;       // place along the line of the first step
  int q_step;        // +1 (directions 0, 1) or -1 (2, 3)
  int t_first;       // scan index of the first step
  int64_t u, delta, B, C;              // offsets of the first position
  int64_t u_inc, delta_inc, B_inc, C_inc;
  int64_t scratch;   // (batch, seq) row of the segment scratch: + segment index
  int segment_index; // line * segments + segment
};

__device__ __forceinline__ Walk walk_of(const ScanParams& p, int segment_slots) {
  Walk k;
  k.batch = blockIdx.z;
  const int channel_groups = (p.dim + kWarps - 1) / kWarps;
  k.direction = blockIdx.y / channel_groups;
  k.channel = (blockIdx.y - k.direction * channel_groups) * kWarps + threadIdx.x / kLanes;
  const Geometry g = geometry(p.height, p.width, k.direction);
  const int line_group = blockIdx.x / g.segments;
  k.segment = blockIdx.x - line_group * g.segments;
  k.line = line_group * kLanes + threadIdx.x % kLanes;
  k.active = line_group < g.line_groups && k.line < g.lines && k.channel < p.dim;
  k.rows = (k.direction & 1) == 0;
  const bool forward = k.direction < 2;
  const int q0 = k.segment * kSegment;
  const int q1 = min(q0 + kSegment, g.length);
  k.steps = line_group < g.line_groups ? q1 - q0 : 0;
  k.q_first = forward ? q0 : q1 - 1;
  k.q_step = forward ? 1 : -1;
  const int line_start = k.line * g.length;
  k.t_first = forward ? line_start + q0 : p.length - line_start - q1;
  const int channel = min(k.channel, p.dim - 1);
  const int line = min(k.line, g.lines - 1);
  k.seq = k.direction * p.dim + channel;
  const int h = k.rows ? line : k.q_first, w = k.rows ? k.q_first : line;
  k.u = k.batch * p.u_batch_stride + channel * p.u_dim_stride + h * p.u_h_stride + w * p.u_w_stride;
  k.delta = k.batch * p.delta_batch_stride + k.direction * p.delta_dir_stride + channel * p.delta_dim_stride +
            h * p.delta_h_stride + w * p.delta_w_stride;
  k.B = k.batch * p.B_batch_stride + k.direction * p.B_group_stride + h * p.B_h_stride + w * p.B_w_stride;
  k.C = k.batch * p.C_batch_stride + k.direction * p.C_group_stride + h * p.C_h_stride + w * p.C_w_stride;
  k.u_inc = k.q_step * (k.rows ? p.u_w_stride : p.u_h_stride);
  k.delta_inc = k.q_step * (k.rows ? p.delta_w_stride : p.delta_h_stride);
  k.B_inc = k.q_step * (k.rows ? p.B_w_stride : p.B_h_stride);
  k.C_inc = k.q_step * (k.rows ? p.C_w_stride : p.C_h_stride);
  k.segment_index = line * g.segments + k.segment;
  k.scratch = (static_cast<int64_t>(k.batch) * p.num_seqs + k.seq) * segment_slots;
  return k;
}

__device__ __forceinline__ float flat_delta(const ScanParams& p, float raw, float bias) {
  const float biased = raw + bias;
  return (!p.delta_softplus || biased > kSoftplusThreshold) ? biased : log1pf(__expf(biased));
}

__device__ __forceinline__ void load_A2(const ScanParams& p, int seq, float (&A2)[kStates]) {
#pragma unroll
  for (int n = 0; n < kStates; ++n) A2[n] = n < p.dstate ? p.A[static_cast<int64_t>(seq) * p.dstate + n] * kLog2e : 0.f;
}

constexpr unsigned kFullMask = 0xffffffffu;

// B / C rows gathered by a warp (v6.1): one position's kStates states in 16-byte pieces, and the shared row
// stride. 16 bytes of padding make the stride an odd number of 16-byte units, so the 8 lanes of a shared
// 128-byte wavefront read 8 different bank groups.
template <typename T>
struct Gathered {
  static constexpr int kBytes = kStates * static_cast<int>(sizeof(T));
  static constexpr int kPieces = kBytes / 16;
  static constexpr int kRowsPerPass = kLanes / kPieces;
  static constexpr int kStride = kBytes + 16;
};

// Why gathered: each lane needs its own position's B (and C) row, and 32 positions are 32 different cache
// lines, so a load instruction in which every lane reads its own row costs 32 L1 wavefronts (v6 as first
// measured: ~34 such loads per step, 4.7 ms at 192x256 fp32 against the staged kernel's 1.23). Here, per pass,
// the lanes read 16-byte pieces of kRowsPerPass rows (each lane gets a row's address from its owner by a
// shuffle): one instruction touches kRowsPerPass lines, and the pieces go through shared memory to their
// owners.
template <typename T>
__device__ __forceinline__ void load_pieces(const T* mine, int lane, uint4 (&piece)[Gathered<T>::kPieces]) {
  using G = Gathered<T>;
  const unsigned long long address = reinterpret_cast<unsigned long long>(mine);
#pragma unroll
  for (int pass = 0; pass < G::kPieces; ++pass) {
    const int row = pass * G::kRowsPerPass + lane / G::kPieces;
    const unsigned long long src = __shfl_sync(kFullMask, address, row);
    piece[pass] = __ldg(reinterpret_cast<const uint4*>(src) + lane % G::kPieces);
  }
}

template <typename T>
__device__ __forceinline__ void store_pieces(unsigned char* rows, int lane, const uint4 (&piece)[Gathered<T>::kPieces]) {
  using G = Gathered<T>;
#pragma unroll
  for (int pass = 0; pass < G::kPieces; ++pass) {
    const int row = pass * G::kRowsPerPass + lane / G::kPieces;
    *reinterpret_cast<uint4*>(rows + row * G::kStride + (lane % G::kPieces) * 16) = piece[pass];
  }
}

__device__ __forceinline__ void unpack(const uint4& raw, float* v) {
  const float* f = reinterpret_cast<const float*>(&raw);
  v[0] = f[0];
  v[1] = f[1];
  v[2] = f[2];
  v[3] = f[3];
}

template <typename T>
__device__ __forceinline__ void unpack_pairs(const uint4& raw, float* v) {
  using T2 = typename PairOf<T>::type;
  const T2* pairs = reinterpret_cast<const T2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = pair_to_float2<T2, T>(pairs[j]);
    v[2 * j] = f.x;
    v[2 * j + 1] = f.y;
  }
}

// This lane's gathered row as fp32.
template <typename T>
__device__ __forceinline__ void read_row(const unsigned char* rows, int lane, float (&v)[kStates]) {
  using G = Gathered<T>;
  const uint4* row = reinterpret_cast<const uint4*>(rows + lane * G::kStride);
#pragma unroll
  for (int i = 0; i < G::kPieces; ++i) {
    const uint4 raw = row[i];
    if constexpr (sizeof(T) == sizeof(float)) {
      unpack(raw, v + 4 * i);
    } else {
      unpack_pairs<T>(raw, v + 8 * i);
    }
  }
}

// Along the row directions a lane walks its own row, so a warp's per-step loads of x and delta would touch
// 32 lines each. Instead, at the start of every window of kWindow steps the warp loads the window's
// (x, raw delta) for its 32 rows row by row (the lanes along the row: one or two lines per instruction) into
// a shared tile, and each lane reads its own row from it. The same tile slot then takes the lane's y for the
// transposed atomics (x is consumed by then).
struct RowTile {
  float2 (*cell)[kWindow + 1];  // [lane / row][step in window]
};

__device__ __forceinline__ void fill_row_tile(const ScanParams& p, const Walk& k, int64_t u, int64_t delta, int first,
                                              int lane, RowTile tile) {
  const int count = min(kWindow, k.steps - first);
#pragma unroll 4
  for (int r = 0; r < kLanes; ++r) {
    const long long u_row = __shfl_sync(kFullMask, static_cast<long long>(u), r);
    const long long delta_row = __shfl_sync(kFullMask, static_cast<long long>(delta), r);
    float x = 0.f, raw = 0.f;
    if (lane < count) {
      x = load_kind(p.u, u_row + lane * k.u_inc, p.u_kind);
      raw = load_kind(p.delta, delta_row + lane * k.delta_inc, p.delta_kind);
    }
    tile.cell[r][lane] = make_float2(x, raw);
  }
  // Each lane next reads its own row, cell[lane][...], which the other lanes wrote: the kVector path's
  // __syncwarp after store_pieces happened to order that, the scalar path had nothing (a shuffle orders no
  // memory), so its row directions read unwritten (NaN) or the previous window's cells (found by the emulator).
  __syncwarp();
}

// Shared memory of one warp: the row tile (row directions), then the gathered B rows, then the gathered C rows
// (output launch only).
template <typename T, bool kWithC>
struct WarpShared {
  static constexpr int kTileBytes = kLanes * (kWindow + 1) * static_cast<int>(sizeof(float2));
  static constexpr int kRowsBytes = kLanes * Gathered<T>::kStride;
  static constexpr int kBytes = kTileBytes + (kWithC ? 2 : 1) * kRowsBytes;
};

// Launch 1: each segment's end state from a zero state, and its delta sum. Scratch: split_state
// (batch, num_seqs, segment_slots, kStates) and split_decay (batch, num_seqs, segment_slots).
template <typename bc_t, bool kVector>
__global__ void __launch_bounds__(kThreads) scan_flat_aggregate(ScanParams p, int segment_slots) {
  using S = WarpShared<bc_t, false>;
  __shared__ __align__(16) unsigned char shared[kWarps][S::kBytes];
  const Walk k = walk_of(p, segment_slots);
  const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  // A warp past dim has nothing to do (all its lanes alike); idle lines of a real channel stay for the
  // warp's gathers and tiles.
  if (k.channel >= p.dim) return;
  const RowTile tile{reinterpret_cast<float2 (*)[kWindow + 1]>(shared[warp])};
  unsigned char* B_rows = shared[warp] + S::kTileBytes;
  float A2[kStates], h[kStates], Bv[kStates];
  load_A2(p, k.seq, A2);
#pragma unroll
  for (int n = 0; n < kStates; ++n) h[n] = 0.f;
  const float bias = p.delta_bias ? p.delta_bias[k.seq] : 0.f;
  const bc_t* B = static_cast<const bc_t*>(p.B);
  int64_t u = k.u, delta = k.delta, b_at = k.B;
  float delta_sum = 0.f;
  uint4 B_next[Gathered<bc_t>::kPieces];
  if (kVector && k.steps > 0) load_pieces(B + b_at, lane, B_next);
  for (int s = 0; s < k.steps; ++s) {
    const int slot = s % kWindow;
    if (k.rows && slot == 0) {
      __syncwarp();  // the previous window's reads of the tile are done
      fill_row_tile(p, k, u, delta, s, lane, tile);
    }
    if (kVector) {
      store_pieces<bc_t>(B_rows, lane, B_next);
      if (s + 1 < k.steps) load_pieces(B + b_at + k.B_inc, lane, B_next);  // in flight during this step
      __syncwarp();
      read_row<bc_t>(B_rows, lane, Bv);
      __syncwarp();  // every lane has its row before the next step overwrites them
    } else {
      load_state_row(B + b_at, p.B_state_stride, p.dstate, Bv);
    }
    float x, raw;
    if (k.rows) {
      const float2 cell = tile.cell[lane][slot];
      x = cell.x;
      raw = cell.y;
    } else {
      x = k.active ? load_kind(p.u, u, p.u_kind) : 0.f;
      raw = k.active ? load_kind(p.delta, delta, p.delta_kind) : 0.f;
    }
    const float dt = flat_delta(p, raw, bias);
    delta_sum += dt;
    const float dtx = dt * x;
#pragma unroll
    for (int n = 0; n < kStates; ++n) h[n] = exp2f(dt * A2[n]) * h[n] + dtx * Bv[n];
    u += k.u_inc;
    delta += k.delta_inc;
    b_at += k.B_inc;
  }
  if (!k.active) return;
  float* out = p.split_state + (k.scratch + k.segment_index) * kStates;
#pragma unroll
  for (int n = 0; n < kStates; n += 4) __stcg(reinterpret_cast<float4*>(out + n), make_float4(h[n], h[n + 1], h[n + 2], h[n + 3]));
  __stcg(p.split_decay + k.scratch + k.segment_index, delta_sum);
}

// Launch 2: per (batch, sequence, state), the segments in scan order: aggregate -> entering state, in place.
// static: not a template, and every scan_<dtype>.cu includes this file.
static __global__ void __launch_bounds__(kCarryThreads) scan_flat_carry(ScanParams p, int segment_slots) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int n = static_cast<int>(index % kStates);
  const int64_t row = index / kStates;  // batch * num_seqs + seq
  if (row >= static_cast<int64_t>(p.batch) * p.num_seqs || n >= p.dstate) return;
  const int seq = static_cast<int>(row % p.num_seqs);
  const int direction = seq / p.dim;
  const Geometry g = geometry(p.height, p.width, direction);
  const int count = g.lines * g.segments;
  const float A2 = p.A[static_cast<int64_t>(seq) * p.dstate + n] * kLog2e;
  float* states = p.split_state + row * segment_slots * kStates + n;
  const float* sums = p.split_decay + row * segment_slots;
  const bool forward = direction < 2;
  float entering = 0.f;
  for (int i = 0; i < count; ++i) {
    const int segment = forward ? i : count - 1 - i;
    const float end = states[static_cast<int64_t>(segment) * kStates];
    const float decay = exp2f(A2 * sums[segment]);
    states[static_cast<int64_t>(segment) * kStates] = entering;
    entering = decay * entering + end;
  }
}

// Launch 3: y and chunk_states from each segment's entering state.
template <typename bc_t, bool kVector>
__global__ void __launch_bounds__(kThreads) scan_flat_output(ScanParams p, int segment_slots) {
  using S = WarpShared<bc_t, true>;
  __shared__ __align__(16) unsigned char shared[kWarps][S::kBytes];
  const Walk k = walk_of(p, segment_slots);
  const int warp = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  // A warp whose channel is past dim has nothing to do (all its lanes alike: no warp-wide step is skipped by
  // part of a warp); idle lines of a real channel stay for the gathers and transposes.
  if (k.channel >= p.dim) return;
  const RowTile tile{reinterpret_cast<float2 (*)[kWindow + 1]>(shared[warp])};
  unsigned char* B_rows = shared[warp] + S::kTileBytes;
  unsigned char* C_rows = B_rows + S::kRowsBytes;
  float A2[kStates], h[kStates], Bv[kStates], Cv[kStates];
  load_A2(p, k.seq, A2);
  const float* entering = p.split_state + (k.scratch + k.segment_index) * kStates;
#pragma unroll
  for (int n = 0; n < kStates; n += 4) {
    const float4 e = k.active ? __ldcg(reinterpret_cast<const float4*>(entering + n)) : make_float4(0.f, 0.f, 0.f, 0.f);
    h[n] = e.x;
    h[n + 1] = e.y;
    h[n + 2] = e.z;
    h[n + 3] = e.w;
  }
  const float bias = p.delta_bias && k.active ? p.delta_bias[k.seq] : 0.f;
  const float Dv = p.D && k.active ? p.D[k.seq] : 0.f;
  const bc_t* B = static_cast<const bc_t*>(p.B);
  const bc_t* C = static_cast<const bc_t*>(p.C);
  float* y = static_cast<float*>(p.out) + (static_cast<int64_t>(k.batch) * p.dim + k.channel) * p.length;
  float* states = p.chunk_states + (static_cast<int64_t>(k.batch) * p.num_seqs + k.seq) * p.num_chunks * p.dstate;
  int next_chunk = (k.t_first + p.chunk_size - 1) / p.chunk_size;
  int64_t u = k.u, delta = k.delta, b_at = k.B, c_at = k.C;
  // The warp's first line: the rows the transposed y rows belong to.
  const int line0 = k.line - lane;
  uint4 B_next[Gathered<bc_t>::kPieces], C_next[Gathered<bc_t>::kPieces];
  if (kVector && k.steps > 0) {
    load_pieces(B + b_at, lane, B_next);
    load_pieces(C + c_at, lane, C_next);
  }
  for (int s = 0; s < k.steps; ++s) {
    const int t = k.t_first + s;
    if (k.active && t == next_chunk * p.chunk_size) {
#pragma unroll
      for (int n = 0; n < kStates; ++n)
        if (n < p.dstate) states[static_cast<int64_t>(next_chunk) * p.dstate + n] = h[n];
    }
    if (t == next_chunk * p.chunk_size) ++next_chunk;
    const int slot = s % kWindow;
    if (k.rows && slot == 0) {
      __syncwarp();  // the previous window's flush has read the tile
      fill_row_tile(p, k, u, delta, s, lane, tile);
    }
    if (kVector) {
      store_pieces<bc_t>(B_rows, lane, B_next);
      store_pieces<bc_t>(C_rows, lane, C_next);
      if (s + 1 < k.steps) {  // the next step's rows are in flight during this step
        load_pieces(B + b_at + k.B_inc, lane, B_next);
        load_pieces(C + c_at + k.C_inc, lane, C_next);
      }
      __syncwarp();
      read_row<bc_t>(B_rows, lane, Bv);
      read_row<bc_t>(C_rows, lane, Cv);
      __syncwarp();  // every lane has its rows before the next step overwrites them
    } else if (k.active) {
      load_state_row(B + b_at, p.B_state_stride, p.dstate, Bv);
      load_state_row(C + c_at, p.C_state_stride, p.dstate, Cv);
    }
    float x = 0.f, raw = 0.f;
    if (k.rows) {
      const float2 cell = tile.cell[lane][slot];
      x = cell.x;
      raw = cell.y;
    } else if (k.active) {
      x = load_kind(p.u, u, p.u_kind);
      raw = load_kind(p.delta, delta, p.delta_kind);
    }
    float out = 0.f;
    if (k.active) {
      const float dt = flat_delta(p, raw, bias);
      const float dtx = dt * x;
#pragma unroll
      for (int n = 0; n < kStates; ++n) {
        h[n] = exp2f(dt * A2[n]) * h[n] + dtx * Bv[n];
        out += Cv[n] * h[n];
      }
      out += Dv * x;
    }
    u += k.u_inc;
    delta += k.delta_inc;
    b_at += k.B_inc;
    c_at += k.C_inc;
    const int q = k.q_first + s * k.q_step;
    if (!k.rows) {
      if (k.active) atomicAdd(y + q * p.width + k.line, out);
      continue;
    }
    // Row directions: lane = row, so this step's places are a column: y waits in the tile (x's slot, consumed)
    // until the window ends, then goes out row by row, each row's steps at adjacent places.
    tile.cell[lane][slot].x = out;
    if (slot == kWindow - 1 || s == k.steps - 1) {
      __syncwarp();
      const int window = slot + 1;
      const int first = s - slot;
      if (lane < window) {
        const int place = k.q_first + (first + lane) * k.q_step;
        for (int r = 0; r < kLanes; ++r) {
          const int row = line0 + r;
          if (row < p.height) atomicAdd(y + static_cast<int64_t>(row) * p.width + place, tile.cell[r][lane].x);
        }
      }
    }
  }
}

}  // namespace flat

#ifdef __CUDACC__
template <typename bc_t, bool kVector>
int launch_forward_flat(const ScanParams& p, int segment_slots, cudaStream_t stream) {
  const int channel_groups = (p.dim + flat::kWarps - 1) / flat::kWarps;
  const dim3 grid(static_cast<unsigned>(flat::blocks_per_direction(p.height, p.width)),
                  static_cast<unsigned>(p.num_directions * channel_groups), static_cast<unsigned>(p.batch));
  flat::scan_flat_aggregate<bc_t, kVector><<<grid, flat::kThreads, 0, stream>>>(p, segment_slots);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  const int64_t carry_threads = static_cast<int64_t>(p.batch) * p.num_seqs * flat::kStates;
  flat::scan_flat_carry<<<static_cast<unsigned>((carry_threads + flat::kCarryThreads - 1) / flat::kCarryThreads),
                          flat::kCarryThreads, 0, stream>>>(p, segment_slots);
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  flat::scan_flat_output<bc_t, kVector><<<grid, flat::kThreads, 0, stream>>>(p, segment_slots);
  return static_cast<int>(cudaGetLastError());
}

// Whether B and C can be read as 16-byte vectors of 16 states: states adjacent, every other stride and the
// base pointers on 16-byte boundaries.
template <typename bc_t>
bool flat_vector_bc(const ScanParams& p) {
  constexpr int64_t kPerVector = 16 / sizeof(bc_t);
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  auto multiple = [&](int64_t stride) { return stride % kPerVector == 0; };
  return p.dstate == flat::kStates && p.B_state_stride == 1 && p.C_state_stride == 1 && aligned(p.B) &&
         aligned(p.C) && multiple(p.B_batch_stride) && multiple(p.B_group_stride) && multiple(p.B_h_stride) &&
         multiple(p.B_w_stride) && multiple(p.C_batch_stride) && multiple(p.C_group_stride) &&
         multiple(p.C_h_stride) && multiple(p.C_w_stride);
}

// The flat multiaxial forward (scan v6). The host gave p.split_state (batch, num_seqs, segment_slots,
// flat::kStates) and p.split_decay (batch, num_seqs, segment_slots) fp32 scratch, segment_slots =
// flat::max_segments(H, W), and a zeroed y.
template <typename bc_t>
int scan_forward_multiaxial_flat(const ScanParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.dstate > flat::kStates || p.num_directions != 4 || p.split_state == nullptr || p.split_decay == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  const int slots = flat::max_segments(p.height, p.width);
  return flat_vector_bc<bc_t>(p) ? launch_forward_flat<bc_t, true>(p, slots, s)
                                 : launch_forward_flat<bc_t, false>(p, slots, s);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dermomamba
