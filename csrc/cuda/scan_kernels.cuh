// CUDA kernels of the selective scans (1-D and multiaxial), forward and backward.
//
// Work split. One warp scans one sequence over a run of consecutive chunks ("split"); each lane
// owns up to kMaxItemsPerLane consecutive positions of a chunk, the state loop over n is a
// run-time loop, and inside a chunk the lanes combine their pieces with a warp scan of affine maps
// h -> a * h + b. Long sequences with few channels (DermoMamba's first stage: L = 49,152, 8
// channels) are cut into several splits scanned at once:
//   forward:  (1) each split's composed map per state      (scan_fwd_split_aggregate)
//             (2) a short serial carry over splits           (scan_fwd_split_carry)
//             (3) the output pass from the carried state     (scan_fwd_main)
//   backward: the same three passes run right-to-left for the adjoint state; the forward state is
//             restarted at every chunk from chunk_states, so no h_t is ever stored.
// When batch x sequences already fill the GPU there is one split and passes (1)-(2) are skipped.
//
// Determinism: the only float atomics are the multiaxial forward's sum of four directions into y,
// and, when the caller does not ask for deterministic gradients, the dB / dC / dx accumulations.
// Per-chunk partials of dA, dD and ddelta_bias are reduced by the host in a fixed order.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "scan_params.h"
#include "dtype_convert.cuh"
#include "scan_kind_access.cuh"

namespace dermomamba {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
// torch.nn.functional.softplus's default threshold: above it softplus(x) == x in float.
constexpr float kSoftplusThreshold = 20.f;

// Place (h, w) in the native layout of scan position t of a direction: 0 row-major, 1
// column-major, 2 and 3 those two read backwards. The 1-D scan is row-major over 1 x L.
template <bool kMulti>
__device__ __forceinline__ void place_of(const ScanParams& p, int direction, int t, int& h, int& w) {
  if (!kMulti) {
    h = 0;
    w = t;
    return;
  }
  const int s = direction >= 2 ? p.length - 1 - t : t;
  if (direction & 1) {
    w = s / p.height;
    h = s - w * p.height;
  } else {
    h = s / p.width;
    w = s - h * p.width;
  }
}

struct SequenceBases {
  int direction, channel, group;
  int64_t u, delta, B, C, z, dout;
};

template <bool kMulti>
__device__ __forceinline__ SequenceBases sequence_bases(const ScanParams& p, int b, int seq) {
  SequenceBases s;
  s.direction = kMulti ? seq / p.dim : 0;
  s.channel = kMulti ? seq - s.direction * p.dim : seq;
  s.group = seq / p.channels_per_group;
  s.u = b * p.u_batch_stride + s.channel * p.u_dim_stride;
  s.delta = b * p.delta_batch_stride + s.direction * p.delta_dir_stride + s.channel * p.delta_dim_stride;
  s.B = b * p.B_batch_stride + s.group * p.B_group_stride;
  s.C = b * p.C_batch_stride + s.group * p.C_group_stride;
  s.z = b * p.z_batch_stride + s.channel * p.z_dim_stride;
  s.dout = b * p.dout_batch_stride + s.channel * p.dout_dim_stride;
  return s;
}

// Affine maps h -> a * h + b. Left-to-right inclusive scan over lanes: after it, lane l holds the
// composition of lanes 0..l (applied in that order).
__device__ __forceinline__ void warp_scan_forward(float& a, float& b, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const float a_prev = __shfl_up_sync(kFullMask, a, offset);
    const float b_prev = __shfl_up_sync(kFullMask, b, offset);
    if (lane >= offset) {
      b = a * b_prev + b;
      a = a_prev * a;
    }
  }
}

// Right-to-left inclusive scan: lane l holds f_l o f_{l+1} o ... o f_31.
__device__ __forceinline__ void warp_scan_reverse(float& a, float& b, int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const float a_next = __shfl_down_sync(kFullMask, a, offset);
    const float b_next = __shfl_down_sync(kFullMask, b, offset);
    if (lane + offset < kWarpSize) {
      b = a * b_next + b;
      a = a * a_next;
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// The same scans for kS independent states at once: their shuffles are issued back to back, so
// the latency of one round is paid once for all kS chains.
template <int kS>
__device__ __forceinline__ void warp_scan_forward_multi(float (&a)[kS], float (&b)[kS], int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    float a_prev[kS], b_prev[kS];
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      a_prev[s] = __shfl_up_sync(kFullMask, a[s], offset);
      b_prev[s] = __shfl_up_sync(kFullMask, b[s], offset);
    }
    if (lane >= offset) {
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        b[s] = a[s] * b_prev[s] + b[s];
        a[s] = a_prev[s] * a[s];
      }
    }
  }
}

template <int kS>
__device__ __forceinline__ void warp_scan_reverse_multi(float (&a)[kS], float (&b)[kS], int lane) {
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    float a_next[kS], b_next[kS];
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      a_next[s] = __shfl_down_sync(kFullMask, a[s], offset);
      b_next[s] = __shfl_down_sync(kFullMask, b[s], offset);
    }
    if (lane + offset < kWarpSize) {
#pragma unroll
      for (int s = 0; s < kS; ++s) {
        b[s] = a[s] * b_next[s] + b[s];
        a[s] = a[s] * a_next[s];
      }
    }
  }
}

