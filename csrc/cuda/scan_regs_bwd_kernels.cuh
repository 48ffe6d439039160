// Backward of the multiaxial selective scan, "regs" form (scan v5 backward): the staged backward's
// skeleton (scan_staged_bwd_kernels.cuh: same ScanParams, tiles, reverse tickets, mirrored deterministic
// milestones, chunk_states read, outputs and their modes), but each thread owns S (8 or 4, the variant's:
// scan_regs_bwd_layout.h) consecutive states of one channel in registers instead of one state.
//
// Why: the staged backward maps one state per lane, so every per-position cost (step / dy / place loads,
// the softplus slope, index arithmetic, the du / ddelta butterflies over 16 lanes, the dB / dC sum over
// channels through bank-conflicted shared memory) is paid by 16 lanes: ~120 thread instructions per
// (position, state), 128 registers with spills (Nsight Compute, DermoMamba's 192x256, H200). Here a
// position's scalars are loaded once per 8 states, du / ddelta are summed in-thread (then over Lc = 2
// lanes for N = 16), dB / dC are summed over the sub-chunk's channels by a transposed shuffle reduction
// inside a warp (fixed order: deterministic), and positions are split into blocks without divisions.
//
// Floor (DermoMamba's largest shape: batch 16, D 8, 192 x 256, N 16, fp32; E = batch x 4 x D x L x N =
// 403 M (channel, position, state) elements):
//   bytes: B, C read 403 MB, dB, dC written 403 MB, delta 101 MB, ddelta 101 MB, x 25 MB, dy 25 MB,
//   dx 25 MB (x 4 directions, atomics), chunk_states read + dA partials 2 x 50 MB (chunk_size 32):
//   ~1.2 GB, ~0.25 ms at H200 bandwidth;
//   instructions per element (thread instructions, sm_90 SASS of the fp32, Lc = 2, 8-slot kernel): walk F
//   7.9 (4 FMUL, 2 FFMA, 1 MUFU.EX2, 0.75 LDS), walk B rebuild 7 (1 EX2), walk B adjoint 21 (6 FMUL,
//   5 FFMA, 1 EX2, 2 SHFL + their 3.5 SEL and 2 FADD for the dB / dC reduction over 8 slots and S1 / S2
//   over 2 lanes), stores ~6 (per position: ddelta, dx, 2 of the 32 dB / dC sums per lane): ~42 against
//   the staged form's ~120, ~0.5 ms issue-bound at 2 warps per scheduler; 3 exp2 per element are ~0.3 ms
//   of the MUFU pipe.
//   Variant s8: 221-254 registers (no spills), 128 threads, 104 KB of shared memory per block at
//   chunk_size 32 (two blocks, 8 warps per SM); too few warps to hide the latency of the shared loads,
//   exp2s and shuffles. S = 4 (variants s4b3, s4): 52 KB, <= 168 registers (3 blocks, 12 warps per SM)
//   or <= 128 (4 blocks, 16 warps), at ~35-45 % more SASS instructions per element in walk B (fp32,
//   N 16, D 8, a full 4-position block: s8 1406 / 32 = 44, s4b3 943 / 16 = 59, s4 1007 / 16 = 63);
//   scan_regs_bwd_layout.h has the variants.
//
// Math: as the staged backward (its header comment). Per position t and state n, with a = exp(delta A_n),
// dp = a h_{t-1}, g = C_t[n] dy_t + o, w = g dp:
//   dA_n += delta w,  S1 += g B_t[n],  S2 += A_n w,  o <- a g,  dB term g delta u,  dC term dy h_t;
//   du_t = delta S1 + D dy, ddelta_t = softplus' (u S1 + S2) (S1, S2 summed over all states; the code
//   sums A_n log2(e) w, the exponent it already holds, and scales the sum by ln 2 once).
//
// Work of one block (layout: regs_bwd_layout in scan_regs_bwd_layout.h):
//   1. stage the tile: the forward's stage_tile (rows of Lc x 8 B / C floats) and the staged backward's
//      stage_dy;
//   2. walk F, each thread over its sub-chunk (whole chunks) left to right: h restarted from
//      chunk_states at every chunk, a checkpoint of h every K positions (shared memory: the
//      walk B rebuild needs h at arbitrary block starts, and a register array cannot be indexed by a
//      run-time block), and the sub-chunk's adjoint map (running decay, agg += decay C dy);
//   3. the tile's map, the reverse look-back and the sub-chunks' entering carries: the staged backward's
//      step 3 verbatim, per state of the thread;
//   4. walk B, all sub-chunks of a warp in lockstep over (chunk, block) right to left (so every lane of a
//      warp runs the same shuffles; a sub-chunk with fewer positions runs masked blocks of zeros): h_{t-1}
//      of the block rebuilt in registers from its checkpoint, then per position right to left the
//      adjoint, the dB / dC terms reduced over the sub-chunk's channel slots (transposed xor butterfly:
//      each slot lane ends with 2 S / slots of the (dB, dC) x state sums and stores them), S1 / S2
//      summed over the Lc lanes of the channel (xor butterfly), dx / ddelta stored by the channel's
//      first lane; per-chunk dA, dD, ddelta_bias partials at every chunk's first block.
// Outputs and their modes as the staged backward: dx by fp32 atomics or one plane per direction; dB / dC
// plain stores when one channel block covers a direction, else fp32 atomics or per-block partials.
// Deterministic mode is bit-reproducible whatever the schedule (every sum has a fixed order).
//
// The launcher at the bottom is compiled by nvcc only.
#pragma once

