// CUDA kernels of the multi-step LIF / IF neuron (docs/design.md section 2.1) over x[T, N].
//
// Each thread owns VEC neighbouring neurons (16 bytes per access: 4 fp32, 8 fp16/bf16, 2 fp64;
// VEC = 1 when N or a pointer is not aligned for that), grid-stride with int64 offsets, the loop over
// T inside: every x[t] row is read coalesced once. State and arithmetic in fp32 (fp64 for fp64 data)
// whatever the I/O dtype, in the order of stars_fast.reference.multistep_neuron: divide mode is an
// IEEE division by tau (nvcc's default -prec-div=true) and setup.py builds with --fmad=false, so no
// multiply-add is fused and the spikes match the reference bit for bit. NaN behaves as in the
// reference (a NaN spike; NaN surrogate gradients, the triangle's included).
//
// The backward keeps h in registers, in chunks of C steps (all indices compile-time after
// unrolling: no local-memory array). A first pass recomputes the forward over all T, storing v at
// the start of chunks 1.. into a [T/C, N] scratch (only when T > C) and keeping the last chunk's h;
// the reverse scan then walks the chunks last to first, recomputing each earlier chunk's h from its
// checkpoint. Each chunk's grad_spikes is loaded up front (C independent loads in flight), then the
// reverse steps run and store grad_x. T <= C (C = 4 for fp32) reads x and grad_spikes once and
// writes grad_x once: the minimal traffic.
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

enum Charge : int { kIF = 0, kDecayInput = 1, kNoDecay = 2 };
// Emitted value: the Heaviside spike, or a surrogate's primitive; surrogates use the others (surrogate
// id + 1). kSuperSpike is a surrogate only: it has no primitive (check_neuron_inputs refuses spiking=False).
enum Fire : int {
  kHeaviside = 0, kSigmoid = 1, kAtan = 2, kTriangle = 3, kPiecewiseExp = 4, kSoftSign = 5, kSuperSpike = 6, kErf = 7
};

// The neuron's constants (op_args.h) and its options as run-time modes (uniform branches).
template <typename acc_t>
struct Params : NeuronConstants<acc_t> {
  int charge, fire, surrogate;
  bool hard, divide;
};

template <typename acc_t>
Params<acc_t> make_params(bool leaky, bool decay_is_tau, bool decay_input, bool spiking, int64_t surrogate,
                          double v_threshold, std::optional<double> v_reset, double alpha, bool detach_reset) {
  Params<acc_t> p{neuron_constants<acc_t>(v_threshold, v_reset, alpha, detach_reset)};
  p.charge = !leaky ? kIF : (decay_input ? kDecayInput : kNoDecay);
  p.surrogate = static_cast<int>(surrogate) + 1;
  p.fire = spiking ? kHeaviside : p.surrogate;
  p.hard = v_reset.has_value();
  p.divide = decay_is_tau;
  return p;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float atan_acc(float x) { return atanf(x); }
__device__ __forceinline__ double atan_acc(double x) { return atan(x); }
__device__ __forceinline__ float erfc_acc(float x) { return erfcf(x); }
__device__ __forceinline__ double erfc_acc(double x) { return erfc(x); }
template <typename acc_t>
__device__ __forceinline__ acc_t abs_acc(acc_t x) { return x < acc_t(0) ? -x : x; }  // NaN stays NaN

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}

// (1/tau) d: d / tau (divide mode) | d * k (multiply mode)
template <typename acc_t>
__device__ __forceinline__ acc_t leak(acc_t d, acc_t decay, const Params<acc_t>& p) {
  return p.divide ? d / decay : d * decay;
}

// charge   IF: h = v + x    LIF decay_input: h = v + (x - (v - v_r)) / tau    LIF: h = v - (v - v_r) / tau + x
template <typename acc_t>
__device__ __forceinline__ acc_t charge(acc_t v, acc_t x, acc_t decay, const Params<acc_t>& p) {
  if (p.charge == kIF) return v + x;
  if (p.charge == kDecayInput) return v + leak(x - (v - p.v_r), decay, p);
  return v - leak(v - p.v_r, decay, p) + x;
}

