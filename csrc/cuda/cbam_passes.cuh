// The CBAM passes over x-sized tensors, templated on x's dtype, and the forward / backward
// sequences. Included once per dtype (cbam_float.cu, cbam_half.cu, cbam_bfloat16.cu).
//
// Mapping: a warp owns a tile of 32 * pixels_per_lane pixels (lane l reads pixels tile_start +
// j * 32 + l: coalesced along a row in NCHW) and a range of channels, which it walks in chunks of
// kChannelChunk (loads of a chunk are issued together). Per-pixel reductions over C stay in each
// lane's registers; the warps of a block that share a pixel tile (channel_groups > 1, for small
// images) combine theirs through shared memory in a fixed order. Per-channel reductions over the
// tile are warp butterflies, stored per (b, c, tile) for a later fixed-order sum.
#pragma once

#include "cbam_common.cuh"

namespace dermomamba {
namespace cuda {
namespace cbam {

// Channels whose loads a lane issues together: kChannelChunk for passes reading x alone, kPairChunk
// for those reading x and grad_out (same bytes in flight, half the registers each).
constexpr int kChannelChunk = 4;
constexpr int kPairChunk = 2;
constexpr int kMaxLanePixels = kCbamMaxPixelsPerLane;

// Where a warp works: its image, pixel tile and channel range.
struct WarpTile {
  int lane, warp;
  int local_group;  // channel group within the block, 0 .. channel_groups - 1
  int b, tile;
  bool tile_valid;
  int c_begin, c_end;
};

__device__ __forceinline__ WarpTile warp_tile(const CbamParams& p) {
  WarpTile t;
  t.lane = threadIdx.x & 31;
  t.warp = threadIdx.x >> 5;
  t.local_group = t.warp % p.channel_groups;
  const int tiles_per_block = kCbamWarps / p.channel_groups;
  t.tile = blockIdx.x * tiles_per_block + t.warp / p.channel_groups;
  t.tile_valid = t.tile < p.num_pixel_tiles;
  t.b = blockIdx.y;
  const int groups = p.channel_groups * gridDim.z;
  const int group = blockIdx.z * p.channel_groups + t.local_group;
  const int per_group = (p.channels + groups - 1) / groups;
  t.c_begin = min(p.channels, group * per_group);
  t.c_end = min(p.channels, t.c_begin + per_group);
  return t;
}

// Pixel index of slot j of this lane, and whether it lies in the image.
__device__ __forceinline__ int lane_pixel(const CbamParams& p, const WarpTile& t, int j) {
  return t.tile * p.tile_pixels + j * 32 + t.lane;
}

__device__ __forceinline__ bool lane_pixel_valid(const CbamParams& p, const WarpTile& t, int j) {
  return t.tile_valid && j < p.pixels_per_lane && lane_pixel(p, t, j) < p.hw;
}

__device__ __forceinline__ float spatial_scale(const CbamParams& p, float z, float& zn) {
  zn = (z - p.stats[kStatsMean]) * p.stats[kStatsInvStd];
  return sigmoid(zn * load_any(p.bn_weight, 0) + load_any(p.bn_bias, 0));
}

// Loads a (kChunk x kMaxLanePixels) block of a (B, C, HW) tensor; zeros outside. Pixel offsets are
// formed per load (one wide multiply-add) rather than kept: 64-bit offsets for three tensors would
// cost 48 registers a thread.
template <int kChunk, typename T>
__device__ __forceinline__ void load_chunk(const T* base, int64_t channel_stride, int64_t pixel_stride,
                                           const int (&pixel)[kMaxLanePixels], const bool (&valid)[kMaxLanePixels],
                                           int c0, int c_end, float (&v)[kChunk][kMaxLanePixels]) {
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    const int c = c0 + k;
    const T* row = base + c * channel_stride;
#pragma unroll
    for (int j = 0; j < kMaxLanePixels; ++j)
      v[k][j] = (c < c_end && valid[j]) ? to_float(row[pixel[j] * pixel_stride]) : 0.0f;
  }
}

// Pixel slots of this lane: index (0 when outside the image) and validity.
__device__ __forceinline__ void lane_pixels(const CbamParams& p, const WarpTile& t, int (&pixel)[kMaxLanePixels],
                                            bool (&valid)[kMaxLanePixels]) {
#pragma unroll
  for (int j = 0; j < kMaxLanePixels; ++j) {
    valid[j] = lane_pixel_valid(p, t, j);
    pixel[j] = valid[j] ? lane_pixel(p, t, j) : 0;
  }
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// Per (b, c, tile): sum, max and count of the max of x over the tile's pixels.
template <typename T>
__global__ void __launch_bounds__(kCbamThreads) pool_hw_kernel(const CbamParams p) {
  const WarpTile t = warp_tile(p);
  if (!t.tile_valid) return;
  const T* x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  int pixel[kMaxLanePixels];
  bool valid[kMaxLanePixels];
  lane_pixels(p, t, pixel, valid);
  const int64_t part_stride = static_cast<int64_t>(p.batch) * p.channels * p.num_pixel_tiles;
  for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChannelChunk) {
    float v[kChannelChunk][kMaxLanePixels];
    load_chunk(x, p.x_channel_stride, p.x_pixel_stride, pixel, valid, c0, t.c_end, v);
#pragma unroll
    for (int k = 0; k < kChannelChunk; ++k) {
      if (c0 + k >= t.c_end) break;  // warp-uniform
      float s = 0.0f, m = -INFINITY, n = 0.0f;
#pragma unroll
      for (int j = 0; j < kMaxLanePixels; ++j) {
        if (!valid[j]) continue;
        s += v[k][j];
        merge_max(m, n, v[k][j], 1.0f);
      }
      s = warp_sum(s);
      warp_max_count(m, n);
      if (t.lane == 0) {
        const int64_t idx = (static_cast<int64_t>(t.b) * p.channels + c0 + k) * p.num_pixel_tiles + t.tile;
        p.pool_parts[idx] = s;
        p.pool_parts[part_stride + idx] = m;
        p.pool_parts[2 * part_stride + idx] = n;
      }
    }
  }
}

// Per pixel: max (with tie count) and mean over C of x * cs.
template <typename T>
__global__ void __launch_bounds__(kCbamThreads) spatial_pool_kernel(const CbamParams p) {
  __shared__ float shared_max[kCbamWarps][32 * kMaxLanePixels];
  __shared__ float shared_count[kCbamWarps][32 * kMaxLanePixels];
  __shared__ float shared_sum[kCbamWarps][32 * kMaxLanePixels];
  const WarpTile t = warp_tile(p);
  const T* x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  const float* cs = p.cs + static_cast<int64_t>(t.b) * p.channels;
  int pixel[kMaxLanePixels];
  bool valid[kMaxLanePixels];
  lane_pixels(p, t, pixel, valid);
  float m[kMaxLanePixels], n[kMaxLanePixels], s[kMaxLanePixels];
#pragma unroll
  for (int j = 0; j < kMaxLanePixels; ++j) {
    m[j] = -INFINITY;
    n[j] = 0.0f;
    s[j] = 0.0f;
  }
  if (t.tile_valid) {
    for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChannelChunk) {
      float v[kChannelChunk][kMaxLanePixels];
      load_chunk(x, p.x_channel_stride, p.x_pixel_stride, pixel, valid, c0, t.c_end, v);
#pragma unroll
      for (int k = 0; k < kChannelChunk; ++k) {
        if (c0 + k >= t.c_end) break;
        const float scale = cs[c0 + k];
#pragma unroll
        for (int j = 0; j < kMaxLanePixels; ++j) {
          const float y = v[k][j] * scale;
          s[j] += y;
          merge_max(m[j], n[j], y, 1.0f);
        }
      }
    }
  }
  if (p.channel_groups > 1) {
#pragma unroll
    for (int j = 0; j < kMaxLanePixels; ++j) {
      shared_max[t.warp][j * 32 + t.lane] = m[j];
      shared_count[t.warp][j * 32 + t.lane] = n[j];
      shared_sum[t.warp][j * 32 + t.lane] = s[j];
    }
    __syncthreads();
    if (t.local_group == 0) {
      // the other channel groups of this tile are the next warps, merged in order
      for (int g = 1; g < p.channel_groups; ++g) {
#pragma unroll
        for (int j = 0; j < kMaxLanePixels; ++j) {
          merge_max(m[j], n[j], shared_max[t.warp + g][j * 32 + t.lane], shared_count[t.warp + g][j * 32 + t.lane]);
          s[j] += shared_sum[t.warp + g][j * 32 + t.lane];
        }
      }
    }
  }
  if (t.local_group != 0) return;
  float* pix = p.pix + static_cast<int64_t>(t.b) * kPixRows * p.hw;
#pragma unroll
  for (int j = 0; j < kMaxLanePixels; ++j) {
    if (!valid[j]) continue;
    pix[kPixMax * p.hw + pixel[j]] = m[j];
    pix[kPixMean * p.hw + pixel[j]] = s[j] / p.channels;
    pix[kPixInvTies * p.hw + pixel[j]] = 1.0f / fmaxf(n[j], 1.0f);
  }
}

// out = x * cs * sigmoid(bn(z)).
template <typename T>
__global__ void __launch_bounds__(kCbamThreads) apply_kernel(const CbamParams p) {
  const WarpTile t = warp_tile(p);
  if (!t.tile_valid) return;
  const T* x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  T* out = static_cast<T*>(p.out) + t.b * p.out_batch_stride;
  const float* cs = p.cs + static_cast<int64_t>(t.b) * p.channels;
  const float* z = p.pix + (static_cast<int64_t>(t.b) * kPixRows + kPixZ) * p.hw;
  int pixel[kMaxLanePixels];
  bool valid[kMaxLanePixels];
  lane_pixels(p, t, pixel, valid);
  float ss[kMaxLanePixels];
#pragma unroll
  for (int j = 0; j < kMaxLanePixels; ++j) {
    float zn;
    ss[j] = valid[j] ? spatial_scale(p, z[pixel[j]], zn) : 0.0f;
  }
  for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChannelChunk) {
    float v[kChannelChunk][kMaxLanePixels];
    load_chunk(x, p.x_channel_stride, p.x_pixel_stride, pixel, valid, c0, t.c_end, v);
#pragma unroll
    for (int k = 0; k < kChannelChunk; ++k) {
      const int c = c0 + k;
      if (c >= t.c_end) break;
      const float scale = cs[c];
      T* row = out + c * p.out_channel_stride;
#pragma unroll
      for (int j = 0; j < kMaxLanePixels; ++j)
        if (valid[j]) row[pixel[j] * p.out_pixel_stride] = from_float<T>((v[k][j] * scale) * ss[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// Per pixel: d spatial logit = sum_c g * x * cs * ss (1 - ss), and its per-tile BatchNorm sums;
// per (b, c, tile): sum_p g * x * ss (the direct path of d cs).
template <typename T>
__global__ void __launch_bounds__(kCbamThreads) bwd_spatial_kernel(const CbamParams p) {
  __shared__ float shared_acc[kCbamWarps][32 * kMaxLanePixels];
  const WarpTile t = warp_tile(p);
  const T* x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  const T* g = static_cast<const T*>(p.grad) + t.b * p.grad_batch_stride;
  const float* cs = p.cs + static_cast<int64_t>(t.b) * p.channels;
  const float* z = p.pix + (static_cast<int64_t>(t.b) * kPixRows + kPixZ) * p.hw;
  int pixel[kMaxLanePixels];
  bool valid[kMaxLanePixels];
  lane_pixels(p, t, pixel, valid);
  float ss[kMaxLanePixels], zn[kMaxLanePixels], acc[kMaxLanePixels];
#pragma unroll
  for (int j = 0; j < kMaxLanePixels; ++j) {
    zn[j] = 0.0f;
    ss[j] = valid[j] ? spatial_scale(p, z[pixel[j]], zn[j]) : 0.0f;
    acc[j] = 0.0f;
  }
  if (t.tile_valid) {
    for (int c0 = t.c_begin; c0 < t.c_end; c0 += kPairChunk) {
      float v[kPairChunk][kMaxLanePixels], gv[kPairChunk][kMaxLanePixels];
      load_chunk(x, p.x_channel_stride, p.x_pixel_stride, pixel, valid, c0, t.c_end, v);
      load_chunk(g, p.grad_channel_stride, p.grad_pixel_stride, pixel, valid, c0, t.c_end, gv);
#pragma unroll
      for (int k = 0; k < kPairChunk; ++k) {
        const int c = c0 + k;
        if (c >= t.c_end) break;
        const float scale = cs[c];
        float direct = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxLanePixels; ++j) {
          const float gx = gv[k][j] * v[k][j];
          acc[j] += gx * scale;
          direct += gx * ss[j];
        }
        direct = warp_sum(direct);
        if (t.lane == 0)
          p.dcs_parts[(static_cast<int64_t>(t.b) * p.channels + c) * p.num_pixel_tiles + t.tile] = direct;
      }
    }
  }
  if (p.channel_groups > 1) {
#pragma unroll
    for (int j = 0; j < kMaxLanePixels; ++j) shared_acc[t.warp][j * 32 + t.lane] = acc[j];
    __syncthreads();
    if (t.local_group == 0) {
      for (int gi = 1; gi < p.channel_groups; ++gi) {
#pragma unroll
        for (int j = 0; j < kMaxLanePixels; ++j) acc[j] += shared_acc[t.warp + gi][j * 32 + t.lane];
      }
    }
  }
  if (t.local_group != 0 || !t.tile_valid) return;
  float* ds_row = p.bpix + (static_cast<int64_t>(t.b) * kBpixRows + kBpixDs) * p.hw;
  float sum_ds = 0.0f, sum_ds_zn = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxLanePixels; ++j) {
    if (!valid[j]) continue;
    const float ds = acc[j] * ss[j] * (1.0f - ss[j]);
    ds_row[pixel[j]] = ds;
    sum_ds += ds;
    sum_ds_zn += ds * zn[j];
  }
  sum_ds = warp_sum(sum_ds);
  sum_ds_zn = warp_sum(sum_ds_zn);
  if (t.lane == 0) {
    const int64_t part = (static_cast<int64_t>(t.b) * p.num_pixel_tiles + t.tile) * 2;
    p.bn_parts[part] = sum_ds;
    p.bn_parts[part + 1] = sum_ds_zn;
  }
}

// Adds the max / mean-map paths to the d cs partials: sum_p d_gated * x, where d_gated =
// d mean-map / C + [x * cs is the pixel's max over C] * d max-map / ties.
template <typename T>
__global__ void __launch_bounds__(kCbamThreads) bwd_channel_kernel(const CbamParams p) {
  const WarpTile t = warp_tile(p);
  if (!t.tile_valid) return;
  const T* x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  const float* cs = p.cs + static_cast<int64_t>(t.b) * p.channels;
  const float* pix = p.pix + static_cast<int64_t>(t.b) * kPixRows * p.hw;
  const float* bpix = p.bpix + static_cast<int64_t>(t.b) * kBpixRows * p.hw;
  int pixel[kMaxLanePixels];
  bool valid[kMaxLanePixels];
  lane_pixels(p, t, pixel, valid);
  float y_max[kMaxLanePixels], d_max[kMaxLanePixels], d_mean[kMaxLanePixels];
#pragma unroll
  for (int j = 0; j < kMaxLanePixels; ++j) {
    y_max[j] = valid[j] ? pix[kPixMax * p.hw + pixel[j]] : 0.0f;
    d_max[j] = valid[j] ? bpix[kBpixDMax * p.hw + pixel[j]] : 0.0f;
    d_mean[j] = valid[j] ? bpix[kBpixDMean * p.hw + pixel[j]] : 0.0f;
  }
  for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChannelChunk) {
    float v[kChannelChunk][kMaxLanePixels];
    load_chunk(x, p.x_channel_stride, p.x_pixel_stride, pixel, valid, c0, t.c_end, v);
#pragma unroll
    for (int k = 0; k < kChannelChunk; ++k) {
      const int c = c0 + k;
      if (c >= t.c_end) break;
      const float scale = cs[c];
      float acc = 0.0f;
#pragma unroll
      for (int j = 0; j < kMaxLanePixels; ++j) {
        const float y = v[k][j] * scale;
        acc += (d_mean[j] + (y == y_max[j] ? d_max[j] : 0.0f)) * v[k][j];
      }
      acc = warp_sum(acc);
      if (t.lane == 0) p.dcs_parts[(static_cast<int64_t>(t.b) * p.channels + c) * p.num_pixel_tiles + t.tile] += acc;
    }
  }
}

// dx = (g * ss + d mean-map + [max over C] d max-map) * cs + d avg / HW + [max over HW] d max / ties.
template <typename T>
__global__ void __launch_bounds__(kCbamThreads) bwd_apply_kernel(const CbamParams p) {
  const WarpTile t = warp_tile(p);
  if (!t.tile_valid) return;
  const T* x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  const T* g = static_cast<const T*>(p.grad) + t.b * p.grad_batch_stride;
  T* dx = static_cast<T*>(p.out) + t.b * p.out_batch_stride;
  const int64_t bc = static_cast<int64_t>(t.b) * p.channels;
  const float* pix = p.pix + static_cast<int64_t>(t.b) * kPixRows * p.hw;
  const float* bpix = p.bpix + static_cast<int64_t>(t.b) * kBpixRows * p.hw;
  const float* chan = p.chan + static_cast<int64_t>(t.b) * kChanRows * p.channels;
  const float* dchan = p.dchan + bc * 2;
  int pixel[kMaxLanePixels];
  bool valid[kMaxLanePixels];
  lane_pixels(p, t, pixel, valid);
  float ss[kMaxLanePixels], y_max[kMaxLanePixels], d_max[kMaxLanePixels], d_mean[kMaxLanePixels];
#pragma unroll
  for (int j = 0; j < kMaxLanePixels; ++j) {
    float zn;
    ss[j] = valid[j] ? spatial_scale(p, pix[kPixZ * p.hw + pixel[j]], zn) : 0.0f;
    y_max[j] = valid[j] ? pix[kPixMax * p.hw + pixel[j]] : 0.0f;
    d_max[j] = valid[j] ? bpix[kBpixDMax * p.hw + pixel[j]] : 0.0f;
    d_mean[j] = valid[j] ? bpix[kBpixDMean * p.hw + pixel[j]] : 0.0f;
  }
  for (int c0 = t.c_begin; c0 < t.c_end; c0 += kPairChunk) {
    float v[kPairChunk][kMaxLanePixels], gv[kPairChunk][kMaxLanePixels];
    load_chunk(x, p.x_channel_stride, p.x_pixel_stride, pixel, valid, c0, t.c_end, v);
    load_chunk(g, p.grad_channel_stride, p.grad_pixel_stride, pixel, valid, c0, t.c_end, gv);
#pragma unroll
    for (int k = 0; k < kPairChunk; ++k) {
      const int c = c0 + k;
      if (c >= t.c_end) break;
      const float scale = p.cs[bc + c];
      const float x_max = chan[kChanMax * p.channels + c];
      const float d_avg = dchan[c];
      const float d_xmax = dchan[p.channels + c];
      T* row = dx + c * p.out_channel_stride;
#pragma unroll
      for (int j = 0; j < kMaxLanePixels; ++j) {
        if (!valid[j]) continue;
        const float y = v[k][j] * scale;
        const float d_gated = gv[k][j] * ss[j] + d_mean[j] + (y == y_max[j] ? d_max[j] : 0.0f);
        const float grad_x = d_gated * scale + d_avg + (v[k][j] == x_max ? d_xmax : 0.0f);
        row[pixel[j] * p.out_pixel_stride] = from_float<T>(grad_x);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// sequences
// ---------------------------------------------------------------------------------------------

inline dim3 x_pass_grid(const CbamParams& p, bool reduces_over_channels) {
  const int tiles_per_block = kCbamWarps / p.channel_groups;
  return dim3(static_cast<unsigned>(cbam_ceil_div(p.num_pixel_tiles, tiles_per_block)), static_cast<unsigned>(p.batch),
              static_cast<unsigned>(reduces_over_channels ? 1 : p.grid_channel_groups));
}

#define CBAM_RETURN_IF_ERROR(expr)                \
  do {                                            \
    const int cbam_status_ = (expr);              \
    if (cbam_status_ != 0) return cbam_status_;   \
  } while (0)

template <typename T>
int forward(const CbamParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 split_grid = x_pass_grid(p, false), whole_grid = x_pass_grid(p, true);
  pool_hw_kernel<T><<<split_grid, kCbamThreads, 0, s>>>(p);
  CBAM_RETURN_IF_ERROR(static_cast<int>(cudaGetLastError()));
  CBAM_RETURN_IF_ERROR(cbam_launch_channel_gate(p, stream));
  spatial_pool_kernel<T><<<whole_grid, kCbamThreads, 0, s>>>(p);
  CBAM_RETURN_IF_ERROR(static_cast<int>(cudaGetLastError()));
  CBAM_RETURN_IF_ERROR(cbam_launch_spatial_conv(p, stream));
  CBAM_RETURN_IF_ERROR(cbam_launch_bn_stats(p, stream));
  apply_kernel<T><<<split_grid, kCbamThreads, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int backward(const CbamParams& p, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 split_grid = x_pass_grid(p, false), whole_grid = x_pass_grid(p, true);
  bwd_spatial_kernel<T><<<whole_grid, kCbamThreads, 0, s>>>(p);
  CBAM_RETURN_IF_ERROR(static_cast<int>(cudaGetLastError()));
  CBAM_RETURN_IF_ERROR(cbam_launch_bn_backward(p, stream));
  CBAM_RETURN_IF_ERROR(cbam_launch_spatial_conv_backward(p, stream));
  bwd_channel_kernel<T><<<split_grid, kCbamThreads, 0, s>>>(p);
  CBAM_RETURN_IF_ERROR(static_cast<int>(cudaGetLastError()));
  CBAM_RETURN_IF_ERROR(cbam_launch_channel_gate_backward(p, stream));
  CBAM_RETURN_IF_ERROR(cbam_launch_param_grads(p, stream));
  bwd_apply_kernel<T><<<split_grid, kCbamThreads, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cbam
}  // namespace cuda
}  // namespace dermomamba
