// The dtype-independent CBAM stages: everything that reads only the small fp32 maps (channel gate
// and its backward, 7x7 conv and its backward, BatchNorm statistics, parameter gradients). The
// passes over x are in cbam_passes.cuh; the order of the stages is in its forward / backward.
#include "cbam_common.cuh"

namespace dermomamba {
namespace cuda {
namespace cbam {

constexpr int kGateThreads = 256;
constexpr int kConvThreads = kCbamConvTileRows * kCbamConvTileCols;
constexpr int kConvHaloRows = kCbamConvTileRows + kCbamMaxKernelSize - 1;
constexpr int kConvHaloCols = kCbamConvTileCols + kCbamMaxKernelSize - 1;
constexpr int kMaxTaps = 2 * kCbamMaxKernelSize * kCbamMaxKernelSize;
constexpr int kParamGradThreads = 256;

// Lanes that share one channel's partials: enough that each walks at most kPartialsPerLane of them,
// so that both few tiles and many channels (small images, C = 512: thread per channel) and many
// tiles and few channels (large images, C = 32: a warp per channel) keep the block busy.
constexpr int kPartialsPerLane = 8;

__device__ __forceinline__ int lanes_per_channel(int tiles) {
  int lanes = 1;
  while (lanes < 32 && lanes * kPartialsPerLane < tiles) lanes *= 2;
  return lanes;
}

// Sum over aligned groups of `lanes` lanes (a power of two); every lane of a group gets the result.
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

__device__ __forceinline__ void group_max_count(float& m, float& n, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset >>= 1) {
    const float other_m = __shfl_xor_sync(kFullMask, m, offset);
    const float other_n = __shfl_xor_sync(kFullMask, n, offset);
    merge_max(m, n, other_m, other_n);
  }
}

// The channel gate as three grids, each with one thread, group of lanes or warp per output element
// (a block per image left 16 blocks on the GPU and walked the MLP serially: 28 us at C = 512).
// (1) Pools of each (b, c) from the per-tile partials: `lanes` lanes per (b, c), each summing every
// lanes-th tile, then a butterfly in the group (fixed order).
__global__ void __launch_bounds__(kGateThreads) gate_pool_kernel(const CbamParams p) {
  const int C = p.channels, tiles = p.num_pixel_tiles;
  const int64_t items = static_cast<int64_t>(p.batch) * C;
  const int64_t part_stride = items * tiles;
  const int lanes = lanes_per_channel(tiles);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = thread / lanes;  // b * C + c
  const int sub = static_cast<int>(thread % lanes);
  float s = 0.0f, m = -INFINITY, n = 0.0f;
  if (item < items) {
    const float* parts = p.pool_parts + item * tiles;
#pragma unroll 4
    for (int i = sub; i < tiles; i += lanes) {
      s += parts[i];
      merge_max(m, n, parts[part_stride + i], parts[2 * part_stride + i]);
    }
  }
  // every lane of the warp takes part (groups are aligned within warps; blocks are whole warps)
  s = group_sum(s, lanes);
  group_max_count(m, n, lanes);
  if (item < items && sub == 0) {
    const int64_t b = item / C, c = item % C;
    float* chan = p.chan + b * kChanRows * C;
    chan[kChanAvg * C + c] = s / p.hw;
    chan[kChanMax * C + c] = m;
    chan[kChanInvTies * C + c] = 1.0f / fmaxf(n, 1.0f);
  }
}

// Pre-activations of hidden unit h for image b: mlp1_w[h] . avg and mlp1_w[h] . max (warp butterflies).
__device__ __forceinline__ void hidden_preactivations(const CbamParams& p, int64_t b, int h, int lane, float& pre_avg,
                                                      float& pre_max) {
  const int C = p.channels;
  const float* chan = p.chan + b * kChanRows * C;
  pre_avg = 0.0f;
  pre_max = 0.0f;
#pragma unroll 4
  for (int c = lane; c < C; c += 32) {
    const float w = load_any(p.mlp1_w, static_cast<int64_t>(h) * C + c);
    pre_avg += w * chan[kChanAvg * C + c];
    pre_max += w * chan[kChanMax * C + c];
  }
  pre_avg = warp_sum(pre_avg);
  pre_max = warp_sum(pre_max);
}

// (2) One warp per (b, hidden unit): relu(pre_avg + b1) + relu(pre_max + b1).
__global__ void __launch_bounds__(kGateThreads) gate_hidden_kernel(const CbamParams p) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= static_cast<int64_t>(p.batch) * p.hidden) return;  // whole warp
  const int64_t b = warp / p.hidden;
  const int h = static_cast<int>(warp % p.hidden);
  float pre_avg, pre_max;
  hidden_preactivations(p, b, h, lane, pre_avg, pre_max);
  if (lane == 0) {
    const float bias = load_any(p.mlp1_b, h);
    // mlp(avg) + mlp(max) = W2 (relu(pre_avg) + relu(pre_max)) + 2 b2: one product for both pools
    p.hidden_buf[warp] = fmaxf(pre_avg + bias, 0.0f) + fmaxf(pre_max + bias, 0.0f);
  }
}

