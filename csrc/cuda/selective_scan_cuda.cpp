// CUDA implementations of the dermomamba scan ops: argument checks, output allocation, launch
// configuration and the final fixed-order reductions. The kernels live in scan_*.cu (no torch
// headers there); the schemas and their conventions are in csrc/ops.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/scan_params.h"
#include "cuda/scan_staged_layout.h"
#include "cuda/scan_regs_fwd_layout.h"
#include "cuda/scan_regs_bwd_layout.h"
#include "cuda/scan_flat_layout.h"

namespace dermomamba {
namespace cuda {
// The lane form of the multiaxial forward (scan v3, csrc/cuda/scan_lane_kernels.cuh), one launcher
// per dtype of B and C in scan_{float,half,bfloat16}.cu. Declared here rather than in
// scan_params.h while the lane form is an opt-in under verification.
int scan_forward_multiaxial_lane_float(const ScanParams& params, int states_per_lane, void* stream);
int scan_forward_multiaxial_lane_half(const ScanParams& params, int states_per_lane, void* stream);
int scan_forward_multiaxial_lane_bfloat16(const ScanParams& params, int states_per_lane, void* stream);
// The lane form of the multiaxial backward (csrc/cuda/scan_lane_bwd_kernels.cuh), same convention.
int scan_backward_multiaxial_lane_float(const ScanParams& params, void* stream);
int scan_backward_multiaxial_lane_half(const ScanParams& params, void* stream);
int scan_backward_multiaxial_lane_bfloat16(const ScanParams& params, void* stream);
// The staged form of the multiaxial forward (scan v4, csrc/cuda/scan_staged_kernels.cuh), same convention.
int scan_forward_multiaxial_staged_float(const ScanParams& params, void* stream);
int scan_forward_multiaxial_staged_half(const ScanParams& params, void* stream);
int scan_forward_multiaxial_staged_bfloat16(const ScanParams& params, void* stream);
// The flat form of the multiaxial forward (scan v6, csrc/cuda/scan_flat_kernels.cuh), same convention.
int scan_forward_multiaxial_flat_float(const ScanParams& params, void* stream);
int scan_forward_multiaxial_flat_half(const ScanParams& params, void* stream);
int scan_forward_multiaxial_flat_bfloat16(const ScanParams& params, void* stream);
// The staged form of the multiaxial backward (scan v4, csrc/cuda/scan_staged_bwd_kernels.cuh), same convention.
int scan_backward_multiaxial_staged_float(const ScanParams& params, void* stream);
int scan_backward_multiaxial_staged_half(const ScanParams& params, void* stream);
int scan_backward_multiaxial_staged_bfloat16(const ScanParams& params, void* stream);
// The "regs" forms (scan v5, csrc/cuda/scan_regs_{fwd,bwd}_kernels.cuh: several states of one channel in each
// thread's registers), same convention.
int scan_forward_multiaxial_regs_float(const ScanParams& params, void* stream);
int scan_forward_multiaxial_regs_half(const ScanParams& params, void* stream);
int scan_forward_multiaxial_regs_bfloat16(const ScanParams& params, void* stream);
int scan_backward_multiaxial_regs_float(const ScanParams& params, void* stream);
int scan_backward_multiaxial_regs_half(const ScanParams& params, void* stream);
int scan_backward_multiaxial_regs_bfloat16(const ScanParams& params, void* stream);
}  // namespace cuda

namespace {

using cuda::ScanParams;

constexpr int64_t kMultiaxialDirections = 4;
// Splitting a sequence costs one extra pass over its inputs (the split aggregate), so a call with
// enough sequences to give every SM kMinWarpsPerSMWithoutSplits warps runs unsplit; otherwise
// sequences are cut into enough splits for kTargetWarpsPerSM warps per SM (more splits cost only
// a longer serial carry over splits, a few floats each).
constexpr int64_t kMinWarpsPerSMWithoutSplits = 8;
constexpr int64_t kTargetWarpsPerSM = 64;

bool is_float_dtype(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

int kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::kFloat32;
    case at::kHalf: return cuda::kFloat16;
    case at::kBFloat16: return cuda::kBFloat16;
    default: TORCH_CHECK(false, "dermomamba scan: unsupported dtype ", t.scalar_type());
  }
}

void check_cuda_float(const at::Tensor& t, const at::Tensor& first, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == first.device(), op, ": ", name, " is on ", t.device(), " but the input is on ",
              first.device());
  TORCH_CHECK(is_float_dtype(t), op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  // The kernels index within one tensor with 32-bit position offsets.
  TORCH_CHECK(t.numel() < (int64_t{1} << 31), op, ": ", name, " has ", t.numel(),
              " elements; the CUDA kernels take fewer than 2^31");
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

void check_fp32_param(const at::Tensor& t, const at::Tensor& first, at::IntArrayRef expected, const char* op,
                      const char* name) {
  check_cuda_float(t, first, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  check_shape(t, expected, op, name);
}

void check_input_or_fp32(const at::Tensor& t, const at::Tensor& first, const char* op, const char* name) {
  check_cuda_float(t, first, op, name);
  TORCH_CHECK(t.scalar_type() == first.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name,
              " must have the input's dtype (", first.scalar_type(), ") or float32, got ", t.scalar_type());
}

void check_sizes(int64_t dstate, int64_t chunk_size, int64_t length, const char* op) {
  TORCH_CHECK(dstate >= 1 && dstate <= cuda::kMaxStateDim, op, ": the CUDA kernels support a state size N from 1 to ",
              cuda::kMaxStateDim, " (A.shape[1]), got ", dstate);
  // A chunk is one warp's tile; a chunk_size above the sequence length is one chunk.
  TORCH_CHECK(chunk_size >= 1 && std::min(chunk_size, length) <= cuda::kMaxChunkSize, op,
              ": the CUDA kernels take chunk_size from 1 to ", cuda::kMaxChunkSize, " (or >= L), got ", chunk_size,
              " for L = ", length);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest power of two up to kMaxWarpsPerBlock dividing the channels that share B and C, so that
// a block's warps reduce dB / dC among themselves.
int warps_per_block_for(int64_t channels_per_group) {
  int warps = cuda::kMaxWarpsPerBlock;
  while (warps > 1 && channels_per_group % warps != 0) warps /= 2;
  return warps;
}

// Cuts each sequence into splits when `warps` (the kernel's units of parallel work) leave the SMs short.
void choose_splits_for_warps(ScanParams& p, int device, int64_t warps) {
  const int64_t sms = std::max(1, cuda::device_multiprocessor_count(device));
  int64_t splits = 1;
  if (warps < sms * kMinWarpsPerSMWithoutSplits)
    splits = std::min<int64_t>(p.num_chunks, ceil_div(sms * kTargetWarpsPerSM, warps));
  p.chunks_per_split = static_cast<int>(ceil_div(p.num_chunks, splits));
  p.num_splits = static_cast<int>(ceil_div(p.num_chunks, p.chunks_per_split));
}

// The warp form scans one sequence per warp.
void choose_splits(ScanParams& p, int device) {
  choose_splits_for_warps(p, device, static_cast<int64_t>(p.batch) * p.num_seqs);
}

void set_common(ScanParams& p, int64_t batch, int64_t num_seqs, int64_t dim, int64_t directions, int64_t height,
                int64_t width, int64_t dstate, int64_t channels_per_group, int64_t bc_groups, int64_t chunk_size,
                bool delta_softplus) {
  p = ScanParams{};
  p.batch = static_cast<int>(batch);
  p.num_seqs = static_cast<int>(num_seqs);
  p.dim = static_cast<int>(dim);
  p.num_directions = static_cast<int>(directions);
  p.height = static_cast<int>(height);
  p.width = static_cast<int>(width);
  p.length = static_cast<int>(height * width);
  p.dstate = static_cast<int>(dstate);
  p.channels_per_group = static_cast<int>(channels_per_group);
  p.num_bc_groups = static_cast<int>(bc_groups);
  p.chunk_size = static_cast<int>(std::min<int64_t>(chunk_size, height * width));
  p.num_chunks = static_cast<int>(ceil_div(height * width, chunk_size));
  p.warps_per_block = warps_per_block_for(channels_per_group);
  p.delta_softplus = delta_softplus;
}

void set_bc(ScanParams& p, const at::Tensor& B, const at::Tensor& C, bool multiaxial) {
  // B, C: (batch, groups, N, L) or (batch, 4, N, H, W).
  p.B = B.data_ptr();
  p.C = C.data_ptr();
  p.B_batch_stride = B.stride(0);
  p.B_group_stride = B.stride(1);
  p.B_state_stride = B.stride(2);
  p.C_batch_stride = C.stride(0);
  p.C_group_stride = C.stride(1);
  p.C_state_stride = C.stride(2);
  if (multiaxial) {
    p.B_h_stride = B.stride(3);
    p.B_w_stride = B.stride(4);
    p.C_h_stride = C.stride(3);
    p.C_w_stride = C.stride(4);
  } else {
    p.B_h_stride = 0;
    p.B_w_stride = B.stride(3);
    p.C_h_stride = 0;
    p.C_w_stride = C.stride(3);
  }
}

void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, op, ": CUDA kernel launch failed: ", cuda::cuda_error_string(code));
}

int run_forward(const ScanParams& p, at::ScalarType bc_dtype, bool multiaxial, cudaStream_t stream) {
  switch (bc_dtype) {
    case at::kFloat: return cuda::scan_forward_float(p, multiaxial, stream);
    case at::kHalf: return cuda::scan_forward_half(p, multiaxial, stream);
    default: return cuda::scan_forward_bfloat16(p, multiaxial, stream);
  }
}

int run_backward(const ScanParams& p, at::ScalarType bc_dtype, bool multiaxial, cudaStream_t stream) {
  switch (bc_dtype) {
    case at::kFloat: return cuda::scan_backward_float(p, multiaxial, stream);
    case at::kHalf: return cuda::scan_backward_half(p, multiaxial, stream);
    default: return cuda::scan_backward_bfloat16(p, multiaxial, stream);
  }
}

// The kernels read B and C in one dtype; a mixed pair (one fp32, one in the input dtype) is read
// as fp32.
std::pair<at::Tensor, at::Tensor> common_bc(const at::Tensor& B, const at::Tensor& C) {
  if (B.scalar_type() == C.scalar_type()) return {B, C};
  return {B.to(at::kFloat), C.to(at::kFloat)};
}

struct SplitScratch {
  at::Tensor decay, state, carry;
};

void allocate_split_scratch(ScanParams& p, const at::TensorOptions& fp32, SplitScratch& s, bool backward) {
  if (p.num_splits <= 1) return;
  s.decay = at::empty({p.batch, p.num_seqs, p.num_splits, p.dstate}, fp32);
  s.state = at::empty({p.batch, p.num_seqs, p.num_splits, p.dstate}, fp32);
  p.split_decay = s.decay.data_ptr<float>();
  p.split_state = s.state.data_ptr<float>();
  if (backward) {
    s.carry = at::empty({p.batch, p.num_seqs, p.num_splits, p.dstate}, fp32);
    p.reverse_carry = s.carry.data_ptr<float>();
  }
}

// dB / dC storage for the backward, by how many blocks share a (batch, group).
struct GradBC {
  at::Tensor dB, dC;           // final, in B's / C's dtype
  at::Tensor dB_buf, dC_buf;   // fp32 accumulation or partials
  int64_t blocks_per_group = 1;
};

// blocks_per_group: how many blocks add into each (batch, group)'s dB / dC.
void setup_grad_bc_blocks(ScanParams& p, const at::Tensor& B, const at::Tensor& C, bool deterministic,
                          int64_t blocks_per_group, GradBC& g) {
  const auto fp32 = B.options().dtype(at::kFloat);
  g.dB = at::empty(B.sizes(), B.options().memory_format(at::MemoryFormat::Contiguous));
  g.dC = at::empty(C.sizes(), C.options().memory_format(at::MemoryFormat::Contiguous));
  g.blocks_per_group = blocks_per_group;
  if (g.blocks_per_group == 1) {
    p.grad_bc_mode = cuda::kGradBCDirect;
    p.dB = g.dB.data_ptr();
    p.dC = g.dC.data_ptr();
  } else if (!deterministic) {
    p.grad_bc_mode = cuda::kGradBCAtomic;
    g.dB_buf = at::zeros(B.sizes(), fp32);
    g.dC_buf = at::zeros(C.sizes(), fp32);
    p.dB = g.dB_buf.data_ptr();
    p.dC = g.dC_buf.data_ptr();
  } else {
    p.grad_bc_mode = cuda::kGradBCPartials;
    const std::vector<int64_t> shape = {p.batch, p.num_bc_groups, g.blocks_per_group, p.dstate, p.length};
    g.dB_buf = at::empty(shape, fp32);
    g.dC_buf = at::empty(shape, fp32);
    p.dB = g.dB_buf.data_ptr();
    p.dC = g.dC_buf.data_ptr();
  }
}

void setup_grad_bc(ScanParams& p, const at::Tensor& B, const at::Tensor& C, bool deterministic, GradBC& g) {
  setup_grad_bc_blocks(p, B, C, deterministic, p.channels_per_group / p.warps_per_block, g);
}

void finish_grad_bc(const ScanParams& p, GradBC& g) {
  if (p.grad_bc_mode == cuda::kGradBCDirect) return;
  at::Tensor dB = g.dB_buf, dC = g.dC_buf;
  if (p.grad_bc_mode == cuda::kGradBCPartials) {
    // at::sum over one axis reduces in an order fixed by the shapes: reproducible run to run.
    dB = dB.sum(2);
    dC = dC.sum(2);
  }
  g.dB.copy_(dB.view(g.dB.sizes()));
  g.dC.copy_(dC.view(g.dC.sizes()));
}

// ---- the 1-D scan ----

ScanParams scan1d_params(const char* op, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                         const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                         const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                         bool delta_softplus, int64_t chunk_size) {
  check_cuda_float(u, u, op, "u");
  TORCH_CHECK(u.dim() == 3, op, ": u must be (batch, dim, L), got shape ", u.sizes());
  const int64_t batch = u.size(0), dim = u.size(1), length = u.size(2);
  TORCH_CHECK(batch >= 1 && dim >= 1 && length >= 1, op, ": u must have batch, dim, L >= 1, got ", u.sizes());
  check_cuda_float(delta, u, op, "delta");
  check_shape(delta, u.sizes(), op, "delta");
  TORCH_CHECK(delta.scalar_type() == u.scalar_type(), op, ": delta must have u's dtype ", u.scalar_type(),
              ", got ", delta.scalar_type());
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, op, ": A must be (dim=", dim, ", N), got shape ", A.sizes());
  const int64_t dstate = A.size(1);
  check_fp32_param(A, u, {dim, dstate}, op, "A");
  TORCH_CHECK(B.dim() == 4, op, ": B must be (batch, groups, N, L), got shape ", B.sizes());
  const int64_t groups = B.size(1);
  TORCH_CHECK(groups > 0 && dim % groups == 0, op, ": B's groups (", groups, ") must divide dim (", dim, ")");
  check_input_or_fp32(B, u, op, "B");
  check_shape(B, {batch, groups, dstate, length}, op, "B");
  check_input_or_fp32(C, u, op, "C");
  check_shape(C, {batch, groups, dstate, length}, op, "C");
  if (D) check_fp32_param(*D, u, {dim}, op, "D");
  if (delta_bias) check_fp32_param(*delta_bias, u, {dim}, op, "delta_bias");
  if (z) {
    check_cuda_float(*z, u, op, "z");
    check_shape(*z, u.sizes(), op, "z");
    TORCH_CHECK(z->scalar_type() == u.scalar_type(), op, ": z must have u's dtype ", u.scalar_type(), ", got ",
                z->scalar_type());
  }
  check_sizes(dstate, chunk_size, length, op);

  ScanParams p;
  set_common(p, batch, dim, dim, 1, 1, length, dstate, dim / groups, groups, chunk_size, delta_softplus);
  p.u = u.data_ptr();
  p.u_kind = kind_of(u);
  p.u_batch_stride = u.stride(0);
  p.u_dim_stride = u.stride(1);
  p.u_h_stride = 0;
  p.u_w_stride = u.stride(2);
  p.delta = delta.data_ptr();
  p.delta_kind = kind_of(delta);
  p.delta_batch_stride = delta.stride(0);
  p.delta_dir_stride = 0;
  p.delta_dim_stride = delta.stride(1);
  p.delta_h_stride = 0;
  p.delta_w_stride = delta.stride(2);
  if (z) {
    p.z = z->data_ptr();
    p.z_kind = kind_of(*z);
    p.z_batch_stride = z->stride(0);
    p.z_dim_stride = z->stride(1);
    p.z_w_stride = z->stride(2);
  }
  return p;
}

struct OwnedParams {
  at::Tensor A, D, delta_bias;
};

void set_fp32_params(ScanParams& p, const at::Tensor& A, const std::optional<at::Tensor>& D,
                     const std::optional<at::Tensor>& delta_bias, OwnedParams& keep) {
  keep.A = A.contiguous();
  p.A = keep.A.data_ptr<float>();
  if (D) {
    keep.D = D->contiguous();
    p.D = keep.D.data_ptr<float>();
  }
  if (delta_bias) {
    keep.delta_bias = delta_bias->contiguous();
    p.delta_bias = keep.delta_bias.data_ptr<float>();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B_in, const at::Tensor& C_in,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias, bool delta_softplus, int64_t chunk_size) {
  const char* op = "selective_scan_fwd";
  ScanParams p = scan1d_params(op, u, delta, A, B_in, C_in, D, z, delta_bias, delta_softplus, chunk_size);
  const c10::cuda::CUDAGuard guard(u.device());
  auto [B, C] = common_bc(B_in, C_in);
  set_bc(p, B, C, /*multiaxial=*/false);
  OwnedParams keep;
  set_fp32_params(p, A, D, delta_bias, keep);
  const auto fp32 = u.options().dtype(at::kFloat);
  auto out = at::empty({p.batch, p.dim, p.length}, u.options());
  auto last_state = at::empty({p.batch, p.dim, p.dstate}, fp32);
  auto chunk_states = at::empty({p.batch, p.dim, p.num_chunks, p.dstate}, fp32);
  p.out = out.data_ptr();
  p.chunk_states = chunk_states.data_ptr<float>();
  p.last_state = last_state.data_ptr<float>();
  choose_splits(p, u.get_device());
  SplitScratch scratch;
  allocate_split_scratch(p, fp32, scratch, /*backward=*/false);
  const auto stream = c10::cuda::getCurrentCUDAStream(u.get_device()).stream();
  check_launch(run_forward(p, B.scalar_type(), /*multiaxial=*/false, stream), op);
  return {out, last_state, chunk_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd_cuda(const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                        const at::Tensor& B_in, const at::Tensor& C_in, const std::optional<at::Tensor>& D,
                        const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                        bool delta_softplus, const at::Tensor& chunk_states_in, int64_t chunk_size,
                        bool deterministic) {
  const char* op = "selective_scan_bwd";
  ScanParams p = scan1d_params(op, u, delta, A, B_in, C_in, D, z, delta_bias, delta_softplus, chunk_size);
  check_cuda_float(dout, u, op, "dout");
  check_shape(dout, u.sizes(), op, "dout");
  check_fp32_param(chunk_states_in, u, {p.batch, p.dim, p.num_chunks, p.dstate}, op, "chunk_states");
  const c10::cuda::CUDAGuard guard(u.device());
  auto [B, C] = common_bc(B_in, C_in);
  set_bc(p, B, C, /*multiaxial=*/false);
  OwnedParams keep;
  set_fp32_params(p, A, D, delta_bias, keep);
  const auto fp32 = u.options().dtype(at::kFloat);
  auto chunk_states = chunk_states_in.contiguous();
  p.chunk_states = chunk_states.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.dout_kind = kind_of(dout);
  p.dout_batch_stride = dout.stride(0);
  p.dout_dim_stride = dout.stride(1);
  p.dout_h_stride = 0;
  p.dout_w_stride = dout.stride(2);

  auto du = at::empty({p.batch, p.dim, p.length}, u.options());
  auto ddelta = at::empty({p.batch, p.dim, p.length}, delta.options());
  auto dz = z ? at::empty({p.batch, p.dim, p.length}, z->options()) : at::empty({0}, u.options());
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  if (z) p.dz = dz.data_ptr();
  auto dA_partial = at::empty({p.batch, p.dim, p.num_chunks, p.dstate}, fp32);
  auto dD_partial = at::empty({p.batch, p.dim, p.num_chunks}, fp32);
  auto dbias_partial = at::empty({p.batch, p.dim, p.num_chunks}, fp32);
  p.dA_partial = dA_partial.data_ptr<float>();
  p.dD_partial = dD_partial.data_ptr<float>();
  p.ddelta_bias_partial = dbias_partial.data_ptr<float>();
  GradBC grads;
  setup_grad_bc(p, B, C, deterministic, grads);
  choose_splits(p, u.get_device());
  SplitScratch scratch;
  allocate_split_scratch(p, fp32, scratch, /*backward=*/true);
  const auto stream = c10::cuda::getCurrentCUDAStream(u.get_device()).stream();
  check_launch(run_backward(p, B.scalar_type(), /*multiaxial=*/false, stream), op);
  finish_grad_bc(p, grads);

  at::Tensor dB = grads.dB, dC = grads.dC;
  if (dB.scalar_type() != B_in.scalar_type()) dB = dB.to(B_in.scalar_type());
  if (dC.scalar_type() != C_in.scalar_type()) dC = dC.to(C_in.scalar_type());
  auto dA = dA_partial.sum(at::IntArrayRef{0, 2});
  auto dD = D ? dD_partial.sum(at::IntArrayRef{0, 2}) : at::empty({0}, fp32);
  auto dbias = delta_bias ? dbias_partial.sum(at::IntArrayRef{0, 2}) : at::empty({0}, fp32);
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

// ---- the multiaxial (SS2D) scan ----

// Which kernel runs multiaxial_scan_fwd: "staged" (scan v4: each tile staged in shared memory once,
// one launch with a decoupled look-back, N <= 32, scan_staged_kernels.cuh), "warp" (v2: one warp
// per sequence, scan_kernels.cuh), "lane" (one lane per (sequence, state), scan_lane_kernels.cuh)
// or "lane4" (the lane form with 4 lanes x 4 states per sequence, N <= 16). All write the same y
// and chunk_states, so the backward is the same. Unset: "staged" wherever it applies (N <= 32 and
// one chunk fits its shared memory), else "warp": staged was the fastest forward at every DermoMamba
// shape measured (1.8x warp at 192x256, benchmarks/RESULTS.md, 2026-11-27 20:02 UTC). Asked for by
// name, a kernel that cannot run the shape is an error. Read on every call (a getenv costs far less
// than a launch) so that tests can switch it per test.
constexpr const char* kForwardKernelVariable = "DERMOMAMBA_SCAN_FWD_KERNEL";
// The lane form keeps all N states of a sequence in one warp; lane4 in 4 lanes of 4 states.
constexpr int64_t kLaneMaxStateDim = cuda::kWarpSize;
constexpr int64_t kNarrowLaneGroup = 16;  // N <= 16: two sequences per warp
constexpr int64_t kWideLaneGroup = 4;
constexpr int64_t kWideStatesPerLane = 4;

enum class ForwardKernel { kWarp, kLane, kLaneWide, kStaged, kRegs, kFlat };

ForwardKernel multiaxial_forward_kernel(const char* op, const ScanParams& p) {
  const char* value = std::getenv(kForwardKernelVariable);
  const std::string choice = value == nullptr ? "" : value;
  if (choice.empty()) {
    const bool staged_fits = p.dstate <= cuda::staged::kMaxStateDim &&
                             cuda::staged::staged_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks).ok;
    return staged_fits ? ForwardKernel::kStaged : ForwardKernel::kWarp;
  }
  if (choice == "warp") return ForwardKernel::kWarp;
  if (choice == "lane") return ForwardKernel::kLane;
  if (choice == "lane4") return ForwardKernel::kLaneWide;
  if (choice == "staged") return ForwardKernel::kStaged;
  if (choice == "regs") return ForwardKernel::kRegs;
  if (choice == "flat") return ForwardKernel::kFlat;
  TORCH_CHECK(false, op, ": environment variable ", kForwardKernelVariable,
              " must be 'warp', 'lane' or 'lane4' (v3), 'staged' (v4), 'regs' (v5) or 'flat' (v6), or unset, got '",
              choice, "'");
}

// Lanes per sequence in the lane forms (the kernels' lane::group_size_for and lane::LaneShape;
// repeated here because this file does not include device code).
int64_t lane_group_size(int64_t dstate, ForwardKernel kernel) {
  if (kernel == ForwardKernel::kLaneWide) return kWideLaneGroup;
  return dstate <= kNarrowLaneGroup ? kNarrowLaneGroup : kLaneMaxStateDim;
}

// choose_splits for the lane forms: their unit of parallel work is a warp of 32 / group sequences.
void choose_splits_lane(ScanParams& p, int device, ForwardKernel kernel) {
  const int64_t sequences_per_warp = cuda::kWarpSize / lane_group_size(p.dstate, kernel);
  choose_splits_for_warps(p, device, static_cast<int64_t>(p.batch) * p.num_directions *
                                         ceil_div(p.dim, sequences_per_warp));
}

int run_forward_staged(const ScanParams& p, at::ScalarType bc_dtype, cudaStream_t stream) {
  switch (bc_dtype) {
    case at::kFloat: return cuda::scan_forward_multiaxial_staged_float(p, stream);
    case at::kHalf: return cuda::scan_forward_multiaxial_staged_half(p, stream);
    default: return cuda::scan_forward_multiaxial_staged_bfloat16(p, stream);
  }
}

// A staged layout's tiles (runs of whole chunks) become p's splits, and its look-back's ticket counter
// and flags one zeroed int32 buffer: the counter, then one flag per (batch, direction, channel block,
// tile). Returns that buffer (kept alive by the caller). Both staged kernels take their scratch
// (split_decay / split_state, the backward's reverse_carry) from allocate_split_scratch.
at::Tensor set_staged_tiles(ScanParams& p, const at::Tensor& x, const cuda::staged::StagedLayout& layout) {
  p.chunks_per_split = layout.chunks_per_tile;
  p.num_splits = layout.num_tiles;
  const int64_t flags = static_cast<int64_t>(p.batch) * p.num_directions * layout.channel_blocks * layout.num_tiles;
  at::Tensor lookback = at::zeros({1 + flags}, x.options().dtype(at::kInt));
  p.tile_ticket = lookback.data_ptr<int>();
  p.tile_flags = p.tile_ticket + 1;
  return lookback;
}

int run_forward_flat(const ScanParams& p, at::ScalarType bc_dtype, cudaStream_t stream) {
  switch (bc_dtype) {
    case at::kFloat: return cuda::scan_forward_multiaxial_flat_float(p, stream);
    case at::kHalf: return cuda::scan_forward_multiaxial_flat_half(p, stream);
    default: return cuda::scan_forward_multiaxial_flat_bfloat16(p, stream);
  }
}

int run_forward_regs(const ScanParams& p, at::ScalarType bc_dtype, cudaStream_t stream) {
  switch (bc_dtype) {
    case at::kFloat: return cuda::scan_forward_multiaxial_regs_float(p, stream);
    case at::kHalf: return cuda::scan_forward_multiaxial_regs_half(p, stream);
    default: return cuda::scan_forward_multiaxial_regs_bfloat16(p, stream);
  }
}

// A tiled kernel's layout (staged: cuda::staged::staged_layout, regs: cuda::regs::regs_fwd_layout, the function
// its kernel uses to find its work), checked, and its tiles set up by set_staged_tiles.
at::Tensor setup_tiled_forward(ScanParams& p, const at::Tensor& x, const char* op, ForwardKernel kernel) {
  const bool regs = kernel == ForwardKernel::kRegs;
  TORCH_CHECK(!regs || cuda::regs::regs_fwd_variant() >= 0, op, ": environment variable ",
              cuda::regs::kFwdVariantVariable, " must be one of 0 .. ", cuda::regs::kFwdVariantCount - 1,
              " (the regs forward's variants), or unset");
  const cuda::staged::StagedLayout layout =
      regs ? cuda::regs::regs_fwd_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks)
           : cuda::staged::staged_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks);
  TORCH_CHECK(layout.ok, op, ": the ", regs ? "regs" : "staged", " kernel (", kForwardKernelVariable, "=",
              regs ? "regs" : "staged", ") cannot fit one chunk (", p.chunk_size, " positions) of one channel with N = ",
              p.dstate, " in its ", cuda::staged::kSharedBudgetBytes,
              " bytes of shared memory; use a smaller chunk_size, or unset ", kForwardKernelVariable);
  return set_staged_tiles(p, x, layout);
}

int run_forward_lane(const ScanParams& p, at::ScalarType bc_dtype, ForwardKernel kernel, cudaStream_t stream) {
  const int states_per_lane = kernel == ForwardKernel::kLaneWide ? static_cast<int>(kWideStatesPerLane) : 1;
  switch (bc_dtype) {
    case at::kFloat: return cuda::scan_forward_multiaxial_lane_float(p, states_per_lane, stream);
    case at::kHalf: return cuda::scan_forward_multiaxial_lane_half(p, states_per_lane, stream);
    default: return cuda::scan_forward_multiaxial_lane_bfloat16(p, states_per_lane, stream);
  }
}

// Which kernel runs multiaxial_scan_bwd: "staged" (scan v4: tiles staged in shared memory, one
// launch with a reverse look-back, scan_staged_bwd_kernels.cuh, N <= 32), "warp" (v2,
// scan_kernels.cuh) or "lane" (one lane per (sequence, state), scan_lane_bwd_kernels.cuh, N <= 32).
// All read the same chunk_states (from any forward kernel) and return the same gradients. Unset:
// "staged" wherever it applies (N <= 32 and one chunk fits its shared memory), else "warp": staged
// forward + staged backward was the fastest pair at DermoMamba's large shapes (5.82 ms against
// staged + warp's 7.55 at 192x256 fp32, even at the small ones; benchmarks/RESULTS.md, 2026-11-27
// 21:41 UTC, H200). Asked for by name, a kernel that cannot run
// the shape is an error. Read on every call, like the forward's.
constexpr const char* kBackwardKernelVariable = "DERMOMAMBA_SCAN_BWD_KERNEL";
// Warps per block of the lane backward, by lanes per sequence (lane::BwdBlock; repeated here
// because this file does not include device code): it fixes how many blocks share a direction's
// dB / dC, i.e. the shape of their partials.
constexpr int64_t kLaneBackwardWarpsNarrow = 4;
constexpr int64_t kLaneBackwardWarpsWide = 2;

enum class BackwardKernel { kWarp, kLane, kStaged, kRegs };

// The staged backward's compile-time variants (scan_staged_layout.h), named by DERMOMAMBA_STAGED_BWD_VARIANT.
std::string staged_bwd_variant_names() {
  std::string names;
  for (int i = 0; i < cuda::staged::kStagedBwdVariantCount; ++i) {
    if (i) names += ", ";
    names += "'" + std::string(cuda::staged::kStagedBwdVariantNames[i]) + "'";
  }
  return names;
}

BackwardKernel multiaxial_backward_kernel(const char* op, const ScanParams& p) {
  // Checked whatever kernel runs: a misspelt variant must not silently time or test the default.
  const char* variant = std::getenv(cuda::staged::kStagedBwdVariantVariable);
  TORCH_CHECK(cuda::staged::staged_bwd_variant() >= 0, op, ": environment variable ",
              cuda::staged::kStagedBwdVariantVariable, " must be one of ", staged_bwd_variant_names(),
              " (the staged backward's variants), or unset, got '", variant == nullptr ? "" : variant, "'");
  const char* value = std::getenv(kBackwardKernelVariable);
  const std::string choice = value == nullptr ? "" : value;
  if (choice.empty()) {
    const bool staged_fits =
        p.dstate <= cuda::staged::kMaxStateDim &&
        cuda::staged::staged_bwd_layout_selected(p.dim, p.dstate, p.chunk_size, p.num_chunks).ok;
    return staged_fits ? BackwardKernel::kStaged : BackwardKernel::kWarp;
  }
  if (choice == "warp") return BackwardKernel::kWarp;
  if (choice == "lane") return BackwardKernel::kLane;
  if (choice == "staged") return BackwardKernel::kStaged;
  if (choice == "regs") return BackwardKernel::kRegs;
  TORCH_CHECK(false, op, ": environment variable ", kBackwardKernelVariable,
              " must be 'warp' or 'lane' (v3), 'staged' (v4) or 'regs' (v5), or unset, got '", choice, "'");
}

// Blocks of the lane backward per (batch, direction): each covers warps x (32 / group) channels.
int64_t lane_backward_channel_blocks(int64_t dim, int64_t dstate) {
  const int64_t group = lane_group_size(dstate, ForwardKernel::kLane);
  const int64_t sequences_per_warp = cuda::kWarpSize / group;
  const int64_t max_warps = group == kNarrowLaneGroup ? kLaneBackwardWarpsNarrow : kLaneBackwardWarpsWide;
  const int64_t warps = std::min(ceil_div(dim, sequences_per_warp), max_warps);
  return ceil_div(dim, warps * sequences_per_warp);
}

int run_backward_staged(const ScanParams& p, at::ScalarType bc_dtype, cudaStream_t stream) {
  switch (bc_dtype) {
    case at::kFloat: return cuda::scan_backward_multiaxial_staged_float(p, stream);
    case at::kHalf: return cuda::scan_backward_multiaxial_staged_half(p, stream);
    default: return cuda::scan_backward_multiaxial_staged_bfloat16(p, stream);
  }
}

std::string regs_bwd_variant_names() {
  std::string names;
  for (int i = 0; i < cuda::regs::kBwdVariantCount; ++i) {
    if (i) names += ", ";
    names += cuda::regs::kBwdVariantNames[i];
  }
  return names;
}

int run_backward_regs(const ScanParams& p, at::ScalarType bc_dtype, cudaStream_t stream) {
  switch (bc_dtype) {
    case at::kFloat: return cuda::scan_backward_multiaxial_regs_float(p, stream);
    case at::kHalf: return cuda::scan_backward_multiaxial_regs_half(p, stream);
    default: return cuda::scan_backward_multiaxial_regs_bfloat16(p, stream);
  }
}

int run_backward_lane(const ScanParams& p, at::ScalarType bc_dtype, cudaStream_t stream) {
  switch (bc_dtype) {
    case at::kFloat: return cuda::scan_backward_multiaxial_lane_float(p, stream);
    case at::kHalf: return cuda::scan_backward_multiaxial_lane_half(p, stream);
    default: return cuda::scan_backward_multiaxial_lane_bfloat16(p, stream);
  }
}

ScanParams multiaxial_params(const char* op, const at::Tensor& x, const at::Tensor& delta, const at::Tensor& A,
                             const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                             const at::Tensor& delta_bias, bool delta_softplus, int64_t chunk_size) {
  check_cuda_float(x, x, op, "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be (batch, dim, H, W), got shape ", x.sizes());
  const int64_t batch = x.size(0), dim = x.size(1), height = x.size(2), width = x.size(3);
  TORCH_CHECK(batch >= 1 && dim >= 1 && height >= 1 && width >= 1, op, ": x must have batch, dim, H, W >= 1, got ",
              x.sizes());
  const int64_t K = kMultiaxialDirections;
  check_input_or_fp32(delta, x, op, "delta");
  check_shape(delta, {batch, K, dim, height, width}, op, "delta");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == K * dim, op, ": A must be (4 * dim=", K * dim, ", N), got shape ",
              A.sizes());
  const int64_t dstate = A.size(1);
  check_fp32_param(A, x, {K * dim, dstate}, op, "A");
  check_input_or_fp32(B, x, op, "B");
  check_shape(B, {batch, K, dstate, height, width}, op, "B");
  check_input_or_fp32(C, x, op, "C");
  check_shape(C, {batch, K, dstate, height, width}, op, "C");
  check_fp32_param(D, x, {K * dim}, op, "D");
  check_fp32_param(delta_bias, x, {K * dim}, op, "delta_bias");
  check_sizes(dstate, chunk_size, height * width, op);

  ScanParams p;
  set_common(p, batch, K * dim, dim, K, height, width, dstate, dim, K, chunk_size, delta_softplus);
  p.u = x.data_ptr();
  p.u_kind = kind_of(x);
  p.u_batch_stride = x.stride(0);
  p.u_dim_stride = x.stride(1);
  p.u_h_stride = x.stride(2);
  p.u_w_stride = x.stride(3);
  p.delta = delta.data_ptr();
  p.delta_kind = kind_of(delta);
  p.delta_batch_stride = delta.stride(0);
  p.delta_dir_stride = delta.stride(1);
  p.delta_dim_stride = delta.stride(2);
  p.delta_h_stride = delta.stride(3);
  p.delta_w_stride = delta.stride(4);
  return p;
}

std::tuple<at::Tensor, at::Tensor> multiaxial_scan_fwd_cuda(const at::Tensor& x, const at::Tensor& delta,
                                                            const at::Tensor& A, const at::Tensor& B_in,
                                                            const at::Tensor& C_in, const at::Tensor& D,
                                                            const at::Tensor& delta_bias, bool delta_softplus,
                                                            int64_t chunk_size) {
  const char* op = "multiaxial_scan_fwd";
  ScanParams p = multiaxial_params(op, x, delta, A, B_in, C_in, D, delta_bias, delta_softplus, chunk_size);
  const ForwardKernel kernel = multiaxial_forward_kernel(op, p);
  const bool lanes = kernel == ForwardKernel::kLane || kernel == ForwardKernel::kLaneWide;
  const bool staged = kernel == ForwardKernel::kStaged;
  const bool regs = kernel == ForwardKernel::kRegs;
  const bool flat = kernel == ForwardKernel::kFlat;
  TORCH_CHECK(!flat || p.dstate <= cuda::flat::kStates, op, ": the flat kernel (", kForwardKernelVariable,
              "=flat) supports a state size N up to ", cuda::flat::kStates, " (A.shape[1]), got ", p.dstate, "; unset ",
              kForwardKernelVariable, " or set it to 'staged' or 'warp' for larger N");
  TORCH_CHECK(!(staged || regs) || p.dstate <= cuda::staged::kMaxStateDim, op, ": the ", regs ? "regs" : "staged",
              " kernel (", kForwardKernelVariable, "=", regs ? "regs" : "staged", ") supports a state size N up to ", cuda::staged::kMaxStateDim, " (A.shape[1]), got ", p.dstate,
              "; unset ", kForwardKernelVariable, " or set it to 'warp' for larger N");
  const int64_t lane_max_dstate =
      kernel == ForwardKernel::kLaneWide ? kWideLaneGroup * kWideStatesPerLane : kLaneMaxStateDim;
  TORCH_CHECK(!lanes || p.dstate <= lane_max_dstate, op, ": the lane kernel (", kForwardKernelVariable, "=",
              kernel == ForwardKernel::kLaneWide ? "lane4" : "lane", ") supports a state size N up to ",
              lane_max_dstate, " (A.shape[1]), got ", p.dstate, "; unset ", kForwardKernelVariable,
              " or set it to 'warp' for larger N");
  const c10::cuda::CUDAGuard guard(x.device());
  auto [B, C] = common_bc(B_in, C_in);
  set_bc(p, B, C, /*multiaxial=*/true);
  OwnedParams keep;
  set_fp32_params(p, A, D, delta_bias, keep);
  const auto fp32 = x.options().dtype(at::kFloat);
  // The four directions add into y with float atomics (y is the only output they touch).
  auto y = at::zeros({p.batch, p.dim, p.height, p.width}, fp32);
  auto chunk_states = at::empty({p.batch, kMultiaxialDirections, p.dim, p.num_chunks, p.dstate}, fp32);
  p.out = y.data_ptr();
  p.chunk_states = chunk_states.data_ptr<float>();
  at::Tensor lookback, flat_states, flat_sums;
  if (flat) {
    // One row of segments per (batch, sequence): each segment's end state, then its entering state (in place),
    // and its delta sum (flat::max_segments: the larger of the row and column orientations).
    const int64_t slots = cuda::flat::max_segments(p.height, p.width);
    flat_states = at::empty({p.batch, p.num_seqs, slots, cuda::flat::kStates}, fp32);
    flat_sums = at::empty({p.batch, p.num_seqs, slots}, fp32);
    p.split_state = flat_states.data_ptr<float>();
    p.split_decay = flat_sums.data_ptr<float>();
    p.num_splits = 1;
  } else if (staged || regs) {
    lookback = setup_tiled_forward(p, x, op, kernel);
  } else if (lanes) {
    choose_splits_lane(p, x.get_device(), kernel);
  } else {
    choose_splits(p, x.get_device());
  }
  SplitScratch scratch;
  allocate_split_scratch(p, fp32, scratch, /*backward=*/false);
  const auto stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check_launch(flat    ? run_forward_flat(p, B.scalar_type(), stream)
               : staged  ? run_forward_staged(p, B.scalar_type(), stream)
               : regs  ? run_forward_regs(p, B.scalar_type(), stream)
               : lanes ? run_forward_lane(p, B.scalar_type(), kernel, stream)
                       : run_forward(p, B.scalar_type(), /*multiaxial=*/true, stream),
               op);
  return {y, chunk_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
multiaxial_scan_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& delta, const at::Tensor& A,
                         const at::Tensor& B_in, const at::Tensor& C_in, const at::Tensor& D,
                         const at::Tensor& delta_bias, bool delta_softplus, const at::Tensor& chunk_states_in,
                         int64_t chunk_size, bool deterministic) {
  const char* op = "multiaxial_scan_bwd";
  ScanParams p = multiaxial_params(op, x, delta, A, B_in, C_in, D, delta_bias, delta_softplus, chunk_size);
  const BackwardKernel kernel = multiaxial_backward_kernel(op, p);
  const bool lanes = kernel == BackwardKernel::kLane;
  const bool staged = kernel == BackwardKernel::kStaged;
  const bool regs = kernel == BackwardKernel::kRegs;
  const char* tiled_name = regs ? "regs" : "staged";
  TORCH_CHECK(!lanes || p.dstate <= kLaneMaxStateDim, op, ": the lane kernel (", kBackwardKernelVariable,
              "=lane) supports a state size N up to ", kLaneMaxStateDim, " (A.shape[1]), got ", p.dstate, "; unset ",
              kBackwardKernelVariable, " or set it to 'warp' for larger N");
  TORCH_CHECK(!(staged || regs) || p.dstate <= cuda::staged::kMaxStateDim, op, ": the ", tiled_name, " kernel (",
              kBackwardKernelVariable, "=", tiled_name, ") supports a state size N up to ", cuda::staged::kMaxStateDim,
              " (A.shape[1]), got ", p.dstate, "; unset ", kBackwardKernelVariable, " or set it to 'warp' for larger N");
  TORCH_CHECK(!regs || cuda::regs::regs_bwd_variant() >= 0, op, ": environment variable ",
              cuda::regs::kBwdVariantVariable, " must name one of the regs backward's variants (",
              regs_bwd_variant_names(), "), or be unset");
  cuda::staged::StagedLayout staged_layout{};
  if (staged || regs) {
    staged_layout = regs ? cuda::regs::regs_bwd_layout(p.dim, p.dstate, p.chunk_size, p.num_chunks)
                         : cuda::staged::staged_bwd_layout_selected(p.dim, p.dstate, p.chunk_size, p.num_chunks);
    TORCH_CHECK(staged_layout.ok, op, ": the ", tiled_name, " kernel (", kBackwardKernelVariable, "=", tiled_name,
                ") cannot fit one chunk (",
                p.chunk_size, " positions) of one channel with N = ", p.dstate, " in its ",
                cuda::staged::kSharedBudgetBytes, " bytes of shared memory; use a smaller chunk_size, or unset ",
                kBackwardKernelVariable);
  }
  check_cuda_float(dy, x, op, "dy");
  check_shape(dy, x.sizes(), op, "dy");
  check_fp32_param(chunk_states_in, x, {p.batch, kMultiaxialDirections, p.dim, p.num_chunks, p.dstate}, op,
                   "chunk_states");
  const c10::cuda::CUDAGuard guard(x.device());
  auto [B, C] = common_bc(B_in, C_in);
  set_bc(p, B, C, /*multiaxial=*/true);
  OwnedParams keep;
  set_fp32_params(p, A, D, delta_bias, keep);
  const auto fp32 = x.options().dtype(at::kFloat);
  auto chunk_states = chunk_states_in.contiguous();
  p.chunk_states = chunk_states.data_ptr<float>();
  p.dout = dy.data_ptr();
  p.dout_kind = kind_of(dy);
  p.dout_batch_stride = dy.stride(0);
  p.dout_dim_stride = dy.stride(1);
  p.dout_h_stride = dy.stride(2);
  p.dout_w_stride = dy.stride(3);

  auto ddelta = at::empty(delta.sizes(), delta.options().memory_format(at::MemoryFormat::Contiguous));
  p.ddelta = ddelta.data_ptr();
  at::Tensor dx_buf;
  if (deterministic) {
    dx_buf = at::empty({kMultiaxialDirections, p.batch, p.dim, p.height, p.width}, fp32);
    p.dx_per_direction = dx_buf.data_ptr<float>();
  } else {
    dx_buf = at::zeros({p.batch, p.dim, p.height, p.width}, fp32);
    p.dx_accum = dx_buf.data_ptr<float>();
  }
  auto dA_partial = at::empty({p.batch, p.num_seqs, p.num_chunks, p.dstate}, fp32);
  auto dD_partial = at::empty({p.batch, p.num_seqs, p.num_chunks}, fp32);
  auto dbias_partial = at::empty({p.batch, p.num_seqs, p.num_chunks}, fp32);
  p.dA_partial = dA_partial.data_ptr<float>();
  p.dD_partial = dD_partial.data_ptr<float>();
  p.ddelta_bias_partial = dbias_partial.data_ptr<float>();
  GradBC grads;
  at::Tensor lookback;
  if (staged || regs) {
    // One block per tile and channel block: those blocks share a direction's dB / dC.
    setup_grad_bc_blocks(p, B, C, deterministic, staged_layout.channel_blocks, grads);
    lookback = set_staged_tiles(p, x, staged_layout);
  } else if (lanes) {
    // The lane form's blocks per direction differ from the warp form's (channels / warps_per_block).
    setup_grad_bc_blocks(p, B, C, deterministic, lane_backward_channel_blocks(p.dim, p.dstate), grads);
    choose_splits_lane(p, x.get_device(), ForwardKernel::kLane);
  } else {
    setup_grad_bc(p, B, C, deterministic, grads);
    choose_splits(p, x.get_device());
  }
  SplitScratch scratch;
  allocate_split_scratch(p, fp32, scratch, /*backward=*/true);
  const auto stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  check_launch(staged  ? run_backward_staged(p, B.scalar_type(), stream)
               : regs  ? run_backward_regs(p, B.scalar_type(), stream)
               : lanes ? run_backward_lane(p, B.scalar_type(), stream)
                       : run_backward(p, B.scalar_type(), /*multiaxial=*/true, stream),
               op);
  finish_grad_bc(p, grads);

  at::Tensor dx = deterministic ? dx_buf.sum(0) : dx_buf;
  if (dx.scalar_type() != x.scalar_type()) dx = dx.to(x.scalar_type());
  at::Tensor dB = grads.dB, dC = grads.dC;
  if (dB.scalar_type() != B_in.scalar_type()) dB = dB.to(B_in.scalar_type());
  if (dC.scalar_type() != C_in.scalar_type()) dC = dC.to(C_in.scalar_type());
  return {dx,
          ddelta,
          dA_partial.sum(at::IntArrayRef{0, 2}),
          dB,
          dC,
          dD_partial.sum(at::IntArrayRef{0, 2}),
          dbias_partial.sum(at::IntArrayRef{0, 2})};
}

}  // namespace

TORCH_LIBRARY_IMPL(dermomamba, CUDA, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cuda);
  m.impl("multiaxial_scan_fwd", &multiaxial_scan_fwd_cuda);
  m.impl("multiaxial_scan_bwd", &multiaxial_scan_bwd_cuda);
}

}  // namespace dermomamba
