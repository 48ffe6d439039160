// The CBAM passes over x-sized tensors, templated on x's dtype and on the lane layout, and the
// forward / backward sequences. Included once per dtype (cbam_float.cu, cbam_half.cu, cbam_bfloat16.cu).
//
// Mapping: a warp owns a tile of 32 * kSlots * kVec pixels and a range of channels. Slot j of lane l
// holds kVec consecutive pixels starting at (tile * 32 * kSlots + j * 32 + l) * kVec: one 16-byte load
// when the tensor is dense along pixels and aligned (vector_loads), kVec strided loads otherwise, with
// the same pixels per lane either way (so the same summation order and the same result bits whatever
// the strides). A warp walks its channels in chunks whose loads are all issued before any is used
// (16 fp32 values in flight per lane and tensor, 8 per tensor when a pass reads x and grad).
// Per-pixel reductions over C stay in each lane's registers; the warps of a block that share a tile
// (channel_groups > 1) merge theirs through shared memory in a fixed order, and a channel split over
// grid.z (channel_splits > 1) leaves per-split partial maps merged in order by a small kernel.
// Per-channel reductions over the tile are warp butterflies, stored per (b, c, tile) and summed in a
// fixed order by the channel-gate kernels. No float atomics anywhere: results are bitwise reproducible.
#pragma once

#include "cbam_common.cuh"

namespace dermomamba {
namespace cuda {
namespace cbam {

// fp32 values a lane loads per chunk and tensor: passes reading x alone, passes reading x and grad.
constexpr int kLoadFloats = 16;
constexpr int kPairLoadFloats = 8;

constexpr int chunk_channels(int budget, int lane_pixels) { return budget / lane_pixels > 1 ? budget / lane_pixels : 1; }

// ---------------------------------------------------------------------------------------------
// 16-byte packs <-> fp32 (same roundings as to_float / from_float)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float half_bits_to_float(uint32_t bits, __half) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
__device__ __forceinline__ float half_bits_to_float(uint32_t bits, __nv_bfloat16) { return __uint_as_float(bits << 16); }
__device__ __forceinline__ uint32_t float_to_half_bits(float v, __half) { return __half_as_ushort(__float2half_rn(v)); }
__device__ __forceinline__ uint32_t float_to_half_bits(float v, __nv_bfloat16) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&v)[16 / sizeof(T)]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(words[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = half_bits_to_float(words[i] & 0xffffu, T{});
      v[2 * i + 1] = half_bits_to_float(words[i] >> 16, T{});
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&v)[16 / sizeof(T)]) {
  uint32_t words[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) words[i] = __float_as_uint(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) words[i] = float_to_half_bits(v[2 * i], T{}) | (float_to_half_bits(v[2 * i + 1], T{}) << 16);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// ---------------------------------------------------------------------------------------------
// lane layout
// ---------------------------------------------------------------------------------------------

// Where a warp works: its image, pixel tile, channel range and channel split.
struct WarpTile {
  int lane, warp;
  int local_group;  // channel group within the block, 0 .. channel_groups - 1
  int b, tile, split;
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
  t.split = blockIdx.z;
  const int groups = p.channel_groups * gridDim.z;
  const int group = blockIdx.z * p.channel_groups + t.local_group;
  const int per_group = (p.channels + groups - 1) / groups;
  t.c_begin = min(p.channels, group * per_group);
  t.c_end = min(p.channels, t.c_begin + per_group);
  return t;
}

template <int kVec, int kSlots>
struct LaneSlots {
  int first[kSlots];   // first pixel of each slot (0 when outside the image)
  bool valid[kSlots];  // kVec divides H * W, so a slot is wholly inside or wholly outside
};

template <int kVec, int kSlots>
__device__ __forceinline__ LaneSlots<kVec, kSlots> lane_slots(const CbamParams& p, const WarpTile& t) {
  LaneSlots<kVec, kSlots> s;
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    const int first = ((t.tile * kSlots + j) * 32 + t.lane) * kVec;
    s.valid[j] = t.tile_valid && first < p.hw;
    s.first[j] = s.valid[j] ? first : 0;
  }
  return s;
}

template <typename T, int kVec, bool kVectorLoads>
__device__ __forceinline__ void load_slot(const T* __restrict__ row, int64_t pixel_stride, int first, float (&v)[kVec]) {
  if constexpr (kVectorLoads) {
    static_assert(kVec * sizeof(T) == 16, "vector loads are 16 bytes");
    unpack<T>(__ldg(reinterpret_cast<const uint4*>(row + first)), v);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[e] = to_float(row[static_cast<int64_t>(first + e) * pixel_stride]);
  }
}

template <typename T, int kVec, bool kVectorLoads>
__device__ __forceinline__ void store_slot(T* __restrict__ row, int64_t pixel_stride, int first, const float (&v)[kVec]) {
  if constexpr (kVectorLoads) {
    *reinterpret_cast<uint4*>(row + first) = pack<T>(v);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) row[static_cast<int64_t>(first + e) * pixel_stride] = from_float<T>(v[e]);
  }
}

// Loads channels c0 .. c0 + kChunk - 1 of this lane's slots (zeros past c_end or outside the image).
template <int kChunk, typename T, int kVec, int kSlots, bool kVectorLoads>
__device__ __forceinline__ void load_chunk(const T* __restrict__ base, int64_t channel_stride, int64_t pixel_stride,
                                           const LaneSlots<kVec, kSlots>& s, int c0, int c_end,
                                           float (&v)[kChunk][kSlots][kVec]) {
#pragma unroll
  for (int k = 0; k < kChunk; ++k) {
    const int c = c0 + k;
    const T* row = base + static_cast<int64_t>(c) * channel_stride;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (c < c_end && s.valid[j]) {
        load_slot<T, kVec, kVectorLoads>(row, pixel_stride, s.first[j], v[k][j]);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) v[k][j][e] = 0.0f;
      }
    }
  }
}