// (3) One thread per (b, c): cs = sigmoid(W2 hidden + 2 b2).
__global__ void __launch_bounds__(kGateThreads) gate_scale_kernel(const CbamParams p) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= static_cast<int64_t>(p.batch) * p.channels) return;
  const int64_t b = item / p.channels, c = item % p.channels;
  const float* hidden_sum = p.hidden_buf + b * p.hidden;
  float logit = 0.0f;
#pragma unroll 8
  for (int h = 0; h < p.hidden; ++h) logit += load_any(p.mlp2_w, c * p.hidden + h) * hidden_sum[h];
  p.cs[item] = sigmoid(logit + 2.0f * load_any(p.mlp2_b, c));
}

// With a channel split: per pixel, the splits' (max, count, sum) over their channels merged in
// split order -> the max, mean and 1 / ties maps.
__global__ void __launch_bounds__(kGateThreads) spatial_pool_merge_kernel(const CbamParams p) {
  const int64_t hw = p.hw;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // b * HW + q
  if (item >= p.batch * hw) return;
  const int64_t b = item / hw, q = item % hw;
  const int64_t split_stride = static_cast<int64_t>(p.batch) * 3 * hw;
  const float* part = p.pixel_parts + b * 3 * hw + q;
  float m = part[0], n = part[hw], s = part[2 * hw];
#pragma unroll 4
  for (int k = 1; k < p.channel_splits; ++k) {
    const float* next = part + k * split_stride;
    merge_max(m, n, next[0], next[hw]);
    s += next[2 * hw];
  }
  float* pix = p.pix + b * kPixRows * hw + q;
  pix[kPixMax * hw] = m;
  pix[kPixMean * hw] = s / p.channels;
  pix[kPixInvTies * hw] = 1.0f / fmaxf(n, 1.0f);
}

// With a channel split: per pixel, d spatial logit from the splits' sum_c g * x * cs (in split
// order); per (b, pixel tile) its BatchNorm sums, as bwd_spatial_kernel has them without a split.
// A block per (b, tile), a thread per pixel: the split loads of a pixel are independent (unrolled),
// so a block waits for a few memory round trips, not one per split.
__global__ void __launch_bounds__(kGateThreads) spatial_backward_merge_kernel(const CbamParams p) {
  __shared__ float scratch[33];
  const int64_t hw = p.hw;
  const int64_t b = blockIdx.y;
  const int tile = blockIdx.x;
  const int64_t split_stride = static_cast<int64_t>(p.batch) * hw;
  const float* z = p.pix + (b * kPixRows + kPixZ) * hw;
  float* ds_row = p.bpix + (b * kBpixRows + kBpixDs) * hw;
  const float mean = p.stats[kStatsMean], invstd = p.stats[kStatsInvStd];
  const float gamma = load_any(p.bn_weight, 0), beta = load_any(p.bn_bias, 0);
  float sum_ds = 0.0f, sum_ds_zn = 0.0f;
  for (int i = threadIdx.x; i < p.tile_pixels; i += blockDim.x) {
    const int64_t q = static_cast<int64_t>(tile) * p.tile_pixels + i;
    if (q >= hw) break;
    const float* part = p.pixel_parts + b * hw + q;
    float acc = part[0];
#pragma unroll 4
    for (int k = 1; k < p.channel_splits; ++k) acc += part[k * split_stride];
    const float zn = (z[q] - mean) * invstd;
    const float ss = sigmoid(zn * gamma + beta);
    const float ds = acc * ss * (1.0f - ss);
    ds_row[q] = ds;
    sum_ds += ds;
    sum_ds_zn += ds * zn;
  }
  // every thread of the block reaches both sums (no early exit above)
  sum_ds = block_sum<kGateThreads>(sum_ds, scratch);
  sum_ds_zn = block_sum<kGateThreads>(sum_ds_zn, scratch);
  if (threadIdx.x == 0) {
    const int64_t part = (b * p.num_pixel_tiles + tile) * 2;
    p.bn_parts[part] = sum_ds;
    p.bn_parts[part + 1] = sum_ds_zn;
  }
}

