// The CBAM passes over x for x in float; one file per dtype so that nvcc builds them in parallel.
#include "cbam_passes.cuh"

namespace dermomamba {
namespace cuda {

int cbam_forward_float(const CbamParams& p, void* stream) { return cbam::forward<float>(p, stream); }

int cbam_backward_float(const CbamParams& p, void* stream) { return cbam::backward<float>(p, stream); }

}  // namespace cuda
}  // namespace dermomamba
