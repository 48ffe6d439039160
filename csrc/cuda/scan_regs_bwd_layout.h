// Work and shared-memory layout of the "regs" multiaxial backward (scan v5,
// csrc/cuda/scan_regs_bwd_kernels.cuh). Plain C++ (no CUDA or torch headers): the host glue sizes the
// look-back scratch (tickets, flags, split_decay / split_state / reverse_carry, dB / dC channel blocks)
// from the same function the kernel uses, so the two cannot disagree.
//
// A block owns one tile (a run of whole chunks) of one (batch, direction) for a group of channels, as
// in the staged backward (scan_staged_layout.h), but a thread owns S consecutive states of one channel
// (registers) instead of one state (S and the checkpoint block K are the variant's, below):
//   thread = (sub-chunk, channel slot, state group); `group` = Lc lanes per channel (N / S rounded up
//   to a power of two: 1 to 8), adjacent in the warp; a sub-chunk's slots x Lc lanes (slots a power of
//   two, at most min(kRegsMaxSlots, 2 S)) sit inside one warp, so the dB / dC sum over channels is a
//   shuffle reduction and never crosses a warp (a warp holds 32 / (slots x Lc) sub-chunks).
// Shared memory (offsets 16-byte aligned):
//   step       float2 [slots][tile_positions]   (delta after bias / softplus, x)
//   dy         float  [slots][tile_positions]   tile_positions is the tile's positions + kRegsRowPad (the
//                                               staging also fills the pad): the rows of a warp's slots
//                                               start in different banks (an 8-way conflict without)
//   place      int2   [tile_positions]          (h, w); h == -1 past the sequence's end
//   B, C       float  [tile_positions][row]     row = Lc x S (states >= N zero): a thread reads
//                                               its states as float4s, the channels of a warp broadcast
//   checkpoint float4 [sub][block][S / 4][slots x Lc]: h entering every K-position
//                                               block (walk F writes, walk B reads; a warp's float4s are
//                                               consecutive, so no bank conflicts)
//   agg        float2 [sub][slots x Lc][S]      each sub-chunk's adjoint map (decay, aggregate)
//   enter      float  [sub][slots x Lc][S]      the adjoint carry entering each sub-chunk
// Bytes per position with N = 16, 8 channels, K = 4: 64 step + 32 dy + 8 place + 128 B / C + 128
// checkpoint = 360 whatever S. S = 8: 16 lanes per sub-chunk, 8 sub-chunks of 32 positions in 128
// threads, 104 KB (2 blocks per SM); S = 4: 32 lanes per sub-chunk, 4 sub-chunks, 52 KB (3 blocks).
// chunk_size 64 or more leaves fewer sub-chunks (threads) per tile; 32 is the best choice (16 gives the
// same tiles with twice the chunk_states and dA partials).
#pragma once

#include <cstdlib>
#include <cstring>

#include "scan_staged_layout.h"