// delta after bias and softplus, and d(delta)/d(raw delta) for the backward.
__device__ __forceinline__ float effective_delta(float raw, bool softplus, float& slope) {
  if (!softplus || raw > kSoftplusThreshold) {
    slope = 1.f;
    return raw;
  }
  const float e = __expf(raw);
  slope = e / (1.f + e);
  return log1pf(e);
}

// Per-lane view of one chunk: kItems consecutive positions, masked past the chunk or the sequence.
template <bool kMulti, int kItems>
struct ChunkItems {
  float u[kItems];
  float delta[kItems];
  float delta_slope[kItems];
  int native[kItems];  // h * W + w, or -1 for a masked item
  int h[kItems], w[kItems];

  __device__ __forceinline__ void load(const ScanParams& p, const SequenceBases& s, int chunk, int lane,
                                       float bias) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int in_chunk = lane * kItems + i;
      const int t = chunk * p.chunk_size + in_chunk;
      if (in_chunk < p.chunk_size && t < p.length) {
        int hh, ww;
        place_of<kMulti>(p, s.direction, t, hh, ww);
        h[i] = hh;
        w[i] = ww;
        native[i] = hh * p.width + ww;
        u[i] = load_kind(p.u, s.u + hh * p.u_h_stride + ww * p.u_w_stride, p.u_kind);
        const float raw =
            load_kind(p.delta, s.delta + hh * p.delta_h_stride + ww * p.delta_w_stride, p.delta_kind) + bias;
        delta[i] = effective_delta(raw, p.delta_softplus, delta_slope[i]);
      } else {
        // delta 0 makes the item the identity map (decay 1, input 0).
        h[i] = w[i] = 0;
        native[i] = -1;
        u[i] = 0.f;
        delta[i] = 0.f;
        delta_slope[i] = 0.f;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Shared-memory staging of B and C. All warps of a block scan sequences of one B / C group over
// the same chunk, so the block loads each chunk's (states x positions) tile once, in the order
// that is contiguous in memory (state-fastest for the projections' channel-last layout, position-
// fastest otherwise), and the warps read it back transposed, one row per state.
constexpr int kStateTile = 16;  // states staged at a time
constexpr int kRowPad = 1;      // one float per 32 to keep the lanes of a warp on distinct banks

template <int kItems>
struct TileLayout {
  static constexpr int kPositions = kItems * kWarpSize;
  static constexpr int kRow = kItems * (kWarpSize + kRowPad);  // floats per staged state row
  // Slot of chunk position j (lane j / kItems, item j % kItems) inside a row.
  static __device__ __forceinline__ int slot(int j) { return (j % kItems) * (kWarpSize + kRowPad) + j / kItems; }
  static __device__ __forceinline__ int lane_slot(int lane, int item) { return item * (kWarpSize + kRowPad) + lane; }
};

// Element offsets of B and C (and the native index) of each position of a chunk.
template <bool kMulti>
__device__ __forceinline__ void stage_positions(const ScanParams& p, int direction, int chunk, int chunk_len,
                                                int* pos_B, int* pos_C, int* pos_native) {
  for (int j = threadIdx.x; j < chunk_len; j += blockDim.x) {
    int h, w;
    place_of<kMulti>(p, direction, chunk * p.chunk_size + j, h, w);
    pos_B[j] = static_cast<int>(h * p.B_h_stride + w * p.B_w_stride);
    pos_C[j] = static_cast<int>(h * p.C_h_stride + w * p.C_w_stride);
    pos_native[j] = h * p.width + w;
  }
}

template <typename bc_t, int kItems>
__device__ __forceinline__ void stage_tile(const bc_t* base, int64_t state_stride, const int* positions,
                                           int chunk_len, int n0, int count, float* tile) {
  using L = TileLayout<kItems>;
  // Loads are issued kBatch at a time before any store, so each thread has several in flight.
  constexpr int kBatch = 4;
  const int total = count * chunk_len;
  const int step = blockDim.x;
  for (int first = threadIdx.x; first < total; first += kBatch * step) {
    float v[kBatch];
    int where[kBatch];
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int e = first + k * step;
      where[k] = -1;
      v[k] = 0.f;
      if (e < total) {
        int n, j;
        if (state_stride == 1) {
          n = e % count;
          j = e / count;
        } else {
          j = e % chunk_len;
          n = e / chunk_len;
        }
        v[k] = to_float(base[(n0 + n) * state_stride + positions[j]]);
        where[k] = n * L::kRow + L::slot(j);
      }
    }
#pragma unroll
    for (int k = 0; k < kBatch; ++k)
      if (where[k] >= 0) tile[where[k]] = v[k];
  }
}

// Shared memory of each kernel, in 4-byte words.
template <int kItems>
__host__ __device__ inline size_t chunk_shared_words(int warps, int per_warp_words, int tiles, int reduce_rows) {
  using L = TileLayout<kItems>;
  return 3 * static_cast<size_t>(L::kPositions) + static_cast<size_t>(tiles) * kStateTile * L::kRow +
         static_cast<size_t>(warps) * per_warp_words + static_cast<size_t>(reduce_rows) * L::kRow;
}

struct ChunkShared {
  int* pos_B;
  int* pos_C;
  int* pos_native;
  float* tile_B;
  float* tile_C;
  float* per_warp;  // per_warp_words for each warp
  float* reduce;    // reduce_rows rows
};

template <int kItems>
__device__ __forceinline__ ChunkShared carve_shared(float* shared, int warps, int per_warp_words, int tiles) {
  using L = TileLayout<kItems>;
  ChunkShared c;
  c.pos_B = reinterpret_cast<int*>(shared);
  c.pos_C = c.pos_B + L::kPositions;
  c.pos_native = c.pos_C + L::kPositions;
  float* next = shared + 3 * L::kPositions;
  c.tile_B = next;
  c.tile_C = tiles > 1 ? next + kStateTile * L::kRow : next;
  next += tiles * kStateTile * L::kRow;
  c.per_warp = next;
  next += warps * per_warp_words;
  c.reduce = next;
  return c;
}

// ---------------------------------------------------------------------------------------------
// States are processed kS at a time (kForwardStates in the forward passes, kBackwardStates in the
// register-heavier backward) so that each warp has kS independent scan chains in flight.
constexpr int kForwardStates = 4;
constexpr int kBackwardStates = 2;

// Forward pass (1): the composed map of each split, per state: split_decay = prod a,
// split_state = the split's end state from a zero start.
template <typename bc_t, bool kMulti, int kItems>
__global__ void scan_fwd_split_aggregate(ScanParams p) {
  using L = TileLayout<kItems>;
  constexpr int kS = kForwardStates;
  extern __shared__ float shared[];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int b = blockIdx.z, seq = blockIdx.y * p.warps_per_block + warp, split = blockIdx.x;
  const int N = p.dstate;
  const ChunkShared sh = carve_shared<kItems>(shared, p.warps_per_block, 2 * N, 1);
  float* run_a = sh.per_warp + warp * 2 * N;
  float* run_b = run_a + N;
  for (int n = lane; n < N; n += kWarpSize) {
    run_a[n] = 1.f;
    run_b[n] = 0.f;
  }
  const SequenceBases s = sequence_bases<kMulti>(p, b, seq);
  const bc_t* B = static_cast<const bc_t*>(p.B) + s.B;
  const float* A = p.A + static_cast<int64_t>(seq) * N;
  const float bias = p.delta_bias ? p.delta_bias[seq] : 0.f;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, p.num_chunks);
  ChunkItems<kMulti, kItems> it;
  for (int c = c_begin; c < c_end; ++c) {
    const int chunk_len = min(p.chunk_size, p.length - c * p.chunk_size);
    __syncthreads();
    stage_positions<kMulti>(p, s.direction, c, chunk_len, sh.pos_B, sh.pos_C, sh.pos_native);
    it.load(p, s, c, lane, bias);
    float xu[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) xu[i] = it.delta[i] * it.u[i];
    __syncthreads();
    for (int n0 = 0; n0 < N; n0 += kStateTile) {
      const int count = min(kStateTile, N - n0);
      stage_tile<bc_t, kItems>(B, p.B_state_stride, sh.pos_B, chunk_len, n0, count, sh.tile_B);
      __syncthreads();
      for (int n = n0; n < n0 + count; n += kS) {
        float pa[kS], pb[kS];
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          const bool state_ok = n + q < n0 + count;
          const float A2 = state_ok ? A[n + q] * kLog2e : 0.f;
          const float* row_B = sh.tile_B + (n + q - n0) * L::kRow;
          pa[q] = 1.f;
          pb[q] = 0.f;
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            const float Bv = (state_ok && it.native[i] >= 0) ? row_B[L::lane_slot(lane, i)] : 0.f;
            const float a = exp2f(it.delta[i] * A2);
            pb[q] = a * pb[q] + xu[i] * Bv;
            pa[q] *= a;
          }
        }
        warp_scan_forward_multi<kS>(pa, pb, lane);
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          const float ta = __shfl_sync(kFullMask, pa[q], kWarpSize - 1);
          const float tb = __shfl_sync(kFullMask, pb[q], kWarpSize - 1);
          if (lane == 0 && n + q < n0 + count) {
            run_b[n + q] = ta * run_b[n + q] + tb;
            run_a[n + q] *= ta;
          }
        }
      }
      __syncthreads();
    }
  }
  __syncwarp();
  const int64_t out = ((static_cast<int64_t>(b) * p.num_seqs + seq) * p.num_splits + split) * N;
  for (int n = lane; n < N; n += kWarpSize) {
    p.split_decay[out + n] = run_a[n];
    p.split_state[out + n] = run_b[n];
  }
}

