// The CBAM passes over x for x in bfloat16; one file per dtype so that nvcc builds them in parallel.
#include "cbam_passes.cuh"

namespace dermomamba {
namespace cuda {

int cbam_forward_bfloat16(const CbamParams& p, void* stream) { return cbam::forward<__nv_bfloat16>(p, stream); }

int cbam_backward_bfloat16(const CbamParams& p, void* stream) { return cbam::backward<__nv_bfloat16>(p, stream); }

}  // namespace cuda
}  // namespace dermomamba
