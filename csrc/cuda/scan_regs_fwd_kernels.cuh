// Forward of the multiaxial selective scan, "regs" form (scan v5): STUB, to be written.
// Contract: as scan_staged_fwd (scan_staged_kernels.cuh): same ScanParams, tiles = p's splits from
// regs_fwd_layout, tile_ticket / tile_flags zeroed by the host, chunk_states (state entering every chunk)
// and y (fp32 atomics into a zeroed output) with the same meaning.
#pragma once

#include "scan_staged_kernels.cuh"
#include "scan_regs_fwd_layout.h"

namespace dermomamba {
namespace cuda {
namespace regs {

using RegsKernel = void (*)(ScanParams);

// The kernel instantiation that runs layout l (the launcher and the host emulator both use it).
template <typename bc_t>
RegsKernel regs_fwd_kernel(const staged::StagedLayout& l) {
  (void)l;
  return nullptr;
}

}  // namespace regs

#ifdef __CUDACC__
template <typename bc_t>
int scan_forward_multiaxial_regs(const ScanParams& p, void* stream) {
  (void)p; (void)stream;
  return static_cast<int>(cudaErrorNotSupported);
}
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace dermomamba