namespace dermomamba {
namespace cuda {
namespace regs {

// A variant of the backward: states per thread S, checkpoint block K, blocks per SM and walk B's
// prefetch, fixed at compile time (the register cap of __launch_bounds__ and the shared-memory budget
// follow from them), chosen at run time by DERMOMAMBA_REGS_BWD_VARIANT (a name below; unset:
// kBwdDefaultVariant), read on the host by the layout (the host glue's scratch sizes) and the launcher
// alike, so the two cannot disagree.
//   * s8 (S 8, K 4, 2 blocks of 128 threads per SM): a position's loads, index math, softplus slope and
//     stores are paid once per 8 states, but it takes ~250 registers and 104 KB of shared memory:
//     8 warps per SM, too few to hide shared-memory, MUFU and shuffle latency (Nsight Compute, H200,
//     before the prefetch: 0.23 eligible warps per scheduler, IPC 0.80, 5.9 ms at 192 x 256 against
//     the staged backward's 4.85 ms). Walk B prefetches the next position's inputs (registers allow).
//   * s4b3 (S 4, K 4, 3 blocks): the same tile per warp (a sub-chunk is a whole warp at N = 16, 8
//     channels x 4 lanes), half the sub-chunks per block, so half the shared memory (52 KB); <= 168
//     registers: 12 warps per SM, at ~15 % more instructions per (position, state) (the channel sums
//     over 4 lanes). No walk-B prefetch: it costs ~10 registers and spills at 168.
//   * s4 (S 4, K 4, 4 blocks, <= 128 registers): 16 warps per SM. As s4b3, ptxas spills 100-130 bytes
//     per thread (it keeps ~190 registers live uncapped: a block's h_prev and exp2 values, the loop's
//     bounds and addresses), so walk B handles a block one position at a time from the right, each
//     rebuilding its h_{t-1} from the checkpoint (4 h_prev registers instead of 16; 10 position
//     rebuilds per block instead of 4, yet the same SASS count per block as s4b3 + 6 %: ptxas keeps
//     fewer copies). Two parts of 2 positions still spill ~60 bytes; K = 2 fits 128 registers too but
//     doubles the checkpoints (68 KB per block: 3 blocks).
struct RegsBwdVariant {
  int states;         // consecutive states per thread (S), a multiple of 4 (float4 rows)
  int block;          // positions per walk-B block (K): checkpoints every K positions
  int blocks_per_sm;  // __launch_bounds__ minimum blocks; shared memory is budgeted for as many
  bool prefetch;      // walk B loads a position's inputs while the previous one is reduced and stored
  int parts;          // walk B rebuilds a block's h_{t-1} in this many parts (dividing K), right part first
};
constexpr int kBwdVariantCount = 3;
constexpr const char* kBwdVariantNames[kBwdVariantCount] = {"s8", "s4b3", "s4"};
DERMOMAMBA_HOST_DEVICE constexpr RegsBwdVariant regs_bwd_variant_config(int variant) {
  return variant == 0   ? RegsBwdVariant{8, 4, 2, true, 1}
         : variant == 1 ? RegsBwdVariant{4, 4, 3, false, 1}
                        : RegsBwdVariant{4, 4, 4, false, 4};
}
constexpr int kBwdDefaultVariant = 2;
constexpr const char* kBwdVariantVariable = "DERMOMAMBA_REGS_BWD_VARIANT";

// Channel slots of a sub-chunk: a power of two between these. At most 16 (and 2 S): the dB / dC
// reduction turns 2 S values per lane into 2 S / slots sums, at least one. At least 4: fewer kernel
// instantiations (a direction with 1 to 3 channels leaves slots idle).
constexpr int kRegsMinSlots = 4;
constexpr int kRegsMaxSlots = 16;
// Threads per block: the register cap is 65536 / (128 x blocks_per_sm) (255 for s8, 168 for s4b3).
constexpr int kRegsMaxThreads = 128;
// Shared memory of an sm_90 SM (H100 / H200), of which the driver reserves 1 KB per resident block,
// and the kernel's static __shared__ ticket (aligned).
constexpr int kBwdSharedPerSm = 228 * 1024;
constexpr int kBwdReservedPerBlock = 1024;
constexpr int kBwdStaticShared = 16;
// Positions staged past the tile's end, so that the per-slot rows (step, dy) do not start in one bank.
constexpr int kRegsRowPad = 1;
// A sub-chunk walks at least this many positions (several chunks when chunk_size is small).
constexpr int kRegsMinSubPositions = 32;

DERMOMAMBA_HOST_DEVICE constexpr int regs_bwd_shared_budget(const RegsBwdVariant& v) {
  const int per_block = kBwdSharedPerSm / v.blocks_per_sm - kBwdReservedPerBlock - kBwdStaticShared;
  return per_block < staged::kSharedBudgetBytes ? per_block : staged::kSharedBudgetBytes;
}

DERMOMAMBA_HOST_DEVICE constexpr int regs_bwd_max_slots(int states) {
  return 2 * states < kRegsMaxSlots ? 2 * states : kRegsMaxSlots;
}

DERMOMAMBA_HOST_DEVICE inline int regs_lanes_per_channel(int dstate, int states) {
  int lanes = 1;
  while (lanes * states < dstate) lanes *= 2;
  return lanes;
}

DERMOMAMBA_HOST_DEVICE inline int regs_slots_for(int channels, int lanes_per_channel, int states) {
  int slots = kRegsMinSlots;
  while (slots < channels) slots *= 2;
  int max_slots = staged::kLanesPerWarp / lanes_per_channel;
  if (max_slots > regs_bwd_max_slots(states)) max_slots = regs_bwd_max_slots(states);
  return slots < max_slots ? slots : max_slots;
}

// Lanes of one sub-chunk (a power of two, at most a warp).
DERMOMAMBA_HOST_DEVICE inline int regs_lanes_per_sub(const staged::StagedLayout& l) { return l.slots * l.group; }

DERMOMAMBA_HOST_DEVICE inline int regs_blocks_per_chunk(int chunk_size, int block) {
  return (chunk_size + block - 1) / block;
}

DERMOMAMBA_HOST_DEVICE inline void regs_bwd_offsets(staged::StagedLayout& l, int chunk_size, const RegsBwdVariant& v) {
  const int P = l.tile_positions;
  const int lanes = regs_lanes_per_sub(l);
  const int row = l.group * v.states;
  l.blocks_per_sub = l.chunks_per_sub * regs_blocks_per_chunk(chunk_size, v.block);
  l.step_offset = 0;
  l.dy_offset = l.step_offset + staged::staged_align16(l.slots * P * 8);
  l.place_offset = l.dy_offset + staged::staged_align16(l.slots * P * 4);
  l.B_offset = l.place_offset + staged::staged_align16(P * 8);
  l.C_offset = l.B_offset + staged::staged_align16(P * row * 4);
  l.checkpoint_offset = l.C_offset + staged::staged_align16(P * row * 4);
  l.agg_offset = l.checkpoint_offset + staged::staged_align16(l.subs * l.blocks_per_sub * lanes * v.states * 4);
  l.enter_offset = l.agg_offset + staged::staged_align16(l.subs * lanes * v.states * 8);
  l.reduce_offset = l.enter_offset;  // unused: dB / dC are summed by shuffles
  l.shared_bytes = l.enter_offset + staged::staged_align16(l.subs * lanes * v.states * 4);
}

// The layout of variant `variant` (0 .. kBwdVariantCount - 1) for a call within `budget` bytes of shared
// memory: as many channels per block as a warp's sub-chunk holds, then as many sub-chunks as
// kRegsMaxThreads and the budget allow; if even one sub-chunk does not fit, fewer chunks per sub-chunk,
// then fewer channels. ok == false: not even one chunk of one channel fits (chunk_size above ~450
// positions at N = 16, D >= 4, with kSharedBudgetBytes). The regs backward has no reduce rows: l.reduce_row holds the variant, so that the
// launcher (and the emulator) pick the kernel instantiation the layout is for.
DERMOMAMBA_HOST_DEVICE inline staged::StagedLayout regs_bwd_layout_in(int variant, int budget, int dim, int dstate,
                                                                      int chunk_size, int num_chunks) {
  staged::StagedLayout l{};
  l.ok = false;
  const RegsBwdVariant v = regs_bwd_variant_config(variant);
  l.reduce_row = variant;
  l.group = regs_lanes_per_channel(dstate, v.states);
  l.seqs_per_warp = staged::kLanesPerWarp / l.group;
  l.warps_per_sub = 1;
  int channels = dim < regs_slots_for(dim, l.group, v.states) ? dim : regs_slots_for(dim, l.group, v.states);
  int chunks_per_sub = (kRegsMinSubPositions + chunk_size - 1) / chunk_size;
  if (chunks_per_sub > num_chunks) chunks_per_sub = num_chunks;
  for (;;) {
    l.channels = channels;
    l.slots = regs_slots_for(channels, l.group, v.states);
    const int lanes = regs_lanes_per_sub(l);
    l.chunks_per_sub = chunks_per_sub;
    const int subs_needed = (num_chunks + chunks_per_sub - 1) / chunks_per_sub;
    int subs = kRegsMaxThreads / lanes;
    if (subs > subs_needed) subs = subs_needed;
    for (; subs >= 1; --subs) {
      l.subs = subs;
      l.chunks_per_tile = subs * chunks_per_sub;
      l.tile_positions = l.chunks_per_tile * chunk_size + kRegsRowPad;
      regs_bwd_offsets(l, chunk_size, v);
      if (l.shared_bytes <= budget) break;
    }
    if (subs >= 1) break;
    if (chunks_per_sub > 1) {
      chunks_per_sub = (chunks_per_sub + 1) / 2;
    } else if (channels > 1) {
      channels = (channels + 1) / 2;
    } else {
      return l;  // not even one chunk of one channel fits
    }
  }
  // Whole warps: sub-chunks past l.subs in the last warp are idle (they still take part in shuffles).
  const int lanes = regs_lanes_per_sub(l);
  l.threads = (l.subs * lanes + staged::kLanesPerWarp - 1) / staged::kLanesPerWarp * staged::kLanesPerWarp;
  l.num_tiles = (num_chunks + l.chunks_per_tile - 1) / l.chunks_per_tile;
  l.channel_blocks = (dim + l.channels - 1) / l.channels;
  l.ok = true;
  return l;
}

// A chunk too long for the variant's per-block budget (one 400-position chunk at N = 16 needs ~100 KB)
// gets the whole kSharedBudgetBytes: fewer blocks per SM, the same kernel.
DERMOMAMBA_HOST_DEVICE inline staged::StagedLayout regs_bwd_layout_for(int variant, int dim, int dstate,
                                                                       int chunk_size, int num_chunks) {
  staged::StagedLayout l{};
  l.ok = false;
  if (variant < 0 || variant >= kBwdVariantCount) return l;
  if (dstate < 1 || dstate > staged::kMaxStateDim || dim < 1 || chunk_size < 1 || num_chunks < 1) return l;
  l = regs_bwd_layout_in(variant, regs_bwd_shared_budget(regs_bwd_variant_config(variant)), dim, dstate, chunk_size,
                         num_chunks);
  if (!l.ok) l = regs_bwd_layout_in(variant, staged::kSharedBudgetBytes, dim, dstate, chunk_size, num_chunks);
  return l;
}

// The variant DERMOMAMBA_REGS_BWD_VARIANT names (host only): kBwdDefaultVariant when unset or empty,
// -1 when it is none of kBwdVariantNames (the layout is then not ok: the op refuses).
inline int regs_bwd_variant() {
  const char* text = std::getenv(kBwdVariantVariable);
  if (text == nullptr || text[0] == '\0') return kBwdDefaultVariant;
  for (int i = 0; i < kBwdVariantCount; ++i)
    if (std::strcmp(text, kBwdVariantNames[i]) == 0) return i;
  return -1;
}

// The host's layout for the variant the launcher will run (read anew each call, so a benchmark may
// switch variants between calls).
inline staged::StagedLayout regs_bwd_layout(int dim, int dstate, int chunk_size, int num_chunks) {
  return regs_bwd_layout_for(regs_bwd_variant(), dim, dstate, chunk_size, num_chunks);
}

}  // namespace regs
}  // namespace cuda
}  // namespace dermomamba