// fire at u = h - v_th: Heaviside [u >= 0] (NaN stays NaN), or the primitive sigmoid(a u) |
// atan(pi/2 a u) / pi + 1/2 | triangle's piecewise quadratic | piecewise_exp e^(-a|u|)/2 below 0,
// 1 - e^(-a|u|)/2 from 0 | soft_sign (a u / (1 + |a u|) + 1) / 2 | erf erfc(-a u) / 2 (SpikingJelly's).
template <typename acc_t>
__device__ __forceinline__ acc_t fire(acc_t u, int mode, const Params<acc_t>& p) {
  if (mode == kHeaviside) return u >= acc_t(0) ? acc_t(1) : (u == u ? acc_t(0) : u);
  if (mode == kSigmoid) return sigmoid(p.alpha * u);
  if (mode == kAtan) return atan_acc(p.atan_scale * u) / p.pi + acc_t(0.5);
  if (mode == kPiecewiseExp) {
    const acc_t half_tail = exp_acc(-p.alpha * abs_acc(u)) * acc_t(0.5);
    return u >= acc_t(0) ? acc_t(1) - half_tail : half_tail;  // a NaN u takes the (NaN) tail
  }
  if (mode == kSoftSign) {
    const acc_t y = p.alpha * u;
    return (y / (acc_t(1) + abs_acc(y)) + acc_t(1)) * acc_t(0.5);
  }
  if (mode == kErf) return erfc_acc(-p.alpha * u) * acc_t(0.5);
  const acc_t a = p.alpha;
  const acc_t left = (u + a) * (u + a) / p.two_alpha2;
  const acc_t right = acc_t(1) - (a - u) * (a - u) / p.two_alpha2;
  const acc_t mid = u < acc_t(0) ? left : right;
  return u < -a ? acc_t(0) : (u >= a ? acc_t(1) : mid);
}

// surrogate'(u): sigmoid a s(au)(1 - s(au)) | atan (a/2) / (1 + (pi/2 a u)^2) |
// triangle max(0, a - |u|) / a^2, NaN kept (as torch.clamp in the reference) | piecewise_exp
// (a/2) e^(-a|u|) | soft_sign 1 / (2a (1/a + |u|)^2) | super_spike a / (|u| + 1)^2 |
// erf e^(-(a u)^2) a / sqrt(pi).
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
  if (p.surrogate == kPiecewiseExp) return p.half_alpha * exp_acc(-p.alpha * abs_acc(u));
  if (p.surrogate == kSoftSign) {
    const acc_t z = p.inv_alpha + abs_acc(u);
    return acc_t(1) / (p.two_alpha * (z * z));
  }
  if (p.surrogate == kSuperSpike) {
    const acc_t z = abs_acc(u) + acc_t(1);
    return p.alpha / (z * z);
  }
  if (p.surrogate == kErf) {
    const acc_t z = p.alpha * u;
    return exp_acc(-(z * z)) * p.erf_scale;
  }
  const acc_t d = p.alpha - (u < acc_t(0) ? -u : u);
  return (d < acc_t(0) ? acc_t(0) : d) / p.alpha2;
}

// reset   hard: v = h (1 - s) + v_reset s    soft: v = h - v_th s
template <typename acc_t>
__device__ __forceinline__ acc_t reset(acc_t h, acc_t s, const Params<acc_t>& p) {
  return p.hard ? h * (acc_t(1) - s) + p.v_reset * s : h - p.v_th * s;
}

// VEC elements moved as one aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pack(const scalar_t* __restrict__ p, acc_t (&out)[VEC]) {
  const Pack<scalar_t, VEC> pk = *reinterpret_cast<const Pack<scalar_t, VEC>*>(p);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = static_cast<acc_t>(pk.v[e]);
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ p, const acc_t (&in)[VEC]) {
  Pack<scalar_t, VEC> pk;
#pragma unroll
  for (int e = 0; e < VEC; ++e) pk.v[e] = static_cast<scalar_t>(in[e]);
  *reinterpret_cast<Pack<scalar_t, VEC>*>(p) = pk;
}

