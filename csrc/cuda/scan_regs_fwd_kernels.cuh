// Forward of the multiaxial selective scan, "regs" form (scan v5): states in registers.
//
// Why: the staged form (scan_staged_kernels.cuh, v4) maps ONE state per lane, so every per-position
// cost (the (delta, x) load, index math, the transposed butterfly that sums y over states, the y
// atomics) is paid by 16 lanes: Nsight Compute at DermoMamba's largest shape (batch 16, D 8,
// 192 x 256, N 16, fp32, H200) counted ~51 thread-instructions per (position, state) element.
// Here a thread keeps 8 or 4 consecutive states of one channel in registers (the variant,
// scan_regs_fwd_layout.h) and pays those costs once per 8 or 4 states.
//
// Floor (per (position, state) element, N = 16, fp32):
//   * instructions: walk 1 = FMUL (delta A2), MUFU.EX2, FMUL (delta x B), FFMA (a h + ...) = 4;
//     walk 2 = the same + FFMA (y += C h) = 5; per position and thread (shared by 8 states): one
//     LDS.64 of (delta, x), two LDS.128 of B (and two of C in walk 2), delta x, the delta sum, one
//     xor-shuffle + add, the y store into shared memory and the chunk-start test. sm_90 SASS
//     (nvcc 13.0, -O3 --use_fast_math): walk 1 is 41 instructions per position (5.1 per element),
//     walk 2 60.5 (7.6 per element; 8 MUFU.EX2 each); staging (softplus: ~40 per channel and
//     position), the fold and the y flush add ~5 per element: ~18 in all, against ~51 in v4;
//   * the MUFU pipe (16 exp2 per clock and SM on sm_90, an eighth of the FMA rate) is the other floor:
//     2 exp2 per element (one per walk); at 192 x 256 that is 2 x 402 M exp2 ~ 0.2 ms on 132 SMs,
//     about what the instruction issue needs too (~18 per element / 128 per clock and SM);
//   * bytes: B and C once per (batch, direction) and tile (all 8 channels share a block: 128 B per
//     position for N = 16), delta and x once (8 B per channel and position), y by fp32 atomics
//     (coalesced along rows in directions 0 / 2), chunk_states once (64 B per channel and chunk):
//     ~0.6 GB at 192 x 256, ~0.13 ms of H200 bandwidth; so the walks, not memory, bound the kernel.
// Variants (DERMOMAMBA_REGS_FWD_VARIANT, scan_regs_fwd_layout.h), ptxas -v (nvcc 13.0, sm_90), no spills:
//   0: 8 states, 2 blocks / SM: 126-128 registers, ~108 KB shared (D 8, N 16), 16 warps / SM;
//      SASS per position: walk 1 44.5 instructions (5.6 per state), walk 2 ~60 (7.5 per state);
//   1: 8 states, 3 blocks / SM: 79-80 registers, ~70 KB, 24 warps; walk 1 47 (5.9), walk 2 ~65 (8.1);
//   2: 4 states, 4 blocks / SM: 64 registers, ~49 KB, 32 warps; walk 1 37 (9.3), walk 2 51 (12.8).
// Nsight Compute found variant 0 latency-bound (0.58 eligible warps per scheduler, issue 36 % busy):
// variants 1 and 2 trade instructions per state for warps to hide the latency.
//
// Work of one block (plan: scan_regs_fwd_layout.h): one tile of one (batch, direction) for a group of
// channels; threads = sub-chunks x channel slots x state groups (`lanes` threads per channel).
//   1. stage the tile in shared memory (as v4, with more loads in flight: 2 positions x 8 channels of
//      (delta, x) per thread and round, B / C as 16- or 8-byte quads when states are contiguous;
//      delta after bias / softplus once per (channel, position));
//   2. walk 1: each thread walks its sub-chunk from a zero state: (end state, sum of delta);
//   3. fold: one thread per (channel, state) chain folds the sub-chunks (the tile's aggregate, published
//      for non-milestone tiles), then after the look-back the entering state of every sub-chunk. The
//      look-back is v4's (deterministic milestone scheme, same scratch and flags), except that a
//      milestone tile publishes its inclusive state in split_state[tile] (tiles need not start on a
//      chunk, so chunk_states cannot hold it);
//   4. walk 2 from the entering state: chunk_states (the state entering every chunk that starts in the
//      sub-chunk) and y + D x per position into shared memory (over (delta, x)'s delta, dead by then);
//   5. flush: y added into the zeroed fp32 output by atomics, consecutive positions in consecutive lanes.
// Forward progress as v4: blocks take tiles from a ticket counter in start order.
#pragma once

#include <climits>
#include <cstdint>
#include <cstring>

#include "scan_staged_kernels.cuh"
#include "scan_regs_fwd_layout.h"