// Forward pass (2): one thread per (batch, sequence, state) carries the state over the splits
// and writes the state entering each split's first chunk.
static __global__ void scan_fwd_split_carry(ScanParams p) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int N = p.dstate;
  if (index >= static_cast<int64_t>(p.batch) * p.num_seqs * N) return;
  const int n = static_cast<int>(index % N);
  const int64_t bs = index / N;
  float h = 0.f;
  for (int split = 0; split < p.num_splits; ++split) {
    const int chunk = split * p.chunks_per_split;
    p.chunk_states[(bs * p.num_chunks + chunk) * N + n] = h;
    const int64_t agg = (bs * p.num_splits + split) * N + n;
    h = p.split_decay[agg] * h + p.split_state[agg];
  }
}

// Forward pass (3): outputs, chunk_states and the last state.
// Two blocks of 8 warps per SM: the register cap (128) costs no spills at up to 4 items per lane.
constexpr int kMinBlocksPerSM = 2;

template <typename bc_t, bool kMulti, int kItems>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * kWarpSize, kMinBlocksPerSM) scan_fwd_main(ScanParams p) {
  using L = TileLayout<kItems>;
  constexpr int kS = kForwardStates;
  extern __shared__ float shared[];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int b = blockIdx.z, seq = blockIdx.y * p.warps_per_block + warp, split = blockIdx.x;
  const int N = p.dstate;
  const ChunkShared sh = carve_shared<kItems>(shared, p.warps_per_block, N, 2);
  float* carry = sh.per_warp + warp * N;
  const SequenceBases s = sequence_bases<kMulti>(p, b, seq);
  const bc_t* B = static_cast<const bc_t*>(p.B) + s.B;
  const bc_t* C = static_cast<const bc_t*>(p.C) + s.C;
  const float* A = p.A + static_cast<int64_t>(seq) * N;
  const float Dv = p.D ? p.D[seq] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[seq] : 0.f;
  float* states = p.chunk_states + (static_cast<int64_t>(b) * p.num_seqs + seq) * p.num_chunks * N;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, p.num_chunks);
  for (int n = lane; n < N; n += kWarpSize) carry[n] = c_begin == 0 ? 0.f : states[c_begin * N + n];
  __syncwarp();
  ChunkItems<kMulti, kItems> it;
  for (int c = c_begin; c < c_end; ++c) {
    const int chunk_len = min(p.chunk_size, p.length - c * p.chunk_size);
    __syncthreads();
    stage_positions<kMulti>(p, s.direction, c, chunk_len, sh.pos_B, sh.pos_C, sh.pos_native);
    for (int n = lane; n < N; n += kWarpSize) states[static_cast<int64_t>(c) * N + n] = carry[n];
    it.load(p, s, c, lane, bias);
    float y[kItems], xu[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      y[i] = 0.f;
      xu[i] = it.delta[i] * it.u[i];
    }
    __syncthreads();
    for (int n0 = 0; n0 < N; n0 += kStateTile) {
      const int count = min(kStateTile, N - n0);
      stage_tile<bc_t, kItems>(B, p.B_state_stride, sh.pos_B, chunk_len, n0, count, sh.tile_B);
      stage_tile<bc_t, kItems>(C, p.C_state_stride, sh.pos_C, chunk_len, n0, count, sh.tile_C);
      __syncthreads();
      for (int n = n0; n < n0 + count; n += kS) {
        float a[kS][kItems], x[kS][kItems], cv[kS][kItems];
        float pa[kS], pb[kS];
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          const bool state_ok = n + q < n0 + count;
          const float A2 = state_ok ? A[n + q] * kLog2e : 0.f;
          const float* row_B = sh.tile_B + (n + q - n0) * L::kRow;
          const float* row_C = sh.tile_C + (n + q - n0) * L::kRow;
          pa[q] = 1.f;
          pb[q] = 0.f;
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            const bool valid = state_ok && it.native[i] >= 0;
            const float Bv = valid ? row_B[L::lane_slot(lane, i)] : 0.f;
            cv[q][i] = valid ? row_C[L::lane_slot(lane, i)] : 0.f;
            a[q][i] = exp2f(it.delta[i] * A2);
            x[q][i] = xu[i] * Bv;
            pb[q] = a[q][i] * pb[q] + x[q][i];
            pa[q] *= a[q][i];
          }
        }
        warp_scan_forward_multi<kS>(pa, pb, lane);
        float h_end[kS];
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          float ea = __shfl_up_sync(kFullMask, pa[q], 1);
          float eb = __shfl_up_sync(kFullMask, pb[q], 1);
          if (lane == 0) {
            ea = 1.f;
            eb = 0.f;
          }
          const float h0 = n + q < n0 + count ? carry[n + q] : 0.f;
          float h = ea * h0 + eb;
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            h = a[q][i] * h + x[q][i];
            y[i] += cv[q][i] * h;
          }
          h_end[q] = __shfl_sync(kFullMask, h, kWarpSize - 1);
        }
        __syncwarp();
        if (lane == 0) {
#pragma unroll
          for (int q = 0; q < kS; ++q)
            if (n + q < n0 + count) carry[n + q] = h_end[q];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (it.native[i] < 0) continue;
      float out = y[i] + Dv * it.u[i];
      if (kMulti) {
        atomicAdd(static_cast<float*>(p.out) + (static_cast<int64_t>(b) * p.dim + s.channel) * p.length + it.native[i],
                  out);
      } else {
        if (p.z != nullptr) {
          const float zv = load_kind(p.z, s.z + it.w[i] * p.z_w_stride, p.z_kind);
          out *= zv / (1.f + __expf(-zv));
        }
        store_kind(p.out, (static_cast<int64_t>(b) * p.dim + s.channel) * p.length + it.native[i], p.u_kind, out);
      }
    }
  }
  __syncwarp();
  if (c_end == p.num_chunks && p.last_state != nullptr) {
    for (int n = lane; n < N; n += kWarpSize)
      p.last_state[(static_cast<int64_t>(b) * p.num_seqs + seq) * N + n] = carry[n];
  }
}

