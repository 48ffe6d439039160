// Selective-scan kernels with B and C in __nv_bfloat16; one file per dtype so that nvcc builds them in parallel.
#include "scan_kernels.cuh"

namespace dermomamba {
namespace cuda {

int scan_forward_bfloat16(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_forward<__nv_bfloat16>(params, multiaxial, stream);
}

int scan_backward_bfloat16(const ScanParams& params, bool multiaxial, void* stream) {
  return scan_backward<__nv_bfloat16>(params, multiaxial, stream);
}

}  // namespace cuda
}  // namespace dermomamba
