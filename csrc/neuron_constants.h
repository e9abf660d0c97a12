// The neuron's options as the constants its kernels use (docs/design.md section 2.1), in acc_t. No
// ATen: the CUDA kernels (csrc/cuda/lif_kernels.cuh) take them as a launch argument and are also built
// by the host compiler, on the CUDA emulation.
#pragma once

#include <cmath>
#include <optional>

namespace stars_fast {

template <typename acc_t>
struct NeuronConstants {
  acc_t v_th;
  acc_t v_r;           // v_reset in the charge: the reset value, 0 for soft reset
  acc_t v_reset;       // hard-reset value (unused for soft reset)
  acc_t v_start;       // v before t = 0 when v_init is None
  acc_t alpha;
  acc_t half_alpha;    // alpha / 2
  acc_t atan_scale;    // pi/2 * alpha
  acc_t pi;
  acc_t two_alpha2;    // 2 alpha^2 (triangle primitive)
  acc_t alpha2;        // alpha^2 (triangle surrogate)
  acc_t inv_alpha;     // 1 / alpha (soft_sign surrogate)
  acc_t two_alpha;     // 2 alpha (soft_sign surrogate)
  acc_t erf_scale;     // alpha / sqrt(pi) (erf surrogate)
  acc_t not_detached;  // 1 - D: 0 when detach_reset drops the reset's path through s
};

template <typename acc_t>
NeuronConstants<acc_t> neuron_constants(double v_threshold, std::optional<double> v_reset, double alpha,
                                        bool detach_reset) {
  constexpr double kPi = 3.14159265358979323846;
  NeuronConstants<acc_t> c;
  c.v_th = static_cast<acc_t>(v_threshold);
  c.v_r = static_cast<acc_t>(v_reset.value_or(0.0));
  c.v_reset = c.v_r;
  c.v_start = c.v_r;
  c.alpha = static_cast<acc_t>(alpha);
  c.half_alpha = static_cast<acc_t>(alpha / 2.0);
  c.atan_scale = static_cast<acc_t>(kPi / 2.0 * alpha);
  c.pi = static_cast<acc_t>(kPi);
  c.two_alpha2 = static_cast<acc_t>(2.0 * alpha * alpha);
  c.alpha2 = static_cast<acc_t>(alpha * alpha);
  c.inv_alpha = static_cast<acc_t>(1.0 / alpha);
  c.two_alpha = static_cast<acc_t>(2.0 * alpha);
  c.erf_scale = static_cast<acc_t>(alpha / std::sqrt(kPi));
  c.not_detached = detach_reset ? acc_t(0) : acc_t(1);
  return c;
}

}  // namespace stars_fast
