// Device code of the multi-step LIF / IF neuron (docs/design.md section 2.1) over x[T, N]: the kernels
// and their helpers, launched by lif_ops.cuh. No ATen, so that the host compiler builds it too, on the
// CUDA emulation of emulation/cuda_on_host.h (the tests run these kernels on the CPU that way).
//
// Each thread owns VEC neighbouring neurons (the forward 16 bytes per access: 4 fp32, 8 fp16/bf16, 2 fp64;
// the backward at most 4, 8 bytes of fp16/bf16, to stay within its register bound; VEC = 1 when N or a
// pointer is not aligned for that), grid-stride with int64 offsets, the loop over
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
// reverse steps run and store grad_x. T <= C (C = 4 for every dtype) reads x and grad_spikes once and
// writes grad_x once: the minimal traffic.
#pragma once

#include <cstdint>

#include "../neuron_constants.h"

#if !defined(__CUDACC__)
#include "emulation/cuda_on_host.h"
#endif

// Its own namespace: the other ops' device code may name its helpers alike.
namespace stars_fast::lif_cuda {

constexpr int kThreads = 256;

enum Charge : int { kIF = 0, kDecayInput = 1, kNoDecay = 2 };
// Emitted value: the Heaviside spike, or a surrogate's primitive; surrogates use the others (surrogate
// id + 1). kSuperSpike is a surrogate only: it has no primitive (check_neuron_inputs refuses spiking=False).
enum Fire : int {
  kHeaviside = 0, kSigmoid = 1, kAtan = 2, kTriangle = 3, kPiecewiseExp = 4, kSoftSign = 5, kSuperSpike = 6, kErf = 7
};

// The neuron's constants (neuron_constants.h) and its options as run-time modes (uniform branches).
template <typename acc_t>
struct Params : NeuronConstants<acc_t> {
  int charge, fire, surrogate;
  bool hard, divide;
  bool per_neuron_decay;  // decay holds one k per neuron (with kPerNeuron); else its one value
};

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

// reset   hard: v = h (1 - s) + v_reset s    soft: v = h - v_th s   (v_th: the neuron's threshold)
template <typename acc_t>
__device__ __forceinline__ acc_t reset(acc_t h, acc_t s, acc_t v_th, const Params<acc_t>& p) {
  return p.hard ? h * (acc_t(1) - s) + p.v_reset * s : h - v_th * s;
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

// The parameters of the thread's VEC neurons: their own k (kPerNeuron and p.per_neuron_decay: PLIF per
// channel, multiply mode) and v_th (kPerNeuron and thresholds given: a learnable threshold), read element
// by element once per thread (no packing needed), or the one value for all, so that the scalar path's
// code is what it was.
template <int VEC, bool kPerNeuron, typename acc_t>
__device__ __forceinline__ void neuron_params(const acc_t* __restrict__ decay_ptr,
                                              const acc_t* __restrict__ thresholds, int64_t i,
                                              const Params<acc_t>& p, acc_t (&k)[VEC], acc_t (&v_th)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    k[e] = kPerNeuron && p.per_neuron_decay ? decay_ptr[i + e] : *decay_ptr;
    v_th[e] = kPerNeuron && thresholds != nullptr ? thresholds[i + e] : p.v_th;
  }
}

template <int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void initial_v(const scalar_t* __restrict__ v_init, int64_t i, const Params<acc_t>& p,
                                          acc_t (&v)[VEC]) {
  if (v_init != nullptr) return load_pack<VEC>(v_init + i, v);
#pragma unroll
  for (int e = 0; e < VEC; ++e) v[e] = p.v_start;
}

template <typename scalar_t, typename acc_t, int VEC, bool kPerNeuron>
__global__ void lif_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v_init,
                                   const acc_t* __restrict__ decay_ptr, const acc_t* __restrict__ thresholds,
                                   scalar_t* __restrict__ spikes, scalar_t* __restrict__ v_last, int64_t T, int64_t N,
                                   Params<acc_t> p) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < N / VEC;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = q * VEC;
    acc_t v[VEC], k[VEC], v_th[VEC];
    initial_v<VEC>(v_init, i, p, v);
    neuron_params<VEC, kPerNeuron>(decay_ptr, thresholds, i, p, k, v_th);
#pragma unroll 4
    for (int64_t t = 0; t < T; ++t) {
      acc_t xv[VEC], s[VEC];
      load_pack<VEC>(x + t * N + i, xv);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t h = charge(v[e], xv[e], k[e], p);
        s[e] = fire(h - v_th[e], p.fire, p);
        v[e] = reset(h, s[e], v_th[e], p);
      }
      store_pack<VEC>(spikes + t * N + i, s);
    }
    if (v_last != nullptr) store_pack<VEC>(v_last + i, v);
  }
}

// h of steps t0 .. t0 + len - 1 (len <= C) into registers, v advanced past them.
template <int C, int VEC, typename scalar_t, typename acc_t>
__device__ __forceinline__ void recompute_chunk(const scalar_t* __restrict__ x, int64_t t0, int64_t len, int64_t N,
                                                int64_t i, const acc_t (&k)[VEC], const acc_t (&v_th)[VEC],
                                                const Params<acc_t>& p, acc_t (&v)[VEC], acc_t (&h)[C][VEC]) {
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
        h[j][e] = charge(v[e], xs[j][e], k[e], p);
        v[e] = reset(h[j][e], fire(h[j][e] - v_th[e], p.fire, p), v_th[e], p);
      }
    }
  }
}

