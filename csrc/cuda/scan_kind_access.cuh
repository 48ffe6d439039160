// Run-time-dtype reads and writes shared by the scan kernels (warp form in scan_kernels.cuh, lane forms in
// scan_lane_kernels.cuh / scan_lane_bwd_kernels.cuh). Tensors other than B and C are read and written in
// their own dtype, chosen at run time: the branch is uniform across the grid and these accesses sit outside
// the per-state loop.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "dtype_convert.cuh"
#include "scan_params.h"

namespace dermomamba {
namespace cuda {

__device__ __forceinline__ float load_kind(const void* base, int64_t index, int kind) {
  if (kind == kFloat32) return static_cast<const float*>(base)[index];
  if (kind == kFloat16) return __half2float(static_cast<const __half*>(base)[index]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
}

__device__ __forceinline__ void store_kind(void* base, int64_t index, int kind, float value) {
  if (kind == kFloat32) {
    static_cast<float*>(base)[index] = value;
  } else if (kind == kFloat16) {
    static_cast<__half*>(base)[index] = __float2half_rn(value);
  } else {
    static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(value);
  }
}

// One (state, position)'s dB and dC, summed over a block's channels, written as p.grad_bc_mode says
// (scan_params.h): stored in B's / C's dtype, added atomically into fp32, or stored into the block's fp32
// partial row. ``index`` addresses the destination the mode implies.
template <typename bc_t>
__device__ __forceinline__ void store_grad_bc(const ScanParams& p, int64_t index, float sum_B, float sum_C) {
  if (p.grad_bc_mode == kGradBCDirect) {
    static_cast<bc_t*>(p.dB)[index] = from_float<bc_t>(sum_B);
    static_cast<bc_t*>(p.dC)[index] = from_float<bc_t>(sum_C);
  } else if (p.grad_bc_mode == kGradBCAtomic) {
    atomicAdd(static_cast<float*>(p.dB) + index, sum_B);
    atomicAdd(static_cast<float*>(p.dC) + index, sum_C);
  } else {
    static_cast<float*>(p.dB)[index] = sum_B;
    static_cast<float*>(p.dC)[index] = sum_C;
  }
}

}  // namespace cuda
}  // namespace dermomamba
