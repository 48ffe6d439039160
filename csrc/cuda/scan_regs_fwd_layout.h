// Work and shared-memory layout of the "regs" multiaxial forward (scan v5,
// csrc/cuda/scan_regs_fwd_kernels.cuh). Plain C++ (no CUDA or torch headers): the host glue sizes the
// look-back scratch (tickets, flags, split_decay / split_state) from the same function the kernel uses,
// so the two cannot disagree.
//
// A block owns one tile of one (batch, direction) for a group of channels. Its threads are
// `subs` sub-chunks x `slots` channel slots x `lanes` state groups: each thread keeps `states`
// (the variant's, 8 or 4) consecutive states of one channel in registers, and the `lanes` threads of a channel are adjacent
// (an aligned power of two, so an xor-shuffle over them sums y over the states).
//
// Tiles. While a chunk fits a tile, a tile is `chunks_per_tile` whole chunks (tiles_per_chunk == 1);
// a longer chunk (any chunk_size up to L is accepted) is cut into `tiles_per_chunk` tiles
// (chunks_per_tile == 0). Either way every tile starts on a chunk boundary or inside a chunk and
// num_tiles follows from (chunk_size, num_chunks) alone; the tiles of a last, short chunk that lie
// past L are empty and do nothing visible. Sub-chunks are `sub_len` positions, not whole chunks: a
// thread stores chunk_states wherever a chunk starts inside its sub-chunk, so a tile can be filled
// whatever the chunk size.
//
// Shared memory (16-byte aligned regions), positions padded per sub-chunk to `sub_stride` (R):
//   step  float2 [slots][slot_stride]      (delta after bias / softplus, x); walk 2 overwrites .x
//                                          with y + D x, flushed by coalesced atomics at the end
//   place int2   [subs * R]                (h, w) of each position; h == -1 for padding / past L
//   B, C  float  [subs * R][group]         group = lanes * states; idle states stay zero
//   agg   float  [subs][slots][group]      walk 1's end state from zero, then the entering state
//   dsum  float  [subs][slots]             walk 1's sum of delta (the decay is exp2(A2 * dsum))
// Bank conflicts: the threads of one warp in the walks read (sub s, slot) at position s * R + j.
// With R odd (when a warp holds several sub-chunks), s * R mod subs_per_warp is a permutation, and
// slot_stride == subs_per_warp (mod 16 float2) spreads the slots of one residue: the (s, slot) float2
// reads of a warp fall in different bank pairs (two wavefronts where 32 distinct float2 must). R odd
// also shifts the B / C rows of neighbouring sub-chunks by half a 128-byte row (N = 16: the 2 x 2
// float4 a warp reads per load sit in 4 different bank quads).
#pragma once

#include <cstdlib>

#include "scan_staged_layout.h"

