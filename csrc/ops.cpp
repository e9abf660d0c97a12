// Operator schemas of the stars_fast extension (the contract shared by the CPU and CUDA kernels).
// CPU implementations live in lif_cpu.cpp / stars_cpu.cpp, CUDA ones in cuda/*.cu; the Python side
// (stars_fast/ops/) adds fake (meta) kernels and autograd through torch.library.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing stars_fast._C registers the operators below (Python loads the .so as a module).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stars_fast, m) {
  // Multi-step LIF/IF neuron over x[T, N] (contiguous). surrogate: 0 sigmoid, 1 atan, 2 triangle.
  // v_init: [N] or None (then v_reset, or 0 for soft reset). inv_tau: 1-element fp32 tensor (1/tau).
  // Returns spikes [T, N] (x's dtype) and the final membrane potential v_last [N] (x's dtype).
  m.def(
      "lif_forward(Tensor x, Tensor? v_init, Tensor inv_tau, bool leaky, float v_threshold, "
      "float? v_reset, bool decay_input, int surrogate, float alpha, bool spiking) "
      "-> (Tensor spikes, Tensor v_last)");
  // Surrogate-gradient backward: recomputes h from x. grad_inv_tau is a per-element partial sum
  // [N] fp32 (reduced deterministically by the caller) when need_inv_tau_grad, else empty.
  m.def(
      "lif_backward(Tensor grad_spikes, Tensor? grad_v_last, Tensor x, Tensor? v_init, Tensor inv_tau, "
      "bool leaky, float v_threshold, float? v_reset, bool decay_input, int surrogate, float alpha, "
      "bool spiking, bool detach_reset, bool need_inv_tau_grad) "
      "-> (Tensor grad_x, Tensor grad_v_init, Tensor grad_inv_tau)");
  // Fused STARS loss over L layers: z_teacher[l] [B, C_l], z_student[l] [B, C'_l] (one B for all).
  // Per layer, normalize: zn = (z - mean(zT)) / max(std_pop(zT), eps) on both sides (else zn = z);
  // theta = thresholds (shared by all layers, in zn coordinates) if given, else the linear
  // quantiles of zn_T at `quantiles`; coef_rca/coef_tar = lambda * w_l / sum(w). Returns total
  // (0-dim), parts [L, 2] (raw l_rca, l_tar per layer), both fp32 (fp64 if any input is fp64), and
  // the gradients of total for both inputs (inputs' dtypes).
  m.def(
      "stars_loss_fused(Tensor[] z_teacher, Tensor[] z_student, float[] quantiles, float[]? thresholds, "
      "bool normalize, float[] coef_rca, float[] coef_tar, float delta, float eps) "
      "-> (Tensor total, Tensor parts, Tensor[] grad_teacher, Tensor[] grad_student)");
  // Linear-interpolated quantiles of z.flatten() (as torch.quantile), by exact selection.
  m.def("quantiles(Tensor z, float[] q) -> Tensor");
  // Mean of x[T, R, S] over T and S -> [R] (T = 1 for the teacher): the Eq. 12 pooling.
  m.def("pool_mean(Tensor x) -> Tensor");
}