// The halo-padded tile of one map row (kPix*) around this block's output tile, zero outside the image.
__device__ __forceinline__ void load_halo(const float* map, int height, int width, int row0, int col0, int radius,
                                          int rows, int cols, float (*tile)[kConvHaloCols]) {
  for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int r = i / cols, c = i % cols;
    const int h = row0 - radius + r, w = col0 - radius + c;
    tile[r][c] = (h >= 0 && h < height && w >= 0 && w < width) ? map[h * width + w] : 0.0f;
  }
}

struct ConvTile {
  int b, tile, row0, col0, radius, rows, cols, h, w;
  bool valid;
};

__device__ __forceinline__ ConvTile conv_tile(const CbamParams& p) {
  ConvTile t;
  t.b = blockIdx.y;
  t.tile = blockIdx.x;
  t.row0 = (t.tile / p.conv_tiles_x) * kCbamConvTileRows;
  t.col0 = (t.tile % p.conv_tiles_x) * kCbamConvTileCols;
  t.radius = p.ksize / 2;
  t.rows = kCbamConvTileRows + p.ksize - 1;
  t.cols = kCbamConvTileCols + p.ksize - 1;
  t.h = t.row0 + threadIdx.x / kCbamConvTileCols;
  t.w = t.col0 + threadIdx.x % kCbamConvTileCols;
  t.valid = t.h < p.height && t.w < p.width;
  return t;
}

// z = conv([max map, mean map]) over one tile; per tile (count, sum, squared deviations about the
// tile's mean) of z, merged later with Chan's formula (no E[z^2] - E[z]^2 cancellation).
__global__ void __launch_bounds__(kConvThreads) spatial_conv_kernel(const CbamParams p) {
  __shared__ float tile_max[kConvHaloRows][kConvHaloCols];
  __shared__ float tile_mean[kConvHaloRows][kConvHaloCols];
  __shared__ float weights[kMaxTaps];
  __shared__ float scratch[33];
  const ConvTile t = conv_tile(p);
  const int K = p.ksize, taps = K * K;
  float* pix = p.pix + static_cast<int64_t>(t.b) * kPixRows * p.hw;
  load_halo(pix + kPixMax * p.hw, p.height, p.width, t.row0, t.col0, t.radius, t.rows, t.cols, tile_max);
  load_halo(pix + kPixMean * p.hw, p.height, p.width, t.row0, t.col0, t.radius, t.rows, t.cols, tile_mean);
  for (int i = threadIdx.x; i < 2 * taps; i += blockDim.x) weights[i] = load_any(p.conv_w, i);
  __syncthreads();
  const int ly = threadIdx.x / kCbamConvTileCols, lx = threadIdx.x % kCbamConvTileCols;
  float z = 0.0f;
  for (int dy = 0; dy < K; ++dy)
    for (int dx = 0; dx < K; ++dx)
      z += weights[dy * K + dx] * tile_max[ly + dy][lx + dx] + weights[taps + dy * K + dx] * tile_mean[ly + dy][lx + dx];
  if (t.valid) pix[kPixZ * p.hw + t.h * p.width + t.w] = z;
  const float count = block_sum<kConvThreads>(t.valid ? 1.0f : 0.0f, scratch);
  const float sum = block_sum<kConvThreads>(t.valid ? z : 0.0f, scratch);
  const float deviation = t.valid ? z - sum / count : 0.0f;
  const float m2 = block_sum<kConvThreads>(deviation * deviation, scratch);
  if (threadIdx.x == 0) {
    float* part = p.conv_parts + (static_cast<int64_t>(t.b) * p.num_conv_tiles + t.tile) * 3;
    part[0] = count;
    part[1] = sum;
    part[2] = m2;
  }
}

