// The CUDA ops of the multi-step LIF / IF neuron (lif_forward, lif_backward), their host side:
// lif_cuda.cu registers them for CUDA tensors; the tests build them with the host compiler, where their
// kernels (lif_kernels.cuh, which describes them) run on CPU tensors through the emulation of
// emulation/cuda_on_host.h. All launches use the current stream of the inputs' device.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../op_args.h"
#include "launch.cuh"
#include "lif_kernels.cuh"

namespace stars_fast::lif_cuda {

template <typename acc_t>
inline Params<acc_t> make_params(bool leaky, bool decay_is_tau, bool decay_input, bool spiking,
                                 int64_t surrogate, double v_threshold, std::optional<double> v_reset, double alpha,
                                 bool detach_reset) {
  Params<acc_t> p{neuron_constants<acc_t>(v_threshold, v_reset, alpha, detach_reset)};
  p.charge = !leaky ? kIF : (decay_input ? kDecayInput : kNoDecay);
  p.surrogate = static_cast<int>(surrogate) + 1;
  p.fire = spiking ? kHeaviside : p.surrogate;
  p.hard = v_reset.has_value();
  p.divide = decay_is_tau;
  return p;
}

inline int64_t num_blocks(const DeviceScope& scope, int64_t threads_needed) {
  const int64_t sms = scope.multiprocessor_count();
  return std::max<int64_t>(1, std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, sms * 32));
}

// Elements per 16-byte access for scalar_t: the forward's packed width.
template <typename scalar_t>
constexpr int pack_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// The backward's packed width: at most 4 elements (8 bytes of fp16/bf16), because it holds a chunk of h
// and grad_spikes per element in registers: 8 fp16/bf16 elements a thread needed 134-148 registers, over
// the 128 of __launch_bounds__(kThreads, 2) (25% occupancy), and spilled; 4 need 109-120.
template <typename scalar_t>
constexpr int backward_pack_width() {
  return std::min(pack_width<scalar_t>(), 4);
}

// Steps kept in registers per chunk: h (and a chunk of grad_spikes) in about 16 registers each
// (4 steps for every dtype, so T <= 4 reads x once; the unrolled chunk is what ptxas compiles slowest).
template <typename scalar_t, typename acc_t>
constexpr int chunk_steps() {
  return 16 / (backward_pack_width<scalar_t>() * static_cast<int>(sizeof(acc_t) / 4));
}

// fn(std::true_type) when a parameter is per neuron (one k: check_per_neuron_decay; or one v_th: a
// threshold tensor), else fn(std::false_type).
template <typename Fn>
void with_per_neuron(bool per_neuron, const Fn& fn) {
  if (per_neuron) return fn(std::true_type{});
  fn(std::false_type{});
}

// Whether p is aligned for a VEC-wide packed access of scalar_t.
template <typename scalar_t, int VEC>
inline bool aligned_for(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * VEC) == 0;
}

// Whether every tensor (undefined ones skipped) allows VEC-wide packed access at every row.
template <typename scalar_t, int VEC>
inline bool can_pack(int64_t N, std::initializer_list<const at::Tensor*> tensors) {
  if (N % VEC != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->numel() > 0 && !aligned_for<scalar_t, VEC>(t->const_data_ptr())) return false;
  }
  return true;
}