// Per-channel scalars of a chunk (0 past c_end), loaded with the chunk rather than after it.
template <int kChunk>
__device__ __forceinline__ void load_channel_values(const float* __restrict__ values, int c0, int c_end,
                                                    float (&out)[kChunk]) {
#pragma unroll
  for (int k = 0; k < kChunk; ++k) out[k] = c0 + k < c_end ? __ldg(values + c0 + k) : 0.0f;
}

// BatchNorm of z with the saved statistics, then sigmoid; the four scalars read once per thread.
struct SpatialNorm {
  float mean, invstd, gamma, beta;
};

__device__ __forceinline__ SpatialNorm spatial_norm(const CbamParams& p) {
  return SpatialNorm{p.stats[kStatsMean], p.stats[kStatsInvStd], load_any(p.bn_weight, 0), load_any(p.bn_bias, 0)};
}

__device__ __forceinline__ float spatial_scale(const SpatialNorm& n, float z, float& zn) {
  zn = (z - n.mean) * n.invstd;
  return sigmoid(zn * n.gamma + n.beta);
}

// Row `row` of a (B, rows, HW) fp32 map at this lane's slots (0 outside the image).
template <int kVec, int kSlots>
__device__ __forceinline__ void load_map(const float* __restrict__ map, const LaneSlots<kVec, kSlots>& s,
                                         float (&v)[kSlots][kVec]) {
#pragma unroll
  for (int j = 0; j < kSlots; ++j)
#pragma unroll
    for (int e = 0; e < kVec; ++e) v[j][e] = s.valid[j] ? map[s.first[j] + e] : 0.0f;
}