// Batch mean and variance of z (training) or the running stats (eval) -> stats.
__global__ void __launch_bounds__(kCbamReduceThreads) bn_stats_kernel(const CbamParams p) {
  __shared__ float scratch[33];
  float* stats = p.stats;
  if (!p.use_batch_stats) {
    if (threadIdx.x == 0) {
      const float mean = load_any(p.running_mean, 0), var = load_any(p.running_var, 0);
      stats[kStatsMean] = mean;
      stats[kStatsInvStd] = 1.0f / sqrtf(var + p.eps);
      stats[kStatsBatchMean] = mean;
      stats[kStatsBatchVar] = var;
    }
    return;
  }
  const int parts = p.batch * p.num_conv_tiles;
  const float n = static_cast<float>(p.batch) * static_cast<float>(p.hw);
  float s = 0.0f;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) s += p.conv_parts[i * 3 + 1];
  const float mean = block_sum<kCbamReduceThreads>(s, scratch) / n;
  float m2 = 0.0f;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) {
    const float* part = p.conv_parts + i * 3;
    const float shift = part[1] / part[0] - mean;
    m2 += part[2] + part[0] * shift * shift;
  }
  m2 = block_sum<kCbamReduceThreads>(m2, scratch);
  if (threadIdx.x == 0) {
    stats[kStatsMean] = mean;
    stats[kStatsInvStd] = 1.0f / sqrtf(m2 / n + p.eps);
    stats[kStatsBatchMean] = mean;
    stats[kStatsBatchVar] = m2 / (n - 1.0f);
  }
}

// BatchNorm backward reductions: dz = gamma * invstd * (ds - mean(ds) - zn * mean(ds * zn)) with
// batch statistics; the two means vanish when the running statistics normalise.
__global__ void __launch_bounds__(kCbamReduceThreads) bn_backward_kernel(const CbamParams p) {
  __shared__ float scratch[33];
  const int parts = p.batch * p.num_pixel_tiles;
  float sum_ds = 0.0f, sum_ds_zn = 0.0f;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) {
    sum_ds += p.bn_parts[i * 2];
    sum_ds_zn += p.bn_parts[i * 2 + 1];
  }
  sum_ds = block_sum<kCbamReduceThreads>(sum_ds, scratch);
  sum_ds_zn = block_sum<kCbamReduceThreads>(sum_ds_zn, scratch);
  if (threadIdx.x == 0) {
    const float n = static_cast<float>(p.batch) * static_cast<float>(p.hw);
    p.coef[0] = load_any(p.bn_weight, 0) * p.stats[kStatsInvStd];
    p.coef[1] = p.use_batch_stats ? sum_ds / n : 0.0f;
    p.coef[2] = p.use_batch_stats ? sum_ds_zn / n : 0.0f;
    store_any(p.d_bn_weight, 0, sum_ds_zn);
    store_any(p.d_bn_bias, 0, sum_ds);
  }
}

