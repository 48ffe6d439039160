// Selective-scan kernels with B and C in float; one file per dtype so that nvcc builds them in parallel.
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

int scan_forward_float(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_forward<float>(params, multiaxial, stream);
}

int scan_backward_float(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_backward<float>(params, multiaxial, stream);
}

// The lane forms of the multiaxial forward (scan_lane_kernels.cuh; selected by
// DERMOMAMBA_SCAN_FWD_KERNEL=lane / lane4 in selective_scan_cuda.cpp).
int scan_forward_multiaxial_lane_float(const ScanParams& params, int states_per_lane, void* stream) {
  return scan_forward_multiaxial_lane<float>(params, states_per_lane, stream);
}

// The lane form of the multiaxial backward (scan_lane_bwd_kernels.cuh; selected by
// DERMOMAMBA_SCAN_BWD_KERNEL=lane in selective_scan_cuda.cpp).
int scan_backward_multiaxial_lane_float(const ScanParams& params, void* stream) {
  return scan_backward_multiaxial_lane<float>(params, stream);
}

// The staged multiaxial forward (scan v4, scan_staged_kernels.cuh; selected by
// DERMOMAMBA_SCAN_FWD_KERNEL=staged in selective_scan_cuda.cpp).
int scan_forward_multiaxial_staged_float(const ScanParams& params, void* stream) {
  return scan_forward_multiaxial_staged<float>(params, stream);
}

// The staged multiaxial backward (scan v4, scan_staged_bwd_kernels.cuh; selected by
// DERMOMAMBA_SCAN_BWD_KERNEL=staged in selective_scan_cuda.cpp).
int scan_backward_multiaxial_staged_float(const ScanParams& params, void* stream) {
  return scan_backward_multiaxial_staged<float>(params, stream);
}

// The "regs" multiaxial forward and backward (scan v5, scan_regs_fwd_kernels.cuh / scan_regs_bwd_kernels.cuh;
// selected by DERMOMAMBA_SCAN_FWD_KERNEL / DERMOMAMBA_SCAN_BWD_KERNEL=regs in selective_scan_cuda.cpp).
int scan_forward_multiaxial_regs_float(const ScanParams& params, void* stream) {
  return scan_forward_multiaxial_regs<float>(params, stream);
}

int scan_backward_multiaxial_regs_float(const ScanParams& params, void* stream) {
  return scan_backward_multiaxial_regs<float>(params, stream);
}

}  // namespace cuda
}  // namespace dermomamba

namespace dermomamba {
namespace cuda {

int device_multiprocessor_count(int device) {
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
  return count;
}

const char* cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

// The "flat" multiaxial forward (scan v6, scan_flat_kernels.cuh; selected by DERMOMAMBA_SCAN_FWD_KERNEL=flat in
// selective_scan_cuda.cpp).
int scan_forward_multiaxial_flat_float(const ScanParams& params, void* stream) {
  return scan_forward_multiaxial_flat<float>(params, stream);
}

}  // namespace cuda
}  // namespace dermomamba