// The spatial gate sigmoid(BN(z)) at this lane's slots, from the z row of a (B, rows, HW) pixel map.
template <int kVec, int kSlots>
__device__ __forceinline__ void load_spatial_gate(const CbamParams& p, const float* __restrict__ z_row,
                                                  const LaneSlots<kVec, kSlots>& s, float (&gate)[kSlots][kVec]) {
  load_map(z_row, s, gate);
  const SpatialNorm norm = spatial_norm(p);
#pragma unroll
  for (int j = 0; j < kSlots; ++j)
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float zn;
      gate[j][e] = spatial_scale(norm, gate[j][e], zn);
    }
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

// Per (b, c, tile): sum, max and count of the max of x over the tile's pixels.
template <typename T, int kVec, int kSlots, bool kVectorLoads>
__global__ void __launch_bounds__(kCbamThreads) pool_hw_kernel(const CbamParams p) {
  constexpr int kChunk = chunk_channels(kLoadFloats, kVec * kSlots);
  const WarpTile t = warp_tile(p);
  if (!t.tile_valid) return;  // whole warp
  const T* __restrict__ x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  const LaneSlots<kVec, kSlots> s = lane_slots<kVec, kSlots>(p, t);
  const int64_t part_stride = static_cast<int64_t>(p.batch) * p.channels * p.num_pixel_tiles;
  for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChunk) {
    float v[kChunk][kSlots][kVec];
    load_chunk<kChunk, T, kVec, kSlots, kVectorLoads>(x, p.x_channel_stride, p.x_pixel_stride, s, c0, t.c_end, v);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      if (c0 + k >= t.c_end) break;  // warp-uniform
      float sum = 0.0f, m = -INFINITY, n = 0.0f;
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        if (!s.valid[j]) continue;
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          sum += v[k][j][e];
          merge_max(m, n, v[k][j][e], 1.0f);
        }
      }
      sum = warp_sum(sum);
      warp_max_count(m, n);
      if (t.lane == 0) {
        const int64_t idx = (static_cast<int64_t>(t.b) * p.channels + c0 + k) * p.num_pixel_tiles + t.tile;
        p.pool_parts[idx] = sum;
        p.pool_parts[part_stride + idx] = m;
        p.pool_parts[2 * part_stride + idx] = n;
      }
    }
  }
}

