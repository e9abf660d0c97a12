// What the LIF CPU op (lif_cpu.cpp) hands its kernels (lif_cpu_kernel.h, compiled once per CPU
// capability: DEFAULT in lif_cpu.cpp, AVX2 in lif_cpu_avx2.cpp, AVX512 in lif_cpu_avx512.cpp): raw
// pointers and the neuron's options, so that the kernels never touch at::Tensor.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace stars_fast {

// A [rows, N] (or [N]) operand: element (r, j) at data + r * row_stride + j * col_stride, with
// col_stride 1 or 0 (a broadcast value, as the gradient of .sum()).
struct LifOperand {
  const void* data = nullptr;
  int64_t row_stride = 0, col_stride = 1;
};

struct LifOptions {
  bool leaky, decay_input, hard, spiking, detach_reset;
  bool divide;  // decay holds tau and the charge divides by it; else it holds k = 1/tau and multiplies
  int64_t surrogate;  // 0 sigmoid, 1 atan, 2 triangle, 3 piecewise_exp, 4 soft_sign, 5 super_spike, 6 erf
  double decay, v_threshold, v_reset, alpha;  // v_reset: 0 for soft reset
  const void* decays;  // [N] k per neuron (state dtype, multiply mode: PLIF per channel), or nullptr: `decay`
  const void* thresholds;  // [N] v_th per neuron (state dtype: a learnable threshold), or nullptr: `v_threshold`
};

struct LifForwardArgs {
  c10::ScalarType dtype;  // of x, v_init, spikes, v_last
  int64_t T, N;
  LifOperand x, v_init;  // v_init.data nullptr: start at v_reset (0 for soft reset)
  void* spikes;          // [T, N] contiguous
  void* v_last;          // [N] or nullptr when not wanted
  LifOptions o;
};

struct LifBackwardArgs {
  c10::ScalarType dtype;  // of x, v_init, the gradients in and out
  int64_t T, N;
  LifOperand grad_spikes, grad_v_last, x, v_init;  // grad_v_last.data nullptr: zero
  void* grad_x;        // [T, N] contiguous
  void* grad_v_init;   // [N] or nullptr when not wanted
  void* grad_decay;    // [N] partial sums in the state dtype, or nullptr
  void* grad_threshold;  // [N] partial sums of dL/dv_th in the state dtype (per-neuron thresholds), or nullptr
  LifOptions o;
};

// Elements [begin, end) of every row; begin and end multiples of the parallel chunk (or N).
namespace DEFAULT {
void lif_forward_range(const LifForwardArgs& a, int64_t begin, int64_t end);
void lif_backward_range(const LifBackwardArgs& a, int64_t begin, int64_t end);
}  // namespace DEFAULT
namespace AVX2 {
void lif_forward_range(const LifForwardArgs& a, int64_t begin, int64_t end);
void lif_backward_range(const LifBackwardArgs& a, int64_t begin, int64_t end);
}  // namespace AVX2
namespace AVX512 {
void lif_forward_range(const LifForwardArgs& a, int64_t begin, int64_t end);
void lif_backward_range(const LifBackwardArgs& a, int64_t begin, int64_t end);
}  // namespace AVX512

}  // namespace stars_fast
