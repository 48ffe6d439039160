// Forward of the multiaxial selective scan, "lane" forms (scan v3, benchmarks/notes/scan.md):
// a lane owns one (or kStates) (sequence, state) pairs and walks the positions of a split in order.
//
// Why: the warp form (scan_kernels.cuh) combines positions across lanes with 5-round shuffle scans
// per state and stages B / C through shared memory behind block barriers; it is latency-bound at
// 4-6% of copy bandwidth. Here the recurrence h = exp(delta_t A_n) h + delta_t u_t B_t[n] is one
// exp and a few FMAs per step in one lane, with no cross-lane dependency except the sum over
// states for y, and no block barriers at all.
//
// Layout of a warp (LaneShape). kGroup lanes hold the N states of one sequence, kStates each:
// "lane" is kGroup 16 or 32 (a power of two >= N) x 1 state, "lane4" is 4 lanes x 4 states
// (N <= 16); idle states (index >= N) run along and add nothing. A warp holds kWarpSize / kGroup
// sequences: consecutive channels of one direction, so they read the same B_t / C_t rows (one
// transaction serves them all) and the warps of a block share them through L1. Positions are
// walked in blocks of kBlock = max(16, kGroup):
//   * lane n of a group loads u, delta of positions t0 + n kRows .. + kRows - 1 (kRows =
//     kBlock / kGroup), applies delta_bias / softplus once per position (not per state), and
//     stages (delta, delta u, B offset, C offset) in a per-warp shared-memory row read back as one
//     16-byte broadcast per step; the next block's u and delta are loaded before the current
//     block is computed;
//   * each step and state: B_t[n], C_t[n] (channel-last projections: one 64-byte row per group),
//     one exp2, h = a h + (delta u) B, and the sum over the lane's states of C h into a
//     per-position register;
//   * y of the block = the sum over the group's lanes, by a transposed butterfly (kBlock - kRows
//     shuffles per block) that leaves positions t0 + n kRows .. in lane n, so the store is a
//     coalesced row (fp32 atomics: four directions add into the zeroed y).
// Blocks never straddle a chunk, so the state entering each chunk is stored by its lanes at the
// chunk's first block (chunk_states: the layout the warp-form backward reads).
//
// Parallel along the sequence: splits of whole chunks, as in the warp form: (1) each split's
// composed map per (sequence, state) from a zero start (scan_lane_fwd_split_aggregate), (2) the
// carry over splits (the warp form's scan_fwd_split_carry, unchanged: same scratch layout),
// (3) the rescan of every split from its carried state writing y and chunk_states
// (scan_lane_fwd_main).
//
// The kernels only use CUDA's device API and the plain ScanParams; the launcher at the bottom
// needs scan_kernels.cuh (included by the scan_*.cu files first).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "scan_params.h"
#include "dtype_convert.cuh"
#include "scan_kind_access.cuh"

namespace dermomamba {
namespace cuda {
namespace lane {

constexpr unsigned kAllLanes = 0xffffffffu;
constexpr float kLog2eLane = 1.4426950408889634f;
// torch.nn.functional.softplus's default threshold: above it softplus(x) == x in float.
constexpr float kSoftplusLimit = 20.f;
// Largest N of "lane": one warp holds all states of a sequence.
constexpr int kMaxLaneStateDim = kWarpSize;
// Warps per block: blocks only group warps of one direction (L1 sharing of B / C); there is no
// block-level cooperation, so this is an occupancy knob.
constexpr int kMaxLaneWarpsPerBlock = 4;

// Lanes per sequence of "lane" (one state per lane): the smallest supported power of two >= N
// (16 keeps two DermoMamba sequences (N = 16) per warp); "lane4" takes kWideGroup lanes of
// kWideStatesPerLane states. The host side (selective_scan_cuda.cpp) uses the same rules to count
// warps when it chooses splits.
constexpr int kNarrowGroup = 16;
__host__ __device__ inline int group_size_for(int dstate) { return dstate <= kNarrowGroup ? kNarrowGroup : kWarpSize; }
constexpr int kWideGroup = 4;
constexpr int kWideStatesPerLane = 4;

// Shape of the work of one warp: kGroup lanes per sequence, kStates states per lane (lane n owns
// states n kStates .. n kStates + kStates - 1), kBlock positions per block (at least 16, so that
// per-block work is shared by enough steps), of which each lane stages and stores kRows.
template <int kGroup_, int kStates_>
struct LaneShape {
  static constexpr int kGroup = kGroup_;
  static constexpr int kStates = kStates_;
  static constexpr int kSeqsPerWarp = kWarpSize / kGroup;
  static constexpr int kMinBlock = 16;
  static constexpr int kBlock = kGroup >= kMinBlock ? kGroup : kMinBlock;
  static constexpr int kRows = kBlock / kGroup;
};

// Which sequence and states this lane owns. Grid: x = split, y = direction x channel blocks,
// z = batch; a block holds warps x kSeqsPerWarp consecutive channels of one direction.
template <typename S>
struct LaneRole {
  int lane, warp, group, n;
  int batch, direction, channel, seq;
  bool seq_ok;    // the channel exists (the last block of an odd dim has idle groups)
  int64_t seq_index;  // batch * num_seqs + seq

