// The CBAM passes over x for x in half; one file per dtype so that nvcc builds them in parallel.
#include "cbam_passes.cuh"

namespace dermomamba {
namespace cuda {

int cbam_forward_half(const CbamParams& p, void* stream) { return cbam::forward<__half>(p, stream); }

int cbam_backward_half(const CbamParams& p, void* stream) { return cbam::backward<__half>(p, stream); }

}  // namespace cuda
}  // namespace dermomamba