// Reverse scan (gv = dL/dv after step t):
//   sg = surrogate'(h - v_th);  dv/dh = hard: (1 - s) + (v_reset - h) sg (1 - D) | soft: 1 - v_th sg (1 - D)
//   gh = gs sg + gv dv/dh;  gx = gh / tau (LIF decay_input) | gh;  gv <- gh - gh / tau (LIF) | gh (IF)
//   (multiply mode: gh k and gh (1 - k));  PLIF: dL/dk += gh (x - (v_prev - v_r)) | gh * -(v_prev - v_r)
//   learnable threshold: dL/dv_th += gv (1 - s) - gh (gv before the step's update; docs/design.md 2.1)
//
// The kernel streams HBM: only many resident warps keep enough bytes in flight. __launch_bounds__(kThreads, 2)
// caps its registers at 128, so that 2 blocks (16 warps, 25% of an sm_80 / sm_90 SM) fit. The forward has
// no bound: it needs far fewer registers, and a bound lets ptxas spend more of them (fewer resident warps).
template <typename scalar_t, typename acc_t, int VEC, int C, bool kPerNeuron>
__global__ void __launch_bounds__(kThreads, 2)
    lif_backward_kernel(const scalar_t* __restrict__ grad_spikes, int64_t gs_stride_t, int64_t gs_stride_n,
                        const scalar_t* __restrict__ grad_v_last, int64_t gvl_stride, const scalar_t* __restrict__ x,
                        const scalar_t* __restrict__ v_init, const acc_t* __restrict__ decay_ptr,
                        const acc_t* __restrict__ thresholds, scalar_t* __restrict__ grad_x,
                        scalar_t* __restrict__ grad_v_init, acc_t* __restrict__ grad_decay,
                        acc_t* __restrict__ grad_threshold, acc_t* __restrict__ checkpoints, int64_t T, int64_t N,
                        Params<acc_t> p) {
  const int64_t chunks = (T + C - 1) / C;
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < N / VEC;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = q * VEC;
    acc_t v0[VEC], v[VEC], h[C][VEC], k[VEC], one_minus_k[VEC], v_th[VEC];
    initial_v<VEC>(v_init, i, p, v0);
    neuron_params<VEC, kPerNeuron>(decay_ptr, thresholds, i, p, k, v_th);
#pragma unroll
    for (int e = 0; e < VEC; ++e) one_minus_k[e] = acc_t(1) - k[e];
#pragma unroll
    for (int e = 0; e < VEC; ++e) v[e] = v0[e];
    // Forward over every chunk: checkpoint v at the start of chunks 1.., keep the last chunk's h.
    for (int64_t c = 0; c < chunks; ++c) {
      if (c > 0) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) checkpoints[(c - 1) * N + i + e] = v[e];
      }
      recompute_chunk<C, VEC>(x, c * C, min(static_cast<int64_t>(C), T - c * C), N, i, k, v_th, p, v, h);
    }
    acc_t gv[VEC], k_acc[VEC], th_acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      gv[e] = grad_v_last != nullptr ? static_cast<acc_t>(grad_v_last[(i + e) * gvl_stride]) : acc_t(0);
      k_acc[e] = acc_t(0);
      th_acc[e] = acc_t(0);
    }
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t t0 = c * C, len = min(static_cast<int64_t>(C), T - t0);
      acc_t v_start[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) v_start[e] = c == 0 ? v0[e] : checkpoints[(c - 1) * N + i + e];
      if (c != chunks - 1) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[e] = v_start[e];
        recompute_chunk<C, VEC>(x, t0, len, N, i, k, v_th, p, v, h);
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
            const acc_t u = hj - v_th[e];
            const acc_t sg = surrogate_grad(u, p);
            const acc_t not_fired = acc_t(1) - fire(u, p.fire, p);
            const acc_t dv_dh = p.hard ? not_fired + (p.v_reset - hj) * sg * p.not_detached
                                       : acc_t(1) - v_th[e] * sg * p.not_detached;
            const acc_t g = gs[j][e] * sg + gv[e] * dv_dh;
            if (grad_threshold != nullptr) th_acc[e] += gv[e] * not_fired - g;
            const acc_t g_leak = leak(g, k[e], p);
            gx[e] = p.charge == kDecayInput ? g_leak : g;
            if (grad_decay != nullptr) {
              const acc_t v_prev =
                  j > 0 ? reset(h[j - 1][e], fire(h[j - 1][e] - v_th[e], p.fire, p), v_th[e], p) : v_start[e];
              k_acc[e] += p.charge == kDecayInput ? g * (xv[e] - (v_prev - p.v_r)) : g * -(v_prev - p.v_r);
            }
            gv[e] = p.charge == kIF ? g : (p.divide ? g - g_leak : g * one_minus_k[e]);
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
    if (grad_threshold != nullptr) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) grad_threshold[i + e] = th_acc[e];
    }
  }
}

}  // namespace stars_fast::lif_cuda
