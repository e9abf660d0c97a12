// CUDA kernels of the multi-step LIF / IF neuron (shared/DESIGN.md section 2.1) over x[T, N].
//
// One thread per element (grid-stride, int64 offsets), the loop over T inside: every x[t] row is
// read coalesced once. State and arithmetic in fp32 (fp64 for fp64 data) whatever the I/O dtype,
// in the order of stars_fast.reference.multistep_neuron; setup.py builds with --fmad=false so no
// multiply-add is fused and the spikes match the reference bit for bit. The neuron options are
// uniform run-time branches (the kernels are memory-bound). The backward recomputes h from x into
// a per-thread array (local memory) for T <= kMaxLocalSteps, else into a [T, N] scratch buffer.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../op_args.h"

namespace stars_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxLocalSteps = 32;

enum Charge : int { kIF = 0, kDecayInput = 1, kNoDecay = 2 };
// Emitted value: the Heaviside spike, or a surrogate's primitive; surrogates use the last three.
enum Fire : int { kHeaviside = 0, kSigmoid = 1, kAtan = 2, kTriangle = 3 };

// The neuron's constants (op_args.h) and its options as run-time modes.
template <typename acc_t>
struct Params : NeuronConstants<acc_t> {
  int charge, fire, surrogate;
  bool hard;
};

template <typename acc_t>
Params<acc_t> make_params(bool leaky, bool decay_input, bool spiking, int64_t surrogate, double v_threshold,
                          std::optional<double> v_reset, double alpha, bool detach_reset) {
  Params<acc_t> p{neuron_constants<acc_t>(v_threshold, v_reset, alpha, detach_reset)};
  p.charge = !leaky ? kIF : (decay_input ? kDecayInput : kNoDecay);
  p.surrogate = static_cast<int>(surrogate) + 1;
  p.fire = spiking ? kHeaviside : p.surrogate;
  p.hard = v_reset.has_value();
  return p;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float atan_acc(float x) { return atanf(x); }
__device__ __forceinline__ double atan_acc(double x) { return atan(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}

// charge   IF: h = v + x    LIF decay_input: h = v + (x - (v - v_r)) k    LIF: h = v - (v - v_r) k + x
template <typename acc_t>
__device__ __forceinline__ acc_t charge(acc_t v, acc_t x, acc_t k, const Params<acc_t>& p) {
  if (p.charge == kIF) return v + x;
  if (p.charge == kDecayInput) return v + (x - (v - p.v_r)) * k;
  return v - (v - p.v_r) * k + x;
}

// fire at u = h - v_th: Heaviside [u >= 0] (NaN stays NaN), or the primitive sigmoid(a u) |
// atan(pi/2 a u) / pi + 1/2 | triangle's piecewise quadratic.
template <typename acc_t>
__device__ __forceinline__ acc_t fire(acc_t u, int mode, const Params<acc_t>& p) {
  if (mode == kHeaviside) return u >= acc_t(0) ? acc_t(1) : (u == u ? acc_t(0) : u);
  if (mode == kSigmoid) return sigmoid(p.alpha * u);
  if (mode == kAtan) return atan_acc(p.atan_scale * u) / p.pi + acc_t(0.5);
  const acc_t a = p.alpha;
  const acc_t left = (u + a) * (u + a) / p.two_alpha2;
  const acc_t right = acc_t(1) - (a - u) * (a - u) / p.two_alpha2;
  const acc_t mid = u < acc_t(0) ? left : right;
  return u < -a ? acc_t(0) : (u >= a ? acc_t(1) : mid);
}

// surrogate'(u): sigmoid a s(au)(1 - s(au)) | atan (a/2) / (1 + (pi/2 a u)^2) | triangle max(0, a - |u|) / a^2
template <typename acc_t>
__device__ __forceinline__ acc_t surrogate_grad(acc_t u, const Params<acc_t>& p) {
  if (p.surrogate == kSigmoid) {
    const acc_t s = sigmoid(p.alpha * u);
    return p.alpha * s * (acc_t(1) - s);
  }
  if (p.surrogate == kAtan) {
    const acc_t w = p.atan_scale * u;
    return p.half_alpha / (acc_t(1) + w * w);
  }
  const acc_t d = p.alpha - (u < acc_t(0) ? -u : u);
  return (d > acc_t(0) ? d : acc_t(0)) / p.alpha2;
}

// reset   hard: v = h (1 - s) + v_reset s    soft: v = h - v_th s
template <typename acc_t>
__device__ __forceinline__ acc_t reset(acc_t h, acc_t s, const Params<acc_t>& p) {
  return p.hard ? h * (acc_t(1) - s) + p.v_reset * s : h - p.v_th * s;
}

template <typename scalar_t, typename acc_t>
__global__ void lif_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v_init,
                                   const acc_t* __restrict__ inv_tau, scalar_t* __restrict__ spikes,
                                   scalar_t* __restrict__ v_last, int64_t T, int64_t N, Params<acc_t> p) {
  const acc_t k = *inv_tau;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t v = v_init != nullptr ? static_cast<acc_t>(v_init[i]) : p.v_start;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t off = t * N + i;
      const acc_t h = charge(v, static_cast<acc_t>(x[off]), k, p);
      const acc_t s = fire(h - p.v_th, p.fire, p);
      spikes[off] = static_cast<scalar_t>(s);
      v = reset(h, s, p);
    }
    v_last[i] = static_cast<scalar_t>(v);
  }
}