namespace dermomamba {
namespace cuda {
namespace regs {

using RegsKernel = void (*)(ScanParams);

// Elements each thread loads per staging round before storing any (two loads each: 16 in flight).
constexpr int kFwdStageLoads = 8;
// B / C quads per thread and round (x 2 arrays: 8 vector loads, 32 registers in flight; 8 quads
// spill at the 128-register cap). Variants capped at 64 registers keep half as many in flight (their
// 4 resident blocks keep the SM's loads in flight instead).
constexpr int kFwdQuadLoads = 4;
// Positions per thread and round when staging (delta, x): 2 x 8 slots x 2 loads = 32 in flight.
constexpr int kFwdStepPositions = 2;
// Register caps at which a variant keeps the staging loads above in flight (below: a quarter of the
// (delta, x) loads, half the quads, half the look-back hops) and unrolls its walks twice. Measured
// with ptxas -v (nvcc 13.0, sm_90): the 80-register variant spills with the wide staging, the
// 64-register one with an unrolled walk or more staging loads in flight.
constexpr int kFwdWideStagingRegisters = 96;
constexpr int kFwdUnrolledWalkRegisters = 80;
constexpr unsigned kFwdFullMask = 0xffffffffu;
// Never a position index: the chunk-start countdown of a thread with no (more) chunk starts.
constexpr int kFwdNoChunkStart = INT_MAX;
// Look-back hops folded per tile at most: the tiles after the last milestone.
constexpr int kFwdMaxLookbackHops = staged::kMilestoneSpan - 1;

__device__ __forceinline__ float4 fwd_load_float4(const float* at) {
#ifdef __CUDACC__
  return *reinterpret_cast<const float4*>(at);
#else
  float4 v;
  std::memcpy(&v, at, sizeof v);
  return v;
#endif
}

__device__ __forceinline__ void fwd_store_float4(float* at, float4 v) {
#ifdef __CUDACC__
  *reinterpret_cast<float4*>(at) = v;
#else
  std::memcpy(at, &v, sizeof v);
#endif
}

// Four consecutive states of B or C: one 16-byte (fp32) or 8-byte (fp16 / bf16) load.
template <typename bc_t>
struct alignas(4 * sizeof(bc_t)) BcQuad {
  bc_t v[4];
};

template <typename bc_t>
__device__ __forceinline__ BcQuad<bc_t> load_quad(const bc_t* at) {
#ifdef __CUDACC__
  return *reinterpret_cast<const BcQuad<bc_t>*>(at);
#else
  BcQuad<bc_t> q;
  std::memcpy(&q, at, sizeof q);
  return q;
#endif
}

struct RegsFwdShared {
  float2* step;  // [slot][slot_stride]
  int2* place;   // [padded position]
  float* B;      // [padded position][group]
  float* C;
  float* agg;    // [sub][slot][group]
  float* dsum;   // [sub][slot]
};

__device__ __forceinline__ RegsFwdShared regs_fwd_shared(const RegsFwdPlan& q) {
  unsigned char* base = staged::staged_shared_memory();
  RegsFwdShared s;
  s.step = reinterpret_cast<float2*>(base + q.l.step_offset);
  s.place = reinterpret_cast<int2*>(base + q.l.place_offset);
  s.B = reinterpret_cast<float*>(base + q.l.B_offset);
  s.C = reinterpret_cast<float*>(base + q.l.C_offset);
  s.agg = reinterpret_cast<float*>(base + q.l.agg_offset);
  s.dsum = reinterpret_cast<float*>(base + q.dsum_offset);
  return s;
}

// The ticket's tile: (batch, direction, channel block) and its positions [t0, t0 + length).
struct RegsFwdTile {
  int tile, unit, batch, direction, channel0, block_channels;
  int t0, length;  // length <= 0: a tile of a last, short chunk past L (does nothing visible)
  int milestone_before;
  bool milestone;
};

__device__ __forceinline__ RegsFwdTile regs_fwd_tile(const ScanParams& p, const RegsFwdPlan& q, int ticket) {
  const staged::StagedLayout& l = q.l;
  RegsFwdTile w;
  const int units = p.batch * p.num_directions * l.channel_blocks;
  w.tile = ticket / units;
  w.unit = ticket - w.tile * units;
  w.batch = w.unit / (p.num_directions * l.channel_blocks);
  const int rest = w.unit - w.batch * p.num_directions * l.channel_blocks;
  w.direction = rest / l.channel_blocks;
  w.channel0 = (rest - w.direction * l.channel_blocks) * l.channels;
  w.block_channels = min(l.channels, p.dim - w.channel0);
  int end;
  if (q.tiles_per_chunk == 1) {
    w.t0 = w.tile * l.chunks_per_tile * p.chunk_size;
    end = w.t0 + l.tile_positions;
  } else {
    const int chunk = w.tile / q.tiles_per_chunk;
    const int part = w.tile - chunk * q.tiles_per_chunk;
    w.t0 = chunk * p.chunk_size + part * l.tile_positions;
    end = min(w.t0 + l.tile_positions, (chunk + 1) * p.chunk_size);
  }
  w.length = min(end, p.length) - w.t0;
  w.milestone = (w.tile + 1) % staged::kMilestoneSpan == 0;
  w.milestone_before = (w.tile / staged::kMilestoneSpan) * staged::kMilestoneSpan - 1;  // -1: zero state
  return w;
}

// (delta after bias / softplus, x) of every (slot, padded position): positions across threads
// (consecutive along a contiguous row), slots in registers. kFloatInputs: x and delta are fp32 (no
// per-load dtype test).
template <bool kFloatInputs, int kStepPositions, int kSlotLoads>
__device__ __forceinline__ void stage_steps(const ScanParams& p, const RegsFwdPlan& q, const RegsFwdTile& w,
                                            const RegsFwdShared& sh) {
  const int Pp = q.padded_positions;
  // Mixed dtypes (rarer) walk one position per round: load_kind's dtype tests need the registers.
  constexpr int kPositions = kFloatInputs ? kStepPositions : 1;
  const int64_t u_base = w.batch * p.u_batch_stride + w.channel0 * p.u_dim_stride;
  const int64_t delta_base =
      w.batch * p.delta_batch_stride + w.direction * p.delta_dir_stride + w.channel0 * p.delta_dim_stride;
  const float* bias_row = p.delta_bias ? p.delta_bias + w.direction * p.dim + w.channel0 : nullptr;
  // kPositions positions x kSlotLoads slots per round: all their loads are in flight at once.
  for (int i0 = threadIdx.x; i0 < Pp; i0 += kPositions * blockDim.x) {
    int2 hw[kPositions];
#pragma unroll
    for (int r = 0; r < kPositions; ++r) {
      const int i = i0 + r * blockDim.x;
      hw[r] = i < Pp ? sh.place[i] : make_int2(-1, -1);
    }
    for (int slot0 = 0; slot0 < q.l.slots; slot0 += kSlotLoads) {
      float u[kPositions][kSlotLoads], raw[kPositions][kSlotLoads], bias[kSlotLoads];
#pragma unroll
      for (int k = 0; k < kSlotLoads; ++k) {
        const int slot = slot0 + k;
        bias[k] = bias_row && slot < w.block_channels ? bias_row[slot] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < kPositions; ++r) {
        // Element offsets stepped by the channel stride (64-bit adds, not a multiply per load).
        int64_t u_at = u_base + slot0 * p.u_dim_stride + hw[r].x * p.u_h_stride + hw[r].y * p.u_w_stride;
        int64_t delta_at =
            delta_base + slot0 * p.delta_dim_stride + hw[r].x * p.delta_h_stride + hw[r].y * p.delta_w_stride;
#pragma unroll
        for (int k = 0; k < kSlotLoads; ++k) {
          const int slot = slot0 + k;
          u[r][k] = raw[r][k] = 0.f;
          if (hw[r].x >= 0 && slot < w.block_channels) {
            if (kFloatInputs) {
              u[r][k] = static_cast<const float*>(p.u)[u_at];
              raw[r][k] = static_cast<const float*>(p.delta)[delta_at];
            } else {
              u[r][k] = load_kind(p.u, u_at, p.u_kind);
              raw[r][k] = load_kind(p.delta, delta_at, p.delta_kind);
            }
          }
          u_at += p.u_dim_stride;
          delta_at += p.delta_dim_stride;
        }
      }
#pragma unroll
      for (int r = 0; r < kPositions; ++r) {
        const int i = i0 + r * blockDim.x;
#pragma unroll
        for (int k = 0; k < kSlotLoads; ++k) {
          const int slot = slot0 + k;
          if (i < Pp && slot < q.l.slots) {
            float dt = 0.f;
            if (hw[r].x >= 0 && slot < w.block_channels) {
              const float biased = raw[r][k] + bias[k];
              dt = (!p.delta_softplus || biased > kSoftplusThreshold) ? biased : log1pf(__expf(biased));
            }
            sh.step[slot * q.slot_stride + i] = make_float2(dt, u[r][k]);
          }
        }
      }
    }
  }
}

// Step 1: places, (delta, x) per channel, B and C per state, for every padded position; zeros where
// there is no position (padding, past the tile or L) or no state (>= N), so those steps are identities.
template <typename bc_t, int kGroup, int kQuadLoads, int kStepPositions, int kStepSlots>
__device__ __forceinline__ void stage_regs_fwd_tile(const ScanParams& p, const RegsFwdPlan& q, const RegsFwdTile& w,
                                                const RegsFwdShared& sh) {
  const int Pp = q.padded_positions;
  const int R = q.sub_stride;
  for (int i = threadIdx.x; i < Pp; i += blockDim.x) {
    const int s = i / R;
    const int j = i - s * R;
    const int at = s * q.sub_len + j;
    int h = -1, wc = -1;
    if (j < q.sub_len && at < w.length) place_of<true>(p, w.direction, w.t0 + at, h, wc);
    sh.place[i] = make_int2(h, wc);
  }
  __syncthreads();
  if (p.u_kind == kFloat32 && p.delta_kind == kFloat32) {
    stage_steps<true, kStepPositions, kStepSlots>(p, q, w, sh);
  } else {
    stage_steps<false, kStepPositions, kStepSlots>(p, q, w, sh);
  }
  // B and C.
  const bc_t* B = static_cast<const bc_t*>(p.B) + w.batch * p.B_batch_stride + w.direction * p.B_group_stride;
  const bc_t* C = static_cast<const bc_t*>(p.C) + w.batch * p.C_batch_stride + w.direction * p.C_group_stride;
  const int N = p.dstate;
  const bool quads = p.B_state_stride == 1 && p.C_state_stride == 1 && N % 4 == 0 &&
                     (p.B_batch_stride | p.B_group_stride | p.B_h_stride | p.B_w_stride) % 4 == 0 &&
                     (p.C_batch_stride | p.C_group_stride | p.C_h_stride | p.C_w_stride) % 4 == 0 &&
                     reinterpret_cast<uintptr_t>(p.B) % sizeof(BcQuad<bc_t>) == 0 &&
                     reinterpret_cast<uintptr_t>(p.C) % sizeof(BcQuad<bc_t>) == 0;
  if (quads) {
    // States fastest and aligned (the wrapper's channel-last projections, N % 4 == 0): quad e is
    // states 4 (e % (kGroup / 4)) .. + 3 of position e / (kGroup / 4); a 256-thread block stages a
    // DermoMamba tile (496 positions x 16 states, B and C) in two rounds of 8 vector loads per thread.
    constexpr int kQuadsPerRow = kGroup / 4;
    const int elements = Pp * kQuadsPerRow;
    for (int first = threadIdx.x; first < elements; first += kQuadLoads * blockDim.x) {
      BcQuad<bc_t> Bq[kQuadLoads], Cq[kQuadLoads];
      bool real[kQuadLoads];
#pragma unroll
      for (int k = 0; k < kQuadLoads; ++k) {
        const int e = first + k * blockDim.x;
        const int i = e / kQuadsPerRow;
        const int n = (e - i * kQuadsPerRow) * 4;
        real[k] = false;
        if (e < elements) {
          const int2 hw = sh.place[i];
          real[k] = hw.x >= 0 && n < N;
          if (real[k]) {
            Bq[k] = load_quad(B + n + hw.x * p.B_h_stride + hw.y * p.B_w_stride);
            Cq[k] = load_quad(C + n + hw.x * p.C_h_stride + hw.y * p.C_w_stride);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kQuadLoads; ++k) {
        const int e = first + k * blockDim.x;
        if (e < elements) {
          float4 b = make_float4(0.f, 0.f, 0.f, 0.f), c = b;
          if (real[k]) {
            b = make_float4(to_float(Bq[k].v[0]), to_float(Bq[k].v[1]), to_float(Bq[k].v[2]), to_float(Bq[k].v[3]));
            c = make_float4(to_float(Cq[k].v[0]), to_float(Cq[k].v[1]), to_float(Cq[k].v[2]), to_float(Cq[k].v[3]));
          }
          fwd_store_float4(sh.B + e * 4, b);
          fwd_store_float4(sh.C + e * 4, c);
        }
      }
    }
  } else if (p.B_state_stride == 1) {
    // States fastest but N % 4 != 0 or rows not aligned to a quad: element e = (position, state).
    const int elements = Pp * kGroup;
    for (int first = threadIdx.x; first < elements; first += kFwdStageLoads * blockDim.x) {
      bc_t Bv[kFwdStageLoads], Cv[kFwdStageLoads];
      bool real[kFwdStageLoads];
#pragma unroll
      for (int k = 0; k < kFwdStageLoads; ++k) {
        const int e = first + k * blockDim.x;
        const int i = e / kGroup;
        const int n = e - i * kGroup;
        real[k] = false;
        if (e < elements) {
          const int2 hw = sh.place[i];
          real[k] = hw.x >= 0 && n < N;
          if (real[k]) {
            Bv[k] = B[n * p.B_state_stride + hw.x * p.B_h_stride + hw.y * p.B_w_stride];
            Cv[k] = C[n * p.C_state_stride + hw.x * p.C_h_stride + hw.y * p.C_w_stride];
          }
        }
      }
#pragma unroll
      for (int k = 0; k < kFwdStageLoads; ++k) {
        const int e = first + k * blockDim.x;
        if (e < elements) {
          sh.B[e] = real[k] ? to_float(Bv[k]) : 0.f;
          sh.C[e] = real[k] ? to_float(Cv[k]) : 0.f;
        }
      }
    }
  } else {
    // Positions fastest: positions across threads, kStatesPerRound states of one position per round
    // (never more than the row: a 4-state group's rounds must not spill into the next position's row).
    constexpr int kStatesPerRound = kGroup < kFwdStageLoads ? kGroup : kFwdStageLoads;
    for (int i = threadIdx.x; i < Pp; i += blockDim.x) {
      const int2 hw = sh.place[i];
      // Not unrolled: hoisting every round's loads (kGroup 32: 64 in flight) exceeds 128 registers.
#pragma unroll 1
      for (int n0 = 0; n0 < kGroup; n0 += kStatesPerRound) {
        bc_t Bv[kStatesPerRound], Cv[kStatesPerRound];
#pragma unroll
        for (int k = 0; k < kStatesPerRound; ++k) {
          const int n = n0 + k;
          if (hw.x >= 0 && n < N) {
            Bv[k] = B[n * p.B_state_stride + hw.x * p.B_h_stride + hw.y * p.B_w_stride];
            Cv[k] = C[n * p.C_state_stride + hw.x * p.C_h_stride + hw.y * p.C_w_stride];
          }
        }
        float b[kStatesPerRound], c[kStatesPerRound];
#pragma unroll
        for (int k = 0; k < kStatesPerRound; ++k) {
          const bool real = hw.x >= 0 && n0 + k < N;
          b[k] = real ? to_float(Bv[k]) : 0.f;
          c[k] = real ? to_float(Cv[k]) : 0.f;
        }
#pragma unroll
        for (int k = 0; k < kStatesPerRound; k += 4) {
          fwd_store_float4(sh.B + i * kGroup + n0 + k, make_float4(b[k], b[k + 1], b[k + 2], b[k + 3]));
          fwd_store_float4(sh.C + i * kGroup + n0 + k, make_float4(c[k], c[k + 1], c[k + 2], c[k + 3]));
        }
      }
    }
  }
  __syncthreads();
}

// The kStates values of a B or C row this thread owns.
template <int kStates>
__device__ __forceinline__ void fwd_load_row(const float* at, float (&v)[kStates]) {
#pragma unroll
  for (int k = 0; k < kStates; k += 4) {
    const float4 f = fwd_load_float4(at + k);
    v[k] = f.x;
    v[k + 1] = f.y;
    v[k + 2] = f.z;
    v[k + 3] = f.w;
  }
}

// The state entering a chunk, this thread's states < N: float4 stores when N % 4 == 0 (rows aligned).
template <int kStates>
__device__ __forceinline__ void fwd_store_chunk_state(float* row, const float (&h)[kStates], int first_state, int N) {
  if (N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < kStates; k += 4)
      if (first_state + k < N) fwd_store_float4(row + k, make_float4(h[k], h[k + 1], h[k + 2], h[k + 3]));
  } else {
#pragma unroll
    for (int k = 0; k < kStates; ++k)
      if (first_state + k < N) row[k] = h[k];
  }
}

template <typename bc_t, int kLanes, int kVariant>
__global__ void __launch_bounds__(kFwdMaxThreads, regs_fwd_variant_config(kVariant).blocks_per_sm)
    scan_regs_fwd(ScanParams p) {
  constexpr RegsFwdVariant kConfig = regs_fwd_variant_config(kVariant);
  constexpr int kStates = kConfig.states;
  constexpr int G = kLanes * kStates;
  // Register cap of the variant: 128 (2 blocks), 80 (3), 64 (4). The staging loads in flight, the
  // look-back hops in flight and the walks' unrolling shrink with it, so that no variant spills.
  constexpr int kRegisterCap = 65536 / (kFwdMaxThreads * kConfig.blocks_per_sm);
  constexpr bool kWideStaging = kRegisterCap >= kFwdWideStagingRegisters;
  constexpr int kWalkUnroll = kRegisterCap >= kFwdUnrolledWalkRegisters ? 2 : 1;
  constexpr int kHopsInFlight = kWideStaging ? kFwdMaxLookbackHops : (kFwdMaxLookbackHops + 1) / 2;
  const RegsFwdPlan q = regs_fwd_plan(p.dim, p.dstate, p.chunk_size, p.num_chunks, kConfig);
  const staged::StagedLayout& l = q.l;
  const RegsFwdShared sh = regs_fwd_shared(q);
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(p.tile_ticket, 1);
  __syncthreads();
  const RegsFwdTile w = regs_fwd_tile(p, q, ticket);

  stage_regs_fwd_tile<bc_t, G, kWideStaging ? kFwdQuadLoads : kFwdQuadLoads / 2, kWideStaging ? kFwdStepPositions : 1,
                      kWideStaging ? kFwdStageLoads : kFwdStageLoads / 4>(
      p, q, w, sh);

  // This thread's (sub-chunk, channel slot, state group), after staging: its loads need the registers.
  const int N = p.dstate;
  const int sub = threadIdx.x / q.threads_per_sub;
  const int in_sub = threadIdx.x - sub * q.threads_per_sub;
  const int slot = in_sub / kLanes;
  const int grp = in_sub - slot * kLanes;
  const int first_state = grp * kStates;
  const bool seq_ok = slot < w.block_channels;
  // Idle slots (a short last channel block) follow a real channel's parameters and store nothing.
  const int channel = w.channel0 + (seq_ok ? slot : w.block_channels - 1);
  const int seq = w.direction * p.dim + channel;
  const int64_t seq_index = static_cast<int64_t>(w.batch) * p.num_seqs + seq;
  const int64_t flags = static_cast<int64_t>(w.unit) * l.num_tiles;
  // A2 is loaded by each walk (L1 hits): kept from walk 1 to walk 2, it would hold kStates registers
  // through the fold and the look-back, where the 64-register variant has none to spare.
  const auto load_A2 = [&](float (&A2)[kStates]) {
#pragma unroll
    for (int k = 0; k < kStates; ++k)
      A2[k] = seq_ok && first_state + k < N ? p.A[static_cast<int64_t>(seq) * N + first_state + k] * kLog2e : 0.f;
  };

  float2* step = sh.step + slot * q.slot_stride + sub * q.sub_stride;
  const float* Brow = sh.B + sub * q.sub_stride * G + first_state;
  const float* Crow = sh.C + sub * q.sub_stride * G + first_state;
  const int sub_len = q.sub_len;

  // Both walks are software-pipelined: position j + 1's (delta, x), B (and C) are loaded before
  // position j's arithmetic, so the shared-memory latency overlaps the exp2 / FMA work (the loop's
  // y store into step[] would otherwise keep the compiler from hoisting the next loads above it).
  // The last position re-loads itself: no read past the sub-chunk's positions.

  // Step 2 (walk 1): the sub-chunk's end state from zero and its sum of delta.
  {
    float h[kStates], b[kStates], b_next[kStates], A2[kStates];
    load_A2(A2);
#pragma unroll
    for (int k = 0; k < kStates; ++k) h[k] = 0.f;
    float delta_sum = 0.f;
    float2 s = step[0];
    fwd_load_row<kStates>(Brow, b);
#pragma unroll kWalkUnroll
    for (int j = 0; j < sub_len; ++j) {
      const int j_next = j + 1 < sub_len ? j + 1 : j;
      const float2 s_next = step[j_next];
      fwd_load_row<kStates>(Brow + j_next * G, b_next);
      const float dx = s.x * s.y;
      delta_sum += s.x;
#pragma unroll
      for (int k = 0; k < kStates; ++k) h[k] = exp2f(s.x * A2[k]) * h[k] + dx * b[k];
      s = s_next;
#pragma unroll
      for (int k = 0; k < kStates; ++k) b[k] = b_next[k];
    }
    float* agg = sh.agg + (sub * l.slots + slot) * G + first_state;
#pragma unroll
    for (int k = 0; k < kStates; k += 4) fwd_store_float4(agg + k, make_float4(h[k], h[k + 1], h[k + 2], h[k + 3]));
    if (grp == 0) sh.dsum[sub * l.slots + slot] = delta_sum;
  }
  __syncthreads();

  // Step 3: one thread per (slot, state) chain. The tile's aggregate, published by non-milestone tiles.
  const int chains = l.slots * G;
  const bool has_successor = w.tile + 1 < l.num_tiles;
  if (!w.milestone && has_successor) {
    for (int c = threadIdx.x; c < chains; c += blockDim.x) {
      const int c_slot = c / G;
      const int n = c - c_slot * G;
      if (c_slot >= w.block_channels || n >= N) continue;
      const int c_seq = w.direction * p.dim + w.channel0 + c_slot;
      const float c_A2 = p.A[static_cast<int64_t>(c_seq) * N + n] * kLog2e;
      float state = 0.f, delta_sum = 0.f;
      for (int s = 0; s < l.subs; ++s) {
        const float ds = sh.dsum[s * l.slots + c_slot];
        state = exp2f(c_A2 * ds) * state + sh.agg[(s * l.slots + c_slot) * G + n];
        delta_sum += ds;
      }
      const int64_t out = ((static_cast<int64_t>(w.batch) * p.num_seqs + c_seq) * p.num_splits + w.tile) * N + n;
      __stcg(p.split_decay + out, exp2f(c_A2 * delta_sum));
      __stcg(p.split_state + out, state);
    }
    staged::publish_flag(p.tile_flags + flags + w.tile);
  }
  // Look-back: the last milestone's inclusive state, then the aggregates after it, in order.
  if (threadIdx.x == 0) {
    for (int j = max(w.milestone_before, 0); j < w.tile; ++j) staged::wait_for_flag(p.tile_flags + flags + j);
    __threadfence();
  }
  __syncthreads();
  for (int c = threadIdx.x; c < chains; c += blockDim.x) {
    const int c_slot = c / G;
    const int n = c - c_slot * G;
    const bool c_ok = c_slot < w.block_channels && n < N;
    const int c_seq = w.direction * p.dim + w.channel0 + (c_slot < w.block_channels ? c_slot : 0);
    const int64_t c_index = static_cast<int64_t>(w.batch) * p.num_seqs + c_seq;
    const float c_A2 = c_ok ? p.A[static_cast<int64_t>(c_seq) * N + n] * kLog2e : 0.f;
    float e = 0.f;
    if (c_ok) {
      // The hops' loads in groups (independent within a group: all of them when registers allow),
      // then the fold in tile order.
      const int hop0 = w.milestone_before + 1;
      if (w.milestone_before >= 0) e = __ldcg(p.split_state + (c_index * p.num_splits + w.milestone_before) * N + n);
#pragma unroll
      for (int k0 = 0; k0 < kFwdMaxLookbackHops; k0 += kHopsInFlight) {
        float decay[kHopsInFlight], state[kHopsInFlight];
#pragma unroll
        for (int k = 0; k < kHopsInFlight; ++k) {
          decay[k] = 1.f;
          state[k] = 0.f;
          if (k0 + k < kFwdMaxLookbackHops && hop0 + k0 + k < w.tile) {
            const int64_t at = (c_index * p.num_splits + hop0 + k0 + k) * N + n;
            decay[k] = __ldcg(p.split_decay + at);
            state[k] = __ldcg(p.split_state + at);
          }
        }
#pragma unroll
        for (int k = 0; k < kHopsInFlight; ++k) e = decay[k] * e + state[k];
      }
    }
    // The entering state of every sub-chunk, over its end state from zero.
    for (int s = 0; s < l.subs; ++s) {
      float* at = sh.agg + (s * l.slots + c_slot) * G + n;
      const float end_from_zero = *at;
      *at = e;
      e = exp2f(c_A2 * sh.dsum[s * l.slots + c_slot]) * e + end_from_zero;
    }
    if (w.milestone && has_successor && c_ok)
      __stcg(p.split_state + (c_index * p.num_splits + w.tile) * N + n, e);
  }
  if (w.milestone && has_successor) staged::publish_flag(p.tile_flags + flags + w.tile);
  __syncthreads();

  // Step 4 (walk 2): chunk_states and y + D x from the entering state.
  {
    float h[kStates], b[kStates], c[kStates], b_next[kStates], A2[kStates];
    load_A2(A2);
    fwd_load_row<kStates>(sh.agg + (sub * l.slots + slot) * G + first_state, h);
    const float Dv = p.D ? p.D[seq] : 0.f;
    // Chunk starts inside this sub-chunk's valid positions: a countdown (no division per position).
    const int t_sub = w.t0 + sub * sub_len;
    const int valid = max(0, min(sub_len, w.length - sub * sub_len));
    const int into_chunk = t_sub % p.chunk_size;
    int next_start = into_chunk == 0 ? 0 : p.chunk_size - into_chunk;
    int chunk = (t_sub + next_start) / p.chunk_size;
    if (next_start >= valid || !seq_ok || first_state >= N) next_start = kFwdNoChunkStart;
    float* states = p.chunk_states + seq_index * p.num_chunks * N + first_state;
    float2 s = step[0];
    fwd_load_row<kStates>(Brow, b);
#pragma unroll kWalkUnroll
    for (int j = 0; j < sub_len; ++j) {
      if (j == next_start) {
        fwd_store_chunk_state<kStates>(states + static_cast<int64_t>(chunk) * N, h, first_state, N);
        ++chunk;
        next_start += p.chunk_size;
        if (next_start >= valid) next_start = kFwdNoChunkStart;
      }
      // C is not needed before the new state: its latency hides behind the exp2 / FMA of h.
      fwd_load_row<kStates>(Crow + j * G, c);
      const int j_next = j + 1 < sub_len ? j + 1 : j;
      const float2 s_next = step[j_next];
      fwd_load_row<kStates>(Brow + j_next * G, b_next);
      const float dx = s.x * s.y;
      float y = 0.f;
#pragma unroll
      for (int k = 0; k < kStates; ++k) {
        h[k] = exp2f(s.x * A2[k]) * h[k] + dx * b[k];
        y += c[k] * h[k];
      }
#pragma unroll
      for (int m = 1; m < kLanes; m <<= 1) y += __shfl_xor_sync(kFwdFullMask, y, m);
      // The channel's other lanes read step[j] (and step[j + 1]) before this point; the store below
      // must come after their reads.
      if (kLanes > 1) __syncwarp();
      // The last position re-loaded step[j] before this store: its (delta, x) are already in s_next
      // and unused after the loop.
      if (grp == 0) reinterpret_cast<float*>(step + j)[0] = y + Dv * s.y;
      s = s_next;
#pragma unroll
      for (int k = 0; k < kStates; ++k) b[k] = b_next[k];
    }
  }
  __syncthreads();

  // Step 5: y into the zeroed output, consecutive positions in consecutive threads.
  float* y = static_cast<float*>(p.out) + (static_cast<int64_t>(w.batch) * p.dim + w.channel0) * p.length;
  for (int s_slot = 0; s_slot < w.block_channels; ++s_slot) {
    const float2* row = sh.step + s_slot * q.slot_stride;
    float* y_row = y + static_cast<int64_t>(s_slot) * p.length;
    for (int i = threadIdx.x; i < q.padded_positions; i += blockDim.x) {
      const int2 hw = sh.place[i];
      if (hw.x >= 0) atomicAdd(y_row + hw.x * p.width + hw.y, row[i].x);
    }
  }
}

// The kernel instantiation that runs layout l of the variant DERMOMAMBA_REGS_FWD_VARIANT names (the
// launcher and the host emulator both use it; l must come from regs_fwd_layout of the same variant).
template <typename bc_t, int kVariant>
RegsKernel regs_fwd_variant_kernel(int lanes) {
  switch (lanes) {
    case 1: return scan_regs_fwd<bc_t, 1, kVariant>;
    case 2: return scan_regs_fwd<bc_t, 2, kVariant>;
    case 4: return scan_regs_fwd<bc_t, 4, kVariant>;
    case 8:
      if constexpr (regs_fwd_variant_config(kVariant).states * 8 <= staged::kMaxStateDim)
        return scan_regs_fwd<bc_t, 8, kVariant>;
      return nullptr;
    default: return nullptr;
  }
}

template <typename bc_t>
RegsKernel regs_fwd_kernel(const staged::StagedLayout& l) {
  if (!l.ok) return nullptr;
  const int variant = regs_fwd_variant();
  if (variant < 0) return nullptr;
  const int lanes = l.group / regs_fwd_variant_config(variant).states;
  switch (variant) {
    case 0: return regs_fwd_variant_kernel<bc_t, 0>(lanes);
    case 1: return regs_fwd_variant_kernel<bc_t, 1>(lanes);
    case 2: return regs_fwd_variant_kernel<bc_t, 2>(lanes);
    default: return nullptr;
  }
}

}  // namespace regs

#ifdef __CUDACC__
// The regs multiaxial forward, variant DERMOMAMBA_REGS_FWD_VARIANT (read by regs_fwd_layout and
// regs_fwd_kernel alike). The host sized its scratch from regs::regs_fwd_layout: the tiles are
// p's splits (chunks_per_split == chunks_per_tile, 0 when chunks are cut into several tiles),
// tile_ticket and tile_flags zeroed, split_decay / split_state when there is more than one tile.
template <typename bc_t>
int scan_forward_multiaxial_regs(const ScanParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const staged::StagedLayout l = regs::regs_fwd_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks);
  if (!l.ok || p.num_splits != l.num_tiles || p.chunks_per_split != l.chunks_per_tile ||
      p.tile_ticket == nullptr || p.tile_flags == nullptr ||
      (l.num_tiles > 1 && (p.split_decay == nullptr || p.split_state == nullptr)))
    return static_cast<int>(cudaErrorInvalidValue);
  const regs::RegsKernel kernel = regs::regs_fwd_kernel<bc_t>(l);
  if (kernel == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.num_directions * l.channel_blocks * l.num_tiles;
  // The variants' blocks per SM need the whole shared-memory carveout (3 x 70 KB, 4 x 49 KB); without
  // the hint the driver may pick a smaller one for a block that needs only 49 KB.
  const cudaError_t carveout =
      cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
  if (carveout != cudaSuccess) return static_cast<int>(carveout);
  return launch_with_shared(kernel, dim3(static_cast<unsigned>(blocks)), dim3(l.threads), l.shared_bytes, s, p);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dermomamba
