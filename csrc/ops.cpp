// Op schemas of torch.ops.dermomamba, defined once. Kernels register per dispatch key in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cpp (CUDA); fake (meta) implementations and autograd are
// registered from Python (dermomamba_kernels/selective_scan/extension.py), so every op works under
// torch.compile(fullgraph=True).
//
// Conventions shared by all scan kernels (see dermomamba_kernels/selective_scan/naive.py for the
// arithmetic):
//  * state is fp32 whatever the input dtype;
//  * chunk_states holds the state *entering* each chunk of `chunk_size` positions
//    (chunk 0's is zero); the backward restarts the forward from there instead of storing h_t;
//  * optional gradients that do not apply come back as empty (numel 0) tensors.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace dermomamba {

bool compiled_with_cuda() {
#ifdef DERMOMAMBA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The GPU architectures this build holds kernels for, e.g. "sm_80 sm_90 compute_90": machine code
// (sm_XY runs on compute capability X.Z for Z >= Y) and PTX (compute_XY, JIT-compiled for any
// capability >= X.Y). Empty without CUDA. setup.py passes the lists as comma-separated integers.
#ifndef DERMOMAMBA_CUDA_SASS_ARCHS
#define DERMOMAMBA_CUDA_SASS_ARCHS
#endif
#ifndef DERMOMAMBA_CUDA_PTX_ARCHS
#define DERMOMAMBA_CUDA_PTX_ARCHS
#endif

std::string compiled_cuda_archs() {
  std::string result;
#ifdef DERMOMAMBA_WITH_CUDA
  const std::vector<int> machine_code = {DERMOMAMBA_CUDA_SASS_ARCHS};
  const std::vector<int> ptx = {DERMOMAMBA_CUDA_PTX_ARCHS};
  for (int arch : machine_code) result += (result.empty() ? "" : " ") + std::string("sm_") + std::to_string(arch);
  for (int arch : ptx) result += (result.empty() ? "" : " ") + std::string("compute_") + std::to_string(arch);
#endif
  return result;
}

TORCH_LIBRARY(dermomamba, m) {
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);
  m.def("compiled_cuda_archs() -> str", &compiled_cuda_archs);

  // 1-D scan, mamba_ssm semantics. u, delta, z: (batch, dim, L), stride(-1) == 1;
  // A: (dim, N) fp32; B, C: (batch, groups, N, L), any strides (a constant (dim, N) B arrives as a
  // stride-0 expanded view with groups == dim), dtype of u or fp32; D, delta_bias: (dim,) fp32.
  // out: (batch, dim, L) in u's dtype (z-gated when z is given); last_state: (batch, dim, N) fp32;
  // chunk_states: (batch, dim, ceil(L / chunk_size), N) fp32.
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, bool delta_softplus, int chunk_size) -> (Tensor out, Tensor last_state, "
      "Tensor chunk_states)");
  // Gradients in the dtype of their input (dB, dC in B's / C's dtype, shape of B / C, contiguous);
  // dD, dz, ddelta_bias are empty when D, z, delta_bias were None.
  m.def(
      "selective_scan_bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor chunk_states, int chunk_size, "
      "bool deterministic) -> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, "
      "Tensor dz, Tensor ddelta_bias)");

  // SS2D core over an (H, W) plane, four directions read by index arithmetic (no copies):
  // k=0 row-major, k=1 column-major, k=2 / k=3 those reversed. x: (batch, dim, H, W), any strides;
  // delta: (batch, 4, dim, H, W) and B, C: (batch, 4, N, H, W), any strides, in x's dtype or fp32,
  // all in the native (h, w) layout; A: (4 * dim, N) fp32; D, delta_bias: (4 * dim,) fp32.
  // y: (batch, dim, H, W) fp32 contiguous, the sum of the four directions;
  // chunk_states: (batch, 4, dim, ceil(H * W / chunk_size), N) fp32.
  m.def(
      "multiaxial_scan_fwd(Tensor x, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, "
      "Tensor delta_bias, bool delta_softplus, int chunk_size) -> (Tensor y, Tensor chunk_states)");
  m.def(
      "multiaxial_scan_bwd(Tensor dy, Tensor x, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, "
      "Tensor delta_bias, bool delta_softplus, Tensor chunk_states, int chunk_size, bool deterministic) "
      "-> (Tensor dx, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor ddelta_bias)");

  // Fused CBAM (dermomamba_kernels/cbam; CUDA kernels only). x: (B, C, H, W) fp32/fp16/bf16 whose H
  // and W flatten to one pixel axis (NCHW or channels-last; otherwise a contiguous copy is read);
  // mlp1_w (hidden, C), mlp1_b (hidden,), mlp2_w (C, hidden), mlp2_b (C,), conv_w (1, 2, k, k) with
  // k odd, bn_weight, bn_bias, running_mean, running_var (1,): any float dtype each. Functional:
  // out (x's shape, dtype and memory format) and the maps the backward reads, all fp32 contiguous:
  // cs (B, C) channel scale; chan (B, 3, C) avg, max and 1/ties of the max over HW; pix (B, 4, H*W)
  // max, mean and 1/ties of the max over C of x * cs, and the conv output; stats (4,) mean and
  // 1/std that normalised, batch mean, unbiased batch variance. use_batch_stats=False normalises
  // with the running stats (required then). Gradients come in their parameters' dtypes and shapes.
  m.def(
      "cbam_fwd(Tensor x, Tensor mlp1_w, Tensor mlp1_b, Tensor mlp2_w, Tensor mlp2_b, Tensor conv_w, "
      "Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, Tensor? running_var, bool use_batch_stats, "
      "float eps) -> (Tensor out, Tensor cs, Tensor chan, Tensor pix, Tensor stats)");
  m.def(
      "cbam_bwd(Tensor grad_out, Tensor x, Tensor mlp1_w, Tensor mlp1_b, Tensor mlp2_w, Tensor mlp2_b, "
      "Tensor conv_w, Tensor bn_weight, Tensor bn_bias, Tensor cs, Tensor chan, Tensor pix, Tensor stats, "
      "bool use_batch_stats) -> (Tensor dx, Tensor d_mlp1_w, Tensor d_mlp1_b, Tensor d_mlp2_w, Tensor d_mlp2_b, "
      "Tensor d_conv_w, Tensor d_bn_weight, Tensor d_bn_bias)");
  // BatchNorm's momentum update of the running buffers from cbam_fwd's stats, in place, in fp32
  // rounded once to the buffers' dtype.
  m.def(
      "cbam_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor stats, "
      "float momentum) -> ()");
}

}  // namespace dermomamba

// The module has no Python functions: importing it runs the static registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
