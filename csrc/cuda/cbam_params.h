// Plain parameter block and launchers of the fused CBAM CUDA kernels (no torch headers: the .cu
// files include this and compile in seconds; csrc/cuda/cbam_cuda.cpp fills it).
//
// x-sized tensors are indexed as (batch, channel, pixel) through their strides, pixel = h * W + w
// (H and W must flatten to one axis: NCHW and channels-last both do), so they are read and written
// in place. Everything else is fp32 and contiguous:
//   cs     (B, C)      channel scale sigmoid(mlp(avg) + mlp(max))
//   chan   (B, 3, C)   average over HW, max over HW, 1 / (ties of that max)
//   pix    (B, 4, HW)  max over C of x * cs, mean over C, 1 / (ties of that max), conv output z
//   stats  (4,)        mean and 1/std that normalised z, batch mean, unbiased batch variance
// Every reduction goes through per-tile (over pixels) or per-split (over channels) partial buffers
// summed in a fixed order: results are bitwise reproducible (no float atomics).
#pragma once

#include <cstdint>

namespace dermomamba {
namespace cuda {

// Warps of the blocks that stream x: they split into `channel_groups` warps per pixel tile.
constexpr int kCbamWarps = 8;
constexpr int kCbamThreads = kCbamWarps * 32;
// A lane owns up to this many pixel slots of its warp's tile; a slot is `vector_width` consecutive
// pixels (slot j of lane l in tile t: first pixel ((t * pixels_per_lane + j) * 32 + l) * vector_width).
constexpr int kCbamMaxPixelsPerLane = 2;
// 16-byte loads: pixels per slot when H * W allows (the layout depends on the shape only, so the
// summation order, and with it every result bit, is the same whatever the strides).
constexpr int kCbamVectorBytes = 16;
// Spatial tiles of the 7x7 conv kernels: one output pixel per thread, rows x columns.
constexpr int kCbamConvTileRows = 8;
constexpr int kCbamConvTileCols = 32;
// Largest conv kernel: its halo-padded tiles of the two maps must fit the static shared memory.
constexpr int kCbamMaxKernelSize = 15;
// Threads of the single-block reductions (batch statistics, BatchNorm backward).
constexpr int kCbamReduceThreads = 1024;
// Warps the x-streaming passes aim for (per SM) before pixel tiles shrink and channels split: with
// 64-128 bytes in flight per lane this many resident warps cover the DRAM latency.
constexpr int kCbamTargetWarpsPerSM = 20;
// The channel split over the grid never leaves a warp fewer channels than this (partials cost bytes).
constexpr int kCbamMinChannelsPerWarp = 4;

// dtypes of the tensors the kernels read or write through a run-time tag (the parameters may
// differ from x: fp32 parameters with fp16 activations under autocast).
enum CbamScalarKind : int { kCbamFloat32 = 0, kCbamFloat16 = 1, kCbamBFloat16 = 2, kCbamFloat64 = 3 };

struct CbamTensor {
  const void* data = nullptr;
  int kind = kCbamFloat32;
};

struct CbamOutTensor {
  void* data = nullptr;
  int kind = kCbamFloat32;
};

struct CbamParams {
  // Problem size.
  int batch, channels, height, width, hw, hidden, ksize;
  bool use_batch_stats;
  float eps;

  // Tiling of the passes over x (see cbam_choose_tiling).
  int vector_width;        // pixels per slot: 16 bytes of x when H * W allows, else 1
  int pixels_per_lane;     // slots per lane, 1..kCbamMaxPixelsPerLane
  int tile_pixels;         // 32 * pixels_per_lane * vector_width: one warp's pixel tile
  int num_pixel_tiles;     // per image
  int channel_groups;      // warps per pixel tile in a block (1, 2, 4 or 8); kCbamWarps / channel_groups tiles
  int channel_splits;      // channel split over grid.z (every pass; reductions over C leave partials)
  bool vector_loads;       // x, grad, out dense along pixels and 16-byte aligned: one load per slot
  int conv_tiles_x, conv_tiles_y, num_conv_tiles;  // per image

  // x-sized tensors (element strides; pixel stride = stride of W).
  const void* x;
  int64_t x_batch_stride, x_channel_stride, x_pixel_stride;
  const void* grad;  // backward: grad of out
  int64_t grad_batch_stride, grad_channel_stride, grad_pixel_stride;
  void* out;         // forward: out; backward: dx
  int64_t out_batch_stride, out_channel_stride, out_pixel_stride;

  // Parameters and running stats, any float kind, contiguous.
  CbamTensor mlp1_w, mlp1_b, mlp2_w, mlp2_b, conv_w, bn_weight, bn_bias, running_mean, running_var;

  // Saved maps (forward outputs, backward inputs).
  float* cs;
  float* chan;
  float* pix;
  float* stats;