  __device__ __forceinline__ LaneRole(const ScanParams& p) {
    lane = threadIdx.x % kWarpSize;
    warp = threadIdx.x / kWarpSize;
    group = lane / S::kGroup;
    n = lane % S::kGroup;
    const int warps = blockDim.x / kWarpSize;
    const int channels_per_block = warps * S::kSeqsPerWarp;
    const int channel_blocks = (p.dim + channels_per_block - 1) / channels_per_block;
    direction = blockIdx.y / channel_blocks;
    const int wanted =
        (blockIdx.y - direction * channel_blocks) * channels_per_block + warp * S::kSeqsPerWarp + group;
    seq_ok = wanted < p.dim;
    // Idle groups follow the last real channel's addresses (valid memory) and store nothing.
    channel = seq_ok ? wanted : p.dim - 1;
    batch = blockIdx.z;
    seq = direction * p.dim + channel;
    seq_index = static_cast<int64_t>(batch) * p.num_seqs + seq;
  }
  __device__ __forceinline__ int state(int q) const { return n * S::kStates + q; }
  __device__ __forceinline__ bool state_ok(const ScanParams& p, int q) const { return seq_ok && state(q) < p.dstate; }
};

// The positions [t0, end) of block k of a split: blocks of kBlock positions that never straddle
// a chunk (a chunk's last block may be shorter).
struct PositionBlock {
  int chunk, t0, end;
  bool chunk_start;
};

template <int kBlock>
__device__ __forceinline__ PositionBlock position_block(const ScanParams& p, int first_chunk, int k) {
  const int blocks_per_chunk = (p.chunk_size + kBlock - 1) / kBlock;
  PositionBlock blk;
  blk.chunk = first_chunk + k / blocks_per_chunk;
  const int in_chunk = k - (k / blocks_per_chunk) * blocks_per_chunk;
  const int chunk_begin = blk.chunk * p.chunk_size;
  blk.t0 = chunk_begin + in_chunk * kBlock;
  blk.end = min(min(blk.t0 + kBlock, chunk_begin + p.chunk_size), p.length);
  blk.chunk_start = in_chunk == 0;
  return blk;
}

// Number of position blocks of chunks [c_begin, c_end): whole chunks, and the sequence's last
// (possibly shorter) chunk only up to L.
template <int kBlock>
__device__ __forceinline__ int blocks_in_split(const ScanParams& p, int c_begin, int c_end) {
  const int blocks_per_chunk = (p.chunk_size + kBlock - 1) / kBlock;
  if (c_end < p.num_chunks) return (c_end - c_begin) * blocks_per_chunk;
  const int last_length = p.length - (p.num_chunks - 1) * p.chunk_size;
  return (c_end - 1 - c_begin) * blocks_per_chunk + (last_length + kBlock - 1) / kBlock;
}

// Raw inputs of one position a lane stages (it also stores that position's y).
struct OwnPosition {
  float u, delta_raw;
  int offset_B, offset_C;  // element offsets of position t in B / C (state 0)
  int native;              // h * W + w
  bool valid;
};

template <typename S>
__device__ __forceinline__ OwnPosition load_own_position(const ScanParams& p, const LaneRole<S>& r, int t, int end) {
  OwnPosition o;
  o.valid = t < end;
  o.u = 0.f;
  o.delta_raw = 0.f;
  o.offset_B = o.offset_C = 0;
  o.native = 0;
  if (o.valid) {
    // Place (h, w) of scan position t: 0 row-major, 1 column-major, 2 / 3 those read backwards.
    const int s = r.direction >= 2 ? p.length - 1 - t : t;
    int h, w;
    if (r.direction & 1) {
      w = s / p.height;
      h = s - w * p.height;
    } else {
      h = s / p.width;
      w = s - h * p.width;
    }
    o.native = h * p.width + w;
    o.offset_B = static_cast<int>(h * p.B_h_stride + w * p.B_w_stride);
    o.offset_C = static_cast<int>(h * p.C_h_stride + w * p.C_w_stride);
    const int64_t base_u = r.batch * p.u_batch_stride + r.channel * p.u_dim_stride;
    const int64_t base_delta =
        r.batch * p.delta_batch_stride + r.direction * p.delta_dir_stride + r.channel * p.delta_dim_stride;
    o.u = load_kind(p.u, base_u + h * p.u_h_stride + w * p.u_w_stride, p.u_kind);
    o.delta_raw = load_kind(p.delta, base_delta + h * p.delta_h_stride + w * p.delta_w_stride, p.delta_kind);
  }
  return o;
}

// The kRows positions lane n stages in block k: t0 + n kRows + i.
template <typename S>
__device__ __forceinline__ void load_own_rows(const ScanParams& p, const LaneRole<S>& r, const PositionBlock& blk,
                                              OwnPosition (&own)[S::kRows]) {
#pragma unroll
  for (int i = 0; i < S::kRows; ++i) own[i] = load_own_position<S>(p, r, blk.t0 + r.n * S::kRows + i, blk.end);
}

// delta after bias and softplus; 0 for a masked position, which makes its step the identity.
__device__ __forceinline__ float effective_step(const OwnPosition& o, float bias, bool softplus) {
  if (!o.valid) return 0.f;
  const float raw = o.delta_raw + bias;
  if (!softplus || raw > kSoftplusLimit) return raw;
  return log1pf(__expf(raw));
}

// Per-warp staging rows: [buffer][group][position of the block] = (delta, delta u, B offset,
// C offset). Two buffers, so one __syncwarp per block separates the writes of block k + 1 from the
// reads of block k.
template <typename S>
struct StageRows {
  float4 row[2][S::kSeqsPerWarp][S::kBlock];
};

template <typename S>
__device__ __forceinline__ void stage_rows(const OwnPosition (&own)[S::kRows], float bias, bool softplus, int n,
                                           float4* row) {
#pragma unroll
  for (int i = 0; i < S::kRows; ++i) {
    const float d = effective_step(own[i], bias, softplus);
    row[n * S::kRows + i] =
        make_float4(d, d * own[i].u, __int_as_float(own[i].offset_B), __int_as_float(own[i].offset_C));
  }
}

// Sum over the kGroup lanes of a group of kBlock values per lane: after it, lane n holds in
// v[0 .. kRows) the sums of everyone's v[n kRows .. n kRows + kRows). Each round halves the
// values a lane keeps: the lane whose bit kHalf is set keeps the upper half of its kLength values
// and sends the lower one. (A template recursion, so every index is a constant and v stays in
// registers.)
template <int kHalf, int kLength, int kBlock>
__device__ __forceinline__ void transposed_sum_rounds(float (&v)[kBlock], int n) {
  if constexpr (kHalf >= 1) {
    constexpr int kKeep = kLength / 2;
    const bool upper = (n & kHalf) != 0;
#pragma unroll
    for (int k = 0; k < kKeep; ++k) {
      const float send = upper ? v[k] : v[k + kKeep];
      const float keep = upper ? v[k + kKeep] : v[k];
      v[k] = keep + __shfl_xor_sync(kAllLanes, send, kHalf);
    }
    transposed_sum_rounds<kHalf / 2, kKeep, kBlock>(v, n);
  }
}

template <typename S>
__device__ __forceinline__ void transposed_group_sum(float (&v)[S::kBlock], int n) {
  transposed_sum_rounds<S::kGroup / 2, S::kBlock, S::kBlock>(v, n);
}

// Per-lane constants of the states a lane owns.
template <typename bc_t, typename S>
struct LaneStates {
  float A2[S::kStates];         // A * log2(e); 0 for an idle state
  const bc_t* B[S::kStates];    // B at this state, batch and direction (position 0)
  const bc_t* C[S::kStates];
  bool ok[S::kStates];