#include "scan_staged_bwd_kernels.cuh"
#include "scan_regs_bwd_layout.h"

namespace dermomamba {
namespace cuda {
namespace regs {

using RegsKernel = void (*)(ScanParams);

constexpr float kLn2 = 0.6931471805599453f;

// One of dB / dC (the other is the same index of the other tensor), as store_grad_bc does for both.
template <typename bc_t>
__device__ __forceinline__ void store_grad_one(const ScanParams& p, void* dst, int64_t index, float value) {
  if (p.grad_bc_mode == kGradBCDirect) {
    static_cast<bc_t*>(dst)[index] = from_float<bc_t>(value);
  } else if (p.grad_bc_mode == kGradBCAtomic) {
    atomicAdd(static_cast<float*>(dst) + index, value);
  } else {
    static_cast<float*>(dst)[index] = value;
  }
}

// kS floats from a 16-byte aligned shared-memory row.
template <int kS>
__device__ __forceinline__ void load_row(const float* row, float (&v)[kS]) {
#pragma unroll
  for (int q = 0; q < kS / 4; ++q) {
    const float4 f = reinterpret_cast<const float4*>(row)[q];
    v[4 * q] = f.x;
    v[4 * q + 1] = f.y;
    v[4 * q + 2] = f.z;
    v[4 * q + 3] = f.w;
  }
}

// Sum over the kSlots channel slots of a sub-chunk (lanes kLc apart) of kLength values per lane: after
// it, the lane of slot s holds in v[0 .. kLength / kSlots) the sums of everyone's
// v[s kLength / kSlots ..]. Each round the lane whose slot bit kHalf is set keeps the upper half.
template <int kLc, int kHalf, int kLength, int kSize>
__device__ __forceinline__ void slot_sum_rounds(float (&v)[kSize], int slot) {
  if constexpr (kHalf >= 1) {
    constexpr int kKeep = kLength / 2;
    const bool upper = (slot & kHalf) != 0;
#pragma unroll
    for (int k = 0; k < kKeep; ++k) {
      const float send = upper ? v[k] : v[k + kKeep];
      const float keep = upper ? v[k + kKeep] : v[k];
      v[k] = keep + __shfl_xor_sync(kFullMask, send, kHalf * kLc);
    }
    slot_sum_rounds<kLc, kHalf / 2, kKeep, kSize>(v, slot);
  }
}

// Sum over the kLc lanes of a channel (every lane gets the total).
template <int kLc>
__device__ __forceinline__ float channel_sum(float v) {
#pragma unroll
  for (int offset = kLc / 2; offset >= 1; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// What walk B needs about this thread beyond the block's data.
struct RegsRole {
  int slot, state0;      // channel slot in the block, first state of this thread
  bool seq_ok, first;    // a real channel; the channel's first lane (stores dx, ddelta)
  int64_t seq_index;
  int64_t dx_base, bc_plane;  // dx_base: in p.dx_per_direction (its direction's plane) or p.dx_accum
  float Dv;
};

// Walk F over one block of positions (tile-local j0 .. j0 + length): the checkpoint (h entering the
// block), then h forward, the adjoint map's running decay product and aggregate. Every shared-memory
// load of the block is issued before the checkpoint store: the compiler cannot tell the checkpoint
// from the step / B / C rows (one shared buffer), so a load after the store would wait for it.
template <int kS, int kK, bool kMasked>
__device__ __forceinline__ void forward_block(const float2* step, const float* dy, const float* B, const float* C,
                                              int row, int length, float4* checkpoint, int checkpoint_stride,
                                              const float (&A2)[kS], float (&h)[kS], float (&decay)[kS],
                                              float (&agg)[kS]) {
  float2 s[kK];
  float dyv[kK], Bv[kK][kS], Cv[kK][kS];
#pragma unroll
  for (int j = 0; j < kK; ++j) {
    if (!kMasked || j < length) {
      s[j] = step[j];
      dyv[j] = dy[j];
      load_row<kS>(B + j * row, Bv[j]);
      load_row<kS>(C + j * row, Cv[j]);
    }
  }
#pragma unroll
  for (int q = 0; q < kS / 4; ++q)
    checkpoint[q * checkpoint_stride] = make_float4(h[4 * q], h[4 * q + 1], h[4 * q + 2], h[4 * q + 3]);
#pragma unroll
  for (int j = 0; j < kK; ++j) {
    if (!kMasked || j < length) {
      const float du = s[j].x * s[j].y;
#pragma unroll
      for (int q = 0; q < kS; ++q) {
        const float a = exp2f(s[j].x * A2[q]);
        h[q] = a * h[q] + du * Bv[j][q];
        decay[q] *= a;
        agg[q] += decay[q] * (Cv[j][q] * dyv[j]);
      }
    }
  }
}

// Walk B over positions kLo .. kHi - 1 of a block, right to left: h_{t-1} of those positions rebuilt
// from the block's checkpoint (through positions 0 .. kHi - 1), then the adjoint: the carry o in and
// out, dA, and every position's dx, ddelta, dB, dC stored. kMasked: positions >= length (a chunk's
// last block, or a sub-chunk with nothing here) add zeros; the shuffles run for every position
// regardless. kPrefetch: a position's shared-memory loads (step, dy, B, C, place) are issued before the
// previous position's global stores: those go through generic pointers the compiler must assume may
// hit shared memory, so a load written after them could not be hoisted above them (a software pipeline
// of one position, 2 S + 5 registers; all of a block's rows up front would cost 2 K S and spill).
template <typename bc_t, int kS, int kLo, int kHi, int kLc, int kSlots, bool kPrefetch, bool kMasked>
__device__ __forceinline__ void backward_part(const ScanParams& p, const RegsRole& r, const float2* step,
                                              const float* dy, const float* B, const float* C, const int2* place,
                                              int row, int length, const float4* checkpoint, int checkpoint_stride,
                                              const float (&A2)[kS], float (&o)[kS], float (&dA)[kS], float& dD,
                                              float& dbias) {
  constexpr int kValues = 2 * kS;          // dB then dC terms of the thread's states
  constexpr int kOwned = kValues / kSlots;  // sums a slot lane stores per position
  static_assert(kOwned >= 1, "at most 2 x kS slots");
  float h[kS];
  if (!kMasked || kLo < length) {
#pragma unroll
    for (int q = 0; q < kS / 4; ++q) {
      const float4 f = checkpoint[q * checkpoint_stride];
      h[4 * q] = f.x;
      h[4 * q + 1] = f.y;
      h[4 * q + 2] = f.z;
      h[4 * q + 3] = f.w;
    }
  }
  float h_prev[kHi - kLo][kS];
#pragma unroll
  for (int j = 0; j < kHi; ++j) {
    if (!kMasked || j < length) {
      const float2 s = step[j];
      const float du = s.x * s.y;
      float Bv[kS];
      load_row<kS>(B + j * row, Bv);
#pragma unroll
      for (int q = 0; q < kS; ++q) {
        if (j >= kLo) h_prev[j >= kLo ? j - kLo : 0][q] = h[q];
        h[q] = exp2f(s.x * A2[q]) * h[q] + du * Bv[q];
      }
    }
  }
  // The pipeline's registers: position j's inputs, loaded while position j + 1 is finished.
  float2 s = make_float2(0.f, 0.f);
  float dyv = 0.f;
  int2 hw = make_int2(0, 0);
  float Bv[kS], Cv[kS];
  if (kPrefetch && (!kMasked || kHi - 1 < length)) {
    s = step[kHi - 1];
    dyv = dy[kHi - 1];
    hw = place[kHi - 1];
    load_row<kS>(B + (kHi - 1) * row, Bv);
    load_row<kS>(C + (kHi - 1) * row, Cv);
  }
#pragma unroll
  for (int j = kHi - 1; j >= kLo; --j) {
    const bool valid = !kMasked || j < length;
    float v[kValues];
    float S1 = 0.f, S2 = 0.f;
    if (!kPrefetch && valid) {
      s = step[j];
      dyv = dy[j];
      hw = place[j];
      load_row<kS>(B + j * row, Bv);
      load_row<kS>(C + j * row, Cv);
    }
    const float2 sj = s;
    const float dyj = dyv;
    const int2 hwj = hw;
    if (valid) {
      const float du = sj.x * sj.y;
#pragma unroll
      for (int q = 0; q < kS; ++q) {
        const float a = exp2f(sj.x * A2[q]);
        const float dp = a * h_prev[j - kLo][q];
        const float g = Cv[q] * dyj + o[q];
        const float w = g * dp;
        dA[q] += sj.x * w;
        S2 += A2[q] * w;
        S1 += g * Bv[q];
        v[q] = g * du;
        v[kS + q] = dyj * (dp + du * Bv[q]);
        o[q] = a * g;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kValues; ++i) v[i] = 0.f;
    }
    if (kPrefetch && j > kLo && (!kMasked || j - 1 < length)) {
      s = step[j - 1];
      dyv = dy[j - 1];
      hw = place[j - 1];
      load_row<kS>(B + (j - 1) * row, Bv);
      load_row<kS>(C + (j - 1) * row, Cv);
    }
    slot_sum_rounds<kLc, kSlots / 2, kValues, kValues>(v, r.slot);
    S1 = channel_sum<kLc>(S1);
    S2 = channel_sum<kLc>(S2);
    if (valid) {
      const int native = hwj.x * p.width + hwj.y;
      // The lane of slot s owns the sums s kOwned .. of (dB of states state0 .. state0 + kS - 1, then dC).
#pragma unroll
      for (int i = 0; i < kOwned; ++i) {
        const int value = r.slot * kOwned + i;
        const bool is_C = value >= kS;
        const int n = r.state0 + (is_C ? value - kS : value);
        if (n < p.dstate)
          store_grad_one<bc_t>(p, is_C ? p.dC : p.dB, (r.bc_plane + n) * p.length + native, v[i]);
      }
      if (r.first && r.seq_ok) {
        // softplus'(raw) = sigmoid(raw) = 1 - exp(-softplus(raw)); 1 in float above the threshold.
        const float slope = p.delta_softplus ? -expm1f(-sj.x) : 1.f;
        const float ddelta_raw = (sj.y * S1 + kLn2 * S2) * slope;
        dD += dyj * sj.y;
        dbias += ddelta_raw;
        store_kind(p.ddelta, r.seq_index * p.length + native, p.delta_kind, ddelta_raw);
        const float dx = sj.x * S1 + r.Dv * dyj;
        if (p.dx_per_direction != nullptr) {
          p.dx_per_direction[r.dx_base + native] = dx;
        } else {
          atomicAdd(p.dx_accum + r.dx_base + native, dx);
        }
      }
    }
  }
}

// Walk B over one block of kK positions in kParts parts, right part first. Each part rebuilds its h_{t-1}
// from the checkpoint (through the positions before it again): kParts parts keep kK S / kParts h_prev
// registers for (kParts + 1) / 2 times the rebuild work (ptxas recomputes the earlier positions' exp2s
// rather than keeping them: the SASS MUFU count is the parts' sum).
template <typename bc_t, int kS, int kK, int kParts, int kLc, int kSlots, bool kPrefetch, bool kMasked, int kPart = kParts - 1>
__device__ __forceinline__ void backward_block(const ScanParams& p, const RegsRole& r, const float2* step,
                                               const float* dy, const float* B, const float* C, const int2* place,
                                               int row, int length, const float4* checkpoint, int checkpoint_stride,
                                               const float (&A2)[kS], float (&o)[kS], float (&dA)[kS], float& dD,
                                               float& dbias) {
  static_assert(kK % kParts == 0, "whole parts");
  constexpr int kLen = kK / kParts;
  backward_part<bc_t, kS, kPart * kLen, (kPart + 1) * kLen, kLc, kSlots, kPrefetch, kMasked>(
      p, r, step, dy, B, C, place, row, length, checkpoint, checkpoint_stride, A2, o, dA, dD, dbias);
  if constexpr (kPart > 0) {
    backward_block<bc_t, kS, kK, kParts, kLc, kSlots, kPrefetch, kMasked, kPart - 1>(
        p, r, step, dy, B, C, place, row, length, checkpoint, checkpoint_stride, A2, o, dA, dD, dbias);
  }
}

template <typename bc_t, int kVariant, int kLc, int kSlots>
__global__ void __launch_bounds__(kRegsMaxThreads, regs_bwd_variant_config(kVariant).blocks_per_sm)
    scan_regs_bwd(ScanParams p) {
  using staged::kMilestoneSpan;
  constexpr int kRegsStates = regs_bwd_variant_config(kVariant).states;
  constexpr int kRegsQuads = kRegsStates / 4;
  constexpr int kRegsBlock = regs_bwd_variant_config(kVariant).block;
  constexpr bool kPrefetch = regs_bwd_variant_config(kVariant).prefetch;
  constexpr int kParts = regs_bwd_variant_config(kVariant).parts;
  constexpr int kLanesPerSub = kSlots * kLc;
  constexpr int kRow = kLc * kRegsStates;  // floats per position of staged B / C
  static_assert(kLanesPerSub <= kWarpSize, "a sub-chunk sits in one warp");
  static_assert(kRegsStates % 4 == 0, "float4 rows");
  const staged::StagedLayout l = regs_bwd_layout_for(kVariant, p.dim, p.dstate, p.chunk_size, p.num_chunks);
  const staged::BwdTileShared sh = staged::bwd_tile_shared(l);
  __shared__ int ticket;
  if (threadIdx.x == 0) ticket = atomicAdd(p.tile_ticket, 1);
  __syncthreads();
  int reverse;
  const staged::TileWork w = staged::bwd_tile_work(p, l, ticket, reverse);

  // This thread's (sub-chunk, channel slot, state group).
  const int N = p.dstate;
  const int sub = threadIdx.x / kLanesPerSub;
  const int lane_in_sub = threadIdx.x - sub * kLanesPerSub;
  const bool sub_ok = sub < l.subs;
  RegsRole r;
  r.slot = lane_in_sub / kLc;
  const int state_group = lane_in_sub - r.slot * kLc;
  r.state0 = state_group * kRegsStates;
  r.first = state_group == 0;
  r.seq_ok = r.slot < w.block_channels;
  // Idle slots follow a real channel's parameters (valid addresses) and store nothing.
  const int channel = w.channel0 + (r.seq_ok ? r.slot : w.block_channels - 1);
  const int seq = w.direction * p.dim + channel;
  r.seq_index = static_cast<int64_t>(w.batch) * p.num_seqs + seq;
  float A2[kRegsStates];
#pragma unroll
  for (int q = 0; q < kRegsStates; ++q)
    A2[q] = r.seq_ok && r.state0 + q < N ? p.A[static_cast<int64_t>(seq) * N + r.state0 + q] * kLog2e : 0.f;
  const float* states = p.chunk_states + r.seq_index * p.num_chunks * N;
  const int64_t flags = static_cast<int64_t>(w.unit) * l.num_tiles;
  const int P = l.tile_positions;
  const int agg_index = (sub * kLanesPerSub + lane_in_sub) * kRegsStates;

  stage_tile<bc_t, kRow>(p, l, w, sh.fwd);
  stage_dy(p, l, w, sh);

  const int chunks_per_sub = l.chunks_per_sub;
  const int c_begin = w.first_chunk + sub * chunks_per_sub;
  const int c_end = sub_ok ? min(c_begin + chunks_per_sub, p.num_chunks) : c_begin;
  const int blocks_per_chunk = regs_blocks_per_chunk(p.chunk_size, kRegsBlock);
  const float2* step = sh.fwd.step + r.slot * P;
  const float* dy = sh.dy + r.slot * P;
  const float* Brow = sh.fwd.B + r.state0;
  const float* Crow = sh.fwd.C + r.state0;
  // checkpoint[(block * kRegsQuads + quad) * kLanesPerSub]: this thread's float4s of block `block`.
  float4* checkpoint = reinterpret_cast<float4*>(sh.checkpoint) +
                       static_cast<int64_t>(sub) * l.blocks_per_sub * kRegsQuads * kLanesPerSub + lane_in_sub;

  // Step 2 (walk F): checkpoints and the sub-chunk's adjoint map.
  {
    float h[kRegsStates], decay[kRegsStates], agg[kRegsStates];
#pragma unroll
    for (int q = 0; q < kRegsStates; ++q) {
      decay[q] = 1.f;
      agg[q] = 0.f;
    }
    for (int c = c_begin; c < c_end; ++c) {
#pragma unroll
      for (int q = 0; q < kRegsStates; ++q)
        h[q] = r.state0 + q < N ? states[static_cast<int64_t>(c) * N + r.state0 + q] : 0.f;
      const int chunk_t = c * p.chunk_size;
      const int length = min(p.chunk_size, p.length - chunk_t);
      const int base = chunk_t - w.t0;
      int block = (c - c_begin) * blocks_per_chunk;
      for (int j0 = 0; j0 < length; j0 += kRegsBlock, ++block) {
        float4* block_checkpoint = checkpoint + block * kRegsQuads * kLanesPerSub;
        const int t = base + j0;
        if (length - j0 >= kRegsBlock) {
          forward_block<kRegsStates, kRegsBlock, false>(step + t, dy + t, Brow + t * kRow, Crow + t * kRow, kRow,
                                                        kRegsBlock, block_checkpoint, kLanesPerSub, A2, h, decay, agg);
        } else {
          forward_block<kRegsStates, kRegsBlock, true>(step + t, dy + t, Brow + t * kRow, Crow + t * kRow, kRow,
                                                       length - j0, block_checkpoint, kLanesPerSub, A2, h, decay, agg);
        }
      }
    }
    if (sub_ok) {
#pragma unroll
      for (int q = 0; q < kRegsStates; ++q) sh.fwd.agg[agg_index + q] = make_float2(decay[q], agg[q]);
    }
  }
  __syncthreads();

  // Step 3: the tile's map (sub-chunks right to left), published by non-milestone tiles that have a
  // tile to their left; the look-back to the right; the carry entering every sub-chunk.
  float tile_decay[kRegsStates], tile_state[kRegsStates];
#pragma unroll
  for (int q = 0; q < kRegsStates; ++q) {
    tile_decay[q] = 1.f;
    tile_state[q] = 0.f;
  }
  if (sub == 0) {
#pragma unroll 1
    for (int s = l.subs - 1; s >= 0; --s) {
#pragma unroll
      for (int q = 0; q < kRegsStates; ++q) {
        const float2 a = sh.fwd.agg[(s * kLanesPerSub + lane_in_sub) * kRegsStates + q];
        tile_state[q] = a.x * tile_state[q] + a.y;
        tile_decay[q] *= a.x;
      }
    }
  }
  const bool has_successor = w.tile > 0;
  if (!w.milestone && has_successor) {
    if (sub == 0 && r.seq_ok) {
      const int64_t out = (r.seq_index * p.num_splits + w.tile) * N + r.state0;
#pragma unroll
      for (int q = 0; q < kRegsStates; ++q) {
        if (r.state0 + q < N) {
          __stcg(p.split_decay + out + q, tile_decay[q]);
          __stcg(p.split_state + out + q, tile_state[q]);
        }
      }
    }
    staged::publish_flag(p.tile_flags + flags + w.tile);
  }
  // Look-back to the right: the last milestone's inclusive carry, then the maps after it, in order.
  if (threadIdx.x == 0) {
    for (int j = max(w.milestone_before, 0); j < reverse; ++j)
      staged::wait_for_flag(p.tile_flags + flags + (l.num_tiles - 1 - j));
    __threadfence();
  }
  __syncthreads();
  float o[kRegsStates];
#pragma unroll
  for (int q = 0; q < kRegsStates; ++q) o[q] = 0.f;
  // The cold loops of this step are not unrolled: unrolled, the compiler keeps every state's loads of
  // several iterations in flight, and that peak sets the whole kernel's register count.
  if (sub == 0 && r.seq_ok) {
    if (w.milestone_before >= 0) {
      const int64_t at = (r.seq_index * p.num_splits + (l.num_tiles - 1 - w.milestone_before)) * N + r.state0;
#pragma unroll
      for (int q = 0; q < kRegsStates; ++q)
        if (r.state0 + q < N) o[q] = __ldcg(p.reverse_carry + at + q);
    }
#pragma unroll 1
    for (int j = w.milestone_before + 1; j < reverse; ++j) {
      const int64_t at = (r.seq_index * p.num_splits + (l.num_tiles - 1 - j)) * N + r.state0;
#pragma unroll
      for (int q = 0; q < kRegsStates; ++q)
        if (r.state0 + q < N) o[q] = __ldcg(p.split_decay + at + q) * o[q] + __ldcg(p.split_state + at + q);
    }
  }
  if (w.milestone && has_successor) {
    if (sub == 0 && r.seq_ok) {
      const int64_t out = (r.seq_index * p.num_splits + w.tile) * N + r.state0;
#pragma unroll
      for (int q = 0; q < kRegsStates; ++q)
        if (r.state0 + q < N) __stcg(p.reverse_carry + out + q, tile_decay[q] * o[q] + tile_state[q]);
    }
    staged::publish_flag(p.tile_flags + flags + w.tile);
  }
  if (sub == 0) {
#pragma unroll 1
    for (int s = l.subs - 1; s >= 0; --s) {
      const int at = (s * kLanesPerSub + lane_in_sub) * kRegsStates;
#pragma unroll
      for (int q = 0; q < kRegsStates; ++q) {
        sh.fwd.enter[at + q] = o[q];
        const float2 a = sh.fwd.agg[at + q];
        o[q] = a.x * o[q] + a.y;
      }
    }
  }
  __syncthreads();

  // Step 4 (walk B).
#pragma unroll
  for (int q = 0; q < kRegsStates; ++q) o[q] = sub_ok ? sh.fwd.enter[agg_index + q] : 0.f;
  r.Dv = p.D ? p.D[seq] : 0.f;
  r.dx_base = (static_cast<int64_t>(w.batch) * p.dim + channel) * p.length;
  if (p.dx_per_direction != nullptr) r.dx_base += w.direction * (static_cast<int64_t>(p.batch) * p.dim * p.length);
  const int block_in_group = w.channel0 / l.channels;
  r.bc_plane = p.grad_bc_mode == kGradBCPartials
                   ? ((static_cast<int64_t>(w.batch) * p.num_bc_groups + w.direction) * l.channel_blocks +
                      block_in_group) *
                         N
                   : (static_cast<int64_t>(w.batch) * p.num_bc_groups + w.direction) * N;
  // The warp's last sub-chunk: when its block is full, so are the blocks of the warp's other sub-chunks
  // (earlier chunks, all whole), and the warp takes the unmasked path together.
  const int warp_last_sub = (threadIdx.x / kWarpSize * kWarpSize + kWarpSize - 1) / kLanesPerSub;
  const int warp_last_c = w.first_chunk + warp_last_sub * chunks_per_sub;
  float dA[kRegsStates];
#pragma unroll
  for (int q = 0; q < kRegsStates; ++q) dA[q] = 0.f;
  float dD = 0.f, dbias = 0.f;
  for (int ci = chunks_per_sub - 1; ci >= 0; --ci) {
    const int c = c_begin + ci;
    const int chunk_t = c * p.chunk_size;
    const int length = c < c_end ? min(p.chunk_size, p.length - chunk_t) : 0;
    const int base = chunk_t - w.t0;
    const int last_c = warp_last_c + ci;
    const int last_length =
        warp_last_sub < l.subs && last_c < p.num_chunks ? min(p.chunk_size, p.length - last_c * p.chunk_size) : 0;
    for (int bb = blocks_per_chunk - 1; bb >= 0; --bb) {
      const int j0 = bb * kRegsBlock;
      const int block = ci * blocks_per_chunk + bb;
      const float4* block_checkpoint = checkpoint + block * kRegsQuads * kLanesPerSub;
      const int t = base + j0;
      if (last_length - j0 >= kRegsBlock) {
        backward_block<bc_t, kRegsStates, kRegsBlock, kParts, kLc, kSlots, kPrefetch, false>(
            p, r, step + t, dy + t, Brow + t * kRow, Crow + t * kRow, sh.fwd.place + t, kRow, kRegsBlock,
            block_checkpoint, kLanesPerSub, A2, o, dA, dD, dbias);
      } else {
        const int valid = j0 < length ? min(kRegsBlock, length - j0) : 0;
        // Masked sub-chunks read nothing: their pointers stay at the tile's start.
        const int at = valid > 0 ? t : 0;
        backward_block<bc_t, kRegsStates, kRegsBlock, kParts, kLc, kSlots, kPrefetch, true>(
            p, r, step + at, dy + at, Brow + at * kRow, Crow + at * kRow, sh.fwd.place + at, kRow, valid,
            block_checkpoint, kLanesPerSub, A2, o, dA, dD, dbias);
      }
    }
    // The chunk's first block closes it: its dA, dD and ddelta_bias partials.
    if (length > 0 && r.seq_ok) {
      float* dA_out = p.dA_partial + (r.seq_index * p.num_chunks + c) * N + r.state0;
#pragma unroll
      for (int q = 0; q < kRegsStates; ++q)
        if (r.state0 + q < N) dA_out[q] = dA[q];
      if (r.first) {
        if (p.dD_partial) p.dD_partial[r.seq_index * p.num_chunks + c] = dD;
        if (p.ddelta_bias_partial) p.ddelta_bias_partial[r.seq_index * p.num_chunks + c] = dbias;
      }
    }
#pragma unroll
    for (int q = 0; q < kRegsStates; ++q) dA[q] = 0.f;
    dD = dbias = 0.f;
  }
}

template <typename bc_t, int kVariant, int kLc>
RegsKernel regs_bwd_kernel_for_slots(int slots) {
  switch (slots) {
    case 4: return scan_regs_bwd<bc_t, kVariant, kLc, 4>;
    case 8:
      if constexpr (kLc * 8 <= kWarpSize) return scan_regs_bwd<bc_t, kVariant, kLc, 8>;
      return nullptr;
    default:
      if constexpr (kLc * 16 <= kWarpSize && regs_bwd_max_slots(regs_bwd_variant_config(kVariant).states) >= 16) {
        if (slots == 16) return scan_regs_bwd<bc_t, kVariant, kLc, 16>;
      }
      return nullptr;
  }
}

template <typename bc_t, int kVariant>
RegsKernel regs_bwd_kernel_for_variant(const staged::StagedLayout& l) {
  constexpr int kStates = regs_bwd_variant_config(kVariant).states;
  switch (l.group) {
    case 1: return regs_bwd_kernel_for_slots<bc_t, kVariant, 1>(l.slots);
    case 2: return regs_bwd_kernel_for_slots<bc_t, kVariant, 2>(l.slots);
    case 4: return regs_bwd_kernel_for_slots<bc_t, kVariant, 4>(l.slots);
    case 8:
      // 8 lanes of kStates cover N <= 32 only when kStates == 4.
      if constexpr (kStates < 8)
        return regs_bwd_kernel_for_slots<bc_t, kVariant, 8>(l.slots);
      return nullptr;
    default: return nullptr;
  }
}

// The kernel instantiation that runs layout l (its variant in l.reduce_row; the launcher and the host
// emulator both use it); null for a layout it has none for.
template <typename bc_t>
RegsKernel regs_bwd_kernel(const staged::StagedLayout& l) {
  if (!l.ok) return nullptr;
  static_assert(kBwdVariantCount == 3, "one case per variant");
  switch (l.reduce_row) {
    case 0: return regs_bwd_kernel_for_variant<bc_t, 0>(l);
    case 1: return regs_bwd_kernel_for_variant<bc_t, 1>(l);
    case 2: return regs_bwd_kernel_for_variant<bc_t, 2>(l);
    default: return nullptr;
  }
}

}  // namespace regs

#ifdef __CUDACC__
// The regs multiaxial backward. The host sized its scratch from regs::regs_bwd_layout: the tiles are p's
// splits, tile_ticket and tile_flags zeroed, split_decay / split_state / reverse_carry allocated when
// there is more than one tile, and dB / dC set up for the layout's channel blocks.
template <typename bc_t>
int scan_backward_multiaxial_regs(const ScanParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  // The variant is read from DERMOMAMBA_REGS_BWD_VARIANT here as in the host glue's layout (same call).
  const staged::StagedLayout l = regs::regs_bwd_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks);
  if (!l.ok || p.num_splits != l.num_tiles || p.chunks_per_split != l.chunks_per_tile ||
      p.tile_ticket == nullptr || p.tile_flags == nullptr ||
      (l.num_tiles > 1 && (p.split_decay == nullptr || p.split_state == nullptr || p.reverse_carry == nullptr)))
    return static_cast<int>(cudaErrorInvalidValue);
  const regs::RegsKernel kernel = regs::regs_bwd_kernel<bc_t>(l);
  if (kernel == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = static_cast<int64_t>(p.batch) * p.num_directions * l.channel_blocks * l.num_tiles;
  return launch_with_shared(kernel, dim3(static_cast<unsigned>(blocks)), dim3(l.threads), l.shared_bytes, s, p);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dermomamba