  // Forward scratch.
  float* pool_parts;  // (3, B, C, num_pixel_tiles): sum, max, count of the max over each tile
  float* conv_parts;  // (B, num_conv_tiles, 3): count, sum, squared deviations of z over each tile
  float* hidden_buf;  // forward (B, hidden); backward (B, 3, hidden): relu sums, d pre-activations
  float* pixel_parts; // channel_splits > 1: forward (splits, B, 3, HW) max, ties, sum over each split's
                      // channels; backward (splits, B, HW) sum_c g * x * cs of each split

  // Backward scratch.
  float* bpix;        // (B, 3, HW): d spatial logit, d max-map / ties, d mean-map / C
  float* dcs_parts;   // (B, C, num_pixel_tiles): partial d cs over each tile, direct path
  float* dcs_parts2;  // (B, C, num_pixel_tiles): the max / mean-map paths (bwd_channel)
  float* bn_parts;    // (B, num_pixel_tiles, 2): sum of d logit, sum of d logit * normalised z
  float* coef;        // (3,): gamma * invstd, mean(d logit), mean(d logit * zn) (zeros in eval)
  float* conv_wparts; // (2 * k * k, B * num_conv_tiles): per-tile conv-weight gradient
  float* d_logit;     // (B, C): gradient of the channel logits
  float* dchan;       // (B, 2, C): gradient per element of the avg pool (d avg / HW) and of the max (/ ties)

  // Parameter gradients, in their parameters' kinds.
  CbamOutTensor d_mlp1_w, d_mlp1_b, d_mlp2_w, d_mlp2_b, d_conv_w, d_bn_weight, d_bn_bias;