  __device__ __forceinline__ LaneStates(const ScanParams& p, const LaneRole<S>& r) {
    const int N = p.dstate;
#pragma unroll
    for (int q = 0; q < S::kStates; ++q) {
      ok[q] = r.state_ok(p, q);
      // Idle states read state N - 1 (valid memory) and add nothing.
      const int n_load = min(r.state(q), N - 1);
      A2[q] = ok[q] ? p.A[static_cast<int64_t>(r.seq) * N + n_load] * kLog2eLane : 0.f;
      B[q] = static_cast<const bc_t*>(p.B) + r.batch * p.B_batch_stride + r.direction * p.B_group_stride +
             n_load * p.B_state_stride;
      C[q] = static_cast<const bc_t*>(p.C) + r.batch * p.C_batch_stride + r.direction * p.C_group_stride +
             n_load * p.C_state_stride;
    }
  }
};

// One block of positions. kMasked: some positions of the block are past its end (their B / C are
// not loaded); full blocks, the common case, skip the per-step test.
template <typename bc_t, typename S, bool kMasked, bool kWithOutput>
__device__ __forceinline__ void walk_block(const float4 (&stage)[S::kBlock], const LaneStates<bc_t, S>& ls,
                                           int length, float (&h)[S::kStates], float (&v)[S::kBlock],
                                           float& delta_sum) {
#pragma unroll
  for (int j = 0; j < S::kBlock; ++j) {
    const float4 s = stage[j];
    const bool in_block = !kMasked || j < length;
    float y_part = 0.f;
#pragma unroll
    for (int q = 0; q < S::kStates; ++q) {
      float Bv = 0.f;
      if (in_block) Bv = to_float(ls.B[q][__float_as_int(s.z)]);
      const float a = exp2f(s.x * ls.A2[q]);
      h[q] = a * h[q] + s.y * Bv;
      if (kWithOutput) {
        float Cv = 0.f;
        if (in_block) Cv = to_float(ls.C[q][__float_as_int(s.w)]);
        // An idle state must add nothing to the sum over states. Its load is still made: a
        // select, not a branch, keeps every step's loads hoistable.
        Cv = ls.ok[q] ? Cv : 0.f;
        y_part += Cv * h[q];
      }
    }
    if (kWithOutput) {
      v[j] = y_part;
    } else {
      delta_sum += s.x;
    }
  }
}

// Pass (1): per (sequence, state) and split, the composed map of the split: decay = exp(A sum of
// delta) = prod a, state = the split's end state from a zero start.
template <typename bc_t, typename S>
__global__ void __launch_bounds__(kMaxLaneWarpsPerBlock* kWarpSize) scan_lane_fwd_split_aggregate(ScanParams p) {
  __shared__ StageRows<S> stage_all[kMaxLaneWarpsPerBlock];
  const LaneRole<S> r(p);
  StageRows<S>& stage = stage_all[r.warp];
  const LaneStates<bc_t, S> ls(p, r);
  const float bias = p.delta_bias ? p.delta_bias[r.seq] : 0.f;
  const int split = blockIdx.x;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, p.num_chunks);
  const int blocks = blocks_in_split<S::kBlock>(p, c_begin, c_end);