// Transposed conv of dz -> d max-map / ties and d mean-map / C per pixel; per tile and tap the
// conv-weight gradient sum_p dz(p) * map(p + tap).
__global__ void __launch_bounds__(kConvThreads) spatial_conv_backward_kernel(const CbamParams p) {
  __shared__ float tile_dz[kConvHaloRows][kConvHaloCols];
  __shared__ float tile_max[kConvHaloRows][kConvHaloCols];
  __shared__ float tile_mean[kConvHaloRows][kConvHaloCols];
  __shared__ float weights[kMaxTaps];
  const ConvTile t = conv_tile(p);
  const int K = p.ksize, taps = K * K;
  const float* pix = p.pix + static_cast<int64_t>(t.b) * kPixRows * p.hw;
  float* bpix = p.bpix + static_cast<int64_t>(t.b) * kBpixRows * p.hw;
  const float mean = p.stats[kStatsMean], invstd = p.stats[kStatsInvStd];
  const float coef_a = p.coef[0], coef_b = p.coef[1], coef_c = p.coef[2];
  for (int i = threadIdx.x; i < t.rows * t.cols; i += blockDim.x) {
    const int r = i / t.cols, c = i % t.cols;
    const int h = t.row0 - t.radius + r, w = t.col0 - t.radius + c;
    float dz = 0.0f;
    if (h >= 0 && h < p.height && w >= 0 && w < p.width) {
      const int q = h * p.width + w;
      dz = coef_a * (bpix[kBpixDs * p.hw + q] - coef_b - (pix[kPixZ * p.hw + q] - mean) * invstd * coef_c);
    }
    tile_dz[r][c] = dz;
  }
  load_halo(pix + kPixMax * p.hw, p.height, p.width, t.row0, t.col0, t.radius, t.rows, t.cols, tile_max);
  load_halo(pix + kPixMean * p.hw, p.height, p.width, t.row0, t.col0, t.radius, t.rows, t.cols, tile_mean);
  for (int i = threadIdx.x; i < 2 * taps; i += blockDim.x) weights[i] = load_any(p.conv_w, i);
  __syncthreads();
  const int ly = threadIdx.x / kCbamConvTileCols, lx = threadIdx.x % kCbamConvTileCols;
  const int r = t.radius;
  // output pixel q = this pixel - (dy - r, dx - r) read this pixel through tap (dy, dx)
  float d_max = 0.0f, d_mean = 0.0f;
  for (int dy = 0; dy < K; ++dy) {
    for (int dx = 0; dx < K; ++dx) {
      const float dz = tile_dz[ly + 2 * r - dy][lx + 2 * r - dx];
      d_max += weights[dy * K + dx] * dz;
      d_mean += weights[taps + dy * K + dx] * dz;
    }
  }
  if (t.valid) {
    const int q = t.h * p.width + t.w;
    bpix[kBpixDMax * p.hw + q] = d_max * pix[kPixInvTies * p.hw + q];
    bpix[kBpixDMean * p.hw + q] = d_mean / p.channels;
  }
  // Weight gradient: (tap, way) threads, each way summing every ways-th row of the tile, the ways then
  // added in order (7x7: two ways, 196 of the 256 threads busy instead of 98).
  const int rows_in = min(kCbamConvTileRows, p.height - t.row0), cols_in = min(kCbamConvTileCols, p.width - t.col0);
  const int64_t num_parts = static_cast<int64_t>(p.batch) * p.num_conv_tiles;
  const int weight_taps = 2 * taps;
  const int ways = max(1, min(kCbamConvTileRows, kConvThreads / weight_taps));
  __shared__ float way_sums[kConvThreads];
  for (int tap0 = 0; tap0 < weight_taps; tap0 += kConvThreads / ways) {
    const int slot = tap0 + static_cast<int>(threadIdx.x) % (kConvThreads / ways);
    const int way = static_cast<int>(threadIdx.x) / (kConvThreads / ways);
    float acc = 0.0f;
    if (slot < weight_taps && way < ways) {
      const int k = slot % taps, dy = k / K, dx = k % K;
      float(*map)[kConvHaloCols] = slot < taps ? tile_max : tile_mean;
      for (int y = way; y < rows_in; y += ways)
        for (int x = 0; x < cols_in; ++x) acc += tile_dz[y + r][x + r] * map[y + dy][x + dx];
    }
    way_sums[threadIdx.x] = acc;
    __syncthreads();
    if (way == 0 && slot < weight_taps) {
      float total = acc;
      for (int w = 1; w < ways; ++w) total += way_sums[threadIdx.x + w * (kConvThreads / ways)];
      p.conv_wparts[slot * num_parts + static_cast<int64_t>(t.b) * p.num_conv_tiles + t.tile] = total;
    }
    __syncthreads();
  }
}