// A gradient operand read through its strides: packed when unit-stride, else element by element
// (stride 0 for a broadcast gradient, as from .sum()).
template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_grad(const scalar_t* __restrict__ g, int64_t row_off, int64_t col_stride,
                                          int64_t i, acc_t (&out)[VEC]) {
  if (col_stride == 1) return load_pack<VEC>(g + row_off + i, out);
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = static_cast<acc_t>(g[row_off + (i + e) * col_stride]);
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void initial_v(const scalar_t* __restrict__ v_init, int64_t i, const Params<acc_t>& p,
                                          acc_t (&v)[VEC]) {
  if (v_init != nullptr) return load_pack<VEC>(v_init + i, v);
#pragma unroll
  for (int e = 0; e < VEC; ++e) v[e] = p.v_start;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void lif_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v_init,
                                   const acc_t* __restrict__ decay_ptr, scalar_t* __restrict__ spikes,
                                   scalar_t* __restrict__ v_last, int64_t T, int64_t N, Params<acc_t> p) {
  const acc_t decay = *decay_ptr;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < N / VEC;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = q * VEC;
    acc_t v[VEC];
    initial_v<VEC>(v_init, i, p, v);
#pragma unroll 4
    for (int64_t t = 0; t < T; ++t) {
      acc_t xv[VEC], s[VEC];
      load_pack<VEC>(x + t * N + i, xv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t h = charge(v[e], xv[e], decay, p);
        s[e] = fire(h - p.v_th, p.fire, p);
        v[e] = reset(h, s[e], p);
      }
      store_pack<VEC>(spikes + t * N + i, s);
    }
    if (v_last != nullptr) store_pack<VEC>(v_last + i, v);
  }
}

// h of steps t0 .. t0 + len - 1 (len <= C) into registers, v advanced past them.
template <int C, int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void recompute_chunk(const scalar_t* __restrict__ x, int64_t t0, int64_t len, int64_t N,
                                                int64_t i, acc_t decay, const Params<acc_t>& p, acc_t (&v)[VEC],
                                                acc_t (&h)[C][VEC]) {
  acc_t xs[C][VEC];
#pragma unroll
  for (int j = 0; j < C; ++j) {
    if (j < len) load_pack<VEC>(x + (t0 + j) * N + i, xs[j]);
  }
#pragma unroll
  for (int j = 0; j < C; ++j) {
    if (j < len) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        h[j][e] = charge(v[e], xs[j][e], decay, p);
        v[e] = reset(h[j][e], fire(h[j][e] - p.v_th, p.fire, p), p);
      }
    }
  }
}

// Reverse scan (gv = dL/dv after step t):
//   sg = surrogate'(h - v_th);  dv/dh = hard: (1 - s) + (v_reset - h) sg (1 - D) | soft: 1 - v_th sg (1 - D)
//   gh = gs sg + gv dv/dh;  gx = gh / tau (LIF decay_input) | gh;  gv <- gh - gh / tau (LIF) | gh (IF)
//   (multiply mode: gh k and gh (1 - k));  PLIF: dL/dk += gh (x - (v_prev - v_r)) | gh * -(v_prev - v_r)
template <typename scalar_t, typename acc_t, int VEC, int C>
__global__ void lif_backward_kernel(const scalar_t* __restrict__ grad_spikes, int64_t gs_stride_t,
                                    int64_t gs_stride_n, const scalar_t* __restrict__ grad_v_last,
                                    int64_t gvl_stride, const scalar_t* __restrict__ x,
                                    const scalar_t* __restrict__ v_init, const acc_t* __restrict__ decay_ptr,
                                    scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_v_init,
                                    acc_t* __restrict__ grad_decay, acc_t* __restrict__ checkpoints, int64_t T,
                                    int64_t N, Params<acc_t> p) {
  const acc_t decay = *decay_ptr;
  const acc_t one_minus_k = acc_t(1) - decay;
  const int64_t chunks = (T + C - 1) / C;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < N / VEC;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = q * VEC;
    acc_t v0[VEC], v[VEC], h[C][VEC];
    initial_v<VEC>(v_init, i, p, v0);
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = v0[e];
    // Forward over every chunk: checkpoint v at the start of chunks 1.., keep the last chunk's h.
    for (int64_t c = 0; c < chunks; ++c) {
      if (c > 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) checkpoints[(c - 1) * N + i + e] = v[e];
      }
      recompute_chunk<C, VEC>(x, c * C, min(static_cast<int64_t>(C), T - c * C), N, i, decay, p, v, h);
    }
    acc_t gv[VEC], k_acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      gv[e] = grad_v_last != nullptr ? static_cast<acc_t>(grad_v_last[(i + e) * gvl_stride]) : acc_t(0);
      k_acc[e] = acc_t(0);
    }
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t t0 = c * C, len = min(static_cast<int64_t>(C), T - t0);
      acc_t v_start[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) v_start[e] = c == 0 ? v0[e] : checkpoints[(c - 1) * N + i + e];
      if (c != chunks - 1) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = v_start[e];
        recompute_chunk<C, VEC>(x, t0, len, N, i, decay, p, v, h);
      }
      acc_t gs[C][VEC];
