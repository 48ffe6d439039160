// Work and shared-memory layout of the "staged" multiaxial forward (scan v4,
// csrc/cuda/scan_staged_kernels.cuh; benchmarks/notes/scan.md, "v4"). Plain C++ (no CUDA or torch
// headers): the host glue (selective_scan_cuda.cpp) sizes the look-back scratch from the same
// function the kernel uses to find its work, so the two cannot disagree.
//
// A block owns one tile (a run of whole chunks) of one (batch, direction) for a group of channels.
// Its threads are `subs` sub-chunks x channel slots x `group` lanes (one state per lane); sub-chunk s
// of the tile is `chunks_per_sub` consecutive chunks. The tile's inputs sit in shared memory:
//   step  float2 [slots][tile_positions]  (delta after bias / softplus, x) per channel and position
//   place int2   [tile_positions]         (h, w) of each position in the native layout
//   B, C  float  [tile_positions][group]  states >= N stay zero, so idle lanes add nothing
//   agg   float2 [subs][slots][group]     each sub-chunk's (decay, end state from zero)
//   enter float  [subs][slots][group]     the state entering each sub-chunk
#pragma once

#include <cstdlib>
#include <cstring>

#ifdef __CUDACC__
#define DERMOMAMBA_HOST_DEVICE __host__ __device__
#else
#define DERMOMAMBA_HOST_DEVICE
#endif

