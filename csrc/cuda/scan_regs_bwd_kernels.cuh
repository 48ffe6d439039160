// Backward of the multiaxial selective scan, "regs" form (scan v5): STUB, to be written.
// Contract: as scan_staged_bwd (scan_staged_bwd_kernels.cuh): same ScanParams, tiles = p's splits from
// regs_bwd_layout, tile_ticket / tile_flags zeroed, chunk_states read, the gradients and their modes (dx atomics or
// per-direction planes, dB / dC per grad_bc_mode with the layout's channel blocks, per-chunk partials) the same.
#pragma once

#include "scan_staged_bwd_kernels.cuh"
#include "scan_regs_bwd_layout.h"

namespace dermomamba {
namespace cuda {
namespace regs {

using RegsKernel = void (*)(ScanParams);

// The kernel instantiation that runs layout l (the launcher and the host emulator both use it).
template <typename bc_t>
RegsKernel regs_bwd_kernel(const staged::StagedLayout& l) {
  (void)l;
  return nullptr;
}

}  // namespace regs

#ifdef __CUDACC__
template <typename bc_t>
int scan_backward_multiaxial_regs(const ScanParams& p, void* stream) {
  (void)p; (void)stream;
  return static_cast<int>(cudaErrorNotSupported);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dermomamba