namespace dermomamba {
namespace cuda {
namespace regs {

// A variant of the kernel: states per thread and blocks per SM, fixed at compile time (the register cap
// of __launch_bounds__ and the shared-memory budget follow from them). Chosen at run time by
// DERMOMAMBA_REGS_FWD_VARIANT (the index below; unset: kFwdDefaultVariant), read on the host by the
// layout and by the launcher alike, so the host's scratch sizes and the kernel's plan cannot disagree.
//   * 8 states per thread amortise a position's loads of (delta, x), index math, the y shuffle and the
//     y store over 8 states, but need ~120 registers: 2 blocks of 256 threads per SM (16 warps), too
//     few to hide shared-memory and MUFU latency (Nsight Compute: 0.58 eligible warps per scheduler);
//   * 8 states under an 80-register cap (fewer staging loads and look-back hops in flight) and a
//     ~70 KB tile: 3 blocks (24 warps);
//   * 4 states per thread pay those per-position costs over 4 states but fit 64 registers, and the
//     tile (8 sub-chunks of up to 32 positions) fits a quarter of the SM's shared memory: 4 blocks (32 warps).
struct RegsFwdVariant {
  int states;                // consecutive states per thread (kStates of the kernel)
  int blocks_per_sm;         // __launch_bounds__ minimum blocks; shared memory is budgeted for as many
  int target_sub_positions;  // tile length target per sub-chunk when shared memory allows
};
constexpr int kFwdVariantCount = 3;
DERMOMAMBA_HOST_DEVICE constexpr RegsFwdVariant regs_fwd_variant_config(int variant) {
  return variant == 0 ? RegsFwdVariant{8, 2, 32} : variant == 1 ? RegsFwdVariant{8, 3, 32} : RegsFwdVariant{4, 4, 32};
}
// Predicted fastest (not yet measured): 8 states keep the walks at ~14 SASS instructions per
// (position, state) against ~22 with 4, and 3 blocks give 1.5 x variant 0's warps.
constexpr int kFwdDefaultVariant = 1;
constexpr const char* kFwdVariantVariable = "DERMOMAMBA_REGS_FWD_VARIANT";
// 256 threads per block in every variant: the register cap is 65536 / (256 x blocks_per_sm).
constexpr int kFwdMaxThreads = 256;
// Shared memory of an sm_90 SM (H100 / H200), of which the driver reserves 1 KB per resident block.
constexpr int kFwdSharedPerSm = 228 * 1024;
constexpr int kFwdReservedPerBlock = 1024;
constexpr int kFwdStaticShared = 16;  // the kernel's __shared__ ticket (ptxas -v: smem), aligned
// A tile is cut into ceil(positions / kFwdMinSubPositions) sub-chunks at most: short tiles keep
// sub-chunks long enough that a thread's walk amortises its per-tile work.
constexpr int kFwdMinSubPositions = 16;
constexpr int kFwdFloat2PerBankRow = 16;  // 128-byte shared-memory bank row
constexpr int kFwdWarp = 32;

DERMOMAMBA_HOST_DEVICE constexpr int regs_fwd_shared_budget(const RegsFwdVariant& v) {
  const int per_block = kFwdSharedPerSm / v.blocks_per_sm - kFwdReservedPerBlock - kFwdStaticShared;
  return per_block < staged::kSharedBudgetBytes ? per_block : staged::kSharedBudgetBytes;
}

struct RegsFwdPlan {
  staged::StagedLayout l;  // the host's view: ok, channels, channel_blocks, chunks_per_tile, num_tiles,
                           // threads, shared_bytes (+ group, slots, subs, tile_positions, offsets)
  int lanes;               // threads per channel and sub-chunk: 1, 2 or 4
  int threads_per_sub;     // slots * lanes: a power of two <= 32 or a multiple of 32
  int subs_per_warp;
  int sub_len;             // positions each sub-chunk walks (uniform: past the tile's end, identity steps)
  int sub_stride;          // R >= sub_len
  int padded_positions;    // subs * R
  int slot_stride;         // float2 per slot row of step
  int tiles_per_chunk;     // 1, or > 1 when a chunk is longer than a tile
  int dsum_offset;         // == l.enter_offset
};

// Threads per channel: a power of two covering N with `states` each (N <= 32: at most 8).
DERMOMAMBA_HOST_DEVICE inline int regs_fwd_lanes_for(int dstate, int states) {
  int lanes = 1;
  while (lanes * states < dstate) lanes *= 2;
  return lanes;
}

DERMOMAMBA_HOST_DEVICE inline void regs_fwd_offsets(RegsFwdPlan& q) {
  staged::StagedLayout& l = q.l;
  const int Pp = q.padded_positions;
  const int pad = ((q.subs_per_warp - Pp) % kFwdFloat2PerBankRow + kFwdFloat2PerBankRow) % kFwdFloat2PerBankRow;
  q.slot_stride = Pp + pad;
  l.step_offset = 0;
  l.place_offset = l.step_offset + staged::staged_align16(l.slots * q.slot_stride * 8);
  l.B_offset = l.place_offset + staged::staged_align16(Pp * 8);
  l.C_offset = l.B_offset + staged::staged_align16(Pp * l.group * 4);
  l.agg_offset = l.C_offset + staged::staged_align16(Pp * l.group * 4);
  l.enter_offset = l.agg_offset + staged::staged_align16(l.subs * l.slots * l.group * 4);
  q.dsum_offset = l.enter_offset;
  l.shared_bytes = l.enter_offset + staged::staged_align16(l.subs * l.slots * 4);
}

// The plan for a call. Channels per block: as many as a warp per sub-chunk allows (they share the
// tile's B and C); the tile: as many positions as the variant's shared budget and target per sub-chunk allow.
// ok == false: N > 32, bad sizes, or not even one position of one channel fits.
DERMOMAMBA_HOST_DEVICE inline RegsFwdPlan regs_fwd_plan(int dim, int dstate, int chunk_size, int num_chunks,
                                                        const RegsFwdVariant& v) {
  RegsFwdPlan q{};
  staged::StagedLayout& l = q.l;
  l.ok = false;
  if (dstate < 1 || dstate > staged::kMaxStateDim || dim < 1 || chunk_size < 1 || num_chunks < 1) return q;
  const int budget = regs_fwd_shared_budget(v);
  q.lanes = regs_fwd_lanes_for(dstate, v.states);
  l.group = q.lanes * v.states;
  l.seqs_per_warp = kFwdWarp / q.lanes;
  // At most a warp per sub-chunk: at least 8 sub-chunks keep tiles long (fewer look-back hops) where
  // more channels per block would only save re-reads of B and C (which L2 serves).
  int channels = dim < kFwdWarp / q.lanes ? dim : kFwdWarp / q.lanes;
  int max_subs = 0, cap = 0;
  for (;;) {
    int tps = channels * q.lanes;
    if (tps <= kFwdWarp) {
      int pow2 = 1;
      while (pow2 < tps) pow2 *= 2;
      tps = pow2;
    } else {
      tps = (tps + kFwdWarp - 1) / kFwdWarp * kFwdWarp;
    }
    q.threads_per_sub = tps;
    l.channels = channels;
    l.slots = tps / q.lanes;
    q.subs_per_warp = tps < kFwdWarp ? kFwdWarp / tps : 1;
    max_subs = kFwdMaxThreads / tps;
    // Bytes per (padded) position and an upper bound of the rest at max_subs sub-chunks; the
    // position cap leaves room for the per-sub-chunk padding of R.
    const int per_position = l.slots * 8 + 8 + 2 * l.group * 4;
    const int fixed = max_subs * l.slots * (l.group + 1) * 4 + l.slots * kFwdFloat2PerBankRow * 8 + 6 * 16;
    cap = (budget - fixed) / per_position;
    // Rounding (sub_len = ceil(tile / subs)) and R's padding: at most 2 positions per sub-chunk.
    int subs_estimate = (cap + kFwdMinSubPositions - 1) / kFwdMinSubPositions;
    if (subs_estimate > max_subs) subs_estimate = max_subs;
    cap -= 2 * subs_estimate;
    if (cap > max_subs * v.target_sub_positions) cap = max_subs * v.target_sub_positions;
    if (cap >= 1) break;
    if (channels == 1) return q;
    channels = (channels + 1) / 2;
  }
  // The cap leaves room for rounding (sub_len = ceil(tile / subs)) and R's padding, so the first
  // try fits; the loop is a guard.
  for (;; cap -= cap / 16 > 1 ? cap / 16 : 1) {
    if (cap < 1) return q;
    int tile_positions;
    if (chunk_size <= cap) {
      int cpt = cap / chunk_size;
      if (cpt > num_chunks) cpt = num_chunks;
      l.chunks_per_tile = cpt;
      q.tiles_per_chunk = 1;
      tile_positions = cpt * chunk_size;
      l.num_tiles = (num_chunks + cpt - 1) / cpt;
    } else {
      l.chunks_per_tile = 0;
      q.tiles_per_chunk = (chunk_size + cap - 1) / cap;
      tile_positions = (chunk_size + q.tiles_per_chunk - 1) / q.tiles_per_chunk;
      l.num_tiles = num_chunks * q.tiles_per_chunk;
    }
    l.tile_positions = tile_positions;
    int subs = (tile_positions + kFwdMinSubPositions - 1) / kFwdMinSubPositions;
    subs = (subs + q.subs_per_warp - 1) / q.subs_per_warp * q.subs_per_warp;  // whole warps
    if (subs > max_subs) subs = max_subs;
    l.subs = subs;
    q.sub_len = (tile_positions + subs - 1) / subs;
    q.sub_stride = q.sub_len;
    if (q.subs_per_warp > 1) {
      q.sub_stride |= 1;
    }
    q.padded_positions = subs * q.sub_stride;
    regs_fwd_offsets(q);
    if (l.shared_bytes <= budget) break;
  }
  l.warps_per_sub = (q.threads_per_sub + kFwdWarp - 1) / kFwdWarp;
  l.chunks_per_sub = 0;  // sub-chunks are position runs, not whole chunks
  l.threads = l.subs * q.threads_per_sub;
  l.channel_blocks = (dim + l.channels - 1) / l.channels;
  l.ok = true;
  return q;
}

// The variant DERMOMAMBA_REGS_FWD_VARIANT names (host only): kFwdDefaultVariant when unset or empty,
// -1 when it is not one of 0 .. kFwdVariantCount - 1 (the layout is then not ok: the op refuses).
inline int regs_fwd_variant() {
  const char* text = std::getenv(kFwdVariantVariable);
  if (text == nullptr || text[0] == '\0') return kFwdDefaultVariant;
  if (text[1] != '\0' || text[0] < '0' || text[0] >= '0' + kFwdVariantCount) return -1;
  return text[0] - '0';
}

// The host's layout for the variant the launcher will run (read anew each call, so a benchmark may
// switch variants between calls).
inline staged::StagedLayout regs_fwd_layout(int dim, int dstate, int chunk_size, int num_chunks) {
  const int variant = regs_fwd_variant();
  if (variant < 0) {
    staged::StagedLayout refused{};
    refused.ok = false;
    return refused;
  }
  return regs_fwd_plan(dim, dstate, chunk_size, num_chunks, regs_fwd_variant_config(variant)).l;
}

}  // namespace regs
}  // namespace cuda
}  // namespace dermomamba