// Channel-gate backward as two grids (plus the per-(b, c) pool gradients in param_grads_kernel):
// (1) d cs of each (b, c) from both partial buffers (tile order, `lanes` lanes per (b, c)) -> d logits.
__global__ void __launch_bounds__(kGateThreads) gate_backward_logit_kernel(const CbamParams p) {
  const int C = p.channels, tiles = p.num_pixel_tiles;
  const int64_t items = static_cast<int64_t>(p.batch) * C;
  const int lanes = lanes_per_channel(tiles);
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = thread / lanes;
  const int sub = static_cast<int>(thread % lanes);
  float d_cs = 0.0f;
  if (item < items) {
    const float* direct = p.dcs_parts + item * tiles;
    const float* maps = p.dcs_parts2 + item * tiles;
#pragma unroll 4
    for (int i = sub; i < tiles; i += lanes) d_cs += direct[i] + maps[i];
  }
  d_cs = group_sum(d_cs, lanes);
  if (item < items && sub == 0) {
    const float scale = p.cs[item];
    p.d_logit[item] = d_cs * scale * (1.0f - scale);
  }
}

// (2) One warp per (b, hidden unit): the pre-activations recomputed (a (hidden,) product is cheaper
// than saving them), d hidden = W2[:, h] . d logit[b], through the two relus.
__global__ void __launch_bounds__(kGateThreads) gate_backward_hidden_kernel(const CbamParams p) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= static_cast<int64_t>(p.batch) * p.hidden) return;  // whole warp
  const int C = p.channels, hidden = p.hidden;
  const int64_t b = warp / hidden;
  const int h = static_cast<int>(warp % hidden);
  float pre_avg, pre_max;
  hidden_preactivations(p, b, h, lane, pre_avg, pre_max);
  const float* d_logit = p.d_logit + b * C;
  float d_hidden = 0.0f;
#pragma unroll 4
  for (int c = lane; c < C; c += 32) d_hidden += load_any(p.mlp2_w, static_cast<int64_t>(c) * hidden + h) * d_logit[c];
  d_hidden = warp_sum(d_hidden);
  if (lane == 0) {
    float* hid = p.hidden_buf + b * kHidRows * hidden;
    const float bias = load_any(p.mlp1_b, h);
    pre_avg += bias;
    pre_max += bias;
    hid[kHidSum * hidden + h] = fmaxf(pre_avg, 0.0f) + fmaxf(pre_max, 0.0f);
    hid[kHidDPreAvg * hidden + h] = pre_avg > 0.0f ? d_hidden : 0.0f;
    hid[kHidDPreMax * hidden + h] = pre_max > 0.0f ? d_hidden : 0.0f;
  }
}