// Per pixel: max (with tie count) and mean over C of x * cs; with a channel split, per-split
// (max, count, sum) partial maps that spatial_pool_merge_kernel combines.
template <typename T, int kVec, int kSlots, bool kVectorLoads>
__global__ void __launch_bounds__(kCbamThreads) spatial_pool_kernel(const CbamParams p) {
  constexpr int kChunk = chunk_channels(kLoadFloats, kVec * kSlots);
  const WarpTile t = warp_tile(p);
  const T* __restrict__ x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  const float* __restrict__ cs = p.cs + static_cast<int64_t>(t.b) * p.channels;
  const LaneSlots<kVec, kSlots> s = lane_slots<kVec, kSlots>(p, t);
  float m[kSlots][kVec], n[kSlots][kVec], sum[kSlots][kVec];
#pragma unroll
  for (int j = 0; j < kSlots; ++j)
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      m[j][e] = -INFINITY;
      n[j][e] = 0.0f;
      sum[j][e] = 0.0f;
    }
  if (t.tile_valid) {
    for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChunk) {
      float scale[kChunk];
      load_channel_values(cs, c0, t.c_end, scale);
      float v[kChunk][kSlots][kVec];
      load_chunk<kChunk, T, kVec, kSlots, kVectorLoads>(x, p.x_channel_stride, p.x_pixel_stride, s, c0, t.c_end, v);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        if (c0 + k >= t.c_end) break;
#pragma unroll
        for (int j = 0; j < kSlots; ++j)
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float y = v[k][j][e] * scale[k];
            sum[j][e] += y;
            merge_max(m[j][e], n[j][e], y, 1.0f);
          }
      }
    }
  }
  if constexpr (kSlots == 1) {
    // channel groups exist only with one slot per lane (cbam_choose_tiling), which sizes this merge
    __shared__ float shared_max[kCbamWarps][32 * kVec];
    __shared__ float shared_count[kCbamWarps][32 * kVec];
    __shared__ float shared_sum[kCbamWarps][32 * kVec];
    if (p.channel_groups > 1) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        shared_max[t.warp][e * 32 + t.lane] = m[0][e];
        shared_count[t.warp][e * 32 + t.lane] = n[0][e];
        shared_sum[t.warp][e * 32 + t.lane] = sum[0][e];
      }
      __syncthreads();
      if (t.local_group == 0) {
        // the other channel groups of this tile are the next warps, merged in order
        for (int g = 1; g < p.channel_groups; ++g) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            merge_max(m[0][e], n[0][e], shared_max[t.warp + g][e * 32 + t.lane], shared_count[t.warp + g][e * 32 + t.lane]);
            sum[0][e] += shared_sum[t.warp + g][e * 32 + t.lane];
          }
        }
      }
    }
  }
  if (t.local_group != 0) return;
  const int64_t hw = p.hw;
  if (p.channel_splits == 1) {
    float* pix = p.pix + static_cast<int64_t>(t.b) * kPixRows * hw;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (!s.valid[j]) continue;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int q = s.first[j] + e;
        pix[kPixMax * hw + q] = m[j][e];
        pix[kPixMean * hw + q] = sum[j][e] / p.channels;
        pix[kPixInvTies * hw + q] = 1.0f / fmaxf(n[j][e], 1.0f);
      }
    }
  } else {
    float* part = p.pixel_parts + (static_cast<int64_t>(t.split) * p.batch + t.b) * 3 * hw;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (!s.valid[j]) continue;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const int q = s.first[j] + e;
        part[q] = m[j][e];
        part[hw + q] = n[j][e];
        part[2 * hw + q] = sum[j][e];
      }
    }
  }
}

