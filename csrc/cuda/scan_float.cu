// Selective-scan kernels with B and C in float; one file per dtype so that nvcc builds them in parallel.
#include "scan_kernels.cuh"

namespace dermomamba {
namespace cuda {

int scan_forward_float(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_forward<float>(params, multiaxial, stream);
}

int scan_backward_float(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_backward<float>(params, multiaxial, stream);
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

}  // namespace cuda
}  // namespace dermomamba