// ---------------------------------------------------------------------------------------------
// Backward. The adjoint g_t = dL/dh_t obeys g_t = dy_t C_t + a_{t+1} g_{t+1}; with o_t = a_t g_t
// (what position t hands to t - 1) this is o_t = a_t o_{t+1} + a_t dy_t C_t, the same kind of
// affine recurrence read right to left.

// dy of the pre-gate output at each item (dout * silu(z) under z gating), with dout and z kept
// for the z gradient.
template <bool kMulti, int kItems>
__device__ __forceinline__ void load_output_grads(const ScanParams& p, const SequenceBases& s,
                                                  const ChunkItems<kMulti, kItems>& it, float (&dy)[kItems],
                                                  float (&dout)[kItems], float (&zv)[kItems]) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    dy[i] = dout[i] = zv[i] = 0.f;
    if (it.native[i] < 0) continue;
    const float g = load_kind(p.dout, s.dout + it.h[i] * p.dout_h_stride + it.w[i] * p.dout_w_stride, p.dout_kind);
    dout[i] = g;
    if (!kMulti && p.z != nullptr) {
      const float z = load_kind(p.z, s.z + it.w[i] * p.z_w_stride, p.z_kind);
      zv[i] = z;
      dy[i] = g * z / (1.f + __expf(-z));
    } else {
      dy[i] = g;
    }
  }
}

