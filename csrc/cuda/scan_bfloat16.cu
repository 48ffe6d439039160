// Selective-scan kernels with B and C in __nv_bfloat16; one file per dtype so that nvcc builds them in parallel.
#include "scan_kernels.cuh"
#include "scan_lane_kernels.cuh"
#include "scan_lane_bwd_kernels.cuh"
#include "scan_staged_kernels.cuh"
#include "scan_staged_bwd_kernels.cuh"
#include "scan_regs_fwd_kernels.cuh"
#include "scan_regs_bwd_kernels.cuh"
#include "scan_flat_kernels.cuh"

namespace dermomamba {
namespace cuda {

int scan_forward_bfloat16(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_forward<__nv_bfloat16>(params, multiaxial, stream);
}

int scan_backward_bfloat16(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_backward<__nv_bfloat16>(params, multiaxial, stream);
}

// The lane forms of the multiaxial forward (scan_lane_kernels.cuh; selected by
// DERMOMAMBA_SCAN_FWD_KERNEL=lane / lane4 in selective_scan_cuda.cpp).
int scan_forward_multiaxial_lane_bfloat16(const ScanParams& params, int states_per_lane, void* stream) {
  return scan_forward_multiaxial_lane<__nv_bfloat16>(params, states_per_lane, stream);
}

// The lane form of the multiaxial backward (scan_lane_bwd_kernels.cuh; selected by
// DERMOMAMBA_SCAN_BWD_KERNEL=lane in selective_scan_cuda.cpp).
int scan_backward_multiaxial_lane_bfloat16(const ScanParams& params, void* stream) {
  return scan_backward_multiaxial_lane<__nv_bfloat16>(params, stream);
}

// The staged multiaxial forward (scan v4, scan_staged_kernels.cuh; selected by
// DERMOMAMBA_SCAN_FWD_KERNEL=staged in selective_scan_cuda.cpp).
int scan_forward_multiaxial_staged_bfloat16(const ScanParams& params, void* stream) {
  return scan_forward_multiaxial_staged<__nv_bfloat16>(params, stream);
}

// The staged multiaxial backward (scan v4, scan_staged_bwd_kernels.cuh; selected by
// DERMOMAMBA_SCAN_BWD_KERNEL=staged in selective_scan_cuda.cpp).
int scan_backward_multiaxial_staged_bfloat16(const ScanParams& params, void* stream) {
  return scan_backward_multiaxial_staged<__nv_bfloat16>(params, stream);
}

// The "regs" multiaxial forward and backward (scan v5, scan_regs_fwd_kernels.cuh / scan_regs_bwd_kernels.cuh;
// selected by DERMOMAMBA_SCAN_FWD_KERNEL / DERMOMAMBA_SCAN_BWD_KERNEL=regs in selective_scan_cuda.cpp).
int scan_forward_multiaxial_regs_bfloat16(const ScanParams& params, void* stream) {
  return scan_forward_multiaxial_regs<__nv_bfloat16>(params, stream);
}

int scan_backward_multiaxial_regs_bfloat16(const ScanParams& params, void* stream) {
  return scan_backward_multiaxial_regs<__nv_bfloat16>(params, stream);
}

// The "flat" multiaxial forward (scan v6, scan_flat_kernels.cuh; selected by DERMOMAMBA_SCAN_FWD_KERNEL=flat in
// selective_scan_cuda.cpp).
int scan_forward_multiaxial_flat_bfloat16(const ScanParams& params, void* stream) {
  return scan_forward_multiaxial_flat<__nv_bfloat16>(params, stream);
}

}  // namespace cuda
}  // namespace dermomamba
