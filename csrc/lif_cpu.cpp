// CPU op of the multi-step LIF / IF neuron (docs/design.md section 2.1) over x[T, N]: argument
// checks, outputs, and the split of the N neurons into parallel chunks of kChunk elements (a
// multiple of 64 bytes, so threads never write the same cache line of a row whose start is
// aligned), each run by the kernels of lif_cpu_kernel.h for the CPU's capability (AVX-512, AVX2 +
// FMA, or the DEFAULT build: cpu_isa() in common.h). The DEFAULT kernels are compiled in this file.
#define CPU_CAPABILITY DEFAULT
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"
#include "lif_cpu.h"
#include "lif_cpu_kernel.h"

namespace stars_fast {
namespace {

// Elements per parallel task (see parallel_chunks in common.h).
constexpr int64_t kChunk = 32768;

LifOperand operand(const at::Tensor& t) {
  if (!t.defined()) return {};
  if (t.dim() == 2) return {t.const_data_ptr(), t.stride(0), t.stride(1)};
  return {t.const_data_ptr(), 0, t.stride(0)};
}

// A gradient in x's dtype with each row unit-stride or broadcast (stride 0): read in place when it is.
at::Tensor readable_grad(const at::Tensor& g, at::ScalarType dtype) {
  at::Tensor out = g.scalar_type() == dtype ? g : g.to(dtype);
  const int64_t col_stride = out.stride(out.dim() - 1);
  return col_stride == 0 || col_stride == 1 ? out : out.contiguous();
}

LifOptions options(const at::Tensor& x, const at::Tensor& decay, bool leaky, bool decay_is_tau, double v_threshold,
                   std::optional<double> v_reset, bool decay_input, int64_t surrogate, double alpha, bool spiking,
                   bool detach_reset, const std::optional<at::Tensor>& threshold, const char* op) {
  const bool per_neuron = check_per_neuron_decay(op, x, decay, decay_is_tau);
  const double d = per_neuron ? 1.0 : decay.item<double>();  // per neuron: the kernels read `decays` instead
  check_decay_value(op, leaky, decay_is_tau, d);
  return LifOptions{leaky,        decay_input, v_reset.has_value(),    spiking, detach_reset, decay_is_tau, surrogate,
                    d,            v_threshold, v_reset.value_or(0.0), alpha,
                    per_neuron && leaky ? decay.const_data_ptr() : nullptr,
                    threshold.has_value() ? threshold->const_data_ptr() : nullptr};
}

// Runs the kernels of the widest ISA cpu_isa() allows over all chunks.
template <typename Args>
void run_chunks(const Args& a, void (*avx512)(const Args&, int64_t, int64_t),
                void (*avx2)(const Args&, int64_t, int64_t), void (*baseline)(const Args&, int64_t, int64_t)) {
  const CpuIsa isa = cpu_isa();
  const auto range = isa == CpuIsa::kAvx512 ? avx512 : isa == CpuIsa::kAvx2 ? avx2 : baseline;
  parallel_chunks(a.N, kChunk, [&](int64_t begin, int64_t end) { range(a, begin, end); });
}

#if defined(__x86_64__) || defined(__i386__)
#define LIF_KERNELS(fn) &AVX512::fn, &AVX2::fn, &DEFAULT::fn
#else
#define LIF_KERNELS(fn) &DEFAULT::fn, &DEFAULT::fn, &DEFAULT::fn  // cpu_isa() is kBaseline
#endif

std::tuple<at::Tensor, at::Tensor> lif_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& v_init,
                                                   const at::Tensor& decay, bool leaky, bool decay_is_tau,
                                                   double v_threshold, std::optional<double> v_reset,
                                                   bool decay_input, int64_t surrogate, double alpha, bool spiking,
                                                   bool need_v_last, const std::optional<at::Tensor>& threshold) {
  check_neuron_inputs("lif_forward", x, v_init, decay, surrogate, spiking, alpha, v_threshold, threshold);
  const int64_t T = x.size(0), N = x.size(1);
  at::Tensor spikes = empty_output(x.sizes(), x.options());
  at::Tensor v_last = at::empty({need_v_last ? N : 0}, x.options());
  const at::Tensor v0 = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  const LifForwardArgs a{x.scalar_type(),
                         T,
                         N,
                         operand(x),
                         operand(v0),
                         spikes.data_ptr(),
                         need_v_last ? v_last.data_ptr() : nullptr,
                         options(x, decay, leaky, decay_is_tau, v_threshold, v_reset, decay_input, surrogate, alpha,
                                 spiking, false, threshold, "lif_forward")};
  run_chunks(a, LIF_KERNELS(lif_forward_range));
  return {spikes, v_last};
}

// grad_v_init [N] (x's dtype, dL/dv before t = 0) when need_grad_v_init; grad_decay and grad_threshold the
// [N] partial sums of dL/dk and dL/dv_th in the state dtype (fp64 for fp64 x, else fp32) when
// need_decay_grad / need_threshold_grad. Else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lif_backward_cpu(
    const at::Tensor& grad_spikes, const std::optional<at::Tensor>& grad_v_last, const at::Tensor& x,
    const std::optional<at::Tensor>& v_init, const at::Tensor& decay, bool leaky, bool decay_is_tau,
    double v_threshold, std::optional<double> v_reset, bool decay_input, int64_t surrogate, double alpha,
    bool spiking, bool detach_reset, bool need_decay_grad, bool need_grad_v_init,
    const std::optional<at::Tensor>& threshold, bool need_threshold_grad) {
  check_neuron_inputs("lif_backward", x, v_init, decay, surrogate, spiking, alpha, v_threshold, threshold);
  check_neuron_grads(x, grad_spikes, grad_v_last, leaky, decay_is_tau, need_decay_grad, threshold,
                     need_threshold_grad);
  const int64_t T = x.size(0), N = x.size(1);
  at::Tensor grad_x = empty_output(x.sizes(), x.options());
  at::Tensor grad_v_init = at::empty({need_grad_v_init ? N : 0}, x.options());
  at::Tensor grad_decay = at::empty({need_decay_grad ? N : 0}, x.options().dtype(acc_dtype(x.scalar_type())));
  at::Tensor grad_threshold =
      at::empty({need_threshold_grad ? N : 0}, x.options().dtype(acc_dtype(x.scalar_type())));
  const at::Tensor gs = readable_grad(grad_spikes, x.scalar_type());
  const at::Tensor gv = grad_v_last.has_value() ? readable_grad(*grad_v_last, x.scalar_type()) : at::Tensor();
  const at::Tensor v0 = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  const LifBackwardArgs a{x.scalar_type(),
                          T,
                          N,
                          operand(gs),
                          operand(gv),
                          operand(x),
                          operand(v0),
                          grad_x.data_ptr(),
                          need_grad_v_init ? grad_v_init.data_ptr() : nullptr,
                          need_decay_grad ? grad_decay.data_ptr() : nullptr,
                          need_threshold_grad ? grad_threshold.data_ptr() : nullptr,
                          options(x, decay, leaky, decay_is_tau, v_threshold, v_reset, decay_input, surrogate, alpha,
                                  spiking, detach_reset, threshold, "lif_backward")};
  run_chunks(a, LIF_KERNELS(lif_backward_range));
  return {grad_x, grad_v_init, grad_decay, grad_threshold};
}

}  // namespace

TORCH_LIBRARY_IMPL(stars_fast, CPU, m) {
  m.impl("lif_forward", &lif_forward_cpu);
  m.impl("lif_backward", &lif_backward_cpu);
}

}  // namespace stars_fast
