// Backward of the multiaxial selective scan, "staged" form (scan v4 backward, benchmarks/notes/scan.md,
// "v4 backward"): one launch, every input read from device memory once, no split-aggregate pass.
//
// Why: the warp and lane backwards (scan_kernels.cuh, scan_lane_bwd_kernels.cuh) are latency-bound on
// per-step global loads and run a whole extra pass over delta, dy and C just to form each split's
// adjoint aggregate. Here a block stages a tile of positions in shared memory once (as the staged
// forward, scan_staged_kernels.cuh, whose tiles, staging, look-back flags and helpers it reuses), and
// the adjoint aggregate comes out of the same walk that rebuilds the forward states.
//
// Math (per sequence, state n; a_t = exp(delta_t A_n), h_t = a_t h_{t-1} + delta_t u_t B_t[n]):
//   g_t = dL/dh_t = C_t[n] dy_t + o_t, o_{t-1} = a_t g_t   (o: the adjoint carry, zero at the end)
//   dB_t[n] = sum over channels g_t delta_t u_t      dC_t[n] = sum over channels dy_t h_t
//   du_t = sum_n g_t delta_t B_t[n] + D dy_t
//   ddelta_t = softplus'(raw) sum_n g_t (u_t B_t[n] + A_n a_t h_{t-1})
//   dA_n = sum g_t delta_t a_t h_{t-1}, dD = sum dy_t u_t, ddelta_bias = sum ddelta_t.
// Over a run of positions [l, r] the carry maps as o_{l-1} = (prod_{l..r} a) o_r + agg with
// agg = sum_{t=l..r} (prod_{s=l..t} a_s) C_t[n] dy_t: a left-to-right sum, so the walk that rebuilds
// h from chunk_states also forms the run's adjoint aggregate.
//
// Work of one block (layout: staged_bwd_layout in scan_staged_layout.h): one tile of one (batch,
// direction) for a group of channels; threads are sub-chunks x channel slots x lanes (one state each):
//   1. stage the tile: the forward's stage_tile ((delta after bias / softplus, x), (h, w), B, C),
//      then dy per channel and position;
//   2. walk F, each lane over its sub-chunk left to right: h restarted from chunk_states at every
//      chunk, a checkpoint of h at every block of kBlock positions (shared memory), and the
//      sub-chunk's adjoint map (decay = the running product of a, agg);
//   3. the block folds its sub-chunks' maps right to left into the tile's map, publishes it and gets
//      the carry entering the tile from its right by a look-back over the tiles to its right: the
//      forward's deterministic milestones mirrored (tickets, milestones and folds in reverse tile
//      order; a milestone publishes its inclusive carry in reverse_carry), so the result does not
//      depend on timing;
//   4. walk B, every sub-chunk's blocks right to left in lockstep (sub-chunks with fewer blocks idle,
//      so the block's barriers are uniform): h_{t-1} and a_t of the block rebuilt in registers from
//      its checkpoint, the adjoint back over the block; du and ddelta summed over states by the
//      transposed butterfly (lane n ends with position t0 + n: dx, ddelta stored there), dB / dC
//      summed over the block's channels through shared memory in a fixed order; dA, dD and
//      ddelta_bias per-chunk partials (the host sums them).
// Outputs and their modes as the other backwards: dx by fp32 atomics or one plane per direction
// (deterministic, summed by the host); dB / dC by plain stores when one channel block covers a
// direction, else fp32 atomics or per-block partials (grad_bc_mode). Deterministic mode is
// bit-reproducible whatever the schedule.
//
// The launcher at the bottom is compiled by nvcc only.
#pragma once

#include "scan_staged_kernels.cuh"

