// Work and shared-memory layout of the "regs" multiaxial backward (scan v5,
// csrc/cuda/scan_regs_bwd_kernels.cuh). Plain C++ (no CUDA or torch headers): the host glue sizes the
// look-back scratch (tickets, flags, split_decay / split_state / reverse_carry, dB / dC channel blocks)
// from the same function the kernel uses, so the two cannot disagree.
//
// A block owns one tile (a run of whole chunks) of one (batch, direction) for a group of channels, as
// in the staged backward (scan_staged_layout.h), but a thread owns kRegsStates consecutive states of
// one channel (registers) instead of one state:
//   thread = (sub-chunk, channel slot, state group); `group` = Lc lanes per channel (N / kRegsStates
//   rounded up to a power of two: 1, 2 or 4), adjacent in the warp; a sub-chunk's slots x Lc lanes
//   (slots a power of two, at most kRegsMaxSlots) sit inside one warp, so the dB / dC sum over
//   channels is a shuffle reduction and never crosses a warp (a warp holds 32 / (slots x Lc) sub-chunks).
// Shared memory (offsets 16-byte aligned):
//   step       float2 [slots][tile_positions]   (delta after bias / softplus, x)
//   dy         float  [slots][tile_positions]   tile_positions is the tile's positions + kRegsRowPad (the
//                                               staging also fills the pad): the rows of a warp's slots
//                                               start in different banks (an 8-way conflict without)
//   place      int2   [tile_positions]          (h, w); h == -1 past the sequence's end
//   B, C       float  [tile_positions][row]     row = Lc x kRegsStates (states >= N zero): a thread reads
//                                               its states as float4s, the channels of a warp broadcast
//   checkpoint float4 [sub][block][kRegsStates / 4][slots x Lc]: h entering every kRegsBlock-position
//                                               block (walk F writes, walk B reads; a warp's float4s are
//                                               consecutive, so no bank conflicts)
//   agg        float2 [sub][slots x Lc][kRegsStates]  each sub-chunk's adjoint map (decay, aggregate)
//   enter      float  [sub][slots x Lc][kRegsStates]  the adjoint carry entering each sub-chunk
// Bytes per position with N = 16, 8 channels: 64 step + 32 dy + 8 place + 128 B / C + 128 checkpoint
// = 360, so a 110 KB tile holds ~300 positions: at chunk_size 16 or 32, 8 sub-chunks of 32 positions,
// 128 threads, 104 KB. chunk_size 64 or more leaves fewer sub-chunks (threads) per tile; 32 is the best
// choice (16 gives the same tiles with twice the chunk_states and dA partials).
#pragma once

#include "scan_staged_layout.h"

