// What the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu) implementations of each op share on the host:
// the argument checks, so that an op rejects the same inputs with the same message on either device,
// and (neuron_constants.h) the neuron's constants derived from its options. Plain ATen, no device code.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "neuron_constants.h"

namespace stars_fast {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// State and arithmetic dtype: float64 for float64 data, float32 for float32/float16/bfloat16.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// t is defined, of a float dtype, and on `device` (the device the op runs on).
inline void check_float(const at::Tensor& t, const c10::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// RCA's silent rows (docs/design.md section 2.2): a row whose norm is at most this times the largest
// row norm of its side and layer has no direction; it leaves the pairs on both sides and gets no RCA
// gradient. The same value as stars_fast.reference.RCA_SILENT_TOL and the Triton kernel's.
constexpr double kRcaSilentTol = 1e-3;

// normalize="teacher" standardizes by s = max(std_pop(zT), tau_std rms(zT), eps), 1 where s = 0
// (docs/design.md section 2.2): a constant teacher layer at c gets 1e-3 |c|, not eps. The same value as
// stars_fast.reference.NORMALIZE_STD_TOL and the Triton kernel's.
constexpr double kNormalizeStdTol = 1e-3;

// 1 / s for the standardization above, from the teacher's mean and population std; NaN stays NaN.
inline double normalize_scale(double mean, double std_pop, double eps) {
  const double floor = kNormalizeStdTol * std::hypot(mean, std_pop);
  double s = std_pop < floor ? floor : std_pop;
  s = s < eps ? eps : s;
  return s == 0 ? 1.0 : 1.0 / s;
}

// ---------------------------------------------------------------------------------------------
// Neuron (lif_forward / lif_backward).

// A learnable threshold: v_th per neuron ([N]), which the kernels read in place (then on x's device, in the
// state dtype, contiguous) instead of v_threshold. Its values are not checked (that would synchronize a
// GPU); a NaN threshold gives NaN spikes, as in the reference.
inline void check_per_neuron_threshold(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& threshold) {
  if (!threshold.has_value()) return;
  TORCH_CHECK(threshold->dim() == 1 && threshold->size(0) == x.size(1), op,
              ": threshold must have shape [N] = [", x.size(1), "] (one v_th per neuron), got shape ",
              threshold->sizes());
  TORCH_CHECK(threshold->device() == x.device(), op, ": threshold must be on ", x.device(), ", got ",
              threshold->device());
  TORCH_CHECK(threshold->scalar_type() == acc_dtype(x.scalar_type()), op, ": threshold must be ",
              acc_dtype(x.scalar_type()), " for ", x.scalar_type(), " x, got ", threshold->scalar_type());
  TORCH_CHECK(threshold->is_contiguous(), op, ": threshold must be contiguous");
}

// x [T, N] contiguous; v_init [N] of x's dtype; decay one float element on x's device or the CPU
// (tau when decay_is_tau, else k = 1/tau), or [N] values of k, one per neuron (check_per_neuron_decay);
// surrogate 0 (sigmoid) | 1 (atan) | 2 (triangle) | 3 (piecewise_exp) | 4 (soft_sign) | 5 (super_spike,
// spiking only: it has no primitive) | 6 (erf); alpha > 0; threshold None or [N] (check_per_neuron_threshold).
// The Python op checks all of this first (stars_fast/ops/lif.py); these are the second line.
inline void check_neuron_inputs(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& v_init,
                                const at::Tensor& decay, int64_t surrogate, bool spiking, double alpha,
                                double v_threshold, const std::optional<at::Tensor>& threshold) {
  TORCH_CHECK(x.defined(), op, ": x is undefined");
  check_float(x, x.device(), op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [T, N], got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  if (v_init.has_value()) {
    check_float(*v_init, x.device(), op, "v_init");
    TORCH_CHECK(v_init->dim() == 1 && v_init->size(0) == x.size(1), op, ": v_init must have shape [N] = [",
                x.size(1), "], got ", v_init->sizes());
    TORCH_CHECK(v_init->scalar_type() == x.scalar_type(), op, ": v_init dtype ", v_init->scalar_type(),
                " differs from x dtype ", x.scalar_type());
  }
  TORCH_CHECK(decay.defined(), op, ": decay is undefined");
  TORCH_CHECK(decay.device() == x.device() || decay.device().is_cpu(), op, ": decay must be on ", x.device(),
              " or the CPU, got ", decay.device());
  TORCH_CHECK(is_float_dtype(decay.scalar_type()), op, ": decay must be a floating-point tensor, got ",
              decay.scalar_type());
  TORCH_CHECK(decay.numel() == 1 || (decay.dim() == 1 && decay.size(0) == x.size(1)), op,
              ": decay must have one element or shape [N] = [", x.size(1), "] (one per neuron), got shape ",
              decay.sizes());
  TORCH_CHECK(surrogate >= 0 && surrogate <= 6, op, ": surrogate must be 0 (sigmoid), 1 (atan), 2 (triangle), ",
              "3 (piecewise_exp), 4 (soft_sign), 5 (super_spike) or 6 (erf), got ", surrogate);
  TORCH_CHECK_VALUE(spiking || surrogate != 5, op,
                    ": super_spike has no primitive: spiking=False is not supported with it");
  TORCH_CHECK(std::isfinite(alpha) && alpha > 0, op, ": alpha must be a positive number, got ", alpha);
  TORCH_CHECK(std::isfinite(v_threshold), op, ": v_threshold must be finite, got ", v_threshold);
  check_per_neuron_threshold(op, x, threshold);
}

// Whether decay holds one k = 1/tau per neuron ([N], N > 1), which the kernels read in place: then it
// must be multiply mode, on x's device, in the state dtype and contiguous. Its values are not checked
// (on a GPU that would synchronize); the Python op passes sigmoid(w), in (0, 1).
inline bool check_per_neuron_decay(const char* op, const at::Tensor& x, const at::Tensor& decay, bool decay_is_tau) {
  if (decay.numel() == 1) return false;
  TORCH_CHECK_VALUE(!decay_is_tau, op, ": a per-neuron decay holds k = 1/tau: decay_is_tau must be False");
  TORCH_CHECK(decay.device() == x.device(), op, ": a per-neuron decay must be on ", x.device(), ", got ",
              decay.device());
  TORCH_CHECK(decay.scalar_type() == acc_dtype(x.scalar_type()), op, ": a per-neuron decay must be ",
              acc_dtype(x.scalar_type()), " for ", x.scalar_type(), " x, got ", decay.scalar_type());
  TORCH_CHECK(decay.is_contiguous(), op, ": a per-neuron decay must be contiguous");
  return true;
}

// A decay value read on the host: tau finite and > 1 (divide mode), or k = 1/tau finite and > 0.
inline void check_decay_value(const char* op, bool leaky, bool decay_is_tau, double decay) {
  if (!leaky) return;
  if (decay_is_tau) {
    TORCH_CHECK(std::isfinite(decay) && decay > 1.0, op, ": tau must be a finite number > 1, got ", decay);
  } else {
    TORCH_CHECK(std::isfinite(decay) && decay > 0.0, op, ": 1/tau must be a finite number > 0, got ", decay);
  }
}

// The incoming gradients of lif_backward: grad_spikes like x (any strides), grad_v_last [N] or None; the
// parameter gradients asked for exist: dL/dk of a leaky neuron's k, dL/dv_th of a threshold tensor.
inline void check_neuron_grads(const at::Tensor& x, const at::Tensor& grad_spikes,
                               const std::optional<at::Tensor>& grad_v_last, bool leaky, bool decay_is_tau,
                               bool need_decay_grad, const std::optional<at::Tensor>& threshold,
                               bool need_threshold_grad) {
  check_float(grad_spikes, x.device(), "lif_backward", "grad_spikes");
  TORCH_CHECK(grad_spikes.sizes() == x.sizes(), "lif_backward: grad_spikes shape ", grad_spikes.sizes(),
              " differs from x shape ", x.sizes());
  if (grad_v_last.has_value()) {
    check_float(*grad_v_last, x.device(), "lif_backward", "grad_v_last");
    TORCH_CHECK(grad_v_last->dim() == 1 && grad_v_last->size(0) == x.size(1),
                "lif_backward: grad_v_last must have shape [N] = [", x.size(1), "], got ", grad_v_last->sizes());
  }
  TORCH_CHECK(leaky || !need_decay_grad, "lif_backward: need_decay_grad requires the leaky (LIF) neuron");
  TORCH_CHECK_VALUE(!decay_is_tau || !need_decay_grad,
              "lif_backward: need_decay_grad requires decay_is_tau=False (decay holds k = 1/tau)");
  TORCH_CHECK_VALUE(!need_threshold_grad || threshold.has_value(),
                    "lif_backward: need_threshold_grad requires a threshold tensor");
}

// ---------------------------------------------------------------------------------------------
// STARS ops (pool_mean, quantiles, stars_loss_fused).

// x [T, R, S] with T, S > 0.
inline void check_pool_mean_input(const at::Tensor& x) {
  TORCH_CHECK(x.defined(), "pool_mean: x is undefined");
  check_float(x, x.device(), "pool_mean", "x");
  TORCH_CHECK(x.dim() == 3, "pool_mean: x must be 3-D [T, R, S], got shape ", x.sizes());
  TORCH_CHECK(x.size(0) > 0 && x.size(2) > 0, "pool_mean: cannot average over an empty T or S, got shape ",
              x.sizes());
}

// z non-empty; q non-empty, each in [0, 1].
inline void check_quantiles_input(const at::Tensor& z, at::ArrayRef<double> q) {
  TORCH_CHECK(z.defined(), "quantiles: z is undefined");
  check_float(z, z.device(), "quantiles", "z");
  TORCH_CHECK(z.numel() > 0, "quantiles: z must be non-empty");
  TORCH_CHECK(!q.empty(), "quantiles: q must be non-empty");
  for (double qi : q) TORCH_CHECK(qi >= 0.0 && qi <= 1.0, "quantiles: q values must be in [0, 1], got ", qi);
}

// One entry per layer in z_student, coef_rca and coef_tar; per layer teacher [B, Ct] and student
// [B, Cs] features with one B >= 2 for every layer and side; the TAR thresholds (fixed values,
// finite) or quantiles (in [0, 1]) non-empty; delta > 0, eps >= 0 and every coefficient finite;
// everything on z_teacher[0]'s device. The Python op (stars_fast/ops/stars.py) checks all of this
// first; these are the second line. Returns whether any feature is float64 (the op then computes
// its loss in float64).
inline bool check_stars_inputs(at::TensorList z_teacher, at::TensorList z_student, at::ArrayRef<double> quantiles,
                               std::optional<at::ArrayRef<double>> thresholds, at::ArrayRef<double> coef_rca,
                               at::ArrayRef<double> coef_tar, double delta, double eps) {
  const size_t L = z_teacher.size();
  TORCH_CHECK(L > 0, "stars_loss_fused: needs at least one layer");
  TORCH_CHECK(z_student.size() == L && coef_rca.size() == L && coef_tar.size() == L,
              "stars_loss_fused: every per-layer list must have one entry per layer; got z_teacher ", L,
              ", z_student ", z_student.size(), ", coef_rca ", coef_rca.size(), ", coef_tar ", coef_tar.size());
  TORCH_CHECK(std::isfinite(delta) && delta > 0, "stars_loss_fused: delta must be a finite number > 0, got ", delta);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "stars_loss_fused: eps must be a finite number >= 0, got ", eps);
  for (size_t l = 0; l < L; ++l) {
    TORCH_CHECK(std::isfinite(coef_rca[l]) && std::isfinite(coef_tar[l]), "stars_loss_fused: layer ", l,
                ": coefficients must be finite, got ", coef_rca[l], " and ", coef_tar[l]);
  }
  if (thresholds.has_value()) {
    TORCH_CHECK(!thresholds->empty(), "stars_loss_fused: thresholds must be non-empty");
    for (double t : *thresholds) TORCH_CHECK(std::isfinite(t), "stars_loss_fused: thresholds must be finite, got ", t);
  } else {
    TORCH_CHECK(!quantiles.empty(), "stars_loss_fused: quantiles must be non-empty");
    for (double q : quantiles) {
      TORCH_CHECK(q >= 0.0 && q <= 1.0, "stars_loss_fused: quantiles must be in [0, 1], got ", q);
    }
  }
  TORCH_CHECK(z_teacher[0].defined(), "stars_loss_fused: z_teacher[0] is undefined");
  const c10::Device device = z_teacher[0].device();
  const int64_t B = z_teacher[0].dim() > 0 ? z_teacher[0].size(0) : 0;
  bool any_fp64 = false;
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor &zt = z_teacher[l], &zs = z_student[l];
    check_float(zt, device, "stars_loss_fused", "z_teacher[l]");
    check_float(zs, device, "stars_loss_fused", "z_student[l]");
    TORCH_CHECK(zt.dim() == 2 && zs.dim() == 2, "stars_loss_fused: layer ", l,
                ": features must be 2-D [B, C], got teacher ", zt.sizes(), " and student ", zs.sizes());
    TORCH_CHECK(zt.size(0) == zs.size(0), "stars_loss_fused: layer ", l, ": teacher batch ", zt.size(0),
                " != student batch ", zs.size(0));
    TORCH_CHECK(zt.size(0) == B, "stars_loss_fused: every layer must have the same batch size; layer 0 has ", B,
                ", layer ", l, " has ", zt.size(0));
    TORCH_CHECK(B >= 2, "stars_loss_fused: layer ", l, ": RCA needs a batch of at least 2, got ", B);
    TORCH_CHECK(zt.size(1) > 0 && zs.size(1) > 0, "stars_loss_fused: layer ", l, ": features have no channels");
    any_fp64 = any_fp64 || zt.scalar_type() == at::kDouble || zs.scalar_type() == at::kDouble;
  }
  return any_fp64;
}

}  // namespace stars_fast
