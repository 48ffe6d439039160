// Forward of the multiaxial selective scan, "staged" form (scan v4, benchmarks/notes/scan.md, "v4"):
// one launch per forward, every input read from device memory once.
//
// Why: the warp and lane forms (scan_kernels.cuh, scan_lane_kernels.cuh) are latency-bound on
// per-step global loads and, when a sequence is cut into splits, run a second pass over every
// input just to form each split's end state (Nsight Compute: 72 % of stalls on L1TEX, the split
// aggregate pass as costly as the main pass). Here a block stages a whole tile of positions in
// shared memory first (one burst of independent loads), and every later step reads shared memory.
//
// Work of one block (layout: scan_staged_layout.h): one tile (a run of whole chunks) of one
// (batch, direction) for a group of channels. Its threads are sub-chunks x channel slots x lanes,
// one state per lane as in the lane form (16 lanes per channel for N <= 16, 32 for N <= 32):
//   1. stage the tile: (delta after bias / softplus, x) per channel and position, (h, w) per
//      position, B and C per position and state (zero for idle states >= N and positions >= L);
//   2. each lane walks its sub-chunk from a zero state: (decay, end state) of the sub-chunk;
//   3. the block folds its sub-chunks into the tile's aggregate and publishes it (device memory
//      + a flag), then gets its entering state by a look-back over the previous tiles of the same
//      sequences: the last milestone tile's inclusive state folded with the aggregates after it
//      (a milestone, every kMilestoneSpan-th tile, publishes its inclusive state instead, at the
//      next tile's first chunk of chunk_states). The fold's order never depends on timing, so the
//      result is bit-reproducible; the serial chain is one hop per milestone (num_tiles / 8).
//   4. each lane walks its sub-chunk again from its entering state, storing the state entering
//      every chunk (chunk_states: the layout every backward reads) and y: the sum over states by
//      the lane form's transposed butterfly, + D x, added into the zeroed y by fp32 atomics (the
//      four directions of a place are in different blocks, as in the other forms).
// Forward progress: blocks take their tile from a global ticket counter in the order they start
// (not blockIdx, which the hardware does not schedule in order), tile-major, so every tile a block
// waits for belongs to a block that started earlier and waits only for earlier ones.
//
// The kernel uses CUDA's device API, the plain ScanParams and place_of from scan_kernels.cuh; the
// launcher at the bottom is compiled by nvcc only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "scan_params.h"
#include "dtype_convert.cuh"
#include "scan_kind_access.cuh"
#include "scan_kernels.cuh"
#include "scan_lane_kernels.cuh"
#include "scan_staged_layout.h"