// Parameter gradients summed over the batch (MLP) and over the conv tiles (conv weight): the first
// 2 k^2 blocks reduce one conv tap each, the rest give one MLP gradient element per thread, then one
// (b, c) pool gradient per thread (they need the same hidden-unit gradients).
__global__ void __launch_bounds__(kParamGradThreads) param_grads_kernel(const CbamParams p) {
  __shared__ float scratch[33];
  const int taps = 2 * p.ksize * p.ksize;
  if (static_cast<int>(blockIdx.x) < taps) {
    const int tap = blockIdx.x;
    const int64_t num_parts = static_cast<int64_t>(p.batch) * p.num_conv_tiles;
    const float* parts = p.conv_wparts + tap * num_parts;
    float s = 0.0f;
#pragma unroll 4
    for (int64_t i = threadIdx.x; i < num_parts; i += blockDim.x) s += parts[i];
    s = block_sum<kParamGradThreads>(s, scratch);
    if (threadIdx.x == 0) store_any(p.d_conv_w, tap, s);
    return;
  }
  const int C = p.channels, hidden = p.hidden;
  const int64_t weights = static_cast<int64_t>(C) * hidden;
  int64_t item = static_cast<int64_t>(blockIdx.x - taps) * blockDim.x + threadIdx.x;
  if (item < weights) {  // d mlp2_w (C, hidden)
    const int c = static_cast<int>(item / hidden), h = static_cast<int>(item % hidden);
    float acc = 0.0f;
#pragma unroll 4
    for (int b = 0; b < p.batch; ++b)
      acc += p.d_logit[static_cast<int64_t>(b) * C + c] * p.hidden_buf[(static_cast<int64_t>(b) * kHidRows + kHidSum) * hidden + h];
    store_any(p.d_mlp2_w, item, acc);
    return;
  }
  item -= weights;
  if (item < weights) {  // d mlp1_w (hidden, C)
    const int h = static_cast<int>(item / C), c = static_cast<int>(item % C);
    float acc = 0.0f;
#pragma unroll 4
    for (int b = 0; b < p.batch; ++b) {
      const float* hid = p.hidden_buf + static_cast<int64_t>(b) * kHidRows * hidden;
      const float* chan = p.chan + static_cast<int64_t>(b) * kChanRows * C;
      acc += hid[kHidDPreAvg * hidden + h] * chan[kChanAvg * C + c] + hid[kHidDPreMax * hidden + h] * chan[kChanMax * C + c];
    }
    store_any(p.d_mlp1_w, item, acc);
    return;
  }
  item -= weights;
  if (item < C) {  // d mlp2_b: b2 enters both pools' MLP outputs
    float acc = 0.0f;
    for (int b = 0; b < p.batch; ++b) acc += p.d_logit[static_cast<int64_t>(b) * C + item];
    store_any(p.d_mlp2_b, item, 2.0f * acc);
    return;
  }
  item -= C;
  if (item < hidden) {  // d mlp1_b
    float acc = 0.0f;
    for (int b = 0; b < p.batch; ++b) {
      const float* hid = p.hidden_buf + static_cast<int64_t>(b) * kHidRows * hidden;
      acc += hid[kHidDPreAvg * hidden + item] + hid[kHidDPreMax * hidden + item];
    }
    store_any(p.d_mlp1_b, item, acc);
    return;
  }
  item -= hidden;
  if (item < static_cast<int64_t>(p.batch) * C) {  // per element of x: d avg / HW everywhere, d max / ties at the maxima
    const int64_t b = item / C, c = item % C;
    const float* hid = p.hidden_buf + b * kHidRows * hidden;
    float d_avg = 0.0f, d_max = 0.0f;
#pragma unroll 8
    for (int h = 0; h < hidden; ++h) {
      const float w = load_any(p.mlp1_w, static_cast<int64_t>(h) * C + c);
      d_avg += w * hid[kHidDPreAvg * hidden + h];
      d_max += w * hid[kHidDPreMax * hidden + h];
    }
    const float* chan = p.chan + b * kChanRows * C;
    p.dchan[b * 2 * C + c] = d_avg / p.hw;
    p.dchan[b * 2 * C + C + c] = d_max * chan[kChanInvTies * C + c];
  }
}

__global__ void running_stats_kernel(CbamOutTensor running_mean, CbamOutTensor running_var, const float* stats,
                                     float momentum) {
  // fp32 arithmetic and one rounding to the buffers' dtype, as BatchNorm does
  const CbamTensor mean_in{running_mean.data, running_mean.kind}, var_in{running_var.data, running_var.kind};
  const float mean = load_any(mean_in, 0), var = load_any(var_in, 0);
  store_any(running_mean, 0, (1.0f - momentum) * mean + momentum * stats[kStatsBatchMean]);
  store_any(running_var, 0, (1.0f - momentum) * var + momentum * stats[kStatsBatchVar]);
}

}  // namespace cbam

namespace {
int last_error() { return static_cast<int>(cudaGetLastError()); }
cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }
}  // namespace

namespace {
unsigned blocks_for(int64_t threads, int per_block) { return static_cast<unsigned>(cbam_ceil_div(threads, per_block)); }

// Threads of a grid with `lanes_per_channel(tiles)` lanes for every (b, c).
unsigned channel_group_blocks(const CbamParams& p) {
  int lanes = 1;
  while (lanes < 32 && lanes * cbam::kPartialsPerLane < p.num_pixel_tiles) lanes *= 2;
  return blocks_for(static_cast<int64_t>(p.batch) * p.channels * lanes, cbam::kGateThreads);
}
}  // namespace