// out = x * cs * sigmoid(bn(z)).
template <typename T, int kVec, int kSlots, bool kVectorLoads>
__global__ void __launch_bounds__(kCbamThreads) apply_kernel(const CbamParams p) {
  constexpr int kChunk = chunk_channels(kLoadFloats, kVec * kSlots);
  const WarpTile t = warp_tile(p);
  if (!t.tile_valid) return;
  const T* __restrict__ x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  T* __restrict__ out = static_cast<T*>(p.out) + t.b * p.out_batch_stride;
  const float* __restrict__ cs = p.cs + static_cast<int64_t>(t.b) * p.channels;
  const LaneSlots<kVec, kSlots> s = lane_slots<kVec, kSlots>(p, t);
  float ss[kSlots][kVec];
  load_spatial_gate(p, p.pix + (static_cast<int64_t>(t.b) * kPixRows + kPixZ) * p.hw, s, ss);
  for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChunk) {
    float scale[kChunk];
    load_channel_values(cs, c0, t.c_end, scale);
    float v[kChunk][kSlots][kVec];
    load_chunk<kChunk, T, kVec, kSlots, kVectorLoads>(x, p.x_channel_stride, p.x_pixel_stride, s, c0, t.c_end, v);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      const int c = c0 + k;
      if (c >= t.c_end) break;
      T* row = out + static_cast<int64_t>(c) * p.out_channel_stride;
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        if (!s.valid[j]) continue;
        float y[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) y[e] = (v[k][j][e] * scale[k]) * ss[j][e];
        store_slot<T, kVec, kVectorLoads>(row, p.out_pixel_stride, s.first[j], y);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

// Per pixel: d spatial logit = sum_c g * x * cs * ss (1 - ss), and its per-tile BatchNorm sums (with
// a channel split: per-split sum_c g * x * cs maps for spatial_backward_merge_kernel); per (b, c,
// tile): sum_p g * x * ss (the direct path of d cs).
template <typename T, int kVec, int kSlots, bool kVectorLoads>
__global__ void __launch_bounds__(kCbamThreads) bwd_spatial_kernel(const CbamParams p) {
  constexpr int kChunk = chunk_channels(kPairLoadFloats, kVec * kSlots);
  const WarpTile t = warp_tile(p);
  const T* __restrict__ x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  const T* __restrict__ g = static_cast<const T*>(p.grad) + t.b * p.grad_batch_stride;
  const float* __restrict__ cs = p.cs + static_cast<int64_t>(t.b) * p.channels;
  const float* z = p.pix + (static_cast<int64_t>(t.b) * kPixRows + kPixZ) * p.hw;
  const LaneSlots<kVec, kSlots> s = lane_slots<kVec, kSlots>(p, t);
  const SpatialNorm norm = spatial_norm(p);
  float ss[kSlots][kVec], acc[kSlots][kVec];
  load_map(z, s, ss);
#pragma unroll
  for (int j = 0; j < kSlots; ++j)
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      float zn;
      ss[j][e] = s.valid[j] ? spatial_scale(norm, ss[j][e], zn) : 0.0f;
      acc[j][e] = 0.0f;
    }
  if (t.tile_valid) {
    for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChunk) {
      float scale[kChunk];
      load_channel_values(cs, c0, t.c_end, scale);
      float v[kChunk][kSlots][kVec], gv[kChunk][kSlots][kVec];
      load_chunk<kChunk, T, kVec, kSlots, kVectorLoads>(x, p.x_channel_stride, p.x_pixel_stride, s, c0, t.c_end, v);
      load_chunk<kChunk, T, kVec, kSlots, kVectorLoads>(g, p.grad_channel_stride, p.grad_pixel_stride, s, c0, t.c_end, gv);
#pragma unroll
      for (int k = 0; k < kChunk; ++k) {
        const int c = c0 + k;
        if (c >= t.c_end) break;
        float direct = 0.0f;
#pragma unroll
        for (int j = 0; j < kSlots; ++j)
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            const float gx = gv[k][j][e] * v[k][j][e];
            acc[j][e] += gx * scale[k];
            direct += gx * ss[j][e];
          }
        direct = warp_sum(direct);
        if (t.lane == 0)
          p.dcs_parts[(static_cast<int64_t>(t.b) * p.channels + c) * p.num_pixel_tiles + t.tile] = direct;
      }
    }
  }
  if constexpr (kSlots == 1) {
    __shared__ float shared_acc[kCbamWarps][32 * kVec];
    if (p.channel_groups > 1) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) shared_acc[t.warp][e * 32 + t.lane] = acc[0][e];
      __syncthreads();
      if (t.local_group == 0) {
        for (int gi = 1; gi < p.channel_groups; ++gi) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc[0][e] += shared_acc[t.warp + gi][e * 32 + t.lane];
        }
      }
    }
  }
  if (t.local_group != 0 || !t.tile_valid) return;
  if (p.channel_splits > 1) {
    float* part = p.pixel_parts + (static_cast<int64_t>(t.split) * p.batch + t.b) * p.hw;
#pragma unroll
    for (int j = 0; j < kSlots; ++j) {
      if (!s.valid[j]) continue;
#pragma unroll
      for (int e = 0; e < kVec; ++e) part[s.first[j] + e] = acc[j][e];
    }
    return;
  }
  float* ds_row = p.bpix + (static_cast<int64_t>(t.b) * kBpixRows + kBpixDs) * p.hw;
  float sum_ds = 0.0f, sum_ds_zn = 0.0f;