// Backward pass (1): each split's composed right-to-left map of o, per state.
template <typename bc_t, bool kMulti, int kItems>
__global__ void scan_bwd_split_aggregate(ScanParams p) {
  using L = TileLayout<kItems>;
  constexpr int kS = kForwardStates;
  extern __shared__ float shared[];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int b = blockIdx.z, seq = blockIdx.y * p.warps_per_block + warp, split = blockIdx.x;
  const int N = p.dstate;
  const ChunkShared sh = carve_shared<kItems>(shared, p.warps_per_block, 2 * N, 1);
  float* run_a = sh.per_warp + warp * 2 * N;
  float* run_b = run_a + N;
  for (int n = lane; n < N; n += kWarpSize) {
    run_a[n] = 1.f;
    run_b[n] = 0.f;
  }
  const SequenceBases s = sequence_bases<kMulti>(p, b, seq);
  const bc_t* C = static_cast<const bc_t*>(p.C) + s.C;
  const float* A = p.A + static_cast<int64_t>(seq) * N;
  const float bias = p.delta_bias ? p.delta_bias[seq] : 0.f;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, p.num_chunks);
  ChunkItems<kMulti, kItems> it;
  float dy[kItems], dout[kItems], zv[kItems];
  for (int c = c_end - 1; c >= c_begin; --c) {
    const int chunk_len = min(p.chunk_size, p.length - c * p.chunk_size);
    __syncthreads();
    stage_positions<kMulti>(p, s.direction, c, chunk_len, sh.pos_B, sh.pos_C, sh.pos_native);
    it.load(p, s, c, lane, bias);
    load_output_grads<kMulti, kItems>(p, s, it, dy, dout, zv);
    __syncthreads();
    for (int n0 = 0; n0 < N; n0 += kStateTile) {
      const int count = min(kStateTile, N - n0);
      stage_tile<bc_t, kItems>(C, p.C_state_stride, sh.pos_C, chunk_len, n0, count, sh.tile_B);
      __syncthreads();
      for (int n = n0; n < n0 + count; n += kS) {
        float pa[kS], pb[kS];
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          const bool state_ok = n + q < n0 + count;
          const float A2 = state_ok ? A[n + q] * kLog2e : 0.f;
          const float* row_C = sh.tile_B + (n + q - n0) * L::kRow;
          pa[q] = 1.f;
          pb[q] = 0.f;
#pragma unroll
          for (int i = kItems - 1; i >= 0; --i) {
            const float cv = (state_ok && it.native[i] >= 0) ? row_C[L::lane_slot(lane, i)] : 0.f;
            const float a = exp2f(it.delta[i] * A2);
            pb[q] = a * (pb[q] + dy[i] * cv);
            pa[q] *= a;
          }
        }
        warp_scan_reverse_multi<kS>(pa, pb, lane);
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          const float ta = __shfl_sync(kFullMask, pa[q], 0);
          const float tb = __shfl_sync(kFullMask, pb[q], 0);
          if (lane == 0 && n + q < n0 + count) {
            // This chunk lies left of the chunks already composed: run = chunk o run.
            run_b[n + q] = ta * run_b[n + q] + tb;
            run_a[n + q] *= ta;
          }
        }
      }
      __syncthreads();
    }
  }
  __syncwarp();
  const int64_t out = ((static_cast<int64_t>(b) * p.num_seqs + seq) * p.num_splits + split) * N;
  for (int n = lane; n < N; n += kWarpSize) {
    p.split_decay[out + n] = run_a[n];
    p.split_state[out + n] = run_b[n];
  }
}