#pragma unroll
      for (int j = 0; j < C; ++j) {
        if (j < len) load_grad<VEC>(grad_spikes, (t0 + j) * gs_stride_t, gs_stride_n, i, gs[j]);
      }
#pragma unroll
      for (int j = C - 1; j >= 0; --j) {
        if (j < len) {
          acc_t gx[VEC], xv[VEC];
          if (grad_decay != nullptr) load_pack<VEC>(x + (t0 + j) * N + i, xv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const acc_t hj = h[j][e];
            const acc_t u = hj - p.v_th;
            const acc_t sg = surrogate_grad(u, p);
            const acc_t dv_dh = p.hard ? (acc_t(1) - fire(u, p.fire, p)) + (p.v_reset - hj) * sg * p.not_detached
                                       : acc_t(1) - p.v_th * sg * p.not_detached;
            const acc_t g = gs[j][e] * sg + gv[e] * dv_dh;
            const acc_t g_leak = leak(g, decay, p);
            gx[e] = p.charge == kDecayInput ? g_leak : g;
            if (grad_decay != nullptr) {
              const acc_t v_prev = j > 0 ? reset(h[j - 1][e], fire(h[j - 1][e] - p.v_th, p.fire, p), p) : v_start[e];
              k_acc[e] += p.charge == kDecayInput ? g * (xv[e] - (v_prev - p.v_r)) : g * -(v_prev - p.v_r);
            }
            gv[e] = p.charge == kIF ? g : (p.divide ? g - g_leak : g * one_minus_k);
          }
          store_pack<VEC>(grad_x + (t0 + j) * N + i, gx);
        }
      }
    }
    if (grad_v_init != nullptr) store_pack<VEC>(grad_v_init + i, gv);
    if (grad_decay != nullptr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) grad_decay[i + e] = k_acc[e];
    }
  }
}

int64_t num_blocks(int64_t threads_needed) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((threads_needed + kThreads - 1) / kThreads, sms * 32));
}