#pragma unroll
  for (int j = 0; j < kSlots; ++j) {
    if (!s.valid[j]) continue;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int q = s.first[j] + e;
      const float ds = acc[j][e] * ss[j][e] * (1.0f - ss[j][e]);
      ds_row[q] = ds;
      sum_ds += ds;
      sum_ds_zn += ds * ((z[q] - norm.mean) * norm.invstd);
    }
  }
  sum_ds = warp_sum(sum_ds);
  sum_ds_zn = warp_sum(sum_ds_zn);
  if (t.lane == 0) {
    const int64_t part = (static_cast<int64_t>(t.b) * p.num_pixel_tiles + t.tile) * 2;
    p.bn_parts[part] = sum_ds;
    p.bn_parts[part + 1] = sum_ds_zn;
  }
}

// The max / mean-map paths of d cs per (b, c, tile): sum_p d_gated * x, where d_gated =
// d mean-map / C + [x * cs is the pixel's max over C] * d max-map / ties.
template <typename T, int kVec, int kSlots, bool kVectorLoads>
__global__ void __launch_bounds__(kCbamThreads) bwd_channel_kernel(const CbamParams p) {
  constexpr int kChunk = chunk_channels(kLoadFloats, kVec * kSlots);
  const WarpTile t = warp_tile(p);
  if (!t.tile_valid) return;
  const T* __restrict__ x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  const float* __restrict__ cs = p.cs + static_cast<int64_t>(t.b) * p.channels;
  const float* pix = p.pix + static_cast<int64_t>(t.b) * kPixRows * p.hw;
  const float* bpix = p.bpix + static_cast<int64_t>(t.b) * kBpixRows * p.hw;
  const LaneSlots<kVec, kSlots> s = lane_slots<kVec, kSlots>(p, t);
  float y_max[kSlots][kVec], d_max[kSlots][kVec], d_mean[kSlots][kVec];
  load_map(pix + kPixMax * p.hw, s, y_max);
  load_map(bpix + kBpixDMax * p.hw, s, d_max);
  load_map(bpix + kBpixDMean * p.hw, s, d_mean);
  for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChunk) {
    float scale[kChunk];
    load_channel_values(cs, c0, t.c_end, scale);
    float v[kChunk][kSlots][kVec];
    load_chunk<kChunk, T, kVec, kSlots, kVectorLoads>(x, p.x_channel_stride, p.x_pixel_stride, s, c0, t.c_end, v);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      const int c = c0 + k;
      if (c >= t.c_end) break;
      float acc = 0.0f;
#pragma unroll
      for (int j = 0; j < kSlots; ++j)
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float y = v[k][j][e] * scale[k];
          acc += (d_mean[j][e] + (y == y_max[j][e] ? d_max[j][e] : 0.0f)) * v[k][j][e];
        }
      acc = warp_sum(acc);
      if (t.lane == 0) p.dcs_parts2[(static_cast<int64_t>(t.b) * p.channels + c) * p.num_pixel_tiles + t.tile] = acc;
    }
  }
}

