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

namespace dermomamba {

bool compiled_with_cuda() {
#ifdef DERMOMAMBA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(dermomamba, m) {
  m.def("compiled_with_cuda() -> bool", &compiled_with_cuda);

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
}

}  // namespace dermomamba

// The module has no Python functions: importing it runs the static registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