  // Small-shape path (cbam_small.cu): a block per (image, channel group), one cooperative kernel per
  // direction. Unused by the passes above.
  int small_groups;              // channel groups per image (blocks = batch * small_groups)
  int small_group_channels;      // channels per group (the last group may have fewer)
  float* small_parts;            // forward (groups, B, 3, HW) max, ties, sum over a group's channels;
                                 // backward (groups, B, HW) sum_c g * x * cs over a group's channels
  float* small_image;            // forward (B, 3) count, sum, squared deviations of z per image;
                                 // backward (B, 2) sum of d logit, of d logit * normalised z per image
};

struct CbamTiling {
  int vector_width, pixels_per_lane, tile_pixels, num_pixel_tiles, channel_groups, channel_splits;
  int conv_tiles_x, conv_tiles_y, num_conv_tiles;
};

inline int cbam_ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Which warp reads what, from the shape alone (never the strides: see kCbamVectorBytes). Tiles of
// 2 slots per lane; while the grid would leave the GPU short of warps, tiles shrink to 1 slot, then
// the warps of a block split the channels of one tile (only with 1 slot: their shared-memory merge
// is sized for it), then grid.z splits the channels further (small images with many channels:
// 16x512x12x16 gets 2 tiles x 8 warps x 13 splits per image instead of 2 warps walking 512 channels).
inline CbamTiling cbam_choose_tiling(int batch, int channels, int height, int width, int element_size,
                                     int multiprocessors) {
  const int64_t hw = static_cast<int64_t>(height) * width;
  const int64_t target_warps = static_cast<int64_t>(multiprocessors > 0 ? multiprocessors : 1) * kCbamTargetWarpsPerSM;
  CbamTiling t{};
  t.vector_width = kCbamVectorBytes / element_size;
  if (hw % t.vector_width != 0) t.vector_width = 1;
  t.pixels_per_lane = kCbamMaxPixelsPerLane;
  t.channel_groups = 1;
  auto warps = [&]() {
    return batch * static_cast<int64_t>(cbam_ceil_div(hw, 32 * t.pixels_per_lane * t.vector_width)) * t.channel_groups;
  };
  while (warps() < target_warps) {
    if (t.pixels_per_lane > 1) {
      t.pixels_per_lane /= 2;
    } else if (t.channel_groups < kCbamWarps && 2 * t.channel_groups <= channels) {
      t.channel_groups *= 2;
    } else {
      break;
    }
  }
  t.tile_pixels = 32 * t.pixels_per_lane * t.vector_width;
  t.num_pixel_tiles = cbam_ceil_div(hw, t.tile_pixels);
  const int64_t have = warps();
  const int64_t max_split = cbam_ceil_div(channels, static_cast<int64_t>(t.channel_groups) * kCbamMinChannelsPerWarp);
  const int64_t split = have >= target_warps ? 1 : cbam_ceil_div(target_warps, have);
  t.channel_splits = static_cast<int>(split < max_split ? split : max_split);
  if (t.channel_splits < 1) t.channel_splits = 1;
  t.conv_tiles_x = cbam_ceil_div(width, kCbamConvTileCols);
  t.conv_tiles_y = cbam_ceil_div(height, kCbamConvTileRows);
  t.num_conv_tiles = t.conv_tiles_x * t.conv_tiles_y;
  return t;
}

// Whole forward (without the running-stat update) and whole backward, one launcher per dtype of
// x (each in its own .cu so that they compile in parallel). They return a CUDA error code
// (cudaSuccess == 0) so the host can raise a clear error.
int cbam_forward_float(const CbamParams& p, void* stream);
int cbam_forward_half(const CbamParams& p, void* stream);
int cbam_forward_bfloat16(const CbamParams& p, void* stream);
int cbam_backward_float(const CbamParams& p, void* stream);
int cbam_backward_half(const CbamParams& p, void* stream);
int cbam_backward_bfloat16(const CbamParams& p, void* stream);

// dtype-independent stages (cbam_kernels.cu), called by the sequences above.
int cbam_launch_channel_gate(const CbamParams& p, void* stream);
int cbam_launch_spatial_pool_merge(const CbamParams& p, void* stream);
int cbam_launch_spatial_backward_merge(const CbamParams& p, void* stream);
int cbam_launch_spatial_conv(const CbamParams& p, void* stream);
int cbam_launch_bn_stats(const CbamParams& p, void* stream);
int cbam_launch_bn_backward(const CbamParams& p, void* stream);
int cbam_launch_spatial_conv_backward(const CbamParams& p, void* stream);
int cbam_launch_channel_gate_backward(const CbamParams& p, void* stream);
int cbam_launch_param_grads(const CbamParams& p, void* stream);

// running = (1 - momentum) * running + momentum * stats[2 or 3], in fp32, rounded once.
int cbam_update_running_stats(CbamOutTensor running_mean, CbamOutTensor running_var, const float* stats,
                              float momentum, void* stream);

// ---------------------------------------------------------------------------------------------
// Small-shape path: one cooperative kernel for the forward, one for the backward (cbam_small.cu).
// ---------------------------------------------------------------------------------------------
// Threads of a small-path block.
constexpr int kCbamSmallThreads = 512;
// A block stages its channels of x (fp32; in the backward also grad_out) in shared memory; at most this
// many values of each, so that with the per-pixel maps a block still fits the 227 KB of an SM (96 KB each).
constexpr int kCbamSmallMaxStagedValues = 24 * 1024;
// The automatic rule takes the small path only up to this many pixels per image: every block of an
// image recomputes the image's pooled maps and 7x7 conv (cheap for small images, not for 192x256).
constexpr int kCbamSmallMaxAutoPixels = 1024;
// Channel groups per image at most (batch 1: more groups than this only repeat per-image work).
constexpr int kCbamSmallMaxGroups = 32;
// Per-pixel maps a small-path block keeps in shared memory (the backward's: spatial gate, normalised
// z, d logit / dz, max over C, 1 / ties, d max-map, d mean-map, mean over C).
constexpr int kCbamSmallMaps = 8;
// Per-channel values of its own channels a block keeps (cs, direct d cs, d avg, d max, max over HW).
constexpr int kCbamSmallOwnRows = 5;
constexpr int kCbamSmallScratch = 64;

// Host and device (the launcher sizes the shared memory, the kernels carve it); plain inline in .cpp files.
#ifdef __CUDACC__
#define CBAM_HOST_DEVICE __host__ __device__
#else
#define CBAM_HOST_DEVICE
#endif

// Shared-memory layout of a small-path block, in floats (the forward leaves out the staged grad_out).
struct CbamSmallLayout {
  int x, grad, chan_avg, chan_max, d_logit, hidden, own, own_weights, conv_w, maps, scratch, total;
};

inline CBAM_HOST_DEVICE CbamSmallLayout cbam_small_layout(int channels, int hw, int hidden, int ksize, int group_channels,
                                                          bool backward) {
  CbamSmallLayout l{};
  int at = 0;
  l.x = at;        at += group_channels * hw;
  l.grad = at;     at += backward ? group_channels * hw : 0;
  l.chan_avg = at; at += channels;
  l.chan_max = at; at += channels;
  l.d_logit = at;  at += channels;
  l.hidden = at;   at += 3 * hidden;
  l.own = at;      at += kCbamSmallOwnRows * group_channels;
  l.own_weights = at; at += group_channels * hidden;
  l.conv_w = at;   at += 2 * ksize * ksize;
  l.maps = at;     at += kCbamSmallMaps * hw;
  l.scratch = at;  at += kCbamSmallScratch;
  l.total = at;
  return l;
}

// Launchers (return a CUDA error code); x's dtype picks the kernel. p.small_groups etc. must be set.
int cbam_small_forward(const CbamParams& p, int x_kind, void* stream);
int cbam_small_backward(const CbamParams& p, int x_kind, void* stream);
// Blocks of the small-path kernels (forward and backward, the lesser) that can be resident on one SM
// with `shared_bytes` of dynamic shared memory (the backward's, the larger); 0 when they cannot run (no
// cooperative launch, or too much shared memory).
int cbam_small_blocks_per_sm(int device, int x_kind, bool vector_loads, int64_t shared_bytes);

int cbam_multiprocessor_count(int device);
const char* cbam_error_string(int code);

}  // namespace cuda
}  // namespace dermomamba
