// Selective-scan kernels with B and C in __half; one file per dtype so that nvcc builds them in parallel.
#include "scan_kernels.cuh"

namespace dermomamba {
namespace cuda {

int scan_forward_half(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_forward<__half>(params, multiaxial, stream);
}

int scan_backward_half(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_backward<__half>(params, multiaxial, stream);
}

}  // namespace cuda
}  // namespace dermomamba
