// The small-shape CBAM path: the whole forward in one cooperative kernel, the whole backward in another
// (design, rule and predictions: benchmarks/notes/cbam.md, "Small-shape CUDA path").
//
// Why: at 16x512x12x16 the pass structure of cbam_passes.cuh is 16 kernels of 2-10 us each for 6 MB of
// x; the time is kernel boundaries and chains of dependent memory round trips, not bytes. Here a block
// owns one image's channel group (all pixels) and stages those channels of x in shared memory, so every
// reduction over H x W is inside one block; what crosses blocks (pooled values of all channels, per-pixel
// partials over channel groups, per-image BatchNorm sums) goes through small global buffers between
// grid-wide barriers (cooperative launch: every block is resident). Values that every block of an image
// needs (pooled maps, conv output, BatchNorm coefficients, hidden units) are recomputed by each block in
// the same fixed order, so they agree bit for bit without another barrier. No atomics: every sum has a
// fixed order and the results are bitwise reproducible.
//
// Data written by one block and read by another inside the same kernel is read with __ldcg (L2, not the
// SM's L1, which is not coherent across SMs); grid.sync() orders the writes before the reads.
#include <cooperative_groups.h>

#include <mutex>
#include <set>
#include <utility>

#include "cbam_passes.cuh"

namespace dermomamba {
namespace cuda {
namespace cbam_small {

namespace cg = cooperative_groups;
using cbam::block_sum;
using cbam::merge_max;
using cbam::sigmoid;
using cbam::warp_max_count;
using cbam::warp_sum;
using cbam::load_any;
using cbam::store_any;

constexpr int kThreads = kCbamSmallThreads;
constexpr int kWarps = kThreads / 32;
// Two resident blocks per SM where shared memory allows (64 registers a thread; also what ptxas picks
// for sm_90 unprompted, and it keeps sm_80 from squeezing a forward variant to 40 registers and spilling).
constexpr int kMinBlocksPerSM = 2;
// Independent global loads a thread keeps in flight in its strided loops.
constexpr int kUnroll = 8;

// Which image and channels this block owns.
struct Owner {
  int b, g, c_begin, own;
};

__device__ __forceinline__ Owner owner(const CbamParams& p) {
  Owner o;
  o.b = blockIdx.x / p.small_groups;
  o.g = blockIdx.x % p.small_groups;
  o.c_begin = min(p.channels, o.g * p.small_group_channels);
  o.own = min(p.channels, o.c_begin + p.small_group_channels) - o.c_begin;
  return o;
}

// Shared memory carved as cbam_small_layout says.
struct Smem {
  float* x;         // (own, HW) this block's channels of x, fp32
  float* grad;      // (own, HW) backward: the same channels of grad_out
  float* chan_avg;  // (C,) avg over HW of every channel of the image
  float* chan_max;  // (C,) max over HW
  float* d_logit;   // (C,) backward: gradient of every channel logit of the image
  float* hidden;    // (3, hidden): relu sums, d pre-activation of the avg and of the max pool
  float* own;       // (kCbamSmallOwnRows, own) per own channel
  float* own_weights;  // (own, hidden): forward mlp2_w rows, backward mlp1_w columns of own channels
  float* conv_w;    // (2, k, k)
  float* maps;      // (kCbamSmallMaps, HW)
  float* scratch;   // block reductions and broadcasts
};

__device__ __forceinline__ Smem carve(const CbamParams& p, float* base, bool backward) {
  const CbamSmallLayout l = cbam_small_layout(p.channels, p.hw, p.hidden, p.ksize, p.small_group_channels, backward);
  return Smem{base + l.x,      base + l.grad, base + l.chan_avg, base + l.chan_max,    base + l.d_logit,
              base + l.hidden, base + l.own,  base + l.own_weights, base + l.conv_w, base + l.maps,
              base + l.scratch};
}

// Rows of Smem::own and of Smem::maps.
constexpr int kOwnCs = 0, kOwnDirect = 1, kOwnDAvg = 2, kOwnDMax = 3, kOwnXMax = 4;
constexpr int kMapGate = 0, kMapZn = 1, kMapDz = 2, kMapMax = 3, kMapInvTies = 4, kMapDMax = 5, kMapDMean = 6,
              kMapMean = 7;

// The block's channels of one image of an x-sized tensor -> fp32 rows in shared memory.
template <typename T, bool kVec>
__device__ __forceinline__ void stage_rows(const T* __restrict__ image, int64_t channel_stride, int64_t pixel_stride,
                                           int c_begin, int own, int hw, float* __restrict__ dst) {
  if constexpr (kVec) {
    constexpr int kWidth = 16 / sizeof(T);
    const int per_row = hw / kWidth;  // kVec only when kWidth divides H * W
    const int items = own * per_row;
    // 4 x 16 bytes in flight per thread: more spills at the 64 registers ptxas gives 512-thread blocks
#pragma unroll 4
    for (int i = threadIdx.x; i < items; i += kThreads) {
      const int cl = i / per_row, q = (i % per_row) * kWidth;
      float v[kWidth];
      cbam::unpack<T>(__ldg(reinterpret_cast<const uint4*>(image + static_cast<int64_t>(c_begin + cl) * channel_stride + q)),
                      v);
#pragma unroll
      for (int e = 0; e < kWidth; ++e) dst[cl * hw + q + e] = v[e];
    }
  } else {
    const int items = own * hw;
#pragma unroll kUnroll
    for (int i = threadIdx.x; i < items; i += kThreads) {
      const int cl = i / hw, q = i % hw;
      dst[i] = to_float(image[static_cast<int64_t>(c_begin + cl) * channel_stride + static_cast<int64_t>(q) * pixel_stride]);
    }
  }
}

// Writes value(cl, q) for every own channel and pixel into one image of an x-sized output.
template <typename T, bool kVec, typename Value>
__device__ __forceinline__ void store_rows(T* __restrict__ image, int64_t channel_stride, int64_t pixel_stride,
                                           int c_begin, int own, int hw, const Value& value) {
  if constexpr (kVec) {
    constexpr int kWidth = 16 / sizeof(T);
    const int per_row = hw / kWidth;
    const int items = own * per_row;
#pragma unroll 2
    for (int i = threadIdx.x; i < items; i += kThreads) {
      const int cl = i / per_row, q = (i % per_row) * kWidth;
      float v[kWidth];
#pragma unroll
      for (int e = 0; e < kWidth; ++e) v[e] = value(cl, q + e);
      *reinterpret_cast<uint4*>(image + static_cast<int64_t>(c_begin + cl) * channel_stride + q) = cbam::pack<T>(v);
    }
  } else {
    const int items = own * hw;
#pragma unroll 4
    for (int i = threadIdx.x; i < items; i += kThreads) {
      const int cl = i / hw, q = i % hw;
      image[static_cast<int64_t>(c_begin + cl) * channel_stride + static_cast<int64_t>(q) * pixel_stride] =
          from_float<T>(value(cl, q));
    }
  }
}

// Hidden unit h of the channel MLP for image pools avg / max (all C channels in shared memory): the
// pre-activations W1[h] . avg and W1[h] . max, lanes striding the channels, then a butterfly (the order
// of cbam_kernels.cu's hidden_preactivations).
__device__ __forceinline__ void preactivations(const CbamParams& p, const Smem& s, int h, int lane, float& pre_avg,
                                               float& pre_max) {
  const int C = p.channels;
  pre_avg = 0.0f;
  pre_max = 0.0f;
#pragma unroll kUnroll
  for (int c = lane; c < C; c += 32) {
    const float w = load_any(p.mlp1_w, static_cast<int64_t>(h) * C + c);
    pre_avg += w * s.chan_avg[c];
    pre_max += w * s.chan_max[c];
  }
  pre_avg = warp_sum(pre_avg);
  pre_max = warp_sum(pre_max);
}

// Pooled avg / max over HW of every channel of image b (written by the forward's phase A) -> shared memory.
__device__ __forceinline__ void load_image_pools(const CbamParams& p, const Smem& s, int b, bool written_here) {
  const int C = p.channels;
  const float* chan = p.chan + static_cast<int64_t>(b) * cbam::kChanRows * C;
  for (int c = threadIdx.x; c < C; c += kThreads) {
    const float* avg = chan + cbam::kChanAvg * C + c;
    const float* max = chan + cbam::kChanMax * C + c;
    s.chan_avg[c] = written_here ? __ldcg(avg) : *avg;
    s.chan_max[c] = written_here ? __ldcg(max) : *max;
  }
}

// Taps of the 7x7 (k x k) conv around pixel (h, w): fn(neighbour pixel, tap index) for taps inside the image
// (zero padding contributes nothing).
template <typename Fn>
__device__ __forceinline__ void for_each_tap(int h, int w, int height, int width, int ksize, Fn fn) {
  const int r = ksize / 2;
  for (int dy = 0; dy < ksize; ++dy) {
    const int hh = h + dy - r;
    if (hh < 0 || hh >= height) continue;
    for (int dx = 0; dx < ksize; ++dx) {
      const int ww = w + dx - r;
      if (ww < 0 || ww >= width) continue;
      fn(hh * width + ww, dy * ksize + dx);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) forward_kernel(const CbamParams p) {
  extern __shared__ float shared[];
  cg::grid_group grid = cg::this_grid();
  const Smem s = carve(p, shared, /*backward=*/false);
  const Owner o = owner(p);
  const int C = p.channels, HW = p.hw, hidden = p.hidden, taps = p.ksize * p.ksize, G = p.small_groups;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* __restrict__ x = static_cast<const T*>(p.x) + o.b * p.x_batch_stride;
  float* cs_own = s.own + kOwnCs * p.small_group_channels;

  // A: per own channel, avg / max / ties over HW (a warp per channel, lanes striding the pixels). The conv
  // weights and the mlp2_w rows of own channels are fetched now, while x streams in, not after a barrier.
  for (int i = tid; i < 2 * taps; i += kThreads) s.conv_w[i] = load_any(p.conv_w, i);
  for (int i = tid; i < o.own * hidden; i += kThreads)
    s.own_weights[i] = load_any(p.mlp2_w, static_cast<int64_t>(o.c_begin) * hidden + i);
  stage_rows<T, kVec>(x, p.x_channel_stride, p.x_pixel_stride, o.c_begin, o.own, HW, s.x);
  __syncthreads();
  {
    float* chan = p.chan + static_cast<int64_t>(o.b) * cbam::kChanRows * C;
    for (int cl = warp; cl < o.own; cl += kWarps) {
      const float* row = s.x + cl * HW;
      float sum = 0.0f, m = -INFINITY, n = 0.0f;
      for (int q = lane; q < HW; q += 32) {
        sum += row[q];
        merge_max(m, n, row[q], 1.0f);
      }
      sum = warp_sum(sum);
      warp_max_count(m, n);
      if (lane == 0) {
        const int c = o.c_begin + cl;
        chan[cbam::kChanAvg * C + c] = sum / HW;
        chan[cbam::kChanMax * C + c] = m;
        chan[cbam::kChanInvTies * C + c] = 1.0f / fmaxf(n, 1.0f);
      }
    }
  }
  grid.sync();

  // B: hidden units from the pools of all C channels; cs of own channels; per pixel (max, ties, sum) of
  // x * cs over own channels -> this group's partial maps
  load_image_pools(p, s, o.b, true);
  __syncthreads();
  for (int h = warp; h < hidden; h += kWarps) {
    float pre_avg, pre_max;
    preactivations(p, s, h, lane, pre_avg, pre_max);
    if (lane == 0) {
      const float bias = load_any(p.mlp1_b, h);
      // mlp(avg) + mlp(max) = W2 (relu(pre_avg) + relu(pre_max)) + 2 b2: one product for both pools
      s.hidden[h] = fmaxf(pre_avg + bias, 0.0f) + fmaxf(pre_max + bias, 0.0f);
    }
  }
  __syncthreads();
  for (int cl = tid; cl < o.own; cl += kThreads) {
    const int c = o.c_begin + cl;
    float logit = 0.0f;
    for (int h = 0; h < hidden; ++h) logit += s.own_weights[cl * hidden + h] * s.hidden[h];
    const float scale = sigmoid(logit + 2.0f * load_any(p.mlp2_b, c));
    cs_own[cl] = scale;
    p.cs[static_cast<int64_t>(o.b) * C + c] = scale;
  }
  __syncthreads();
  {
    float* part = p.small_parts + (static_cast<int64_t>(o.g) * p.batch + o.b) * 3 * HW;
    for (int q = tid; q < HW; q += kThreads) {
      float m = -INFINITY, n = 0.0f, sum = 0.0f;
      for (int cl = 0; cl < o.own; ++cl) {
        const float y = s.x[cl * HW + q] * cs_own[cl];
        sum += y;
        merge_max(m, n, y, 1.0f);
      }
      part[q] = m;
      part[HW + q] = n;
      part[2 * HW + q] = sum;
    }
  }
  grid.sync();

  // C: the image's max / mean maps from the groups' partials (group order), 7x7 conv -> z (every block of
  // the image computes the same maps); group 0 writes pix and the image's (count, sum, squared deviations)
  float* map_max = s.maps + kMapMax * HW;
  float* map_mean = s.maps + kMapMean * HW;
  float* map_inv = s.maps + kMapInvTies * HW;
  float* map_z = s.maps + kMapZn * HW;
  float* map_gate = s.maps + kMapGate * HW;
  {
    const int64_t group_stride = static_cast<int64_t>(p.batch) * 3 * HW;
    const float* part = p.small_parts + static_cast<int64_t>(o.b) * 3 * HW;
    for (int q = tid; q < HW; q += kThreads) {
      float m = __ldcg(part + q), n = __ldcg(part + HW + q), sum = __ldcg(part + 2 * HW + q);
#pragma unroll 4
      for (int g = 1; g < G; ++g) {
        const float* next = part + g * group_stride;
        merge_max(m, n, __ldcg(next + q), __ldcg(next + HW + q));
        sum += __ldcg(next + 2 * HW + q);
      }
      map_max[q] = m;
      map_mean[q] = sum / C;
      map_inv[q] = 1.0f / fmaxf(n, 1.0f);
    }
  }
  __syncthreads();
  for (int q = tid; q < HW; q += kThreads) {
    float z = 0.0f;
    for_each_tap(q / p.width, q % p.width, p.height, p.width, p.ksize, [&](int nq, int tap) {
      z += s.conv_w[tap] * map_max[nq] + s.conv_w[taps + tap] * map_mean[nq];
    });
    map_z[q] = z;
  }
  __syncthreads();
  if (o.g == 0) {  // block-uniform
    float* pix = p.pix + static_cast<int64_t>(o.b) * cbam::kPixRows * HW;
    float sum = 0.0f;
    for (int q = tid; q < HW; q += kThreads) {
      pix[cbam::kPixMax * HW + q] = map_max[q];
      pix[cbam::kPixMean * HW + q] = map_mean[q];
      pix[cbam::kPixInvTies * HW + q] = map_inv[q];
      pix[cbam::kPixZ * HW + q] = map_z[q];
      sum += map_z[q];
    }
    sum = block_sum<kThreads>(sum, s.scratch);
    const float image_mean = sum / HW;
    float m2 = 0.0f;
    for (int q = tid; q < HW; q += kThreads) {
      const float d = map_z[q] - image_mean;
      m2 += d * d;
    }
    m2 = block_sum<kThreads>(m2, s.scratch);
    if (tid == 0) {
      float* image = p.small_image + static_cast<int64_t>(o.b) * 3;
      image[0] = static_cast<float>(HW);
      image[1] = sum;
      image[2] = m2;
    }
  }
  grid.sync();

  // D: BatchNorm statistics (the images' sums merged in batch order with Chan's formula, or the running
  // stats); out = x * cs * sigmoid(bn(z)) for own channels
  if (warp == 0) {  // lanes stride the images (their loads in flight at once), then a butterfly
    float mean, invstd, batch_var;
    if (p.use_batch_stats) {
      const float n = static_cast<float>(p.batch) * static_cast<float>(HW);
      float total = 0.0f;
      for (int b = lane; b < p.batch; b += 32) total += __ldcg(p.small_image + b * 3 + 1);
      mean = warp_sum(total) / n;
      float m2 = 0.0f;
      for (int b = lane; b < p.batch; b += 32) {
        const float* image = p.small_image + b * 3;
        const float count = __ldcg(image), shift = __ldcg(image + 1) / count - mean;
        m2 += __ldcg(image + 2) + count * shift * shift;
      }
      m2 = warp_sum(m2);
      invstd = 1.0f / sqrtf(m2 / n + p.eps);
      batch_var = m2 / (n - 1.0f);
    } else {
      mean = load_any(p.running_mean, 0);
      batch_var = load_any(p.running_var, 0);
      invstd = 1.0f / sqrtf(batch_var + p.eps);
    }
    if (lane == 0) {
      s.scratch[0] = mean;
      s.scratch[1] = invstd;
      if (blockIdx.x == 0) {
        p.stats[cbam::kStatsMean] = mean;
        p.stats[cbam::kStatsInvStd] = invstd;
        p.stats[cbam::kStatsBatchMean] = mean;
        p.stats[cbam::kStatsBatchVar] = batch_var;
      }
    }
  }
  __syncthreads();
  {
    const float mean = s.scratch[0], invstd = s.scratch[1];
    const float gamma = load_any(p.bn_weight, 0), beta = load_any(p.bn_bias, 0);
    for (int q = tid; q < HW; q += kThreads) map_gate[q] = sigmoid(((map_z[q] - mean) * invstd) * gamma + beta);
  }
  __syncthreads();
  store_rows<T, kVec>(static_cast<T*>(p.out) + o.b * p.out_batch_stride, p.out_channel_stride, p.out_pixel_stride,
                      o.c_begin, o.own, HW,
                      [&](int cl, int q) { return (s.x[cl * HW + q] * cs_own[cl]) * map_gate[q]; });
}

// ---------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) backward_kernel(const CbamParams p) {
  extern __shared__ float shared[];
  cg::grid_group grid = cg::this_grid();
  const Smem s = carve(p, shared, /*backward=*/true);
  const Owner o = owner(p);
  const int C = p.channels, HW = p.hw, hidden = p.hidden, taps = p.ksize * p.ksize, G = p.small_groups;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t bc = static_cast<int64_t>(o.b) * C;
  const T* __restrict__ x = static_cast<const T*>(p.x) + o.b * p.x_batch_stride;
  const T* __restrict__ grad = static_cast<const T*>(p.grad) + o.b * p.grad_batch_stride;
  const int own_stride = p.small_group_channels;
  float* cs_own = s.own + kOwnCs * own_stride;
  float* direct_own = s.own + kOwnDirect * own_stride;
  float* d_avg_own = s.own + kOwnDAvg * own_stride;
  float* d_xmax_own = s.own + kOwnDMax * own_stride;
  float* xmax_own = s.own + kOwnXMax * own_stride;
  float* map_gate = s.maps + kMapGate * HW;
  float* map_zn = s.maps + kMapZn * HW;
  float* map_dz = s.maps + kMapDz * HW;
  float* map_max = s.maps + kMapMax * HW;
  float* map_inv = s.maps + kMapInvTies * HW;
  float* map_dmax = s.maps + kMapDMax * HW;
  float* map_dmean = s.maps + kMapDMean * HW;
  float* map_mean = s.maps + kMapMean * HW;
  const float* chan = p.chan + static_cast<int64_t>(o.b) * cbam::kChanRows * C;
  const float* pix = p.pix + static_cast<int64_t>(o.b) * cbam::kPixRows * HW;

  // A: saved maps and own channels' values (and the mlp1_w columns of own channels, for phase D); per pixel
  // sum over own channels of g * x * cs -> this group's partial map; per own channel sum_p g * x * ss (the
  // direct path of d cs)
  for (int i = tid; i < 2 * taps; i += kThreads) s.conv_w[i] = load_any(p.conv_w, i);
  for (int i = tid; i < o.own * hidden; i += kThreads) {
    const int h = i / o.own, cl = i % o.own;  // consecutive threads read consecutive channels of a row of mlp1_w
    s.own_weights[cl * hidden + h] = load_any(p.mlp1_w, static_cast<int64_t>(h) * C + o.c_begin + cl);
  }
  for (int cl = tid; cl < o.own; cl += kThreads) {
    cs_own[cl] = p.cs[bc + o.c_begin + cl];
    xmax_own[cl] = chan[cbam::kChanMax * C + o.c_begin + cl];
  }
  {
    const float mean = p.stats[cbam::kStatsMean], invstd = p.stats[cbam::kStatsInvStd];
    const float gamma = load_any(p.bn_weight, 0), beta = load_any(p.bn_bias, 0);
    for (int q = tid; q < HW; q += kThreads) {
      const float zn = (pix[cbam::kPixZ * HW + q] - mean) * invstd;
      map_zn[q] = zn;
      map_gate[q] = sigmoid(zn * gamma + beta);
      map_max[q] = pix[cbam::kPixMax * HW + q];
      map_mean[q] = pix[cbam::kPixMean * HW + q];
      map_inv[q] = pix[cbam::kPixInvTies * HW + q];
    }
  }
  stage_rows<T, kVec>(x, p.x_channel_stride, p.x_pixel_stride, o.c_begin, o.own, HW, s.x);
  stage_rows<T, kVec>(grad, p.grad_channel_stride, p.grad_pixel_stride, o.c_begin, o.own, HW, s.grad);
  __syncthreads();
  {
    float* part = p.small_parts + (static_cast<int64_t>(o.g) * p.batch + o.b) * HW;
    for (int q = tid; q < HW; q += kThreads) {
      float acc = 0.0f;
      for (int cl = 0; cl < o.own; ++cl) acc += (s.grad[cl * HW + q] * s.x[cl * HW + q]) * cs_own[cl];
      part[q] = acc;
    }
    for (int cl = warp; cl < o.own; cl += kWarps) {
      float direct = 0.0f;
      for (int q = lane; q < HW; q += 32) direct += (s.grad[cl * HW + q] * s.x[cl * HW + q]) * map_gate[q];
      direct = warp_sum(direct);
      if (lane == 0) direct_own[cl] = direct;
    }
  }
  grid.sync();

  // B: d spatial logit per pixel from the groups' partials (group order); group 0: the image's sums for
  // the BatchNorm backward
  {
    const int64_t group_stride = static_cast<int64_t>(p.batch) * HW;
    const float* part = p.small_parts + static_cast<int64_t>(o.b) * HW;
    float sum_ds = 0.0f, sum_ds_zn = 0.0f;
    for (int q = tid; q < HW; q += kThreads) {
      float acc = __ldcg(part + q);
#pragma unroll 4
      for (int g = 1; g < G; ++g) acc += __ldcg(part + g * group_stride + q);
      const float ss = map_gate[q];
      const float ds = acc * ss * (1.0f - ss);
      map_dz[q] = ds;
      sum_ds += ds;
      sum_ds_zn += ds * map_zn[q];
    }
    if (o.g == 0) {  // block-uniform
      sum_ds = block_sum<kThreads>(sum_ds, s.scratch);
      sum_ds_zn = block_sum<kThreads>(sum_ds_zn, s.scratch);
      if (tid == 0) {
        p.small_image[static_cast<int64_t>(o.b) * 2] = sum_ds;
        p.small_image[static_cast<int64_t>(o.b) * 2 + 1] = sum_ds_zn;
      }
    }
  }
  grid.sync();

  // C: BatchNorm backward coefficients (the images' sums in batch order), dz, the transposed conv -> d max-map
  // / ties and d mean-map / C; group 0: the image's conv-weight gradient; per own channel d cs -> d logit
  if (warp == 0) {
    float sum_ds = 0.0f, sum_ds_zn = 0.0f;
    for (int b = lane; b < p.batch; b += 32) {
      sum_ds += __ldcg(p.small_image + b * 2);
      sum_ds_zn += __ldcg(p.small_image + b * 2 + 1);
    }
    sum_ds = warp_sum(sum_ds);
    sum_ds_zn = warp_sum(sum_ds_zn);
    if (lane == 0) {
      const float n = static_cast<float>(p.batch) * static_cast<float>(HW);
      s.scratch[0] = load_any(p.bn_weight, 0) * p.stats[cbam::kStatsInvStd];
      s.scratch[1] = p.use_batch_stats ? sum_ds / n : 0.0f;
      s.scratch[2] = p.use_batch_stats ? sum_ds_zn / n : 0.0f;
      if (blockIdx.x == 0) {
        store_any(p.d_bn_weight, 0, sum_ds_zn);
        store_any(p.d_bn_bias, 0, sum_ds);
      }
    }
  }
  __syncthreads();
  {
    const float coef_a = s.scratch[0], coef_b = s.scratch[1], coef_c = s.scratch[2];
    for (int q = tid; q < HW; q += kThreads) map_dz[q] = coef_a * (map_dz[q] - coef_b - map_zn[q] * coef_c);
  }
  __syncthreads();
  for (int q = tid; q < HW; q += kThreads) {
    // output pixel o = q - (tap - r) read pixel q through tap: the transposed conv mirrors the taps
    const int h = q / p.width, w = q % p.width, r = p.ksize / 2;
    float d_max = 0.0f, d_mean = 0.0f;
    for (int dy = 0; dy < p.ksize; ++dy) {
      const int hh = h + r - dy;
      if (hh < 0 || hh >= p.height) continue;
      for (int dx = 0; dx < p.ksize; ++dx) {
        const int ww = w + r - dx;
        if (ww < 0 || ww >= p.width) continue;
        const float dz = map_dz[hh * p.width + ww];
        d_max += s.conv_w[dy * p.ksize + dx] * dz;
        d_mean += s.conv_w[taps + dy * p.ksize + dx] * dz;
      }
    }
    map_dmax[q] = d_max * map_inv[q];
    map_dmean[q] = d_mean / C;
  }
  if (o.g == 0) {  // block-uniform: a warp per conv tap, sum_p dz(p) * map(p + tap - r)
    for (int tap = warp; tap < 2 * taps; tap += kWarps) {
      const int k = tap % taps, dy = k / p.ksize, dx = k % p.ksize, r = p.ksize / 2;
      const float* map = tap < taps ? map_max : map_mean;
      float acc = 0.0f;
      for (int q = lane; q < HW; q += 32) {
        const int hh = q / p.width + dy - r, ww = q % p.width + dx - r;
        if (hh >= 0 && hh < p.height && ww >= 0 && ww < p.width) acc += map_dz[q] * map[hh * p.width + ww];
      }
      acc = warp_sum(acc);
      if (lane == 0) p.conv_wparts[static_cast<int64_t>(tap) * p.batch + o.b] = acc;
    }
  }
  __syncthreads();
  for (int cl = warp; cl < o.own; cl += kWarps) {
    const float scale = cs_own[cl];
    const float* row = s.x + cl * HW;
    float acc = 0.0f;
    for (int q = lane; q < HW; q += 32) {
      const float y = row[q] * scale;
      acc += (map_dmean[q] + (y == map_max[q] ? map_dmax[q] : 0.0f)) * row[q];
    }
    acc = warp_sum(acc);
    if (lane == 0) {
      const float d_cs = direct_own[cl] + acc;
      p.d_logit[bc + o.c_begin + cl] = d_cs * scale * (1.0f - scale);
    }
  }
  grid.sync();

  // D: hidden-unit gradients from the d logits of all C channels (pre-activations recomputed); per own
  // channel the gradients of its avg and max pools; dx of own channels. Group 0 keeps the image's
  // hidden-unit values for the parameter gradients.
  load_image_pools(p, s, o.b, false);
  for (int c = tid; c < C; c += kThreads) s.d_logit[c] = __ldcg(p.d_logit + bc + c);
  __syncthreads();
  float* hid_sum = s.hidden;
  float* hid_d_avg = s.hidden + hidden;
  float* hid_d_max = s.hidden + 2 * hidden;
  for (int h = warp; h < hidden; h += kWarps) {
    float pre_avg, pre_max;
    preactivations(p, s, h, lane, pre_avg, pre_max);
    float d_hidden = 0.0f;
#pragma unroll kUnroll
    for (int c = lane; c < C; c += 32) d_hidden += load_any(p.mlp2_w, static_cast<int64_t>(c) * hidden + h) * s.d_logit[c];
    d_hidden = warp_sum(d_hidden);
    if (lane == 0) {
      const float bias = load_any(p.mlp1_b, h);
      pre_avg += bias;
      pre_max += bias;
      hid_sum[h] = fmaxf(pre_avg, 0.0f) + fmaxf(pre_max, 0.0f);
      hid_d_avg[h] = pre_avg > 0.0f ? d_hidden : 0.0f;
      hid_d_max[h] = pre_max > 0.0f ? d_hidden : 0.0f;
    }
  }
  __syncthreads();
  if (o.g == 0) {
    float* hid = p.hidden_buf + static_cast<int64_t>(o.b) * cbam::kHidRows * hidden;
    for (int i = tid; i < cbam::kHidRows * hidden; i += kThreads) hid[i] = s.hidden[i];
  }
  for (int cl = tid; cl < o.own; cl += kThreads) {
    const int c = o.c_begin + cl;
    float d_avg = 0.0f, d_max = 0.0f;
    for (int h = 0; h < hidden; ++h) {
      const float w = s.own_weights[cl * hidden + h];
      d_avg += w * hid_d_avg[h];
      d_max += w * hid_d_max[h];
    }
    d_avg_own[cl] = d_avg / HW;
    d_xmax_own[cl] = d_max * chan[cbam::kChanInvTies * C + c];
  }
  __syncthreads();
  store_rows<T, kVec>(static_cast<T*>(p.out) + o.b * p.out_batch_stride, p.out_channel_stride, p.out_pixel_stride,
                      o.c_begin, o.own, HW, [&](int cl, int q) {
                        const float v = s.x[cl * HW + q], gv = s.grad[cl * HW + q], scale = cs_own[cl];
                        const float y = v * scale;
                        const float d_gated = gv * map_gate[q] + map_dmean[q] + (y == map_max[q] ? map_dmax[q] : 0.0f);
                        return d_gated * scale + d_avg_own[cl] + (v == xmax_own[cl] ? d_xmax_own[cl] : 0.0f);
                      });
  grid.sync();

  // E: parameter gradients summed over the batch in batch order, one element per thread of the grid
  const int64_t weights = static_cast<int64_t>(C) * hidden;
  const int64_t items = 2 * taps + 2 * weights + C + hidden;
  const int64_t grid_threads = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + tid; item < items; item += grid_threads) {
    int64_t i = item;
    if (i < 2 * taps) {  // d conv_w
      float acc = 0.0f;
#pragma unroll kUnroll
      for (int b = 0; b < p.batch; ++b) acc += __ldcg(p.conv_wparts + i * p.batch + b);
      store_any(p.d_conv_w, i, acc);
      continue;
    }
    i -= 2 * taps;
    if (i < weights) {  // d mlp2_w (C, hidden)
      const int c = static_cast<int>(i / hidden), h = static_cast<int>(i % hidden);
      float acc = 0.0f;
#pragma unroll kUnroll
      for (int b = 0; b < p.batch; ++b)
        acc += __ldcg(p.d_logit + static_cast<int64_t>(b) * C + c) *
               __ldcg(p.hidden_buf + (static_cast<int64_t>(b) * cbam::kHidRows + cbam::kHidSum) * hidden + h);
      store_any(p.d_mlp2_w, i, acc);
      continue;
    }
    i -= weights;
    if (i < weights) {  // d mlp1_w (hidden, C)
      const int h = static_cast<int>(i / C), c = static_cast<int>(i % C);
      float acc = 0.0f;
#pragma unroll kUnroll
      for (int b = 0; b < p.batch; ++b) {
        const float* hid = p.hidden_buf + static_cast<int64_t>(b) * cbam::kHidRows * hidden;
        const float* pools = p.chan + static_cast<int64_t>(b) * cbam::kChanRows * C;
        acc += __ldcg(hid + cbam::kHidDPreAvg * hidden + h) * pools[cbam::kChanAvg * C + c] +
               __ldcg(hid + cbam::kHidDPreMax * hidden + h) * pools[cbam::kChanMax * C + c];
      }
      store_any(p.d_mlp1_w, i, acc);
      continue;
    }
    i -= weights;
    if (i < C) {  // d mlp2_b: b2 enters both pools' MLP outputs
      float acc = 0.0f;
#pragma unroll kUnroll
      for (int b = 0; b < p.batch; ++b) acc += __ldcg(p.d_logit + static_cast<int64_t>(b) * C + i);
      store_any(p.d_mlp2_b, i, 2.0f * acc);
      continue;
    }
    i -= C;
    {  // d mlp1_b
      float acc = 0.0f;
#pragma unroll kUnroll
      for (int b = 0; b < p.batch; ++b) {
        const float* hid = p.hidden_buf + static_cast<int64_t>(b) * cbam::kHidRows * hidden;
        acc += __ldcg(hid + cbam::kHidDPreAvg * hidden + i) + __ldcg(hid + cbam::kHidDPreMax * hidden + i);
      }
      store_any(p.d_mlp1_b, i, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// launch
// ---------------------------------------------------------------------------------------------

template <bool kForward, typename T, bool kVec>
const void* kernel_of() {
  if constexpr (kForward) return reinterpret_cast<const void*>(&forward_kernel<T, kVec>);
  else return reinterpret_cast<const void*>(&backward_kernel<T, kVec>);
}

template <bool kForward>
const void* pick_kernel(int x_kind, bool vector_loads) {
  switch (x_kind) {
    case kCbamFloat16:
      return vector_loads ? kernel_of<kForward, __half, true>() : kernel_of<kForward, __half, false>();
    case kCbamBFloat16:
      return vector_loads ? kernel_of<kForward, __nv_bfloat16, true>() : kernel_of<kForward, __nv_bfloat16, false>();
    default:
      return vector_loads ? kernel_of<kForward, float, true>() : kernel_of<kForward, float, false>();
  }
}

// Lets `kernel` use `bytes` of dynamic shared memory (above 48 KB an opt-in is needed). The opt-in is made
// once per kernel and device, at the device's maximum: later calls, e.g. during CUDA-graph capture, make no
// attribute call at all.
int allow_shared(const void* kernel, int64_t bytes) {
  constexpr int64_t kDefaultDynamicShared = 48 * 1024;
  if (bytes <= kDefaultDynamicShared) return 0;
  int device = 0, optin = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return static_cast<int>(status);
  if (bytes > optin) return static_cast<int>(cudaErrorInvalidValue);
  static std::mutex mutex;
  static std::set<std::pair<int, const void*>> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  if (allowed.count({device, kernel})) return 0;
  status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (status != cudaSuccess) return static_cast<int>(status);
  allowed.insert({device, kernel});
  return 0;
}

int64_t shared_bytes(const CbamParams& p, bool backward) {
  return static_cast<int64_t>(
             cbam_small_layout(p.channels, p.hw, p.hidden, p.ksize, p.small_group_channels, backward).total) *
         static_cast<int64_t>(sizeof(float));
}

template <bool kForward>
int launch(const CbamParams& p, int x_kind, void* stream) {
  const void* kernel = pick_kernel<kForward>(x_kind, p.vector_loads);
  const int64_t bytes = shared_bytes(p, /*backward=*/!kForward);
  const int status = allow_shared(kernel, bytes);
  if (status != 0) return status;
  CbamParams params = p;
  void* args[] = {&params};
  const dim3 grid(static_cast<unsigned>(p.batch * p.small_groups)), block(kThreads);
  const cudaError_t launched = cudaLaunchCooperativeKernel(kernel, grid, block, args, static_cast<size_t>(bytes),
                                                           static_cast<cudaStream_t>(stream));
  if (launched != cudaSuccess) cudaGetLastError();  // reported to the caller; not left for torch's next check
  return static_cast<int>(launched);
}

}  // namespace cbam_small

int cbam_small_forward(const CbamParams& p, int x_kind, void* stream) {
  return cbam_small::launch<true>(p, x_kind, stream);
}

int cbam_small_backward(const CbamParams& p, int x_kind, void* stream) {
  return cbam_small::launch<false>(p, x_kind, stream);
}

int cbam_small_blocks_per_sm(int device, int x_kind, bool vector_loads, int64_t shared_bytes) {
  int cooperative = 0, optin = 0;
  if (cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device) != cudaSuccess || !cooperative)
    return 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      shared_bytes > optin)
    return 0;
  int least = 0;
  const void* kernels[2] = {cbam_small::pick_kernel<true>(x_kind, vector_loads),
                            cbam_small::pick_kernel<false>(x_kind, vector_loads)};
  for (int i = 0; i < 2; ++i) {
    if (cbam_small::allow_shared(kernels[i], shared_bytes) != 0) return 0;
    int blocks = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernels[i], cbam_small::kThreads,
                                                      static_cast<size_t>(shared_bytes)) != cudaSuccess)
      return 0;
    least = i == 0 ? blocks : (blocks < least ? blocks : least);
  }
  return least;
}

}  // namespace cuda
}  // namespace dermomamba