// Backward pass (2): o entering each split from its right.
static __global__ void scan_bwd_split_carry(ScanParams p) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int N = p.dstate;
  if (index >= static_cast<int64_t>(p.batch) * p.num_seqs * N) return;
  const int n = static_cast<int>(index % N);
  const int64_t bs = index / N;
  float o = 0.f;
  for (int split = p.num_splits - 1; split >= 0; --split) {
    const int64_t agg = (bs * p.num_splits + split) * N + n;
    p.reverse_carry[agg] = o;
    o = p.split_decay[agg] * o + p.split_state[agg];
  }
}

// Backward pass (3): every gradient. Chunks are walked right to left; inside a chunk the forward
// states are rebuilt from chunk_states, then the adjoint runs back over the lanes. dB and dC sum
// over the block's channels through shared memory, double-buffered per group of kS states.
template <typename bc_t, bool kMulti, int kItems>
__global__ void __launch_bounds__(kMaxWarpsPerBlock * kWarpSize, kMinBlocksPerSM) scan_bwd_main(ScanParams p) {
  using L = TileLayout<kItems>;
  constexpr int kS = kBackwardStates;
  extern __shared__ float shared[];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int warps = p.warps_per_block;
  const int b = blockIdx.z, seq = blockIdx.y * warps + warp, split = blockIdx.x;
  const int N = p.dstate;
  const ChunkShared sh = carve_shared<kItems>(shared, warps, N, 2);
  float* carry = sh.per_warp + warp * N;

  const SequenceBases s = sequence_bases<kMulti>(p, b, seq);
  const bc_t* B = static_cast<const bc_t*>(p.B) + s.B;
  const bc_t* C = static_cast<const bc_t*>(p.C) + s.C;
  const float* A = p.A + static_cast<int64_t>(seq) * N;
  const float Dv = p.D ? p.D[seq] : 0.f;
  const float bias = p.delta_bias ? p.delta_bias[seq] : 0.f;
  const int64_t seq_index = static_cast<int64_t>(b) * p.num_seqs + seq;
  const float* states = p.chunk_states + seq_index * p.num_chunks * N;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, p.num_chunks);
  for (int n = lane; n < N; n += kWarpSize)
    carry[n] = split == p.num_splits - 1 ? 0.f : p.reverse_carry[(seq_index * p.num_splits + split) * N + n];
  __syncwarp();

  // Where this block's dB / dC go.
  const int seq0 = blockIdx.y * warps;
  const int group = seq0 / p.channels_per_group;
  const int blocks_per_group = p.channels_per_group / warps;
  const int block_in_group = (seq0 % p.channels_per_group) / warps;
  const int64_t bc_plane =
      p.grad_bc_mode == kGradBCPartials
          ? ((static_cast<int64_t>(b) * p.num_bc_groups + group) * blocks_per_group + block_in_group) * N
          : (static_cast<int64_t>(b) * p.num_bc_groups + group) * N;
  // reduce: [buffer][dB, dC][warp][state of the group] rows
  const int reduce_rows_per_buffer = 2 * warps * kS;

  ChunkItems<kMulti, kItems> it;
  float dy[kItems], dout[kItems], zv[kItems];
  int buffer = 0;
  for (int c = c_end - 1; c >= c_begin; --c) {
    const int chunk_len = min(p.chunk_size, p.length - c * p.chunk_size);
    __syncthreads();  // the previous chunk's readers of the position tables are done
    stage_positions<kMulti>(p, s.direction, c, chunk_len, sh.pos_B, sh.pos_C, sh.pos_native);
    it.load(p, s, c, lane, bias);
    load_output_grads<kMulti, kItems>(p, s, it, dy, dout, zv);
    float du[kItems], ddelta[kItems], y[kItems], xu[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      du[i] = ddelta[i] = y[i] = 0.f;
      xu[i] = it.delta[i] * it.u[i];
    }
    __syncthreads();

    for (int n0 = 0; n0 < N; n0 += kStateTile) {
      const int count = min(kStateTile, N - n0);
      stage_tile<bc_t, kItems>(B, p.B_state_stride, sh.pos_B, chunk_len, n0, count, sh.tile_B);
      stage_tile<bc_t, kItems>(C, p.C_state_stride, sh.pos_C, chunk_len, n0, count, sh.tile_C);
      __syncthreads();
      for (int n = n0; n < n0 + count; n += kS) {
        float a[kS][kItems], bv[kS][kItems], cv[kS][kItems], h_prev[kS][kItems];
        float pa[kS], pb[kS], An[kS];
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          const bool state_ok = n + q < n0 + count;
          An[q] = state_ok ? A[n + q] : 0.f;
          const float A2 = An[q] * kLog2e;
          const float* row_B = sh.tile_B + (n + q - n0) * L::kRow;
          const float* row_C = sh.tile_C + (n + q - n0) * L::kRow;
          pa[q] = 1.f;
          pb[q] = 0.f;
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            const bool valid = state_ok && it.native[i] >= 0;
            bv[q][i] = valid ? row_B[L::lane_slot(lane, i)] : 0.f;
            cv[q][i] = valid ? row_C[L::lane_slot(lane, i)] : 0.f;
            a[q][i] = exp2f(it.delta[i] * A2);
            pb[q] = a[q][i] * pb[q] + xu[i] * bv[q][i];
            pa[q] *= a[q][i];
          }
        }
        warp_scan_forward_multi<kS>(pa, pb, lane);
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          float ea = __shfl_up_sync(kFullMask, pa[q], 1);
          float eb = __shfl_up_sync(kFullMask, pb[q], 1);
          if (lane == 0) {
            ea = 1.f;
            eb = 0.f;
          }
          const float h0 = n + q < n0 + count ? states[static_cast<int64_t>(c) * N + n + q] : 0.f;
          float h = ea * h0 + eb;
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            h_prev[q][i] = h;
            h = a[q][i] * h + xu[i] * bv[q][i];
            if (!kMulti) y[i] += cv[q][i] * h;
          }
        }

        float ra[kS], rb[kS];
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          ra[q] = 1.f;
          rb[q] = 0.f;