  float h[S::kStates];
#pragma unroll
  for (int q = 0; q < S::kStates; ++q) h[q] = 0.f;
  float delta_sum = 0.f;
  float unused[S::kBlock];
  OwnPosition next[S::kRows];
  load_own_rows<S>(p, r, position_block<S::kBlock>(p, c_begin, 0), next);
  for (int k = 0; k < blocks; ++k) {
    const PositionBlock blk = position_block<S::kBlock>(p, c_begin, k);
    float4* row = stage.row[k & 1][r.group];
    stage_rows<S>(next, bias, p.delta_softplus, r.n, row);
    __syncwarp();
    if (k + 1 < blocks) load_own_rows<S>(p, r, position_block<S::kBlock>(p, c_begin, k + 1), next);
    const int length = blk.end - blk.t0;
    if (length == S::kBlock) {
      walk_block<bc_t, S, false, false>(stage.row[k & 1][r.group], ls, length, h, unused, delta_sum);
    } else {
      walk_block<bc_t, S, true, false>(stage.row[k & 1][r.group], ls, length, h, unused, delta_sum);
    }
  }
#pragma unroll
  for (int q = 0; q < S::kStates; ++q) {
    if (ls.ok[q]) {
      const int64_t out = (r.seq_index * p.num_splits + split) * p.dstate + r.state(q);
      p.split_decay[out] = exp2f(ls.A2[q] * delta_sum);
      p.split_state[out] = h[q];
    }
  }
}

// Pass (3): y (added into the zeroed fp32 y) and chunk_states, from the state carried into the
// split (chunk_states at the split's first chunk, written by the carry pass; zero for split 0).
template <typename bc_t, typename S>
__global__ void __launch_bounds__(kMaxLaneWarpsPerBlock* kWarpSize) scan_lane_fwd_main(ScanParams p) {
  __shared__ StageRows<S> stage_all[kMaxLaneWarpsPerBlock];
  const LaneRole<S> r(p);
  StageRows<S>& stage = stage_all[r.warp];
  const LaneStates<bc_t, S> ls(p, r);
  const int N = p.dstate;
  const float bias = p.delta_bias ? p.delta_bias[r.seq] : 0.f;
  const float Dv = p.D ? p.D[r.seq] : 0.f;
  const int split = blockIdx.x;
  const int c_begin = split * p.chunks_per_split;
  const int c_end = min(c_begin + p.chunks_per_split, p.num_chunks);
  const int blocks = blocks_in_split<S::kBlock>(p, c_begin, c_end);
  float* states = p.chunk_states + r.seq_index * p.num_chunks * N;
  float* y = static_cast<float*>(p.out) + (static_cast<int64_t>(r.batch) * p.dim + r.channel) * p.length;

  float h[S::kStates];
#pragma unroll
  for (int q = 0; q < S::kStates; ++q)
    h[q] = (c_begin == 0 || !ls.ok[q]) ? 0.f : states[static_cast<int64_t>(c_begin) * N + r.state(q)];
  float v[S::kBlock];
  float unused_sum = 0.f;
  OwnPosition next[S::kRows];
  load_own_rows<S>(p, r, position_block<S::kBlock>(p, c_begin, 0), next);
  for (int k = 0; k < blocks; ++k) {
    const PositionBlock blk = position_block<S::kBlock>(p, c_begin, k);
    if (blk.chunk_start) {
#pragma unroll
      for (int q = 0; q < S::kStates; ++q)
        if (ls.ok[q]) states[static_cast<int64_t>(blk.chunk) * N + r.state(q)] = h[q];
    }
    OwnPosition own[S::kRows];
#pragma unroll
    for (int i = 0; i < S::kRows; ++i) own[i] = next[i];
    float4* row = stage.row[k & 1][r.group];
    stage_rows<S>(own, bias, p.delta_softplus, r.n, row);
    __syncwarp();
    if (k + 1 < blocks) load_own_rows<S>(p, r, position_block<S::kBlock>(p, c_begin, k + 1), next);
    const int length = blk.end - blk.t0;
    if (length == S::kBlock) {
      walk_block<bc_t, S, false, true>(stage.row[k & 1][r.group], ls, length, h, v, unused_sum);
    } else {
      walk_block<bc_t, S, true, true>(stage.row[k & 1][r.group], ls, length, h, v, unused_sum);
    }
    transposed_group_sum<S>(v, r.n);
#pragma unroll
    for (int i = 0; i < S::kRows; ++i)
      if (own[i].valid && r.seq_ok) atomicAdd(y + own[i].native, v[i] + Dv * own[i].u);
  }
}

}  // namespace lane

#ifdef __CUDACC__
// Launcher of the lane-form multiaxial forward (needs scan_kernels.cuh: the split carry pass and
// the launch helpers). p.num_splits / chunks_per_split come from the host's lane split choice.
template <typename bc_t, typename S>
int launch_forward_lane(const ScanParams& p, cudaStream_t stream) {
  const int warps_needed = (p.dim + S::kSeqsPerWarp - 1) / S::kSeqsPerWarp;
  const int warps = warps_needed < lane::kMaxLaneWarpsPerBlock ? warps_needed : lane::kMaxLaneWarpsPerBlock;
  const int channels_per_block = warps * S::kSeqsPerWarp;
  const int channel_blocks = (p.dim + channels_per_block - 1) / channels_per_block;
  const dim3 grid(p.num_splits, p.num_directions * channel_blocks, p.batch);
  const dim3 block(warps * kWarpSize);
  if (p.num_splits > 1) {
    lane::scan_lane_fwd_split_aggregate<bc_t, S><<<grid, block, 0, stream>>>(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
    scan_fwd_split_carry<<<carry_blocks(p), kCarryBlock, 0, stream>>>(p);
  }
  lane::scan_lane_fwd_main<bc_t, S><<<grid, block, 0, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

// states_per_lane 1: "lane" (N <= 32); 4: "lane4" (N <= 16, 4 lanes x 4 states per sequence).
template <typename bc_t>
int scan_forward_multiaxial_lane(const ScanParams& p, int states_per_lane, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (states_per_lane == lane::kWideStatesPerLane) {
    if (p.dstate > lane::kWideGroup * lane::kWideStatesPerLane) return static_cast<int>(cudaErrorInvalidValue);
    return launch_forward_lane<bc_t, lane::LaneShape<lane::kWideGroup, lane::kWideStatesPerLane>>(p, s);
  }
  if (p.dstate > lane::kMaxLaneStateDim) return static_cast<int>(cudaErrorInvalidValue);
  return lane::group_size_for(p.dstate) == lane::kNarrowGroup
             ? launch_forward_lane<bc_t, lane::LaneShape<lane::kNarrowGroup, 1>>(p, s)
             : launch_forward_lane<bc_t, lane::LaneShape<kWarpSize, 1>>(p, s);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dermomamba