namespace dermomamba {
namespace cuda {
namespace staged {

// Back-off while a look-back flag is not set yet: short, since the tile it waits for is running.
constexpr unsigned kLookbackSleepNs = 100;
constexpr int kFlagPublished = 1;
// Elements each thread loads per staging round before using any of them.
constexpr int kStageBatch = 4;

#ifdef __CUDACC__
__device__ __forceinline__ unsigned char* staged_shared_memory() {
  extern __shared__ __align__(16) unsigned char staged_shared[];
  return staged_shared;
}
#else
// Host emulation of the kernel (tests of the kernel source on a CPU) provides the block's buffer.
unsigned char* staged_shared_memory();
#endif

// Views of the tile's shared memory (offsets from scan_staged_layout.h).
struct TileShared {
  float2* step;   // [slot][position]: (delta after bias / softplus, x)
  int2* place;    // [position]: (h, w); h == -1 past the sequence's end
  float* B;       // [position][group]
  float* C;
  float2* agg;    // [sub][slot][group]: (decay, end state from zero)
  float* enter;   // [sub][slot][group]
};

__device__ __forceinline__ TileShared tile_shared(const StagedLayout& l) {
  unsigned char* base = staged_shared_memory();
  TileShared s;
  s.step = reinterpret_cast<float2*>(base + l.step_offset);
  s.place = reinterpret_cast<int2*>(base + l.place_offset);
  s.B = reinterpret_cast<float*>(base + l.B_offset);
  s.C = reinterpret_cast<float*>(base + l.C_offset);
  s.agg = reinterpret_cast<float2*>(base + l.agg_offset);
  s.enter = reinterpret_cast<float*>(base + l.enter_offset);
  return s;
}

// What this block computes: the ticket's tile, (batch, direction, channel block), its positions.
struct TileWork {
  int tile, unit, batch, direction, channel0, block_channels;
  int first_chunk, t0, milestone_before;
  bool milestone;
};

__device__ __forceinline__ TileWork tile_work(const ScanParams& p, const StagedLayout& l, int ticket) {
  TileWork w;
  const int units = p.batch * p.num_directions * l.channel_blocks;
  w.tile = ticket / units;
  w.unit = ticket - w.tile * units;
  w.batch = w.unit / (p.num_directions * l.channel_blocks);
  const int rest = w.unit - w.batch * p.num_directions * l.channel_blocks;
  w.direction = rest / l.channel_blocks;
  w.channel0 = (rest - w.direction * l.channel_blocks) * l.channels;
  w.block_channels = min(l.channels, p.dim - w.channel0);
  w.first_chunk = w.tile * l.chunks_per_tile;
  w.t0 = w.first_chunk * p.chunk_size;
  w.milestone = (w.tile + 1) % kMilestoneSpan == 0;
  w.milestone_before = (w.tile / kMilestoneSpan) * kMilestoneSpan - 1;  // -1: start from a zero state
  return w;
}

// Step 1: the tile's inputs into shared memory, all threads, then a barrier.
template <typename bc_t, int kGroup>
__device__ __forceinline__ void stage_tile(const ScanParams& p, const StagedLayout& l, const TileWork& w,
                                           const TileShared& sh) {
  const int P = l.tile_positions;
  for (int t = threadIdx.x; t < P; t += blockDim.x) {
    int h = -1, wc = -1;
    if (w.t0 + t < p.length) place_of<true>(p, w.direction, w.t0 + t, h, wc);
    sh.place[t] = make_int2(h, wc);
  }
  __syncthreads();
  // x and delta, positions fastest (consecutive along the row directions of a contiguous layout).
  // kStageBatch elements per thread and round: all their loads are issued before any is used, so
  // a thread waits for one DRAM round trip per round, not per element.
  const int64_t u_base = w.batch * p.u_batch_stride;
  const int64_t delta_base = w.batch * p.delta_batch_stride + w.direction * p.delta_dir_stride;
  const int step_elements = l.slots * P;
  for (int first = threadIdx.x; first < step_elements; first += kStageBatch * blockDim.x) {
    float u[kStageBatch], raw[kStageBatch], bias[kStageBatch];
    bool real[kStageBatch];
#pragma unroll
    for (int q = 0; q < kStageBatch; ++q) {
      const int i = first + q * blockDim.x;
      const int slot = i / P;
      const int t = i - slot * P;
      u[q] = raw[q] = bias[q] = 0.f;
      real[q] = false;
      if (i < step_elements) {
        const int2 hw = sh.place[t];
        real[q] = hw.x >= 0 && slot < w.block_channels;
        if (real[q]) {
          const int channel = w.channel0 + slot;
          u[q] = load_kind(p.u, u_base + channel * p.u_dim_stride + hw.x * p.u_h_stride + hw.y * p.u_w_stride,
                           p.u_kind);
          raw[q] = load_kind(p.delta,
                             delta_base + channel * p.delta_dim_stride + hw.x * p.delta_h_stride +
                                 hw.y * p.delta_w_stride,
                             p.delta_kind);
          if (p.delta_bias) bias[q] = p.delta_bias[w.direction * p.dim + channel];
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kStageBatch; ++q) {
      const int i = first + q * blockDim.x;
      if (i < step_elements) {
        float dt = 0.f;
        if (real[q]) {
          const float biased = raw[q] + bias[q];
          dt = (!p.delta_softplus || biased > kSoftplusThreshold) ? biased : log1pf(__expf(biased));
        }
        sh.step[i] = make_float2(dt, u[q]);
      }
    }
  }
  // B and C: states fastest when a position's states are adjacent (the wrapper's channel-last
  // projections), else positions fastest; batched like x and delta.
  const bool states_fastest = p.B_state_stride == 1;
  const bc_t* B = static_cast<const bc_t*>(p.B) + w.batch * p.B_batch_stride + w.direction * p.B_group_stride;
  const bc_t* C = static_cast<const bc_t*>(p.C) + w.batch * p.C_batch_stride + w.direction * p.C_group_stride;
  const int bc_elements = P * kGroup;
  for (int first = threadIdx.x; first < bc_elements; first += kStageBatch * blockDim.x) {
    bc_t Bv[kStageBatch], Cv[kStageBatch];
    int at[kStageBatch];
    bool real[kStageBatch];
#pragma unroll
    for (int q = 0; q < kStageBatch; ++q) {
      const int i = first + q * blockDim.x;
      int t, n;
      if (states_fastest) {
        t = i / kGroup;
        n = i - t * kGroup;
      } else {
        n = i / P;
        t = i - n * P;
      }
      at[q] = t * kGroup + n;
      real[q] = false;
      if (i < bc_elements) {
        const int2 hw = sh.place[t];
        real[q] = hw.x >= 0 && n < p.dstate;
        if (real[q]) {
          Bv[q] = B[n * p.B_state_stride + hw.x * p.B_h_stride + hw.y * p.B_w_stride];
          Cv[q] = C[n * p.C_state_stride + hw.x * p.C_h_stride + hw.y * p.C_w_stride];
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kStageBatch; ++q) {
      if (first + q * static_cast<int>(blockDim.x) < bc_elements) {
        sh.B[at[q]] = real[q] ? to_float(Bv[q]) : 0.f;
        sh.C[at[q]] = real[q] ? to_float(Cv[q]) : 0.f;
      }
    }
  }
  __syncthreads();
}

// One position block of a sub-chunk, from shared memory. kMasked: the block is shorter than
// kBlock (a chunk's last block); full blocks skip the per-step test.
template <typename S, bool kMasked, bool kWithOutput>
__device__ __forceinline__ void walk_staged_block(const float2* step, const float* B, const float* C, int n,
                                                  int length, float A2, float& h, float (&v)[S::kBlock],
                                                  float& delta_sum) {
#pragma unroll
  for (int j = 0; j < S::kBlock; ++j) {
    if (!kMasked || j < length) {
      const float2 s = step[j];
      const float a = exp2f(s.x * A2);
      h = a * h + (s.x * s.y) * B[j * S::kGroup + n];
      if (kWithOutput) {
        v[j] = C[j * S::kGroup + n] * h;
      } else {
        delta_sum += s.x;
      }
    } else if (kWithOutput) {
      v[j] = 0.f;
    }
  }
}

__device__ __forceinline__ void wait_for_flag(const int* flag) {
  while (*reinterpret_cast<const volatile int*>(flag) != kFlagPublished) __nanosleep(kLookbackSleepNs);
}

// Every thread's writes that another block reads are fenced by the thread itself, then one
// thread raises the flag after the barrier.
__device__ __forceinline__ void publish_flag(int* flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) atomicExch(flag, kFlagPublished);
}

// Blocks per SM the register budget must allow: 2 for 16-lane groups (DermoMamba's N = 16, where shared
// memory also allows 2), 1 for 32-lane groups (which would spill at 64 registers).
template <int kGroup>
constexpr int kMinBlocksPerSM = kGroup == kNarrowGroup ? 2 : 1;

template <typename bc_t, typename S>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocksPerSM<S::kGroup>) scan_staged_fwd(ScanParams p) {
  constexpr int G = S::kGroup;
  const StagedLayout l = staged_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks);
  const TileShared sh = tile_shared(l);
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(p.tile_ticket, 1);
  __syncthreads();
  const TileWork w = tile_work(p, l, ticket);

  // This thread's (sub-chunk, channel slot, state).
  const int N = p.dstate;
  const int threads_per_sub = l.warps_per_sub * kWarpSize;
  const int sub = threadIdx.x / threads_per_sub;
  const int in_sub = threadIdx.x - sub * threads_per_sub;
  const int lane_id = in_sub % kWarpSize;
  const int n = lane_id % G;
  const int slot = (in_sub / kWarpSize) * S::kSeqsPerWarp + lane_id / G;
  const bool seq_ok = slot < w.block_channels;
  // Idle slots (an odd last channel block) follow a real channel's parameters and store nothing.
  const int channel = w.channel0 + (seq_ok ? slot : w.block_channels - 1);
  const int seq = w.direction * p.dim + channel;
  const int64_t seq_index = static_cast<int64_t>(w.batch) * p.num_seqs + seq;
  const bool state_ok = seq_ok && n < N;
  const float A2 = state_ok ? p.A[static_cast<int64_t>(seq) * N + n] * kLog2e : 0.f;
  float* states = p.chunk_states + seq_index * p.num_chunks * N;
  const int64_t flags = static_cast<int64_t>(w.unit) * l.num_tiles;
  const int P = l.tile_positions;

  stage_tile<bc_t, G>(p, l, w, sh);

  const int c_begin = w.first_chunk + sub * l.chunks_per_sub;
  const int c_end = min(c_begin + l.chunks_per_sub, p.num_chunks);
  const int blocks = c_begin < c_end ? lane::blocks_in_split<S::kBlock>(p, c_begin, c_end) : 0;
  const float2* step = sh.step + slot * P;
  float v[S::kBlock];

  // Step 2: the sub-chunk's aggregate.
  {
    float h = 0.f, delta_sum = 0.f;
    for (int k = 0; k < blocks; ++k) {
      const lane::PositionBlock blk = lane::position_block<S::kBlock>(p, c_begin, k);
      const int base = blk.t0 - w.t0;
      const int length = blk.end - blk.t0;
      if (length == S::kBlock) {
        walk_staged_block<S, false, false>(step + base, sh.B + base * G, sh.C + base * G, n, length, A2, h, v,
                                           delta_sum);
      } else {
        walk_staged_block<S, true, false>(step + base, sh.B + base * G, sh.C + base * G, n, length, A2, h, v,
                                          delta_sum);
      }
    }
    sh.agg[(sub * l.slots + slot) * G + n] = make_float2(exp2f(A2 * delta_sum), h);
  }
  __syncthreads();

  // Step 3: the tile's aggregate, published by non-milestone tiles.
  float tile_decay = 1.f, tile_state = 0.f;
  if (sub == 0) {
    for (int s = 0; s < l.subs; ++s) {
      const float2 a = sh.agg[(s * l.slots + slot) * G + n];
      tile_state = a.x * tile_state + a.y;
      tile_decay *= a.x;
    }
  }
  const bool has_successor = w.tile + 1 < l.num_tiles;
  if (!w.milestone && has_successor) {
    if (sub == 0 && state_ok) {
      const int64_t out = (seq_index * p.num_splits + w.tile) * N + n;
      __stcg(p.split_decay + out, tile_decay);
      __stcg(p.split_state + out, tile_state);
    }
    publish_flag(p.tile_flags + flags + w.tile);
  }
  // Look-back: the last milestone's inclusive state, then the aggregates after it, in order.
  if (threadIdx.x == 0) {
    for (int j = max(w.milestone_before, 0); j < w.tile; ++j) wait_for_flag(p.tile_flags + flags + j);
    __threadfence();
  }
  __syncthreads();
  float h_enter = 0.f;
  if (sub == 0 && state_ok) {
    if (w.milestone_before >= 0)
      h_enter = __ldcg(states + static_cast<int64_t>(w.milestone_before + 1) * l.chunks_per_tile * N + n);
    for (int j = w.milestone_before + 1; j < w.tile; ++j) {
      const int64_t at = (seq_index * p.num_splits + j) * N + n;
      h_enter = __ldcg(p.split_decay + at) * h_enter + __ldcg(p.split_state + at);
    }
  }
  if (w.milestone && has_successor) {
    if (sub == 0 && state_ok)
      __stcg(states + static_cast<int64_t>(w.tile + 1) * l.chunks_per_tile * N + n,
             tile_decay * h_enter + tile_state);
    publish_flag(p.tile_flags + flags + w.tile);
  }
  if (sub == 0) {
    float e = h_enter;
    for (int s = 0; s < l.subs; ++s) {
      sh.enter[(s * l.slots + slot) * G + n] = e;
      const float2 a = sh.agg[(s * l.slots + slot) * G + n];
      e = a.x * e + a.y;
    }
  }
  __syncthreads();

  // Step 4: chunk_states and y from the entering state.
  float h = sh.enter[(sub * l.slots + slot) * G + n];
  const float Dv = p.D ? p.D[seq] : 0.f;
  float* y = static_cast<float*>(p.out) + (static_cast<int64_t>(w.batch) * p.dim + channel) * p.length;
  float unused_sum = 0.f;
  for (int k = 0; k < blocks; ++k) {
    const lane::PositionBlock blk = lane::position_block<S::kBlock>(p, c_begin, k);
    if (blk.chunk_start && state_ok) states[static_cast<int64_t>(blk.chunk) * N + n] = h;
    const int base = blk.t0 - w.t0;
    const int length = blk.end - blk.t0;
    if (length == S::kBlock) {
      walk_staged_block<S, false, true>(step + base, sh.B + base * G, sh.C + base * G, n, length, A2, h, v,
                                        unused_sum);
    } else {
      walk_staged_block<S, true, true>(step + base, sh.B + base * G, sh.C + base * G, n, length, A2, h, v,
                                       unused_sum);
    }
    // Lane n now holds the sum over states of position base + n (kRows == 1 for 16- and 32-lane groups).
    lane::transposed_group_sum<S>(v, n);
    if (n < length && seq_ok) {
      const int t = base + n;
      const int2 hw = sh.place[t];
      atomicAdd(y + hw.x * p.width + hw.y, v[0] + Dv * step[t].y);
    }
  }
}

}  // namespace staged

#ifdef __CUDACC__
template <typename bc_t, int kGroup>
int launch_forward_staged(const ScanParams& p, const staged::StagedLayout& l, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.num_directions * l.channel_blocks * l.num_tiles;
  return launch_with_shared(staged::scan_staged_fwd<bc_t, lane::LaneShape<kGroup, 1>>,
                            dim3(static_cast<unsigned>(blocks)), dim3(l.threads), l.shared_bytes, stream, p);
}

// The staged multiaxial forward. The host sized its scratch from staged::staged_layout: the
// tiles are p's splits (chunks_per_split == chunks_per_tile), tile_ticket and tile_flags zeroed.
template <typename bc_t>
int scan_forward_multiaxial_staged(const ScanParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const staged::StagedLayout l = staged::staged_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks);
  if (!l.ok || p.num_splits != l.num_tiles || p.chunks_per_split != l.chunks_per_tile ||
      p.tile_ticket == nullptr || p.tile_flags == nullptr || (l.num_tiles > 1 && p.split_decay == nullptr))
    return static_cast<int>(cudaErrorInvalidValue);
  return l.group == staged::kNarrowGroup ? launch_forward_staged<bc_t, staged::kNarrowGroup>(p, l, s)
                                         : launch_forward_staged<bc_t, staged::kWideGroup>(p, l, s);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dermomamba
