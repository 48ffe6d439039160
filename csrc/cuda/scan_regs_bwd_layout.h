// Work and shared-memory layout of the "regs" multiaxial backward (scan v5,
// csrc/cuda/scan_regs_bwd_kernels.cuh). Plain C++ (no CUDA or torch headers): the host glue sizes the
// look-back scratch (tickets, flags, split_decay / split_state / reverse_carry, dB / dC channel blocks) from the same function the kernel uses.
// STUB: to be written (scan v5 backward).
#pragma once

#include "scan_staged_layout.h"

namespace dermomamba {
namespace cuda {
namespace regs {

DERMOMAMBA_HOST_DEVICE inline staged::StagedLayout regs_bwd_layout(int dim, int dstate, int chunk_size,
                                                                   int num_chunks) {
  staged::StagedLayout l{};
  l.ok = false;
  (void)dim; (void)dstate; (void)chunk_size; (void)num_chunks;
  return l;
}

}  // namespace regs
}  // namespace cuda
}  // namespace dermomamba