// dx = (g * ss + d mean-map + [max over C] d max-map) * cs + d avg / HW + [max over HW] d max / ties.
template <typename T, int kVec, int kSlots, bool kVectorLoads>
__global__ void __launch_bounds__(kCbamThreads) bwd_apply_kernel(const CbamParams p) {
  constexpr int kChunk = chunk_channels(kPairLoadFloats, kVec * kSlots);
  const WarpTile t = warp_tile(p);
  if (!t.tile_valid) return;
  const T* __restrict__ x = static_cast<const T*>(p.x) + t.b * p.x_batch_stride;
  const T* __restrict__ g = static_cast<const T*>(p.grad) + t.b * p.grad_batch_stride;
  T* __restrict__ dx = static_cast<T*>(p.out) + t.b * p.out_batch_stride;
  const int64_t bc = static_cast<int64_t>(t.b) * p.channels;
  const float* pix = p.pix + static_cast<int64_t>(t.b) * kPixRows * p.hw;
  const float* bpix = p.bpix + static_cast<int64_t>(t.b) * kBpixRows * p.hw;
  const float* __restrict__ cs = p.cs + bc;
  const float* __restrict__ x_max_row = p.chan + (static_cast<int64_t>(t.b) * kChanRows + kChanMax) * p.channels;
  const float* __restrict__ d_avg_row = p.dchan + bc * 2;
  const float* __restrict__ d_xmax_row = d_avg_row + p.channels;
  const LaneSlots<kVec, kSlots> s = lane_slots<kVec, kSlots>(p, t);
  float ss[kSlots][kVec], y_max[kSlots][kVec], d_max[kSlots][kVec], d_mean[kSlots][kVec];
  load_spatial_gate(p, pix + kPixZ * p.hw, s, ss);
  load_map(pix + kPixMax * p.hw, s, y_max);
  load_map(bpix + kBpixDMax * p.hw, s, d_max);
  load_map(bpix + kBpixDMean * p.hw, s, d_mean);
  for (int c0 = t.c_begin; c0 < t.c_end; c0 += kChunk) {
    float scale[kChunk], x_max[kChunk], d_avg[kChunk], d_xmax[kChunk];
    load_channel_values(cs, c0, t.c_end, scale);
    load_channel_values(x_max_row, c0, t.c_end, x_max);
    load_channel_values(d_avg_row, c0, t.c_end, d_avg);
    load_channel_values(d_xmax_row, c0, t.c_end, d_xmax);
    float v[kChunk][kSlots][kVec], gv[kChunk][kSlots][kVec];
    load_chunk<kChunk, T, kVec, kSlots, kVectorLoads>(x, p.x_channel_stride, p.x_pixel_stride, s, c0, t.c_end, v);
    load_chunk<kChunk, T, kVec, kSlots, kVectorLoads>(g, p.grad_channel_stride, p.grad_pixel_stride, s, c0, t.c_end, gv);
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      const int c = c0 + k;
      if (c >= t.c_end) break;
      T* row = dx + static_cast<int64_t>(c) * p.out_channel_stride;
#pragma unroll
      for (int j = 0; j < kSlots; ++j) {
        if (!s.valid[j]) continue;
        float grad_x[kVec];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float y = v[k][j][e] * scale[k];
          const float d_gated = gv[k][j][e] * ss[j][e] + d_mean[j][e] + (y == y_max[j][e] ? d_max[j][e] : 0.0f);
          grad_x[e] = d_gated * scale[k] + d_avg[k] + (v[k][j][e] == x_max[k] ? d_xmax[k] : 0.0f);
        }
        store_slot<T, kVec, kVectorLoads>(row, p.out_pixel_stride, s.first[j], grad_x);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// sequences
// ---------------------------------------------------------------------------------------------

inline dim3 x_pass_grid(const CbamParams& p) {
  const int tiles_per_block = kCbamWarps / p.channel_groups;
  return dim3(static_cast<unsigned>(cbam_ceil_div(p.num_pixel_tiles, tiles_per_block)), static_cast<unsigned>(p.batch),
              static_cast<unsigned>(p.channel_splits));
}

#define CBAM_RETURN_IF_ERROR(expr)                \
  do {                                            \
    const int cbam_status_ = (expr);              \
    if (cbam_status_ != 0) return cbam_status_;   \
  } while (0)

template <typename T, int kVec, int kSlots, bool kVectorLoads>
int forward_with(const CbamParams& p, cudaStream_t s) {
  const dim3 grid = x_pass_grid(p);
  pool_hw_kernel<T, kVec, kSlots, kVectorLoads><<<grid, kCbamThreads, 0, s>>>(p);
  CBAM_RETURN_IF_ERROR(static_cast<int>(cudaGetLastError()));
  CBAM_RETURN_IF_ERROR(cbam_launch_channel_gate(p, s));
  spatial_pool_kernel<T, kVec, kSlots, kVectorLoads><<<grid, kCbamThreads, 0, s>>>(p);
  CBAM_RETURN_IF_ERROR(static_cast<int>(cudaGetLastError()));
  if (p.channel_splits > 1) CBAM_RETURN_IF_ERROR(cbam_launch_spatial_pool_merge(p, s));
  CBAM_RETURN_IF_ERROR(cbam_launch_spatial_conv(p, s));
  CBAM_RETURN_IF_ERROR(cbam_launch_bn_stats(p, s));
  apply_kernel<T, kVec, kSlots, kVectorLoads><<<grid, kCbamThreads, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int kVec, int kSlots, bool kVectorLoads>
int backward_with(const CbamParams& p, cudaStream_t s) {
  const dim3 grid = x_pass_grid(p);
  bwd_spatial_kernel<T, kVec, kSlots, kVectorLoads><<<grid, kCbamThreads, 0, s>>>(p);
  CBAM_RETURN_IF_ERROR(static_cast<int>(cudaGetLastError()));
  if (p.channel_splits > 1) CBAM_RETURN_IF_ERROR(cbam_launch_spatial_backward_merge(p, s));
  CBAM_RETURN_IF_ERROR(cbam_launch_bn_backward(p, s));
  CBAM_RETURN_IF_ERROR(cbam_launch_spatial_conv_backward(p, s));
  bwd_channel_kernel<T, kVec, kSlots, kVectorLoads><<<grid, kCbamThreads, 0, s>>>(p);
  CBAM_RETURN_IF_ERROR(static_cast<int>(cudaGetLastError()));
  CBAM_RETURN_IF_ERROR(cbam_launch_channel_gate_backward(p, s));
  CBAM_RETURN_IF_ERROR(cbam_launch_param_grads(p, s));
  bwd_apply_kernel<T, kVec, kSlots, kVectorLoads><<<grid, kCbamThreads, 0, s>>>(p);
  return static_cast<int>(cudaGetLastError());
}

// The lane layout (pixels per slot, slots per lane, 16-byte loads or not) as template arguments:
// fixed-size register arrays, no dead slots.
template <typename T, template <typename, int, int, bool> class Sequence>
int dispatch_layout(const CbamParams& p, void* stream) {
  constexpr int kVec = kCbamVectorBytes / static_cast<int>(sizeof(T));
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  // channel groups merge through shared memory sized for one slot per lane
  if (p.pixels_per_lane != 1 && p.channel_groups != 1) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (p.vector_width == 1) {
    if (p.vector_loads) return static_cast<int>(cudaErrorInvalidConfiguration);
    return p.pixels_per_lane == 1 ? Sequence<T, 1, 1, false>::run(p, s) : Sequence<T, 1, 2, false>::run(p, s);
  }
  if (p.vector_width != kVec) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (p.vector_loads)
    return p.pixels_per_lane == 1 ? Sequence<T, kVec, 1, true>::run(p, s) : Sequence<T, kVec, 2, true>::run(p, s);
  return p.pixels_per_lane == 1 ? Sequence<T, kVec, 1, false>::run(p, s) : Sequence<T, kVec, 2, false>::run(p, s);
}

template <typename T, int kVec, int kSlots, bool kVectorLoads>
struct ForwardSequence {
  static int run(const CbamParams& p, cudaStream_t s) { return forward_with<T, kVec, kSlots, kVectorLoads>(p, s); }
};

template <typename T, int kVec, int kSlots, bool kVectorLoads>
struct BackwardSequence {
  static int run(const CbamParams& p, cudaStream_t s) { return backward_with<T, kVec, kSlots, kVectorLoads>(p, s); }
};

template <typename T>
int forward(const CbamParams& p, void* stream) {
  return dispatch_layout<T, ForwardSequence>(p, stream);
}

template <typename T>
int backward(const CbamParams& p, void* stream) {
  return dispatch_layout<T, BackwardSequence>(p, stream);
}

}  // namespace cbam
}  // namespace cuda
}  // namespace dermomamba