#pragma unroll
          for (int i = kItems - 1; i >= 0; --i) {
            rb[q] = a[q][i] * (rb[q] + dy[i] * cv[q][i]);
            ra[q] *= a[q][i];
          }
        }
        warp_scan_reverse_multi<kS>(ra, rb, lane);
        float o_first[kS];
        float* reduce = sh.reduce + buffer * reduce_rows_per_buffer * L::kRow;
#pragma unroll
        for (int q = 0; q < kS; ++q) {
          float xa = __shfl_down_sync(kFullMask, ra[q], 1);
          float xb = __shfl_down_sync(kFullMask, rb[q], 1);
          if (lane == kWarpSize - 1) {
            xa = 1.f;
            xb = 0.f;
          }
          const float o_in = n + q < n0 + count ? carry[n + q] : 0.f;
          float o = xa * o_in + xb;
          float dA = 0.f;
          float* red_B = reduce + ((0 * warps + warp) * kS + q) * L::kRow;
          float* red_C = reduce + ((1 * warps + warp) * kS + q) * L::kRow;
#pragma unroll
          for (int i = kItems - 1; i >= 0; --i) {
            const float g = dy[i] * cv[q][i] + o;
            const float decayed_prev = a[q][i] * h_prev[q][i];
            const float h_i = decayed_prev + xu[i] * bv[q][i];
            const float g_delta = g * it.delta[i];
            red_B[L::lane_slot(lane, i)] = g_delta * it.u[i];
            red_C[L::lane_slot(lane, i)] = dy[i] * h_i;
            du[i] += g_delta * bv[q][i];
            ddelta[i] += g * (it.u[i] * bv[q][i] + An[q] * decayed_prev);
            dA += g_delta * decayed_prev;
            o = a[q][i] * g;
          }
          o_first[q] = __shfl_sync(kFullMask, o, 0);
          dA = warp_sum(dA);
          if (lane == 0 && n + q < n0 + count) p.dA_partial[(seq_index * p.num_chunks + c) * N + n + q] = dA;
        }
        __syncwarp();
        if (lane == 0) {
#pragma unroll
          for (int q = 0; q < kS; ++q)
            if (n + q < n0 + count) carry[n + q] = o_first[q];
        }

        __syncthreads();  // this group's dB / dC rows are complete
        const int states_here = min(kS, n0 + count - n);
        for (int e = threadIdx.x; e < states_here * chunk_len; e += blockDim.x) {
          const int q = e / chunk_len, j = e - q * chunk_len;
          const int slot = L::slot(j);
          float sum_B = 0.f, sum_C = 0.f;
          for (int w = 0; w < warps; ++w) {
            sum_B += reduce[((0 * warps + w) * kS + q) * L::kRow + slot];
            sum_C += reduce[((1 * warps + w) * kS + q) * L::kRow + slot];
          }
          const int64_t index = (bc_plane + n + q) * p.length + sh.pos_native[j];
          store_grad_bc<bc_t>(p, index, sum_B, sum_C);
        }
        // Double buffering: the next group writes the other buffer, and the one after waits at
        // the barrier above until every thread has read this one.
        buffer ^= 1;
      }
      __syncthreads();  // the tiles are read before the next states are staged
    }

    float dD = 0.f, dbias = 0.f;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (it.native[i] < 0) continue;
      const float du_i = du[i] + Dv * dy[i];
      const float ddelta_raw = ddelta[i] * it.delta_slope[i];
      dD += dy[i] * it.u[i];
      dbias += ddelta_raw;
      store_kind(p.ddelta, seq_index * p.length + it.native[i], p.delta_kind, ddelta_raw);
      const int64_t x_index = (static_cast<int64_t>(b) * p.dim + s.channel) * p.length + it.native[i];
      if (kMulti) {
        if (p.dx_per_direction != nullptr) {
          p.dx_per_direction[static_cast<int64_t>(s.direction) * p.batch * p.dim * p.length + x_index] = du_i;
        } else {
          atomicAdd(p.dx_accum + x_index, du_i);
        }
      } else {
        store_kind(p.du, x_index, p.u_kind, du_i);
        if (p.z != nullptr) {
          const float y_pre = y[i] + Dv * it.u[i];
          const float sig = 1.f / (1.f + __expf(-zv[i]));
          store_kind(p.dz, x_index, p.z_kind, dout[i] * y_pre * sig * (1.f + zv[i] * (1.f - sig)));
        }
      }
    }
    dD = warp_sum(dD);
    dbias = warp_sum(dbias);
    if (lane == 0) {
      if (p.dD_partial) p.dD_partial[seq_index * p.num_chunks + c] = dD;
      if (p.ddelta_bias_partial) p.ddelta_bias_partial[seq_index * p.num_chunks + c] = dbias;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

template <typename Kernel>
int launch_with_shared(Kernel kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                       const ScanParams& p) {
  constexpr size_t kDefaultSharedLimit = 48 * 1024;
  if (shared_bytes > kDefaultSharedLimit) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  kernel<<<grid, block, shared_bytes, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

constexpr int kCarryBlock = 256;

inline unsigned carry_blocks(const ScanParams& p) {
  const int64_t threads = static_cast<int64_t>(p.batch) * p.num_seqs * p.dstate;
  return static_cast<unsigned>((threads + kCarryBlock - 1) / kCarryBlock);
}

template <typename bc_t, bool kMulti, int kItems>
int launch_forward(const ScanParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_splits, p.num_seqs / p.warps_per_block, p.batch);
  const dim3 block(p.warps_per_block * kWarpSize);
  const int warps = p.warps_per_block;
  if (p.num_splits > 1) {
    const size_t shared = chunk_shared_words<kItems>(warps, 2 * p.dstate, 1, 0) * sizeof(float);
    int err = launch_with_shared(scan_fwd_split_aggregate<bc_t, kMulti, kItems>, grid, block, shared, stream, p);
    if (err != 0) return err;
    scan_fwd_split_carry<<<carry_blocks(p), kCarryBlock, 0, stream>>>(p);
  }
  const size_t shared = chunk_shared_words<kItems>(warps, p.dstate, 2, 0) * sizeof(float);
  return launch_with_shared(scan_fwd_main<bc_t, kMulti, kItems>, grid, block, shared, stream, p);
}

template <typename bc_t, bool kMulti, int kItems>
int launch_backward(const ScanParams& p, cudaStream_t stream) {
  const dim3 grid(p.num_splits, p.num_seqs / p.warps_per_block, p.batch);
  const dim3 block(p.warps_per_block * kWarpSize);
  const int warps = p.warps_per_block;
  if (p.num_splits > 1) {
    const size_t shared = chunk_shared_words<kItems>(warps, 2 * p.dstate, 1, 0) * sizeof(float);
    int err = launch_with_shared(scan_bwd_split_aggregate<bc_t, kMulti, kItems>, grid, block, shared, stream, p);
    if (err != 0) return err;
    scan_bwd_split_carry<<<carry_blocks(p), kCarryBlock, 0, stream>>>(p);
  }
  // reduce rows: two buffers x (dB, dC) x warps x states of a group
  const size_t shared =
      chunk_shared_words<kItems>(warps, p.dstate, 2, 4 * warps * kBackwardStates) * sizeof(float);
  return launch_with_shared(scan_bwd_main<bc_t, kMulti, kItems>, grid, block, shared, stream, p);
}

// Items per lane: the smallest power of two whose warp tile covers a chunk.
template <typename Fn>
int with_items(int chunk_size, Fn&& fn) {
  if (chunk_size <= 1 * kWarpSize) return fn(std::integral_constant<int, 1>{});
  if (chunk_size <= 2 * kWarpSize) return fn(std::integral_constant<int, 2>{});
  if (chunk_size <= 4 * kWarpSize) return fn(std::integral_constant<int, 4>{});
  return fn(std::integral_constant<int, 8>{});
}

template <typename bc_t>
int scan_forward(const ScanParams& p, bool multiaxial, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return with_items(p.chunk_size, [&](auto items) {
    constexpr int kItems = decltype(items)::value;
    return multiaxial ? launch_forward<bc_t, true, kItems>(p, s) : launch_forward<bc_t, false, kItems>(p, s);
  });
}

template <typename bc_t>
int scan_backward(const ScanParams& p, bool multiaxial, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  return with_items(p.chunk_size, [&](auto items) {
    constexpr int kItems = decltype(items)::value;
    return multiaxial ? launch_backward<bc_t, true, kItems>(p, s) : launch_backward<bc_t, false, kItems>(p, s);
  });
}

}  // namespace cuda
}  // namespace dermomamba