namespace dermomamba {
namespace cuda {
namespace staged {

// Views of the backward tile's shared memory (offsets: staged_bwd_layout).
struct BwdTileShared {
  TileShared fwd;     // step, place, B, C, agg, enter as in the forward
  float* dy;          // [slot][position]
  float* checkpoint;  // [sub][block][slot * group + n]: h entering the block
  float* reduce;      // [dB, dC][sub][slot * group + n][reduce_row]: one row of block positions per lane
};

__device__ __forceinline__ BwdTileShared bwd_tile_shared(const StagedLayout& l) {
  unsigned char* base = staged_shared_memory();
  BwdTileShared s;
  s.fwd.step = reinterpret_cast<float2*>(base + l.step_offset);
  s.fwd.place = reinterpret_cast<int2*>(base + l.place_offset);
  s.fwd.B = reinterpret_cast<float*>(base + l.B_offset);
  s.fwd.C = reinterpret_cast<float*>(base + l.C_offset);
  s.fwd.agg = reinterpret_cast<float2*>(base + l.agg_offset);
  s.fwd.enter = reinterpret_cast<float*>(base + l.enter_offset);
  s.dy = reinterpret_cast<float*>(base + l.dy_offset);
  s.checkpoint = reinterpret_cast<float*>(base + l.checkpoint_offset);
  s.reduce = reinterpret_cast<float*>(base + l.reduce_offset);
  return s;
}

// The forward's TileWork for the ticket's tile, counted from the sequence's end: tickets hand out
// tiles right to left, so a block waits only for tiles to its right, taken by earlier tickets.
// milestone / milestone_before are in that reverse order (reverse index = num_tiles - 1 - tile).
__device__ __forceinline__ TileWork bwd_tile_work(const ScanParams& p, const StagedLayout& l, int ticket,
                                                  int& reverse) {
  TileWork w = tile_work(p, l, ticket);
  reverse = w.tile;
  w.tile = l.num_tiles - 1 - reverse;
  w.first_chunk = w.tile * l.chunks_per_tile;
  w.t0 = w.first_chunk * p.chunk_size;
  w.milestone = (reverse + 1) % kMilestoneSpan == 0;
  w.milestone_before = (reverse / kMilestoneSpan) * kMilestoneSpan - 1;  // -1: start from a zero carry
  return w;
}

// dy of the tile, zero for idle slots and positions past the sequence's end; batched like the
// forward's staging. Ends with a barrier.
__device__ __forceinline__ void stage_dy(const ScanParams& p, const StagedLayout& l, const TileWork& w,
                                         const BwdTileShared& sh) {
  const int P = l.tile_positions;
  const int64_t dy_base = w.batch * p.dout_batch_stride;
  const int elements = l.slots * P;
  for (int first = threadIdx.x; first < elements; first += kStageBatch * blockDim.x) {
    float v[kStageBatch];
#pragma unroll
    for (int q = 0; q < kStageBatch; ++q) {
      const int i = first + q * blockDim.x;
      v[q] = 0.f;
      if (i < elements) {
        const int slot = i / P;
        const int2 hw = sh.fwd.place[i - slot * P];
        if (hw.x >= 0 && slot < w.block_channels)
          v[q] = load_kind(p.dout,
                           dy_base + (w.channel0 + slot) * p.dout_dim_stride + hw.x * p.dout_h_stride +
                               hw.y * p.dout_w_stride,
                           p.dout_kind);
      }
    }
#pragma unroll
    for (int q = 0; q < kStageBatch; ++q) {
      const int i = first + q * blockDim.x;
      if (i < elements) sh.dy[i] = v[q];
    }
  }
  __syncthreads();
}

// Walk F over one block: h forward, and the adjoint map's running product and aggregate.
template <typename S, bool kMasked>
__device__ __forceinline__ void walk_forward_block(const float2* step, const float* dy, const float* B,
                                                   const float* C, int n, int length, float A2, float& h,
                                                   float& decay, float& agg) {
#pragma unroll
  for (int j = 0; j < S::kBlock; ++j) {
    if (!kMasked || j < length) {
      const float2 s = step[j];
      const float a = exp2f(s.x * A2);
      h = a * h + (s.x * s.y) * B[j * S::kGroup + n];
      decay *= a;
      agg += decay * (C[j * S::kGroup + n] * dy[j]);
    }
  }
}

// Walk B over one block, right to left: the carry o in and out, each position's (state n) dB and dC
// terms into the reduce rows, and the per-state terms of du and ddelta into v_du / v_dd.
template <typename S, bool kMasked>
__device__ __forceinline__ void walk_backward_block(const float2* step, const float* dy, const float* B,
                                                    const float* C, int n, int length, float A2, float An,
                                                    float h, float& o, float& dA, float* red_B, float* red_C,
                                                    float (&v_du)[S::kBlock],
                                                    float (&v_dd)[S::kBlock]) {
  // h_{t-1} of every position of the block, from the checkpoint. a_t is computed again on the way
  // back (one more exp per (t, n)): keeping it too would hold 2 x kBlock floats per lane at once and
  // spill at the 128 registers that 512 threads per SM allow.
  float h_prev[S::kBlock];
#pragma unroll
  for (int j = 0; j < S::kBlock; ++j) {
    if (!kMasked || j < length) {
      const float2 s = step[j];
      h_prev[j] = h;
      h = exp2f(s.x * A2) * h + (s.x * s.y) * B[j * S::kGroup + n];
    }
  }
  // A memory barrier for the compiler: the loop below reads step and B again from shared memory
  // instead of keeping the values this loop read live (3 x kBlock registers, which spill).
  __syncwarp();
#pragma unroll
  for (int j = S::kBlock - 1; j >= 0; --j) {
    if (!kMasked || j < length) {
      const float2 s = step[j];
      const float dyv = dy[j];
      const float Bv = B[j * S::kGroup + n];
      const float decay = exp2f(s.x * A2);
      const float decayed_prev = decay * h_prev[j];
      const float g = dyv * C[j * S::kGroup + n] + o;
      const float h_j = decayed_prev + (s.x * s.y) * Bv;
      const float g_delta = g * s.x;
      red_B[j] = g_delta * s.y;
      red_C[j] = dyv * h_j;
      v_du[j] = g_delta * Bv;
      v_dd[j] = g * (s.y * Bv + An * decayed_prev);
      dA += g_delta * decayed_prev;
      o = decay * g;
    } else {
      v_du[j] = 0.f;
      v_dd[j] = 0.f;
    }
  }
}

// Walk B of the lean variants (scan_staged_layout.h, "compile-time variants"): the same values as
// walk_backward_block, with a lane holding arrays of kBlock / 2 positions instead of kBlock.
//   * h_{t-1} of the block's lower half is parked in the lane's own reduce row (row[j], j < kBlock / 2),
//     each slot read back just before the lane's dB / dC value of position j overwrites it;
//   * dB / dC: the warp's two channels (slots 2m, 2m + 1, lanes n and n + 16) are summed by one xor
//     shuffle: the even slot's row gets the dB sum, the odd slot's row the dC sum;
//   * du and ddelta: the upper half's per-state terms wait in du_hi / dd_hi; as the walk reaches the
//     lower half, position j's terms meet position j + kBlock / 2's in the first round of the transposed
//     butterfly (lane::transposed_sum_rounds with half kBlock / 2, the same operands in the same order),
//     and the caller runs the remaining rounds on the kBlock / 2 results.
// The kernel instantiates the full walk only (kMasked false: see walk F in staged_bwd_body); a masked
// walk would be correct as written, but its per-position predicates spill under the lean register caps.
template <typename S, bool kMasked>
__device__ __forceinline__ void walk_backward_block_lean(const float2* step, const float* dy, const float* B,
                                                         const float* C, int n, int length, float A2, float An,
                                                         float h, bool odd_slot, float& o, float& dA, float* row,
                                                         float (&v_du)[S::kBlock / 2],
                                                         float (&v_dd)[S::kBlock / 2]) {
  constexpr int kHalf = S::kBlock / 2;
  static_assert(S::kSeqsPerWarp == 2, "the dB / dC pair sum pairs the two channels of a warp");
  float h_hi[kHalf];
#pragma unroll
  for (int j = 0; j < S::kBlock; ++j) {
    if (!kMasked || j < length) {
      const float2 s = step[j];
      if (j < kHalf) {
        row[j] = h;
      } else {
        h_hi[j - kHalf] = h;
      }
      h = exp2f(s.x * A2) * h + (s.x * s.y) * B[j * S::kGroup + n];
    }
  }
  // As in walk_backward_block: the loop below reads step and B again instead of keeping them live.
  __syncwarp();
  const bool upper = (n & kHalf) != 0;
  float du_hi[kHalf], dd_hi[kHalf];
#pragma unroll
  for (int j = S::kBlock - 1; j >= 0; --j) {
    float du = 0.f, dd = 0.f;
    if (!kMasked || j < length) {
      const float2 s = step[j];
      const float dyv = dy[j];
      const float Bv = B[j * S::kGroup + n];
      const float decay = exp2f(s.x * A2);
      const float h_prev = j < kHalf ? row[j] : h_hi[j - kHalf];
      const float decayed_prev = decay * h_prev;
      const float g = dyv * C[j * S::kGroup + n] + o;
      const float h_j = decayed_prev + (s.x * s.y) * Bv;
      const float g_delta = g * s.x;
      const float term_B = g_delta * s.y;
      const float term_C = dyv * h_j;
      // length is the same for the whole warp (one sub-chunk), so every lane takes part in the shuffle.
      const float partner = __shfl_xor_sync(kFullMask, odd_slot ? term_B : term_C, S::kGroup);
      row[j] = odd_slot ? partner + term_C : term_B + partner;
      du = g_delta * Bv;
      dd = g * (s.y * Bv + An * decayed_prev);
      dA += g_delta * decayed_prev;
      o = decay * g;
    }
    if (j >= kHalf) {
      du_hi[j - kHalf] = du;
      dd_hi[j - kHalf] = dd;
    } else {
      v_du[j] = (upper ? du_hi[j] : du) + __shfl_xor_sync(kFullMask, upper ? du : du_hi[j], kHalf);
      v_dd[j] = (upper ? dd_hi[j] : dd) + __shfl_xor_sync(kFullMask, upper ? dd : dd_hi[j], kHalf);
    }
  }
}

// Sum over the kGroup lanes of a group (every lane gets the total).
template <typename S>
__device__ __forceinline__ float staged_group_sum(float v) {
#pragma unroll
  for (int offset = S::kGroup / 2; offset >= 1; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Position blocks of sub-chunk `sub` of the tile (0 past the sequence's end) and its first chunk.
__device__ __forceinline__ int sub_first_chunk(const StagedLayout& l, const TileWork& w, int sub) {
  return w.first_chunk + sub * l.chunks_per_sub;
}

template <int kBlock>
__device__ __forceinline__ int sub_blocks(const ScanParams& p, const StagedLayout& l, int c_begin) {
  const int c_end = min(c_begin + l.chunks_per_sub, p.num_chunks);
  return c_begin < c_end ? lane::blocks_in_split<kBlock>(p, c_begin, c_end) : 0;
}

// Threads per block the registers must allow: 512 for 16-lane groups, 256 for 32-lane groups (arrays
// of 32 positions per lane).
template <int kGroup>
constexpr int kBwdMaxThreads = kGroup == kNarrowGroup ? kMaxThreads : kMaxBwdThreadsWide;

// The kernel's body, for the v4 kernel and the lean variants (kVariant: staged_bwd_variant_config).
template <typename bc_t, typename S, int kVariant>
__device__ __forceinline__ void staged_bwd_body(const ScanParams& p) {
  static_assert(S::kRows == 1 && S::kBlock == S::kGroup, "one position per lane and block");
  constexpr int G = S::kGroup;
  constexpr bool kLean = staged_bwd_variant_config(kVariant).lean;
  const StagedLayout l = staged_bwd_layout_for(kVariant, p.dim, p.dstate, p.chunk_size, p.num_chunks);
  const BwdTileShared sh = bwd_tile_shared(l);
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(p.tile_ticket, 1);
  __syncthreads();
  int reverse;
  const TileWork w = bwd_tile_work(p, l, ticket, reverse);

  // This thread's (sub-chunk, channel slot, state), as in the forward.
  const int N = p.dstate;
  const int lanes = l.slots * G;
  const int threads_per_sub = l.warps_per_sub * kWarpSize;
  const int sub = threadIdx.x / threads_per_sub;
  const int in_sub = threadIdx.x - sub * threads_per_sub;
  const int lane_id = in_sub % kWarpSize;
  const int n = lane_id % G;
  const int slot = (in_sub / kWarpSize) * S::kSeqsPerWarp + lane_id / G;
  const int lane_index = slot * G + n;
  const bool seq_ok = slot < w.block_channels;
  const int channel = w.channel0 + (seq_ok ? slot : w.block_channels - 1);
  const int seq = w.direction * p.dim + channel;
  const int64_t seq_index = static_cast<int64_t>(w.batch) * p.num_seqs + seq;
  const bool state_ok = seq_ok && n < N;
  const float An = state_ok ? p.A[static_cast<int64_t>(seq) * N + n] : 0.f;
  const float A2 = An * kLog2e;
  const float* states = p.chunk_states + seq_index * p.num_chunks * N;
  const int64_t flags = static_cast<int64_t>(w.unit) * l.num_tiles;
  const int P = l.tile_positions;

  stage_tile<bc_t, G>(p, l, w, sh.fwd);
  stage_dy(p, l, w, sh);

  const int c_begin = sub_first_chunk(l, w, sub);
  const int blocks = sub_blocks<G>(p, l, c_begin);
  const float2* step = sh.fwd.step + slot * P;
  const float* dy = sh.dy + slot * P;
  float* checkpoint = sh.checkpoint + sub * l.blocks_per_sub * lanes + lane_index;

  // Step 2 (walk F): checkpoints and the sub-chunk's adjoint map.
  {
    float h = 0.f, decay = 1.f, agg = 0.f;
    for (int k = 0; k < blocks; ++k) {
      const lane::PositionBlock blk = lane::position_block<G>(p, c_begin, k);
      if (blk.chunk_start) h = state_ok ? states[static_cast<int64_t>(blk.chunk) * N + n] : 0.f;
      checkpoint[k * lanes] = h;
      const int base = blk.t0 - w.t0;
      const int length = blk.end - blk.t0;
      // The lean variants run only where chunk_size is a multiple of G (staged_bwd_layout_for), so a
      // block is short only at the sequence's end, and its positions up to the chunk's end are staged
      // (step, B, C and dy zero past L): the full walk passes h, decay and agg through them unchanged
      // (a = 1, zero terms), as walk B does o; its terms there are zero or never stored. No masked walk,
      // whose per-position predicates spill under the lean register caps.
      if (kLean || length == G) {
        walk_forward_block<S, false>(step + base, dy + base, sh.fwd.B + base * G, sh.fwd.C + base * G, n, length, A2,
                                     h, decay, agg);
      } else {
        walk_forward_block<S, true>(step + base, dy + base, sh.fwd.B + base * G, sh.fwd.C + base * G, n, length, A2,
                                    h, decay, agg);
      }
    }
    sh.fwd.agg[(sub * l.slots + slot) * G + n] = make_float2(decay, agg);
  }
  __syncthreads();

  // Step 3: the tile's map (sub-chunks right to left), published by non-milestone tiles that have a
  // tile to their left.
  float tile_decay = 1.f, tile_state = 0.f;
  if (sub == 0) {
    for (int s = l.subs - 1; s >= 0; --s) {
      const float2 a = sh.fwd.agg[(s * l.slots + slot) * G + n];
      tile_state = a.x * tile_state + a.y;
      tile_decay *= a.x;
    }
  }
  const bool has_successor = w.tile > 0;
  if (!w.milestone && has_successor) {
    if (sub == 0 && state_ok) {
      const int64_t out = (seq_index * p.num_splits + w.tile) * N + n;
      __stcg(p.split_decay + out, tile_decay);
      __stcg(p.split_state + out, tile_state);
    }
    publish_flag(p.tile_flags + flags + w.tile);
  }
  // Look-back to the right: the last milestone's inclusive carry, then the maps after it, in order.
  if (threadIdx.x == 0) {
    for (int j = max(w.milestone_before, 0); j < reverse; ++j)
      wait_for_flag(p.tile_flags + flags + (l.num_tiles - 1 - j));
    __threadfence();
  }
  __syncthreads();
  float o_enter = 0.f;
  if (sub == 0 && state_ok) {
    if (w.milestone_before >= 0)
      o_enter = __ldcg(p.reverse_carry + (seq_index * p.num_splits + (l.num_tiles - 1 - w.milestone_before)) * N + n);
    for (int j = w.milestone_before + 1; j < reverse; ++j) {
      const int64_t at = (seq_index * p.num_splits + (l.num_tiles - 1 - j)) * N + n;
      o_enter = __ldcg(p.split_decay + at) * o_enter + __ldcg(p.split_state + at);
    }
  }
  if (w.milestone && has_successor) {
    if (sub == 0 && state_ok)
      __stcg(p.reverse_carry + (seq_index * p.num_splits + w.tile) * N + n, tile_decay * o_enter + tile_state);
    publish_flag(p.tile_flags + flags + w.tile);
  }
  if (sub == 0) {
    float e = o_enter;
    for (int s = l.subs - 1; s >= 0; --s) {
      sh.fwd.enter[(s * l.slots + slot) * G + n] = e;
      const float2 a = sh.fwd.agg[(s * l.slots + slot) * G + n];
      e = a.x * e + a.y;
    }
  }
  __syncthreads();

  // Step 4 (walk B).
  float o = sh.fwd.enter[(sub * l.slots + slot) * G + n];
  const float Dv = p.D ? p.D[seq] : 0.f;
  const int64_t x_plane = static_cast<int64_t>(p.batch) * p.dim * p.length;
  const int64_t x_base = (static_cast<int64_t>(w.batch) * p.dim + channel) * p.length;
  const int block_in_group = w.channel0 / l.channels;
  const int64_t bc_plane =
      p.grad_bc_mode == kGradBCPartials
          ? ((static_cast<int64_t>(w.batch) * p.num_bc_groups + w.direction) * l.channel_blocks + block_in_group) * N
          : (static_cast<int64_t>(w.batch) * p.num_bc_groups + w.direction) * N;
  const int reduce_plane = l.subs * lanes * l.reduce_row;  // dB rows, then dC rows (v4; lean: one plane)
  float* red_B = sh.reduce + (sub * lanes + lane_index) * l.reduce_row;
  float* red_C = red_B + reduce_plane;
  const bool odd_slot = (slot & 1) != 0;
  float dA = 0.f, dD = 0.f, dbias = 0.f;
  for (int k = l.blocks_per_sub - 1; k >= 0; --k) {
    const bool active = k < blocks;
    lane::PositionBlock blk{};
    if (active) {
      blk = lane::position_block<G>(p, c_begin, k);
      const int base = blk.t0 - w.t0;
      const int length = blk.end - blk.t0;
      const float h = checkpoint[k * lanes];
      float v_du[kLean ? G / 2 : G], v_dd[kLean ? G / 2 : G];
      if constexpr (kLean) {
        // Always the full walk (see walk F: a block is short only at the sequence's end).
        walk_backward_block_lean<S, false>(step + base, dy + base, sh.fwd.B + base * G, sh.fwd.C + base * G, n,
                                           length, A2, An, h, odd_slot, o, dA, red_B, v_du, v_dd);
        // The butterfly's first round ran in the walk; the rest as in lane::transposed_group_sum.
        lane::transposed_sum_rounds<G / 4, G / 2, G / 2>(v_du, n);
        lane::transposed_sum_rounds<G / 4, G / 2, G / 2>(v_dd, n);
      } else {
        if (length == G) {
          walk_backward_block<S, false>(step + base, dy + base, sh.fwd.B + base * G, sh.fwd.C + base * G, n, length,
                                        A2, An, h, o, dA, red_B, red_C, v_du, v_dd);
        } else {
          walk_backward_block<S, true>(step + base, dy + base, sh.fwd.B + base * G, sh.fwd.C + base * G, n, length,
                                       A2, An, h, o, dA, red_B, red_C, v_du, v_dd);
        }
        lane::transposed_group_sum<S>(v_du, n);
        lane::transposed_group_sum<S>(v_dd, n);
      }
      // Lane n now holds the sums over states of position base + n.
      if (n < length && seq_ok) {
        const int t = base + n;
        const float2 s = step[t];
        const float dyv = dy[t];
        // softplus'(raw) = sigmoid(raw) = 1 - exp(-softplus(raw)); 1 in float above the threshold.
        const float slope = p.delta_softplus ? -expm1f(-s.x) : 1.f;
        const float ddelta_raw = v_dd[0] * slope;
        dD += dyv * s.y;
        dbias += ddelta_raw;
        const int2 hw = sh.fwd.place[t];
        const int native = hw.x * p.width + hw.y;
        store_kind(p.ddelta, seq_index * p.length + native, p.delta_kind, ddelta_raw);
        const float du = v_du[0] + Dv * dyv;
        if (p.dx_per_direction != nullptr) {
          p.dx_per_direction[w.direction * x_plane + x_base + native] = du;
        } else {
          atomicAdd(p.dx_accum + x_base + native, du);
        }
      }
    }
    __syncthreads();
    // dB / dC of every sub-chunk's block k: one (sub-chunk, state, position) per thread, positions
    // fastest (consecutive places along the row directions), channels added in slot order.
    for (int e = threadIdx.x; e < l.subs * G * G; e += blockDim.x) {
      const int s_e = e / (G * G);
      const int rest = e - s_e * G * G;
      const int n_e = rest / G;
      const int j = rest - n_e * G;
      if (n_e >= N) continue;
      const int first_chunk = sub_first_chunk(l, w, s_e);
      if (k >= sub_blocks<G>(p, l, first_chunk)) continue;
      const lane::PositionBlock b = lane::position_block<G>(p, first_chunk, k);
      if (j >= b.end - b.t0) continue;
      const float* row_B = sh.reduce + (s_e * lanes + n_e) * l.reduce_row + j;
      const float* row_C = row_B + reduce_plane;
      const int slot_stride = G * l.reduce_row;
      float sum_B = 0.f, sum_C = 0.f;
      if constexpr (kLean) {
        // Slot pair m: row 2m holds the pair's dB sum, row 2m + 1 its dC sum (an idle odd slot added zeros).
        for (int q = 0; q < w.block_channels; q += 2) {
          sum_B += row_B[q * slot_stride];
          sum_C += row_B[(q + 1) * slot_stride];
        }
      } else {
        for (int q = 0; q < w.block_channels; ++q) {
          sum_B += row_B[q * slot_stride];
          sum_C += row_C[q * slot_stride];
        }
      }
      const int2 hw = sh.fwd.place[b.t0 - w.t0 + j];
      store_grad_bc<bc_t>(p, (bc_plane + n_e) * p.length + hw.x * p.width + hw.y, sum_B, sum_C);
    }
    __syncthreads();
    // A chunk's first block closes the chunk: its dA, dD and ddelta_bias partials.
    if (active && blk.chunk_start) {
      if (state_ok) p.dA_partial[(seq_index * p.num_chunks + blk.chunk) * N + n] = dA;
      dD = staged_group_sum<S>(dD);
      dbias = staged_group_sum<S>(dbias);
      if (seq_ok && n == 0) {
        if (p.dD_partial) p.dD_partial[seq_index * p.num_chunks + blk.chunk] = dD;
        if (p.ddelta_bias_partial) p.ddelta_bias_partial[seq_index * p.num_chunks + blk.chunk] = dbias;
      }
      dA = dD = dbias = 0.f;
    }
  }
}

template <typename bc_t, typename S>
__global__ void __launch_bounds__(kBwdMaxThreads<S::kGroup>, 1) scan_staged_bwd(ScanParams p) {
  staged_bwd_body<bc_t, S, kStagedBwdDefaultVariant>(p);
}

// The lean variants (16-lane groups only): blocks of at most kLeanMaxThreads threads, registers capped so
// that the blocks shared memory allows also fit the register file.
template <typename bc_t, int kVariant>
__global__ void __maxnreg__(staged_bwd_variant_config(kVariant).max_registers)
    scan_staged_bwd_lean(ScanParams p) {
  static_assert(staged_bwd_variant_config(kVariant).lean, "a lean variant");
  staged_bwd_body<bc_t, lane::LaneShape<kNarrowGroup, 1>, kVariant>(p);
}

}  // namespace staged

#ifdef __CUDACC__
template <typename bc_t, int kGroup>
int launch_backward_staged(const ScanParams& p, const staged::StagedLayout& l, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.num_directions * l.channel_blocks * l.num_tiles;
  if constexpr (kGroup == staged::kNarrowGroup) {
    static_assert(staged::kStagedBwdVariantCount == 3, "one case per lean variant");
    if (l.bwd_variant == 1 || l.bwd_variant == 2) {
      if (l.threads > staged::kLeanMaxThreads) return static_cast<int>(cudaErrorInvalidValue);
      return launch_with_shared(l.bwd_variant == 1 ? staged::scan_staged_bwd_lean<bc_t, 1>
                                                   : staged::scan_staged_bwd_lean<bc_t, 2>,
                                dim3(static_cast<unsigned>(blocks)), dim3(l.threads), l.shared_bytes, stream, p);
    }
  }
  if (l.bwd_variant != staged::kStagedBwdDefaultVariant) return static_cast<int>(cudaErrorInvalidValue);
  return launch_with_shared(staged::scan_staged_bwd<bc_t, lane::LaneShape<kGroup, 1>>,
                            dim3(static_cast<unsigned>(blocks)), dim3(l.threads), l.shared_bytes, stream, p);
}

// The staged multiaxial backward. The host sized its scratch from staged::staged_bwd_layout_selected
// (the variant DERMOMAMBA_STAGED_BWD_VARIANT names, read here again in the same call): the tiles are p's
// splits, tile_ticket and tile_flags zeroed, split_decay / split_state / reverse_carry allocated when there
// is more than one tile, and dB / dC set up for the layout's channel blocks.
template <typename bc_t>
int scan_backward_multiaxial_staged(const ScanParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const staged::StagedLayout l = staged::staged_bwd_layout_selected(p.dim, p.dstate, p.chunk_size, p.num_chunks);
  if (!l.ok || p.num_splits != l.num_tiles || p.chunks_per_split != l.chunks_per_tile ||
      p.tile_ticket == nullptr || p.tile_flags == nullptr ||
      (l.num_tiles > 1 && (p.split_decay == nullptr || p.reverse_carry == nullptr)))
    return static_cast<int>(cudaErrorInvalidValue);
  return l.group == staged::kNarrowGroup ? launch_backward_staged<bc_t, staged::kNarrowGroup>(p, l, s)
                                         : launch_backward_staged<bc_t, staged::kWideGroup>(p, l, s);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dermomamba
