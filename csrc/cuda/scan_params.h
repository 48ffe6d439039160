// Plain parameter block shared by the CUDA scan kernels (.cu) and their host glue (.cpp).
//
// No torch headers here: the .cu files include this and compile in seconds. Both ops (the 1-D
// mamba-style scan and the four-direction multiaxial scan) run on the same kernels: a "sequence"
// is one (channel) of the 1-D scan or one (direction, channel) pair of the multiaxial scan, and
// position t of a sequence is mapped to an (h, w) place of the native layout by index arithmetic
// (the 1-D scan is the case H = 1, W = L, one direction).
#pragma once

#include <cstdint>

namespace dermomamba {
namespace cuda {

// Largest state size the kernels accept: the state of one sequence lives in a per-warp shared
// memory row of this many floats, and the per-n loop is a run-time loop, so this bounds shared
// memory, not registers.
constexpr int kMaxStateDim = 256;
// Positions per chunk: each lane of a warp owns kMaxItemsPerLane consecutive positions of a chunk.
constexpr int kMaxItemsPerLane = 8;
constexpr int kWarpSize = 32;
constexpr int kMaxChunkSize = kMaxItemsPerLane * kWarpSize;
// Sequences (warps) per block at most; blocks hold sequences that share B and C.
constexpr int kMaxWarpsPerBlock = 8;

enum ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How the backward turns per-block dB / dC contributions into the gradient.
enum GradBCMode : int {
  kGradBCDirect = 0,    // one block owns each (batch, group): plain stores in B's / C's dtype
  kGradBCAtomic = 1,    // fp32 atomics into a zeroed (batch, groups, N, L) buffer
  kGradBCPartials = 2,  // fp32 partials (batch, groups, blocks_per_group, N, L), summed by the host
};

struct ScanParams {
  // Problem size.
  int batch;
  int num_seqs;         // sequences per batch element: dim (1-D) or 4 * dim (multiaxial)
  int dim;              // channels of u / x
  int num_directions;   // 1 (1-D) or 4 (multiaxial)
  int length;           // L = H * W
  int height, width;    // 1 x L for the 1-D scan
  int dstate;           // N
  int channels_per_group;  // sequences sharing one B / C group (dim / groups, or dim)
  int num_bc_groups;       // groups (1-D) or 4 directions (multiaxial)
  int chunk_size;
  int num_chunks;
  int chunks_per_split;  // consecutive chunks one warp walks with a carried state
  int num_splits;        // ceil(num_chunks / chunks_per_split)
  int warps_per_block;   // divides channels_per_group
  bool delta_softplus;

  // Inputs. Element strides; the position strides are (h, w) of the native layout.
  const void* u; int u_kind;            // x for the multiaxial scan
  int64_t u_batch_stride, u_dim_stride, u_h_stride, u_w_stride;
  const void* delta; int delta_kind;
  int64_t delta_batch_stride, delta_dir_stride, delta_dim_stride, delta_h_stride, delta_w_stride;
  const void* B;                         // dtype: the kernel's template type
  int64_t B_batch_stride, B_group_stride, B_state_stride, B_h_stride, B_w_stride;
  const void* C;
  int64_t C_batch_stride, C_group_stride, C_state_stride, C_h_stride, C_w_stride;
  const float* A;           // (num_seqs, N)
  const float* D;           // (num_seqs,) or null
  const float* delta_bias;  // (num_seqs,) or null
  const void* z; int z_kind;  // 1-D only, or null
  int64_t z_batch_stride, z_dim_stride, z_w_stride;
  const void* dout; int dout_kind;  // backward: dout (1-D, u's dtype) or dy (multiaxial, fp32)
  int64_t dout_batch_stride, dout_dim_stride, dout_h_stride, dout_w_stride;

  // Forward outputs.
  void* out;             // 1-D: (batch, dim, L) in u's dtype; multiaxial: y (batch, dim, H, W) fp32, zeroed
  float* chunk_states;   // (batch, num_seqs, num_chunks, N): state entering each chunk
  float* last_state;     // (batch, num_seqs, N) or null
  float* split_decay;    // scratch (batch, num_seqs, num_splits, N)
  float* split_state;    // scratch (batch, num_seqs, num_splits, N)
  // The staged forward (scan_staged_kernels.cuh) only: zeroed int32 scratch. tile_ticket hands
  // out work in launch order; tile_flags (batch, 4, channel blocks, tiles) says a tile has published
  // its aggregate (split_decay / split_state at split = tile) or, for a milestone tile, its
  // inclusive state (chunk_states at the next tile's first chunk).
  int* tile_ticket;
  int* tile_flags;

  // Backward outputs (contiguous, native layout).
  void* du;              // 1-D: (batch, dim, L) in u's dtype
  float* dx_accum;       // multiaxial: (batch, dim, H, W) fp32 zeroed (atomics), or
  float* dx_per_direction;  //   (4, batch, dim, H, W) fp32 (deterministic), summed by the host
  void* ddelta;          // (batch, num_seqs, L) in delta's dtype
  void* dB; void* dC;    // per grad_bc_mode
  int grad_bc_mode;
  void* dz;              // (batch, dim, L) in z's dtype, or null
  float* dA_partial;     // (batch, num_seqs, num_chunks, N)
  float* dD_partial;     // (batch, num_seqs, num_chunks) or null
  float* ddelta_bias_partial;  // (batch, num_seqs, num_chunks) or null
  float* reverse_carry;  // scratch (batch, num_seqs, num_splits, N), reuses split_state's role
};

// Launchers, one per dtype of B and C (each in its own .cu so that they compile in parallel).
// They return a CUDA error code (cudaSuccess == 0) so the host can raise a clear error.
int scan_forward_float(const ScanParams& params, bool multiaxial, void* stream);
int scan_forward_half(const ScanParams& params, bool multiaxial, void* stream);
int scan_forward_bfloat16(const ScanParams& params, bool multiaxial, void* stream);
int scan_backward_float(const ScanParams& params, bool multiaxial, void* stream);
int scan_backward_half(const ScanParams& params, bool multiaxial, void* stream);
int scan_backward_bfloat16(const ScanParams& params, bool multiaxial, void* stream);

// Multiprocessor count of a device (for choosing how many splits to scan in parallel).
int device_multiprocessor_count(int device);
const char* cuda_error_string(int code);

}  // namespace cuda
}  // namespace dermomamba