// Reverse scan per element (gv = dL/dv after step t):
//   sg = surrogate'(h - v_th);  dv/dh = hard: (1 - s) + (v_reset - h) sg (1 - D) | soft: 1 - v_th sg (1 - D)
//   gh = gs sg + gv dv/dh;  gx = gh k (LIF decay_input) | gh;  gv <- gh (1 - k) (LIF) | gh (IF)
//   PLIF: dL/dk += gh (x - (v_prev - v_r)) (decay_input) | gh * -(v_prev - v_r)
// grad_spikes / grad_v_last are read through strides (0 for a broadcast gradient).
template <typename scalar_t, typename acc_t>
__global__ void lif_backward_kernel(const scalar_t* __restrict__ grad_spikes, int64_t gs_stride_t,
                                    int64_t gs_stride_n, const scalar_t* __restrict__ grad_v_last,
                                    int64_t gvl_stride, const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ v_init, const acc_t* __restrict__ inv_tau,
                                    scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_v_init,
                                    float* __restrict__ grad_inv_tau, acc_t* __restrict__ h_scratch, int64_t T,
                                    int64_t N, Params<acc_t> p) {
  const acc_t k = *inv_tau;
  const acc_t one_minus_k = acc_t(1) - k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t h_local[kMaxLocalSteps];
    acc_t* hs = h_scratch != nullptr ? h_scratch + i : h_local;
    const int64_t h_stride = h_scratch != nullptr ? N : 1;
    // Recompute h[t] with the forward's arithmetic.
    const acc_t v0 = v_init != nullptr ? static_cast<acc_t>(v_init[i]) : p.v_start;
    acc_t v = v0;
    for (int64_t t = 0; t < T; ++t) {
      const acc_t h = charge(v, static_cast<acc_t>(x[t * N + i]), k, p);
      hs[t * h_stride] = h;
      v = reset(h, fire(h - p.v_th, p.fire, p), p);
    }
    acc_t gv = grad_v_last != nullptr ? static_cast<acc_t>(grad_v_last[i * gvl_stride]) : acc_t(0);
    acc_t k_acc = 0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const acc_t h = hs[t * h_stride];
      const acc_t u = h - p.v_th;
      const acc_t sg = surrogate_grad(u, p);
      const acc_t dv_dh = p.hard ? (acc_t(1) - fire(u, p.fire, p)) + (p.v_reset - h) * sg * p.not_detached
                                 : acc_t(1) - p.v_th * sg * p.not_detached;
      const acc_t g = static_cast<acc_t>(grad_spikes[t * gs_stride_t + i * gs_stride_n]) * sg + gv * dv_dh;
      grad_x[t * N + i] = static_cast<scalar_t>(p.charge == kDecayInput ? g * k : g);
      if (grad_inv_tau != nullptr) {
        acc_t v_prev = v0;
        if (t > 0) {
          const acc_t h_prev = hs[(t - 1) * h_stride];
          v_prev = reset(h_prev, fire(h_prev - p.v_th, p.fire, p), p);
        }
        k_acc += p.charge == kDecayInput ? g * (static_cast<acc_t>(x[t * N + i]) - (v_prev - p.v_r))
                                         : g * -(v_prev - p.v_r);
      }
      gv = p.charge == kIF ? g : g * one_minus_k;
    }
    grad_v_init[i] = static_cast<scalar_t>(gv);
    if (grad_inv_tau != nullptr) grad_inv_tau[i] = static_cast<float>(k_acc);
  }
}