namespace dermomamba {
namespace cuda {
namespace staged {

// Largest N: one lane per state, a group of 16 or 32 lanes per channel.
constexpr int kMaxStateDim = 32;
constexpr int kNarrowGroup = 16;
constexpr int kWideGroup = 32;
constexpr int kLanesPerWarp = 32;
constexpr int kMaxThreads = 512;
// Dynamic shared memory per block: two blocks per SM on sm_90 (228 KB per SM, 1 KB reserved per block).
constexpr int kSharedBudgetBytes = 110 * 1024;
// A sub-chunk walks at least this many positions (several short chunks when chunk_size is small),
// so that the per-tile look-back and barriers are shared by enough work.
constexpr int kMinSubChunkPositions = 64;
// Every kMilestoneSpan-th tile publishes its inclusive state; the others publish only their
// aggregate. A tile's entering state is the last milestone's inclusive state folded with the
// aggregates of the tiles after it, always in the same order, so it does not depend on timing.
constexpr int kMilestoneSpan = 8;

struct StagedLayout {
  bool ok;
  int group;            // lanes per channel (16 or 32)
  int seqs_per_warp;    // channels per warp: 32 / group
  int channels;         // channels per block (the last channel block of a direction may have fewer)
  int slots;            // channel slots per sub-chunk, whole warps (>= channels)
  int warps_per_sub;
  int subs;             // sub-chunks per tile
  int chunks_per_sub;
  int chunks_per_tile;
  int tile_positions;   // chunks_per_tile * chunk_size (the sequence's last tile may be shorter)
  int num_tiles;        // per sequence
  int channel_blocks;   // blocks per (batch, direction) and tile
  int threads;
  // Byte offsets in dynamic shared memory (16-byte aligned) and the total.
  int step_offset, place_offset, B_offset, C_offset, agg_offset, enter_offset, shared_bytes;
  // The backward only (staged_bwd_layout; zero in the forward's layout): position blocks of a full
  // sub-chunk, dy [slot][position], the per-lane checkpoints [sub][block][slot * group] and the
  // dB / dC rows [2][sub][slot * group][reduce_row] (reduce_row = group + 1: a lane writes its block's
  // positions at constant offsets, and the padding puts both the lanes' writes and the reducers' reads,
  // one position each, in different banks).
  int blocks_per_sub, dy_offset, checkpoint_offset, reduce_offset, reduce_row;
  // The backward only: planes of dB / dC rows (2: one each, the v4 kernel; 1: the lean variants, whose
  // even slot rows hold dB and odd slot rows dC, each summed over the warp's two channels), and which
  // compile-time variant of the backward runs this layout (staged_bwd_variant_config; 0 in the forward).
  int reduce_planes, bwd_variant;
};

DERMOMAMBA_HOST_DEVICE inline int staged_align16(int bytes) { return (bytes + 15) / 16 * 16; }

DERMOMAMBA_HOST_DEVICE inline void staged_offsets(StagedLayout& l) {
  const int P = l.tile_positions;
  l.step_offset = 0;
  l.place_offset = l.step_offset + staged_align16(l.slots * P * 8);
  l.B_offset = l.place_offset + staged_align16(P * 8);
  l.C_offset = l.B_offset + staged_align16(P * l.group * 4);
  l.agg_offset = l.C_offset + staged_align16(P * l.group * 4);
  l.enter_offset = l.agg_offset + staged_align16(l.subs * l.slots * l.group * 8);
  l.shared_bytes = l.enter_offset + staged_align16(l.subs * l.slots * l.group * 4);
}

// ---- the staged backward (scan_staged_bwd_kernels.cuh) ----
//
// Same tiles as the forward, plus dy per channel and position, a checkpoint of the forward state at
// every position block of a sub-chunk, and the dB / dC rows of one block iteration. Blocks of
// positions are `group` long (the lane shapes' kBlock for 16- and 32-lane groups). With 32-lane
// groups a lane holds arrays of 32 positions, so blocks are at most kMaxBwdThreadsWide threads
// (255 registers each); with 16-lane groups kMaxThreads (128 registers).
constexpr int kMaxBwdThreadsWide = 256;

DERMOMAMBA_HOST_DEVICE inline int staged_bwd_max_threads(int group) {
  return group == kNarrowGroup ? kMaxThreads : kMaxBwdThreadsWide;
}

DERMOMAMBA_HOST_DEVICE inline void staged_bwd_offsets(StagedLayout& l, int chunk_size) {
  const int P = l.tile_positions;
  const int lanes = l.slots * l.group;
  const int blocks_per_chunk = (chunk_size + l.group - 1) / l.group;
  l.blocks_per_sub = l.chunks_per_sub * blocks_per_chunk;
  l.reduce_row = l.group + 1;
  l.step_offset = 0;
  l.dy_offset = l.step_offset + staged_align16(l.slots * P * 8);
  l.place_offset = l.dy_offset + staged_align16(l.slots * P * 4);
  l.B_offset = l.place_offset + staged_align16(P * 8);
  l.C_offset = l.B_offset + staged_align16(P * l.group * 4);
  l.checkpoint_offset = l.C_offset + staged_align16(P * l.group * 4);
  l.reduce_offset = l.checkpoint_offset + staged_align16(l.subs * l.blocks_per_sub * lanes * 4);
  l.agg_offset = l.reduce_offset + staged_align16(l.reduce_planes * l.subs * lanes * l.reduce_row * 4);
  l.enter_offset = l.agg_offset + staged_align16(l.subs * lanes * 8);
  l.shared_bytes = l.enter_offset + staged_align16(l.subs * lanes * 4);
}

// Which kernel a layout is for: both search their tiles the same way, under their own thread limit
// and shared-memory layout.
enum class StagedPass { kForward, kBackward };

// The layout for a call: as many channels per block as the pass's thread limit allows, then as many
// sub-chunks as threads and shared memory allow; if even one sub-chunk of one chunk does not fit,
// fewer chunks per sub-chunk, then fewer channels. ok == false: N > kMaxStateDim or nothing fits.
// The backward's variant (staged_bwd_variant_config) may lower the thread limit and cap the sub-chunks per
// block (max_threads_cap, max_subs: 0 = no cap) and use one plane of dB / dC rows (reduce_planes); the
// defaults are the forward's and the v4 backward's search.
DERMOMAMBA_HOST_DEVICE inline StagedLayout search_staged_layout(int dim, int dstate, int chunk_size, int num_chunks,
                                                                StagedPass pass, int max_threads_cap = 0,
                                                                int max_subs = 0, int reduce_planes = 2) {
  StagedLayout l{};
  l.ok = false;
  if (dstate < 1 || dstate > kMaxStateDim || dim < 1 || chunk_size < 1 || num_chunks < 1) return l;
  l.group = dstate <= kNarrowGroup ? kNarrowGroup : kWideGroup;
  l.seqs_per_warp = kLanesPerWarp / l.group;
  l.reduce_planes = pass == StagedPass::kForward ? 0 : reduce_planes;
  int max_threads = pass == StagedPass::kForward ? kMaxThreads : staged_bwd_max_threads(l.group);
  if (max_threads_cap > 0 && max_threads_cap < max_threads) max_threads = max_threads_cap;
  int channels = dim < max_threads / l.group ? dim : max_threads / l.group;
  int chunks_per_sub = (kMinSubChunkPositions + chunk_size - 1) / chunk_size;
  if (chunks_per_sub > num_chunks) chunks_per_sub = num_chunks;
  for (;;) {
    l.channels = channels;
    l.slots = (channels + l.seqs_per_warp - 1) / l.seqs_per_warp * l.seqs_per_warp;
    l.warps_per_sub = l.slots / l.seqs_per_warp;
    const int threads_per_sub = l.warps_per_sub * kLanesPerWarp;
    l.chunks_per_sub = chunks_per_sub;
    const int subs_needed = (num_chunks + chunks_per_sub - 1) / chunks_per_sub;
    int subs = max_threads / threads_per_sub;
    if (subs > subs_needed) subs = subs_needed;
    if (max_subs > 0 && subs > max_subs) subs = max_subs;
    for (; subs >= 1; --subs) {
      l.subs = subs;
      l.chunks_per_tile = subs * chunks_per_sub;
      l.tile_positions = l.chunks_per_tile * chunk_size;
      if (pass == StagedPass::kForward) {
        staged_offsets(l);
      } else {
        staged_bwd_offsets(l, chunk_size);
      }
      if (l.shared_bytes <= kSharedBudgetBytes) break;
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
  l.threads = l.subs * l.warps_per_sub * kLanesPerWarp;
  l.num_tiles = (num_chunks + l.chunks_per_tile - 1) / l.chunks_per_tile;
  l.channel_blocks = (dim + l.channels - 1) / l.channels;
  l.ok = true;
  return l;
}

DERMOMAMBA_HOST_DEVICE inline StagedLayout staged_layout(int dim, int dstate, int chunk_size, int num_chunks) {
  return search_staged_layout(dim, dstate, chunk_size, num_chunks, StagedPass::kForward);
}

DERMOMAMBA_HOST_DEVICE inline StagedLayout staged_bwd_layout(int dim, int dstate, int chunk_size, int num_chunks) {
  return search_staged_layout(dim, dstate, chunk_size, num_chunks, StagedPass::kBackward);
}

// ---- compile-time variants of the staged backward (benchmarks/notes/scan.md, "v4.1") ----
//
// v4 (Nsight Compute, H200, 192x256 fp32): 128 registers with a spill, 103.7 KB of shared memory per block
// of 256 threads: 2 blocks, 16 warps per SM, 0.66 eligible warps per scheduler: latency-bound. The lean
// variants trade registers and shared memory for warps, with the same arithmetic:
//   * dB / dC: the two channels of a warp are summed by one xor-16 shuffle per position before the rows
//     (the even slot's lane keeps the dB sum, the odd slot's the dC sum), so one plane of rows instead of
//     two (8.5 KB less per sub-chunk of 8 channels) and half the reducers' shared loads;
//   * walk B: h_{t-1} of a block's first half parked in the lane's own reduce row (free until the lane's
//     dB / dC value of that position overwrites it), and the transposed butterfly's first round done as
//     the adjoint walks the lower half, so a lane holds arrays of 8 positions, not 16 (du and ddelta are
//     bit-for-bit the v4 kernel's: the same operations in the same order);
//   * one sub-chunk per block (128 threads at 8 channels, 44 KB: 5 blocks per SM by shared memory;
//     256 threads at 16 channels, 70.6 KB: 3 blocks), under a register cap that lets that many in
//     (lean: 96, so 20 warps per SM at 8 channels and 16 at 16; lean80: 80, 20 and 24).
// 16-lane groups only (N <= 16, DermoMamba's 16): with 32-lane groups every variant runs the v4 kernel.
// Chosen at run time by DERMOMAMBA_STAGED_BWD_VARIANT (a name below; unset or empty: v4), read on the host
// by staged_bwd_layout_selected, i.e. by the host glue (its scratch sizes) and the launcher alike.
struct StagedBwdVariant {
  int max_threads;    // threads per block the layout may use (0: the v4 limit)
  int max_subs;       // sub-chunks per block at most (0: as many as threads and shared memory allow)
  int max_registers;  // register cap per thread of the lean kernel (0: the v4 kernel's launch bounds)
  bool lean;          // pair-summed dB / dC rows and the half-block walk B (above)
};
constexpr int kStagedBwdVariantCount = 3;
constexpr const char* kStagedBwdVariantNames[kStagedBwdVariantCount] = {"v4", "lean", "lean80"};
constexpr const char* kStagedBwdVariantVariable = "DERMOMAMBA_STAGED_BWD_VARIANT";
constexpr int kStagedBwdDefaultVariant = 0;
constexpr int kLeanMaxThreads = 256;

DERMOMAMBA_HOST_DEVICE constexpr StagedBwdVariant staged_bwd_variant_config(int variant) {
  return variant == 1   ? StagedBwdVariant{kLeanMaxThreads, 1, 96, true}
         : variant == 2 ? StagedBwdVariant{kLeanMaxThreads, 1, 80, true}
                        : StagedBwdVariant{0, 0, 0, false};
}

// The layout of variant `variant`. A shape the lean kernels do not handle gets v4's layout (and kernel):
// 32-lane groups (N > 16), and chunk sizes that are not a multiple of 16 (the lean walks have no masked
// form for a chunk's short last block; DermoMamba's chunks, 128 or a whole sequence of a multiple of 16
// positions, are all multiples of 16).
DERMOMAMBA_HOST_DEVICE inline StagedLayout staged_bwd_layout_for(int variant, int dim, int dstate, int chunk_size,
                                                                 int num_chunks) {
  const StagedBwdVariant v = staged_bwd_variant_config(variant);
  if (variant <= 0 || variant >= kStagedBwdVariantCount || dstate > kNarrowGroup || chunk_size % kNarrowGroup != 0)
    return staged_bwd_layout(dim, dstate, chunk_size, num_chunks);
  StagedLayout l = search_staged_layout(dim, dstate, chunk_size, num_chunks, StagedPass::kBackward, v.max_threads,
                                        v.max_subs, v.lean ? 1 : 2);
  l.bwd_variant = variant;
  return l;
}

// The variant DERMOMAMBA_STAGED_BWD_VARIANT names (host only): kStagedBwdDefaultVariant when unset or empty,
// -1 when it is none of kStagedBwdVariantNames (the host glue then refuses with an error naming the variable).
inline int staged_bwd_variant() {
  const char* text = std::getenv(kStagedBwdVariantVariable);
  if (text == nullptr || text[0] == '\0') return kStagedBwdDefaultVariant;
  for (int i = 0; i < kStagedBwdVariantCount; ++i)
    if (std::strcmp(text, kStagedBwdVariantNames[i]) == 0) return i;
  return -1;
}

// The host's layout for the variant the launcher will run (read anew on each call, so a benchmark may switch
// variants between calls); not ok for an unknown variant name.
inline StagedLayout staged_bwd_layout_selected(int dim, int dstate, int chunk_size, int num_chunks) {
  const int variant = staged_bwd_variant();
  if (variant < 0) {
    StagedLayout l{};
    l.ok = false;
    return l;
  }
  return staged_bwd_layout_for(variant, dim, dstate, chunk_size, num_chunks);
}

}  // namespace staged
}  // namespace cuda
}  // namespace dermomamba
