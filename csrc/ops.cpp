// Operator schemas of the stars_fast extension (the contract shared by the CPU and CUDA kernels).
// CPU implementations live in lif_cpu.cpp / stars_cpu.cpp, CUDA ones in cuda/*.cu; the Python side
// (stars_fast/ops/) adds fake (meta) kernels and autograd through torch.library.
#include <Python.h>
#include <torch/library.h>

#include "common.h"

extern "C" {
// Importing stars_fast._C registers the operators below (Python loads the .so as a module).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(stars_fast, m) {
  // Multi-step LIF/IF neuron over x[T, N] (contiguous). surrogate: 0 sigmoid, 1 atan, 2 triangle,
  // 3 piecewise_exp, 4 soft_sign, 5 super_spike (spiking only: it has no primitive), 6 erf.
  // v_init: [N] or None (then v_reset, or 0 for soft reset). decay: 1-element float tensor holding tau
  // (decay_is_tau: the charge divides by it, as SpikingJelly's LIFNode) or k = 1/tau (multiplies, as
  // its ParametricLIFNode), or [N] values of k, one per neuron (state dtype, contiguous). threshold: [N]
  // values of v_th, one per neuron (state dtype, contiguous: a learnable threshold), which replace
  // v_threshold; None: v_threshold. Returns spikes [T, N] (x's dtype) and the final membrane potential
  // v_last [N] (x's dtype) when need_v_last, else an empty [0] tensor.
  m.def(
      "lif_forward(Tensor x, Tensor? v_init, Tensor decay, bool leaky, bool decay_is_tau, float v_threshold, "
      "float? v_reset, bool decay_input, int surrogate, float alpha, bool spiking, bool need_v_last, "
      "Tensor? threshold=None) -> (Tensor spikes, Tensor v_last)");
  // Surrogate-gradient backward: recomputes h from x. grad_v_last None is zero. grad_v_init [N] when
  // need_grad_v_init, grad_decay and grad_threshold the per-neuron partial sums [N] of dL/dk and dL/dv_th
  // (fp32; fp64 for fp64 x; reduced by the caller) when need_decay_grad (requires decay_is_tau=False) and
  // need_threshold_grad (requires threshold); else empty [0].
  m.def(
      "lif_backward(Tensor grad_spikes, Tensor? grad_v_last, Tensor x, Tensor? v_init, Tensor decay, "
      "bool leaky, bool decay_is_tau, float v_threshold, float? v_reset, bool decay_input, int surrogate, "
      "float alpha, bool spiking, bool detach_reset, bool need_decay_grad, bool need_grad_v_init, "
      "Tensor? threshold=None, bool need_threshold_grad=False) "
      "-> (Tensor grad_x, Tensor grad_v_init, Tensor grad_decay, Tensor grad_threshold)");
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
  // The vector ISA the CPU kernels run here: "avx512", "avx2" or "baseline" (common.h cpu_isa:
  // the CPU's, capped by PyTorch's ATEN_CPU_CAPABILITY).
  m.def("cpu_isa() -> str", [] { return std::string(stars_fast::cpu_isa_name(stars_fast::cpu_isa())); });
}