int64_t num_blocks(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, sms * 32));
}

std::tuple<at::Tensor, at::Tensor> lif_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& v_init,
                                                    const at::Tensor& inv_tau, bool leaky, double v_threshold,
                                                    std::optional<double> v_reset, bool decay_input,
                                                    int64_t surrogate, double alpha, bool spiking) {
  check_neuron_inputs("lif_forward", x, v_init, inv_tau, surrogate, alpha);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), N = x.size(1);
  at::Tensor spikes = at::empty_like(x);
  at::Tensor v_last = at::empty({N}, x.options());
  if (N == 0) return {spikes, v_last};
  const at::Tensor v0 = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  const at::Tensor k = inv_tau.to(x.device(), acc_dtype(x.scalar_type())).contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lif_forward_kernel<scalar_t, acc_t><<<num_blocks(N), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), v0.defined() ? v0.const_data_ptr<scalar_t>() : nullptr,
        k.const_data_ptr<acc_t>(), spikes.data_ptr<scalar_t>(), v_last.data_ptr<scalar_t>(), T, N,
        make_params<acc_t>(leaky, decay_input, spiking, surrogate, v_threshold, v_reset, alpha, false));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {spikes, v_last};
}

// grad_v_init [N] (x's dtype) is dL/dv before t = 0; grad_inv_tau [N] float32 per-element partial
// sums of dL/d(1/tau) when need_inv_tau_grad, else empty (the caller sums: deterministic).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_backward_cuda(
    const at::Tensor& grad_spikes_in, const std::optional<at::Tensor>& grad_v_last_in, const at::Tensor& x,
    const std::optional<at::Tensor>& v_init, const at::Tensor& inv_tau, bool leaky, double v_threshold,
    std::optional<double> v_reset, bool decay_input, int64_t surrogate, double alpha, bool spiking,
    bool detach_reset, bool need_inv_tau_grad) {
  check_neuron_inputs("lif_backward", x, v_init, inv_tau, surrogate, alpha);
  check_neuron_grads(x, grad_spikes_in, grad_v_last_in, leaky, need_inv_tau_grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), N = x.size(1);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_v_init = at::empty({N}, x.options());
  at::Tensor grad_inv_tau = at::empty({need_inv_tau_grad ? N : 0}, x.options().dtype(at::kFloat));
  if (N == 0) return {grad_x, grad_v_init, grad_inv_tau};
  // Gradients in x's dtype, read through their strides (a stride-0 broadcast stays unmaterialized).
  const at::Tensor grad_spikes = grad_spikes_in.to(x.scalar_type());
  const at::Tensor grad_v_last = grad_v_last_in.has_value() ? grad_v_last_in->to(x.scalar_type()) : at::Tensor();
  const at::Tensor v0 = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  const at::Tensor k = inv_tau.to(x.device(), acc).contiguous();
  const at::Tensor h_scratch = T > kMaxLocalSteps ? at::empty({T, N}, x.options().dtype(acc)) : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lif_backward_kernel<scalar_t, acc_t><<<num_blocks(N), kThreads, 0, stream>>>(
        grad_spikes.const_data_ptr<scalar_t>(), grad_spikes.stride(0), grad_spikes.stride(1),
        grad_v_last.defined() ? grad_v_last.const_data_ptr<scalar_t>() : nullptr,
        grad_v_last.defined() ? grad_v_last.stride(0) : 0, x.const_data_ptr<scalar_t>(),
        v0.defined() ? v0.const_data_ptr<scalar_t>() : nullptr, k.const_data_ptr<acc_t>(),
        grad_x.data_ptr<scalar_t>(), grad_v_init.data_ptr<scalar_t>(),
        need_inv_tau_grad ? grad_inv_tau.data_ptr<float>() : nullptr,
        h_scratch.defined() ? h_scratch.data_ptr<acc_t>() : nullptr, T, N,
        make_params<acc_t>(leaky, decay_input, spiking, surrogate, v_threshold, v_reset, alpha, detach_reset));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_v_init, grad_inv_tau};
}

}  // namespace

TORCH_LIBRARY_IMPL(stars_fast, CUDA, m) {
  m.impl("lif_forward", &lif_forward_cuda);
  m.impl("lif_backward", &lif_backward_cuda);
}

}  // namespace stars_fast