// Elements per 16-byte access for scalar_t.
template <typename scalar_t>
constexpr int pack_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// Steps kept in registers per chunk: h (and a chunk of grad_spikes) in about 16 registers each
// (fp32: 4 steps, so T <= 4 reads x once; the unrolled chunk is what ptxas compiles slowest).
template <typename scalar_t, typename acc_t>
constexpr int chunk_steps() {
  return 16 / (pack_width<scalar_t>() * static_cast<int>(sizeof(acc_t) / 4));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every tensor (undefined ones skipped) allows VEC-wide packed access at every row.
template <typename scalar_t>
bool can_pack(int64_t N, std::initializer_list<const at::Tensor*> tensors) {
  if (N % pack_width<scalar_t>() != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && t->numel() > 0 && !aligned16(t->const_data_ptr())) return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor> lif_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& v_init,
                                                    const at::Tensor& decay, bool leaky, bool decay_is_tau,
                                                    double v_threshold, std::optional<double> v_reset,
                                                    bool decay_input, int64_t surrogate, double alpha, bool spiking,
                                                    bool need_v_last) {
  check_neuron_inputs("lif_forward", x, v_init, decay, surrogate, spiking, alpha, v_threshold);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), N = x.size(1);
  at::Tensor spikes = at::empty_like(x);
  at::Tensor v_last = at::empty({need_v_last ? N : 0}, x.options());
  if (N == 0) return {spikes, v_last};
  const at::Tensor v0 = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  const at::Tensor d = decay.to(x.device(), acc_dtype(x.scalar_type())).contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto p = make_params<acc_t>(leaky, decay_is_tau, decay_input, spiking, surrogate, v_threshold, v_reset,
                                      alpha, false);
    const auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      lif_forward_kernel<scalar_t, acc_t, VEC><<<num_blocks(N / VEC), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), v0.defined() ? v0.const_data_ptr<scalar_t>() : nullptr,
          d.const_data_ptr<acc_t>(), spikes.data_ptr<scalar_t>(),
          need_v_last ? v_last.data_ptr<scalar_t>() : nullptr, T, N, p);
    };
    if (can_pack<scalar_t>(N, {&x, &v0, &spikes, &v_last})) {
      launch(std::integral_constant<int, pack_width<scalar_t>()>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {spikes, v_last};
}

// grad_v_init [N] (x's dtype) when need_grad_v_init; grad_decay [N] per-neuron partial sums of dL/dk in
// the state dtype when need_decay_grad (the caller sums: deterministic); else empty [0].
std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_backward_cuda(
    const at::Tensor& grad_spikes_in, const std::optional<at::Tensor>& grad_v_last_in, const at::Tensor& x,
    const std::optional<at::Tensor>& v_init, const at::Tensor& decay, bool leaky, bool decay_is_tau,
    double v_threshold, std::optional<double> v_reset, bool decay_input, int64_t surrogate, double alpha,
    bool spiking, bool detach_reset, bool need_decay_grad, bool need_grad_v_init) {
  check_neuron_inputs("lif_backward", x, v_init, decay, surrogate, spiking, alpha, v_threshold);
  check_neuron_grads(x, grad_spikes_in, grad_v_last_in, leaky, decay_is_tau, need_decay_grad);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), N = x.size(1);
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_v_init = at::empty({need_grad_v_init ? N : 0}, x.options());
  at::Tensor grad_decay = at::empty({need_decay_grad ? N : 0}, x.options().dtype(acc));
  if (N == 0) return {grad_x, grad_v_init, grad_decay};
  // Gradients in x's dtype, read through their strides (a stride-0 broadcast stays unmaterialized).
  at::Tensor grad_spikes = grad_spikes_in.to(x.scalar_type());
  if (grad_spikes.stride(1) > 1) grad_spikes = grad_spikes.contiguous();
  const at::Tensor grad_v_last = grad_v_last_in.has_value() ? grad_v_last_in->to(x.scalar_type()) : at::Tensor();
  const at::Tensor v0 = v_init.has_value() ? v_init->contiguous() : at::Tensor();
  const at::Tensor d = decay.to(x.device(), acc).contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int C = chunk_steps<scalar_t, acc_t>();
    const int64_t chunks = (T + C - 1) / C;
    const at::Tensor checkpoints = chunks > 1 ? at::empty({chunks - 1, N}, x.options().dtype(acc)) : at::Tensor();
    const auto p = make_params<acc_t>(leaky, decay_is_tau, decay_input, spiking, surrogate, v_threshold, v_reset,
                                      alpha, detach_reset);
    const bool gs_packed = grad_spikes.stride(1) == 1 && aligned16(grad_spikes.const_data_ptr()) &&
                           (T <= 1 || grad_spikes.stride(0) % pack_width<scalar_t>() == 0);
    const auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      lif_backward_kernel<scalar_t, acc_t, VEC, C><<<num_blocks(N / VEC), kThreads, 0, stream>>>(
          grad_spikes.const_data_ptr<scalar_t>(), grad_spikes.stride(0), grad_spikes.stride(1),
          grad_v_last.defined() ? grad_v_last.const_data_ptr<scalar_t>() : nullptr,
          grad_v_last.defined() ? grad_v_last.stride(0) : 0, x.const_data_ptr<scalar_t>(),
          v0.defined() ? v0.const_data_ptr<scalar_t>() : nullptr, d.const_data_ptr<acc_t>(),
          grad_x.data_ptr<scalar_t>(), need_grad_v_init ? grad_v_init.data_ptr<scalar_t>() : nullptr,
          need_decay_grad ? grad_decay.data_ptr<acc_t>() : nullptr,
          checkpoints.defined() ? checkpoints.data_ptr<acc_t>() : nullptr, T, N, p);
    };
    if ((gs_packed || grad_spikes.stride(1) == 0) && can_pack<scalar_t>(N, {&x, &v0, &grad_x, &grad_v_init})) {
      launch(std::integral_constant<int, pack_width<scalar_t>()>{});
    } else {
      launch(std::integral_constant<int, 1>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_v_init, grad_decay};
}

}  // namespace

TORCH_LIBRARY_IMPL(stars_fast, CUDA, m) {
  m.impl("lif_forward", &lif_forward_cuda);
  m.impl("lif_backward", &lif_backward_cuda);
}

}  // namespace stars_fast