inline std::tuple<at::Tensor, at::Tensor> lif_forward_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& v_init, const at::Tensor& decay, bool leaky,
    bool decay_is_tau, double v_threshold, std::optional<double> v_reset, bool decay_input, int64_t surrogate,
    double alpha, bool spiking, bool need_v_last, const std::optional<at::Tensor>& threshold) {
  check_neuron_inputs("lif_forward", x, v_init, decay, surrogate, spiking, alpha, v_threshold, threshold);
  const DeviceScope scope(x.device());
  const int64_t T = x.size(0), N = x.size(1);
  at::Tensor spikes = at::empty_like(x);
  at::Tensor v_last = at::empty({need_v_last ? N : 0}, x.options());
  if (N == 0) return {spikes, v_last};
  const at::Tensor v0 = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  const bool per_neuron_decay = check_per_neuron_decay("lif_forward", x, decay, decay_is_tau) && leaky;
  const at::Tensor d = decay.to(x.device(), acc_dtype(x.scalar_type())).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto p = make_params<acc_t>(leaky, decay_is_tau, decay_input, spiking, surrogate, v_threshold, v_reset, alpha,
                                false);
    p.per_neuron_decay = per_neuron_decay;
    const auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      with_per_neuron(per_neuron_decay || threshold.has_value(), [&](auto per) {
        launch_kernel(
            lif_forward_kernel<scalar_t, acc_t, VEC, decltype(per)::value>, num_blocks(scope, N / VEC), kThreads,
            scope.stream(), x.const_data_ptr<scalar_t>(), v0.defined() ? v0.const_data_ptr<scalar_t>() : nullptr,
            d.const_data_ptr<acc_t>(), threshold.has_value() ? threshold->const_data_ptr<acc_t>() : nullptr,
            spikes.data_ptr<scalar_t>(),
            need_v_last ? v_last.data_ptr<scalar_t>() : nullptr, T, N, p);
      });
    };
    constexpr int kPack = pack_width<scalar_t>();
    if (can_pack<scalar_t, kPack>(N, {&x, &v0, &spikes, &v_last})) {
      launch(std::integral_constant<int, kPack>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {spikes, v_last};
}

// grad_v_init [N] (x's dtype) when need_grad_v_init; grad_decay and grad_threshold [N] per-neuron partial
// sums of dL/dk and dL/dv_th in the state dtype when need_decay_grad / need_threshold_grad (the caller
// sums: deterministic); else empty [0].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lif_backward_cuda(
    const at::Tensor& grad_spikes_in, const std::optional<at::Tensor>& grad_v_last_in, const at::Tensor& x,
    const std::optional<at::Tensor>& v_init, const at::Tensor& decay, bool leaky, bool decay_is_tau,
    double v_threshold, std::optional<double> v_reset, bool decay_input, int64_t surrogate, double alpha,
    bool spiking, bool detach_reset, bool need_decay_grad, bool need_grad_v_init,
    const std::optional<at::Tensor>& threshold, bool need_threshold_grad) {
  check_neuron_inputs("lif_backward", x, v_init, decay, surrogate, spiking, alpha, v_threshold, threshold);
  check_neuron_grads(x, grad_spikes_in, grad_v_last_in, leaky, decay_is_tau, need_decay_grad, threshold,
                     need_threshold_grad);
  const DeviceScope scope(x.device());
  const int64_t T = x.size(0), N = x.size(1);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_v_init = at::empty({need_grad_v_init ? N : 0}, x.options());
  at::Tensor grad_decay = at::empty({need_decay_grad ? N : 0}, x.options().dtype(acc));
  at::Tensor grad_threshold = at::empty({need_threshold_grad ? N : 0}, x.options().dtype(acc));
  if (N == 0) return {grad_x, grad_v_init, grad_decay, grad_threshold};
  // Gradients in x's dtype, read through their strides (a stride-0 broadcast stays unmaterialized).
  at::Tensor grad_spikes = grad_spikes_in.to(x.scalar_type());
  if (grad_spikes.stride(1) > 1) grad_spikes = grad_spikes.contiguous();
  const at::Tensor grad_v_last = grad_v_last_in.has_value() ? grad_v_last_in->to(x.scalar_type()) : at::Tensor();
  const at::Tensor v0 = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  const bool per_neuron_decay = check_per_neuron_decay("lif_backward", x, decay, decay_is_tau) && leaky;
  const at::Tensor d = decay.to(x.device(), acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int C = chunk_steps<scalar_t, acc_t>();
    const int64_t chunks = (T + C - 1) / C;
    const at::Tensor checkpoints = chunks > 1 ? at::empty({chunks - 1, N}, x.options().dtype(acc)) : at::Tensor();
    auto p = make_params<acc_t>(leaky, decay_is_tau, decay_input, spiking, surrogate, v_threshold, v_reset, alpha,
                                detach_reset);
    p.per_neuron_decay = per_neuron_decay;
    constexpr int kPack = backward_pack_width<scalar_t>();
    const bool gs_packed = grad_spikes.stride(1) == 1 && aligned_for<scalar_t, kPack>(grad_spikes.const_data_ptr()) &&
                           (T <= 1 || grad_spikes.stride(0) % kPack == 0);
    const auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      with_per_neuron(per_neuron_decay || threshold.has_value(), [&](auto per) {
        launch_kernel(
            lif_backward_kernel<scalar_t, acc_t, VEC, C, decltype(per)::value>, num_blocks(scope, N / VEC), kThreads,
            scope.stream(), grad_spikes.const_data_ptr<scalar_t>(), grad_spikes.stride(0), grad_spikes.stride(1),
            grad_v_last.defined() ? grad_v_last.const_data_ptr<scalar_t>() : nullptr,
            grad_v_last.defined() ? grad_v_last.stride(0) : 0, x.const_data_ptr<scalar_t>(),
            v0.defined() ? v0.const_data_ptr<scalar_t>() : nullptr, d.const_data_ptr<acc_t>(),
            threshold.has_value() ? threshold->const_data_ptr<acc_t>() : nullptr, grad_x.data_ptr<scalar_t>(),
            need_grad_v_init ? grad_v_init.data_ptr<scalar_t>() : nullptr,
            need_decay_grad ? grad_decay.data_ptr<acc_t>() : nullptr,
            need_threshold_grad ? grad_threshold.data_ptr<acc_t>() : nullptr,
            checkpoints.defined() ? checkpoints.data_ptr<acc_t>() : nullptr, T, N, p);
      });
    };
    if ((gs_packed || grad_spikes.stride(1) == 0) && can_pack<scalar_t, kPack>(N, {&x, &v0, &grad_x, &grad_v_init})) {
      launch(std::integral_constant<int, kPack>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
  });
  return {grad_x, grad_v_init, grad_decay, grad_threshold};
}

}  // namespace stars_fast::lif_cuda
