// Device helpers shared by the CBAM kernels (cbam_kernels.cu and the per-dtype cbam_*.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cbam_params.h"
#include "dtype_convert.cuh"

namespace dermomamba {
namespace cuda {
namespace cbam {

constexpr unsigned kFullMask = 0xffffffffu;
// Layout of the saved maps (rows of pix, chan, bpix, dchan, hidden_buf in the backward).
constexpr int kPixMax = 0, kPixMean = 1, kPixInvTies = 2, kPixZ = 3, kPixRows = 4;
constexpr int kChanAvg = 0, kChanMax = 1, kChanInvTies = 2, kChanRows = 3;
constexpr int kBpixDs = 0, kBpixDMax = 1, kBpixDMean = 2, kBpixRows = 3;
constexpr int kStatsMean = 0, kStatsInvStd = 1, kStatsBatchMean = 2, kStatsBatchVar = 3;
constexpr int kHidSum = 0, kHidDPreAvg = 1, kHidDPreMax = 2, kHidRows = 3;

__device__ __forceinline__ float load_any(CbamTensor t, int64_t i) {
  switch (t.kind) {
    case kCbamFloat16: return __half2float(static_cast<const __half*>(t.data)[i]);
    case kCbamBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(t.data)[i]);
    case kCbamFloat64: return static_cast<float>(static_cast<const double*>(t.data)[i]);
    default: return static_cast<const float*>(t.data)[i];
  }
}

__device__ __forceinline__ void store_any(CbamOutTensor t, int64_t i, float v) {
  switch (t.kind) {
    case kCbamFloat16: static_cast<__half*>(t.data)[i] = __float2half_rn(v); break;
    case kCbamBFloat16: static_cast<__nv_bfloat16*>(t.data)[i] = __float2bfloat16_rn(v); break;
    case kCbamFloat64: static_cast<double*>(t.data)[i] = static_cast<double>(v); break;
    default: static_cast<float*>(t.data)[i] = v;
  }
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

// Butterfly reductions: every lane ends with the same value, summed in the same order each run.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// (max, number of elements equal to it) merged with another such pair.
__device__ __forceinline__ void merge_max(float& m, float& n, float other_m, float other_n) {
  const float merged = fmaxf(m, other_m);
  n = (m == merged ? n : 0.0f) + (other_m == merged ? other_n : 0.0f);
  m = merged;
}

__device__ __forceinline__ void warp_max_count(float& m, float& n) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_m = __shfl_xor_sync(kFullMask, m, offset);
    const float other_n = __shfl_xor_sync(kFullMask, n, offset);
    merge_max(m, n, other_m, other_n);
  }
}

// Sum over a block of kThreads threads (a multiple of 32, at most 1024); `scratch` holds 32 floats.
// Every thread gets the result; scratch is free again on return.
template <int kThreads>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < kWarps ? scratch[lane] : 0.0f;
    w = warp_sum(w);
    if (lane == 0) scratch[kWarps < 32 ? kWarps : 0] = w;
  }
  __syncthreads();
  const float total = scratch[kWarps < 32 ? kWarps : 0];
  __syncthreads();
  return total;
}

}  // namespace cbam
}  // namespace cuda
}  // namespace dermomamba