int cbam_launch_channel_gate(const CbamParams& p, void* stream) {
  const int64_t items = static_cast<int64_t>(p.batch) * p.channels;
  cbam::gate_pool_kernel<<<channel_group_blocks(p), cbam::kGateThreads, 0, as_stream(stream)>>>(p);
  const int status = last_error();
  if (status != 0) return status;
  cbam::gate_hidden_kernel<<<blocks_for(static_cast<int64_t>(p.batch) * p.hidden * 32, cbam::kGateThreads),
                             cbam::kGateThreads, 0, as_stream(stream)>>>(p);
  const int status2 = last_error();
  if (status2 != 0) return status2;
  cbam::gate_scale_kernel<<<blocks_for(items, cbam::kGateThreads), cbam::kGateThreads, 0, as_stream(stream)>>>(p);
  return last_error();
}

int cbam_launch_spatial_pool_merge(const CbamParams& p, void* stream) {
  cbam::spatial_pool_merge_kernel<<<blocks_for(static_cast<int64_t>(p.batch) * p.hw, cbam::kGateThreads),
                                    cbam::kGateThreads, 0, as_stream(stream)>>>(p);
  return last_error();
}

int cbam_launch_spatial_backward_merge(const CbamParams& p, void* stream) {
  const dim3 grid(p.num_pixel_tiles, p.batch);
  cbam::spatial_backward_merge_kernel<<<grid, cbam::kGateThreads, 0, as_stream(stream)>>>(p);
  return last_error();
}

int cbam_launch_spatial_conv(const CbamParams& p, void* stream) {
  const dim3 grid(p.num_conv_tiles, p.batch);
  cbam::spatial_conv_kernel<<<grid, cbam::kConvThreads, 0, as_stream(stream)>>>(p);
  return last_error();
}

int cbam_launch_bn_stats(const CbamParams& p, void* stream) {
  cbam::bn_stats_kernel<<<1, kCbamReduceThreads, 0, as_stream(stream)>>>(p);
  return last_error();
}

int cbam_launch_bn_backward(const CbamParams& p, void* stream) {
  cbam::bn_backward_kernel<<<1, kCbamReduceThreads, 0, as_stream(stream)>>>(p);
  return last_error();
}

int cbam_launch_spatial_conv_backward(const CbamParams& p, void* stream) {
  const dim3 grid(p.num_conv_tiles, p.batch);
  cbam::spatial_conv_backward_kernel<<<grid, cbam::kConvThreads, 0, as_stream(stream)>>>(p);
  return last_error();
}

int cbam_launch_channel_gate_backward(const CbamParams& p, void* stream) {
  cbam::gate_backward_logit_kernel<<<channel_group_blocks(p), cbam::kGateThreads, 0, as_stream(stream)>>>(p);
  const int status = last_error();
  if (status != 0) return status;
  cbam::gate_backward_hidden_kernel<<<blocks_for(static_cast<int64_t>(p.batch) * p.hidden * 32, cbam::kGateThreads),
                                      cbam::kGateThreads, 0, as_stream(stream)>>>(p);
  return last_error();
}

int cbam_launch_param_grads(const CbamParams& p, void* stream) {
  const int64_t items = 2 * static_cast<int64_t>(p.channels) * p.hidden + p.channels + p.hidden +
                        static_cast<int64_t>(p.batch) * p.channels;
  const int blocks = 2 * p.ksize * p.ksize + cbam_ceil_div(items, cbam::kParamGradThreads);
  cbam::param_grads_kernel<<<blocks, cbam::kParamGradThreads, 0, as_stream(stream)>>>(p);
  return last_error();
}

int cbam_update_running_stats(CbamOutTensor running_mean, CbamOutTensor running_var, const float* stats,
                              float momentum, void* stream) {
  cbam::running_stats_kernel<<<1, 1, 0, as_stream(stream)>>>(running_mean, running_var, stats, momentum);
  return last_error();
}

int cbam_multiprocessor_count(int device) {
  // asked once per device: the attribute query costs more than a small launch
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {0};
  if (device >= 0 && device < kMaxDevices && cached[device] > 0) return cached[device];
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) count = 0;
  if (device >= 0 && device < kMaxDevices) cached[device] = count;
  return count;
}

const char* cbam_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace dermomamba