namespace dermomamba {
namespace cuda {
namespace regs {

// States per thread: 8 independent recurrences give each thread enough instruction-level parallelism
// to run at low occupancy (shared memory, not registers, limits the resident threads), and an 8-float
// row is two float4 loads of B and of C.
constexpr int kRegsStates = 8;
constexpr int kRegsQuads = kRegsStates / 4;
// Positions per walk-B block: h_{t-1} of a block is rebuilt into kRegsBlock x kRegsStates registers from
// its checkpoint. The checkpoints cost N / kRegsBlock floats per (channel, position) of shared memory, the
// rebuilt block kRegsBlock x 8 registers: 4 halves the first against 2 and keeps the second affordable.
constexpr int kRegsBlock = 4;
// Channel slots of a sub-chunk: a power of two between these. At most 16: the dB / dC reduction turns
// 2 x kRegsStates values per lane into 2 x kRegsStates / slots sums, at least one. At least 4: fewer
// kernel instantiations (a direction with 1 to 3 channels leaves slots idle).
constexpr int kRegsMinSlots = 4;
constexpr int kRegsMaxSlots = 16;
// Threads per block and blocks per SM the registers must allow. Shared memory bounds residency first
// (~360 bytes per position at N = 16, D = 8: two ~100 KB tiles per SM), so a block is only 128 threads
// and may use up to 255 registers: ptxas takes 190-230 (it overlaps the next position's exps with the
// current position's shuffle reduction); capped at 128 (two blocks of 256) or 168 (three of 128) it
// spills.
constexpr int kRegsMaxThreads = 128;
constexpr int kRegsMinBlocksPerSM = 2;
// Positions staged past the tile's end, so that the per-slot rows (step, dy) do not start in one bank.
constexpr int kRegsRowPad = 1;
// A sub-chunk walks at least this many positions (several chunks when chunk_size is small): 128 threads
// of 32 positions fill the shared-memory budget at N = 16, D = 8.
constexpr int kRegsMinSubPositions = 32;

DERMOMAMBA_HOST_DEVICE inline int regs_lanes_per_channel(int dstate) {
  int lanes = 1;
  while (lanes * kRegsStates < dstate) lanes *= 2;
  return lanes;
}

DERMOMAMBA_HOST_DEVICE inline int regs_slots_for(int channels, int lanes_per_channel) {
  int slots = kRegsMinSlots;
  while (slots < channels) slots *= 2;
  const int max_slots = staged::kLanesPerWarp / lanes_per_channel < kRegsMaxSlots
                            ? staged::kLanesPerWarp / lanes_per_channel
                            : kRegsMaxSlots;
  return slots < max_slots ? slots : max_slots;
}

// Lanes of one sub-chunk (a power of two, at most a warp).
DERMOMAMBA_HOST_DEVICE inline int regs_lanes_per_sub(const staged::StagedLayout& l) { return l.slots * l.group; }

DERMOMAMBA_HOST_DEVICE inline int regs_blocks_per_chunk(int chunk_size) {
  return (chunk_size + kRegsBlock - 1) / kRegsBlock;
}

DERMOMAMBA_HOST_DEVICE inline void regs_bwd_offsets(staged::StagedLayout& l, int chunk_size) {
  const int P = l.tile_positions;
  const int lanes = regs_lanes_per_sub(l);
  const int row = l.group * kRegsStates;
  l.blocks_per_sub = l.chunks_per_sub * regs_blocks_per_chunk(chunk_size);
  l.reduce_row = 0;
  l.step_offset = 0;
  l.dy_offset = l.step_offset + staged::staged_align16(l.slots * P * 8);
  l.place_offset = l.dy_offset + staged::staged_align16(l.slots * P * 4);
  l.B_offset = l.place_offset + staged::staged_align16(P * 8);
  l.C_offset = l.B_offset + staged::staged_align16(P * row * 4);
  l.checkpoint_offset = l.C_offset + staged::staged_align16(P * row * 4);
  l.agg_offset = l.checkpoint_offset + staged::staged_align16(l.subs * l.blocks_per_sub * lanes * kRegsStates * 4);
  l.enter_offset = l.agg_offset + staged::staged_align16(l.subs * lanes * kRegsStates * 8);
  l.reduce_offset = l.enter_offset;  // unused: dB / dC are summed by shuffles
  l.shared_bytes = l.enter_offset + staged::staged_align16(l.subs * lanes * kRegsStates * 4);
}

// The layout for a call: as many channels per block as a warp's sub-chunk holds, then as many
// sub-chunks as kRegsMaxThreads and shared memory allow; if even one sub-chunk does not fit, fewer
// chunks per sub-chunk, then fewer channels. ok == false: N > 32 or not even one chunk of one channel
// fits (chunk_size above ~450 positions at N = 16, D >= 4).
DERMOMAMBA_HOST_DEVICE inline staged::StagedLayout regs_bwd_layout(int dim, int dstate, int chunk_size,
                                                                   int num_chunks) {
  staged::StagedLayout l{};
  l.ok = false;
  if (dstate < 1 || dstate > staged::kMaxStateDim || dim < 1 || chunk_size < 1 || num_chunks < 1) return l;
  l.group = regs_lanes_per_channel(dstate);
  l.seqs_per_warp = staged::kLanesPerWarp / l.group;
  l.warps_per_sub = 1;
  int channels = dim < regs_slots_for(dim, l.group) ? dim : regs_slots_for(dim, l.group);
  int chunks_per_sub = (kRegsMinSubPositions + chunk_size - 1) / chunk_size;
  if (chunks_per_sub > num_chunks) chunks_per_sub = num_chunks;
  for (;;) {
    l.channels = channels;
    l.slots = regs_slots_for(channels, l.group);
    const int lanes = regs_lanes_per_sub(l);
    l.chunks_per_sub = chunks_per_sub;
    const int subs_needed = (num_chunks + chunks_per_sub - 1) / chunks_per_sub;
    int subs = kRegsMaxThreads / lanes;
    if (subs > subs_needed) subs = subs_needed;
    for (; subs >= 1; --subs) {
      l.subs = subs;
      l.chunks_per_tile = subs * chunks_per_sub;
      l.tile_positions = l.chunks_per_tile * chunk_size + kRegsRowPad;
      regs_bwd_offsets(l, chunk_size);
      if (l.shared_bytes <= staged::kSharedBudgetBytes) break;
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

}  // namespace regs
}  // namespace cuda
}  // namespace dermomamba
