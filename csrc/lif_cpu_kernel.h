// CPU kernels of the multi-step LIF / IF neuron (docs/design.md section 2.1) over x[T, N],
// written with ATen's at::vec::Vectorized and compiled once per CPU capability: the includer
// defines CPU_CAPABILITY (DEFAULT in lif_cpu.cpp, AVX2 in lif_cpu_avx2.cpp, AVX512 in
// lif_cpu_avx512.cpp).
//
// A call handles elements [begin, end) of every row, block by block. Both directions scan the block
// forward in time eight vectors at a time with v in registers (scan_block): the forward writes the
// spikes (and v_last only when asked); the backward writes h of every t into L1/L2 scratch, then
// runs the reverse scan (read grad_spikes, write grad_x, streamed) four vectors at a time, prefetching
// the next block's rows. The neuron options are template parameters (per-neuron parameters among
// them: one k per neuron for PLIF per channel and one v_th per neuron for a learnable threshold, each
// read from its array when given; the scalar path's code is unchanged), except divide-or-multiply (a
// uniform branch). The charge / fire / reset arithmetic is written in exactly the order of
// stars_fast.reference.multistep_neuron, one IEEE rounding per operation (true division by tau;
// setup.py forbids FMA contraction; the intrinsics never contract), so the spikes are bit-identical
// to the reference and the backward's h is the forward's (the gradient arithmetic after it uses
// explicit FMAs, within the tolerance tests/test_csrc_kernels.py sets). exp is exp_avx2.h's inline
// one under AVX2 (1 ulp), exp_avx512.h's (the same, 16 lanes) under AVX-512 and ATen's otherwise;
// atan and erfc are ATen's (Sleef, 1 and 1.5 ulp, under AVX2 and AVX-512). The AVX2 and AVX-512 builds do the same
// operations lane for lane, so they return the same bits.
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "exp_avx2.h"
#include "exp_avx512.h"
#include "lif_cpu.h"

namespace stars_fast {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

#define LIF_INLINE inline __attribute__((always_inline))
#define LIF_UNROLL _Pragma("GCC unroll 8")

enum class Charge { kIF, kDecayInput, kNoDecay };
// What the neuron emits: the Heaviside spike (spiking=True) or the primitive of a surrogate
// (spiking=False). The surrogate of the backward is named by the same enum; kSuperSpike only names
// one (SpikingJelly's SuperSpike has no primitive, and the op refuses spiking=False with it).
enum class Fire { kHeaviside, kSigmoid, kAtan, kTriangle, kPiecewiseExp, kSoftSign, kSuperSpike, kErf };

// The neuron's constants, broadcast.
template <typename acc_t>
struct Consts {
  using Vec = Vectorized<acc_t>;
  bool divide;
  acc_t v_start;  // v before t = 0 without v_init: v_reset, 0 for soft reset
  Vec zero, one, half, v_th, v_r, v_reset, decay, one_minus_k, alpha, neg_alpha, half_alpha, atan_scale, pi,
      two_alpha2, alpha2, inv_alpha, two_alpha, erf_scale, not_detached, reset_gain, threshold_gain;
};

template <typename acc_t>
Consts<acc_t> make_consts(const LifOptions& o) {
  constexpr double kPi = 3.14159265358979323846;
  using Vec = Vectorized<acc_t>;
  Consts<acc_t> c;
  // A power-of-two tau divides exactly as it multiplies by 1 / tau (both give the correctly rounded
  // x 2^-k), so that divide mode takes the multiply.
  int exponent;
  const bool exact_reciprocal = o.divide && std::frexp(o.decay, &exponent) == 0.5;
  c.divide = o.divide && !exact_reciprocal;
  c.v_start = static_cast<acc_t>(o.v_reset);
  c.zero = Vec(acc_t(0));
  c.one = Vec(acc_t(1));
  c.half = Vec(acc_t(0.5));
  c.v_th = Vec(static_cast<acc_t>(o.v_threshold));
  c.v_r = Vec(static_cast<acc_t>(o.v_reset));
  c.v_reset = c.v_r;
  const acc_t decay = static_cast<acc_t>(exact_reciprocal ? 1.0 / o.decay : o.decay);
  c.decay = Vec(decay);
  c.one_minus_k = Vec(acc_t(1) - decay);
  c.alpha = Vec(static_cast<acc_t>(o.alpha));
  c.neg_alpha = Vec(static_cast<acc_t>(-o.alpha));
  c.half_alpha = Vec(static_cast<acc_t>(o.alpha / 2.0));
  c.atan_scale = Vec(static_cast<acc_t>(kPi / 2.0 * o.alpha));
  c.pi = Vec(static_cast<acc_t>(kPi));
  c.two_alpha2 = Vec(static_cast<acc_t>(2.0 * o.alpha * o.alpha));
  c.alpha2 = Vec(static_cast<acc_t>(o.alpha * o.alpha));
  c.inv_alpha = Vec(static_cast<acc_t>(1.0 / o.alpha));        // soft_sign
  c.two_alpha = Vec(static_cast<acc_t>(2.0 * o.alpha));        // soft_sign
  c.erf_scale = Vec(static_cast<acc_t>(o.alpha / std::sqrt(kPi)));  // erf: a / sqrt(pi)
  c.not_detached = Vec(o.detach_reset ? acc_t(0) : acc_t(1));
  c.reset_gain = Vec(o.detach_reset ? acc_t(0) : static_cast<acc_t>(o.v_reset));  // v_reset (1 - D)
  c.threshold_gain = Vec(o.detach_reset ? acc_t(0) : static_cast<acc_t>(o.v_threshold));  // v_th (1 - D)
  return c;
}

// (1/tau) d: d / tau (divide mode) | d * k (multiply mode); decay is c.decay, or the lanes' own k
template <typename acc_t>
LIF_INLINE Vectorized<acc_t> leak(Vectorized<acc_t> d, Vectorized<acc_t> decay, const Consts<acc_t>& c) {
  return c.divide ? d / decay : d * decay;
}

// charge   IF: h = v + x    LIF decay_input: h = v + (x - (v - v_r)) / tau    LIF: h = v - (v - v_r) / tau + x
template <typename acc_t, Charge C>
LIF_INLINE Vectorized<acc_t> charge(Vectorized<acc_t> v, Vectorized<acc_t> x, Vectorized<acc_t> decay,
                                    const Consts<acc_t>& c) {
  if constexpr (C == Charge::kIF) {
    return v + x;
  } else if constexpr (C == Charge::kDecayInput) {
    return v + leak(x - (v - c.v_r), decay, c);
  } else {
    return v - leak(v - c.v_r, decay, c) + x;
  }
}

// e^y: exp_avx2 / exp_avx512 (inline) for float under AVX2 / AVX-512, else ATen's.
template <typename acc_t>
LIF_INLINE Vectorized<acc_t> exp(Vectorized<acc_t> y) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return Vectorized<float>(exp_avx2(y));
#elif defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return Vectorized<float>(exp_avx512(y));
#endif
  return y.exp();
}

// sigmoid(y) = 1 / (1 + e^-y)
template <typename acc_t>
LIF_INLINE Vectorized<acc_t> sigmoid(Vectorized<acc_t> y, const Consts<acc_t>& c) {
  return c.one / (c.one + exp(y.neg()));
}

// fire at u = h - v_th   Heaviside: s = [u >= 0] (NaN stays NaN)   sigmoid: s(alpha u)
//                        atan: atan(pi/2 alpha u) / pi + 1/2
//                        triangle: 0 | (u + a)^2 / 2a^2 | 1 - (a - u)^2 / 2a^2 | 1 on u < -a | < 0 | < a | >= a
//                        piecewise_exp: e^(-a|u|) / 2 | 1 - e^(-a|u|) / 2 on u < 0 | >= 0
//                        soft_sign: (a u / (1 + |a u|) + 1) / 2    erf: erfc(-a u) / 2
// (SpikingJelly's primitive_function, operation for operation)
template <typename acc_t, Fire F>
LIF_INLINE Vectorized<acc_t> fire(Vectorized<acc_t> u, const Consts<acc_t>& c) {
  using Vec = Vectorized<acc_t>;
  if constexpr (F == Fire::kHeaviside) {
    return Vec::blendv(Vec::blendv(c.zero, c.one, u >= c.zero), u, u.isnan());
  } else if constexpr (F == Fire::kSigmoid) {
    return sigmoid(c.alpha * u, c);
  } else if constexpr (F == Fire::kAtan) {
    return (c.atan_scale * u).atan() / c.pi + c.half;
  } else if constexpr (F == Fire::kTriangle) {
    const Vec left = (u + c.alpha) * (u + c.alpha) / c.two_alpha2;
    const Vec right = c.one - (c.alpha - u) * (c.alpha - u) / c.two_alpha2;
    const Vec mid = Vec::blendv(right, left, u < c.zero);
    return Vec::blendv(Vec::blendv(mid, c.one, u >= c.alpha), c.zero, u < c.neg_alpha);
  } else if constexpr (F == Fire::kPiecewiseExp) {
    const Vec half_tail = exp(c.neg_alpha * u.abs()) * c.half;
    return Vec::blendv(half_tail, c.one - half_tail, u >= c.zero);  // a NaN u takes the (NaN) tail
  } else if constexpr (F == Fire::kSoftSign) {
    const Vec y = c.alpha * u;
    return (y / (c.one + y.abs()) + c.one) * c.half;
  } else {
    static_assert(F == Fire::kErf, "SuperSpike has no primitive");
    return (c.neg_alpha * u).erfc() * c.half;  // erfc: no cancellation in the far negative tail (1 + erf has)
  }
}

// The backward's Heaviside, s = [u >= 0] (and 1 - s = [u < 0]), one compare each where fire's spike
// also blends a NaN u through. The backward needs no NaN spike: the surrogate' of a NaN u is NaN and
// carries it into every gradient, and v after a NaN h is NaN either way. Other F: fire itself.
template <typename acc_t, Fire F>
LIF_INLINE Vectorized<acc_t> fired(Vectorized<acc_t> u, const Consts<acc_t>& c) {
  if constexpr (F == Fire::kHeaviside) {
    return (u >= c.zero) & c.one;
  } else {
    return fire<acc_t, F>(u, c);
  }
}

// g (1 - s): g masked to u < 0 for the Heaviside, else g (1 - fire(u)).
template <typename acc_t, Fire F>
LIF_INLINE Vectorized<acc_t> times_not_fired(Vectorized<acc_t> g, Vectorized<acc_t> u, const Consts<acc_t>& c) {
  if constexpr (F == Fire::kHeaviside) {
    return (u < c.zero) & g;
  } else {
    return g * (c.one - fire<acc_t, F>(u, c));
  }
}

// c - a b with one rounding (AVX2 / AVX-512: vfnmadd; the DEFAULT build rounds twice).
template <typename acc_t>
LIF_INLINE Vectorized<acc_t> minus_product(Vectorized<acc_t> a, Vectorized<acc_t> b, Vectorized<acc_t> c) {
  return at::vec::fnmadd(a, b, c);
}

// surrogate'(u) of W vectors   sigmoid: a (s(au) - s(au)^2)   atan: (a/2) / (1 + (pi/2 a u)^2)
//                              triangle: max(0, a - |u|) / a^2 (NaN stays NaN, as torch.clamp)
//                              piecewise_exp: (a/2) e^(-a|u|)   soft_sign: 1 / (2a (1/a + |u|)^2)
//                              super_spike: a / (|u| + 1)^2     erf: e^(-(a u)^2) a / sqrt(pi)
// The sigmoid runs stage by stage over the W vectors, so that their exp / divide chains overlap.
template <int W, typename acc_t, Fire S>
LIF_INLINE void surrogate_grads(const Vectorized<acc_t>* u, Vectorized<acc_t>* sg, const Consts<acc_t>& c) {
  if constexpr (S == Fire::kSigmoid) {
    LIF_UNROLL for (int w = 0; w < W; ++w) sg[w] = exp(c.neg_alpha * u[w]);
    LIF_UNROLL for (int w = 0; w < W; ++w) sg[w] = c.one / (c.one + sg[w]);
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    LIF_UNROLL for (int w = 0; w < W; ++w) sg[w] = c.alpha * minus_product(sg[w], sg[w], sg[w]);
#else  // s - s^2 rounded twice cancels near s = 1; s (1 - s) does not (1 - s is exact for s >= 1/2)
    LIF_UNROLL for (int w = 0; w < W; ++w) sg[w] = c.alpha * (sg[w] * (c.one - sg[w]));
#endif
  } else if constexpr (S == Fire::kAtan) {
    LIF_UNROLL for (int w = 0; w < W; ++w) {
      const auto a = c.atan_scale * u[w];
      sg[w] = c.half_alpha / (c.one + a * a);
    }
  } else if constexpr (S == Fire::kPiecewiseExp) {
    LIF_UNROLL for (int w = 0; w < W; ++w) sg[w] = c.half_alpha * exp(c.neg_alpha * u[w].abs());
  } else if constexpr (S == Fire::kSoftSign) {
    LIF_UNROLL for (int w = 0; w < W; ++w) {
      const auto z = c.inv_alpha + u[w].abs();
      sg[w] = c.one / (c.two_alpha * (z * z));
    }
  } else if constexpr (S == Fire::kSuperSpike) {
    LIF_UNROLL for (int w = 0; w < W; ++w) {
      const auto z = u[w].abs() + c.one;
      sg[w] = c.alpha / (z * z);
    }
  } else if constexpr (S == Fire::kErf) {
    LIF_UNROLL for (int w = 0; w < W; ++w) {
      const auto z = c.alpha * u[w];
      sg[w] = exp((z * z).neg()) * c.erf_scale;
    }
  } else {
    static_assert(S == Fire::kTriangle, "the Heaviside has no surrogate gradient");
    LIF_UNROLL for (int w = 0; w < W; ++w) sg[w] = at::vec::clamp_min(c.alpha - u[w].abs(), c.zero) / c.alpha2;
  }
}

// reset   hard: v = h (1 - s) + v_reset s    soft: v = h - v_th s   (v_th: the lanes' threshold)
template <typename acc_t, bool kHard>
LIF_INLINE Vectorized<acc_t> reset(Vectorized<acc_t> h, Vectorized<acc_t> s, Vectorized<acc_t> v_th,
                                   const Consts<acc_t>& c) {
  if constexpr (kHard) {
    return h * (c.one - s) + c.v_reset * s;
  } else {
    return h - v_th * s;
  }
}

// Whole vectors, or a tail of `count` elements (zero-filled lanes are computed and dropped).
template <bool kFull, typename acc_t>
LIF_INLINE Vectorized<acc_t> load(const acc_t* p, int64_t count) {
  if constexpr (kFull) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    return Vectorized<acc_t>::loadu(p, count);
  }
}

template <bool kFull, typename acc_t>
LIF_INLINE void store(Vectorized<acc_t> v, acc_t* p, int64_t count) {
  if constexpr (kFull) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(count));
  }
}

// Stores of the forward's spikes row and the backward's grad_x row: non-temporal (streaming, no
// read-for-ownership of a line that is written whole) when `stream`, i.e. the row is written in place
// and aligned to the vector (32 / 64 bytes); else plain. (Measured at T=4 N=2^21 on 2 threads,
// interleaved in one process: streaming wins for the forward; for grad_x it lost before the backward
// prefetched its reads (9.7 ms against 8.6 plain) and wins since: fwd+bwd 6.73 and 6.12 ms against 7.26 and 6.58, bwd 4.83 and
// 4.52 against 5.30 and 4.83, two runs of 80 rounds on the Zen 4 VM.)
template <bool kFull, typename acc_t>
LIF_INLINE void store_out(Vectorized<acc_t> v, acc_t* p, int64_t count, bool stream) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (kFull) {
    if (stream) {
#if defined(CPU_CAPABILITY_AVX2)
      if constexpr (std::is_same_v<acc_t, float>) {
        _mm256_stream_ps(p, v);
      } else {
        _mm256_stream_pd(p, v);
      }
#else
      if constexpr (std::is_same_v<acc_t, float>) {
        _mm512_stream_ps(p, v);
      } else {
        _mm512_stream_pd(p, v);
      }
#endif
      return;
    }
  }
#endif
  store<kFull>(v, p, count);
}

// Whether out_block's pointer p (in place when direct) takes streaming stores.
template <typename acc_t>
bool streamable(c10::ScalarType dtype, const acc_t* p) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  constexpr uintptr_t kVectorBytes = sizeof(Vectorized<acc_t>);
  return dtype == c10::CppTypeToScalarType<acc_t>::value && reinterpret_cast<uintptr_t>(p) % kVectorBytes == 0;
#else
  return false;
#endif
}

// Makes the streaming stores of this thread visible before the op returns.
LIF_INLINE void fence_streams() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// The decay of lanes [j, j + count): their own k from ks (kPerNeuron with ks given: one k per neuron,
// multiply mode), else the one broadcast value, so that the scalar path is the code it always was.
template <bool kPerNeuron, bool kFull, typename acc_t>
LIF_INLINE Vectorized<acc_t> decay_at(const acc_t* ks, int64_t j, int64_t count, const Consts<acc_t>& c) {
  if constexpr (kPerNeuron) {
    if (ks != nullptr) return load<kFull>(ks + j, count);
  }
  return c.decay;
}

// The threshold of lanes [j, j + count): their own v_th from ths (kPerNeuron with ths given: a learnable
// threshold), else the one broadcast value.
template <bool kPerNeuron, bool kFull, typename acc_t>
LIF_INLINE Vectorized<acc_t> threshold_at(const acc_t* ths, int64_t j, int64_t count, const Consts<acc_t>& c) {
  if constexpr (kPerNeuron) {
    if (ths != nullptr) return load<kFull>(ths + j, count);
  }
  return c.v_th;
}

// Calls fn(j, count, width, full) over [0, n): groups of W whole vectors (width = W), then whole
// vectors, then the tail (width = 1); full tells whether all `count` lanes are elements.
template <typename acc_t, int W, typename Fn>
LIF_INLINE void for_vector_groups(int64_t n, const Fn& fn) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  int64_t j = 0;
  for (; j + W * V <= n; j += W * V) fn(j, W * V, std::integral_constant<int, W>{}, std::true_type{});
  for (; j + V <= n; j += V) fn(j, V, std::integral_constant<int, 1>{}, std::true_type{});
  if (j < n) fn(j, n - j, std::integral_constant<int, 1>{}, std::false_type{});
}

// Row r of an operand from element b0 on, as bytes to prefetch: nullptr unless it is read in place
// (acc_t with unit stride), or when b0 is past the range.
template <typename acc_t>
const char* prefetch_row(c10::ScalarType dtype, const LifOperand& op, int64_t r, int64_t b0, int64_t end) {
  if (b0 >= end || op.col_stride != 1 || dtype != c10::CppTypeToScalarType<acc_t>::value) return nullptr;
  return static_cast<const char*>(op.data) + (r * op.row_stride + b0) * static_cast<int64_t>(sizeof(acc_t));
}

// Asks for the cache lines of bytes [offset, offset + kBytes) of row (a no-op for nullptr).
template <int64_t kBytes>
LIF_INLINE void prefetch_lines(const char* row, int64_t offset) {
  if (row == nullptr) return;
  LIF_UNROLL for (int64_t o = 0; o < kBytes; o += 64) __builtin_prefetch(row + offset + o, 0, 3);
}

// ---------------------------------------------------------------------------------------------
// Rows of an operand as acc_t: in place when they already are acc_t with unit stride, else
// converted (or, for a broadcast, filled) into the caller's block buffer.

template <typename acc_t>
const acc_t* load_block(c10::ScalarType dtype, const LifOperand& op, int64_t r, int64_t b0, int64_t n, acc_t* buf) {
  const int64_t off = r * op.row_stride + b0 * op.col_stride;
  const auto convert_from = [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* src = static_cast<const scalar_t*>(op.data) + off;
    if (op.col_stride == 0) {
      std::fill(buf, buf + n, static_cast<acc_t>(src[0]));
      return static_cast<const acc_t*>(buf);
    }
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      at::vec::convert(src, buf, n);
      return static_cast<const acc_t*>(buf);
    }
  };
  if constexpr (std::is_same_v<acc_t, double>) {
    return convert_from(double{});
  } else {
    if (dtype == c10::ScalarType::Half) return convert_from(c10::Half{});
    if (dtype == c10::ScalarType::BFloat16) return convert_from(c10::BFloat16{});
    return convert_from(float{});
  }
}

// Where to write elements [off, off + n) of a contiguous output: in place, or the buffer (then commit).
template <typename acc_t>
acc_t* out_block(c10::ScalarType dtype, void* base, int64_t off, acc_t* buf) {
  return dtype == c10::CppTypeToScalarType<acc_t>::value ? static_cast<acc_t*>(base) + off : buf;
}

template <typename acc_t>
void commit_block(c10::ScalarType dtype, void* base, int64_t off, int64_t n, const acc_t* buf) {
  if (dtype == c10::CppTypeToScalarType<acc_t>::value) return;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (dtype == c10::ScalarType::Half) at::vec::convert(buf, static_cast<c10::Half*>(base) + off, n);
    if (dtype == c10::ScalarType::BFloat16) at::vec::convert(buf, static_cast<c10::BFloat16*>(base) + off, n);
  }
}

// v before t = 0: v_init, or v_reset (0 for soft reset).
template <typename acc_t>
void initial_v(c10::ScalarType dtype, const LifOperand& v_init, const Consts<acc_t>& c, int64_t b0, int64_t n,
               acc_t* v, acc_t* buf) {
  if (v_init.data != nullptr) {
    const acc_t* v0 = load_block(dtype, v_init, 0, b0, n, buf);
    std::copy(v0, v0 + n, v);
  } else {
    std::fill(v, v + n, c.v_start);
  }
}

// Elements per block: multiples of 64 bytes; the backward keeps T blocks of h (T * block values, 8 KiB
// in fp32) in L1. T * block = 2048 (block >= 256) against 8192 before: backward 0.86x the time at T=4 N=2^21 and
// T=2/8/16 N=2^20 (2 threads, AVX-512, interleaved in one process); the forward is indifferent.
template <typename acc_t>
int64_t block_size(int64_t T) {
  const int64_t blk = std::clamp<int64_t>(2048 / std::max<int64_t>(T, 1), 256, 2048);
  return blk / 16 * 16;
}

// ---------------------------------------------------------------------------------------------
// The recursion h = charge(v, x[t]), s = fire(h - v_th), v <- reset(h, s) over the n elements of a
// block, eight vectors at a time with their v in registers through all T steps: each step reads
// and writes 256 (AVX-512: 512) contiguous bytes of every row (whole cache lines, which the streaming stores need:
// one vector per row at a time measured 7x slower streamed, and the block walked row by row
// reloading v at every step 1.6x slower than this). v holds the block's v before t = 0, and after
// the last step on return when keep_v. ks, ths: the block's k and v_th per neuron when kPerNeuron, or
// nullptr (read at every step: eight more vectors held through the steps would spill under AVX2).
// emit(t, j, h, s, count, full) receives every step; s is fired's (no NaN spikes) when kBackward.
template <typename acc_t, Charge C, bool kHard, Fire F, bool kBackward, bool kPerNeuron, typename Emit>
LIF_INLINE void scan_block(int64_t T, int64_t n, const acc_t* const* xs, const acc_t* ks, const acc_t* ths, acc_t* v,
                           bool keep_v, const Consts<acc_t>& c, const Emit& emit) {
  for_vector_groups<acc_t, 8>(n, [&](int64_t j0, int64_t cnt, auto width, auto full) {
    constexpr int W = decltype(width)::value;
    constexpr bool kFull = decltype(full)::value;
    constexpr int64_t V = Vectorized<acc_t>::size();
    Vectorized<acc_t> vw[W];
    LIF_UNROLL for (int w = 0; w < W; ++w) vw[w] = load<kFull>(v + j0 + w * V, cnt);
    for (int64_t t = 0; t < T; ++t) {
      LIF_UNROLL for (int w = 0; w < W; ++w) {
        const int64_t j = j0 + w * V;
        const auto k = decay_at<kPerNeuron, kFull>(ks, j, cnt, c);
        const auto v_th = threshold_at<kPerNeuron, kFull>(ths, j, cnt, c);
        const auto h = charge<acc_t, C>(vw[w], load<kFull>(xs[t] + j, cnt), k, c);
        const auto sj = kBackward ? fired<acc_t, F>(h - v_th, c) : fire<acc_t, F>(h - v_th, c);
        emit(t, j, h, sj, cnt, full);
        vw[w] = reset<acc_t, kHard>(h, sj, v_th, c);
      }
    }
    if (keep_v) {
      LIF_UNROLL for (int w = 0; w < W; ++w) store<kFull>(vw[w], v + j0 + w * V, cnt);
    }
  });
}

// The T rows of x at block b0 as acc_t (in place, or converted into xb[t * blk ...]).
template <typename acc_t>
void load_rows(c10::ScalarType dtype, const LifOperand& x, int64_t T, int64_t b0, int64_t n, int64_t blk, acc_t* xb,
               std::vector<const acc_t*>& xs) {
  for (int64_t t = 0; t < T; ++t) xs[t] = load_block(dtype, x, t, b0, n, xb + t * blk);
}

// The block's per-neuron parameters from b0 on (k or v_th) when kPerNeuron and the op has them (read in
// place: the op hands them in the state dtype), else nullptr.
template <bool kPerNeuron, typename acc_t>
const acc_t* block_params(const void* per_neuron, int64_t b0, const Consts<acc_t>&) {
  return kPerNeuron && per_neuron != nullptr ? static_cast<const acc_t*>(per_neuron) + b0 : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Forward: the scan, writing s[t] (and v_last when asked).

template <typename acc_t, Charge C, bool kHard, Fire F, bool kPerNeuron>
void forward_range(const LifForwardArgs& a, const Consts<acc_t>& consts, int64_t begin, int64_t end) {
  const Consts<acc_t> c = consts;  // a local copy: the stores cannot alias it, so it is not reloaded after each
  const int64_t T = a.T, blk = block_size<acc_t>(T);
  const auto scratch = std::make_unique_for_overwrite<acc_t[]>((2 * T + 2) * blk);  // not zero-filled
  acc_t* xb = scratch.get();  // [T, blk] conversion buffers of x and of the spikes
  acc_t* sb = xb + T * blk;
  acc_t* v = sb + T * blk;
  acc_t* vb = v + blk;
  std::vector<const acc_t*> xs(T);
  std::vector<acc_t*> ss(T);
  for (int64_t b0 = begin; b0 < end; b0 += blk) {
    const int64_t n = std::min(blk, end - b0);
    initial_v(a.dtype, a.v_init, c, b0, n, v, vb);
    load_rows(a.dtype, a.x, T, b0, n, blk, xb, xs);
    bool stream = true;
    for (int64_t t = 0; t < T; ++t) {
      ss[t] = out_block(a.dtype, a.spikes, t * a.N + b0, sb + t * blk);
      stream = stream && streamable(a.dtype, ss[t]);
    }
    const auto scan = [&](auto streamed) {  // the store kind fixed outside the loops
      scan_block<acc_t, C, kHard, F, false, kPerNeuron>(T, n, xs.data(), block_params<kPerNeuron>(a.o.decays, b0, c),
                                                    block_params<kPerNeuron>(a.o.thresholds, b0, c), v,
                                                    a.v_last != nullptr, c,
                                     [&](int64_t t, int64_t j, auto, auto sj, int64_t cnt, auto full) {
                                       store_out<decltype(full)::value>(sj, ss[t] + j, cnt, streamed.value);
                                     });
    };
    if (stream) {
      scan(std::true_type{});
    } else {
      scan(std::false_type{});
    }
    for (int64_t t = 0; t < T; ++t) commit_block(a.dtype, a.spikes, t * a.N + b0, n, ss[t]);
    if (a.v_last != nullptr) {
      acc_t* out = out_block(a.dtype, a.v_last, b0, vb);
      std::copy(v, v + n, out);
      commit_block(a.dtype, a.v_last, b0, n, out);
    }
  }
  fence_streams();
}

// ---------------------------------------------------------------------------------------------
// Backward (gv = dL/dv after step t on entry, before it on exit):
//   sg = surrogate'(h - v_th)
//   dv/dh = hard: (1 - s) + (v_reset - h) sg (1 - D)      soft: 1 - v_th sg (1 - D)
//   gh = gs sg + gv dv/dh, computed with FMAs as  hard: sg (gs + gv (v_reset - h)(1 - D)) + gv (1 - s)
//                                                 soft: sg (gs - gv v_th (1 - D)) + gv
//     (five vector operations of ~45 fewer: 0.74 -> 0.64 ns per element and step in L1 on one
//     thread, standalone harness; only the forward and its recompute must round as the reference does)
//   gx = gh / tau (LIF decay_input) | gh;   gv <- gh - gh / tau (LIF) | gh (IF)
//   (multiply mode: gh k and gh (1 - k));   PLIF: dL/dk += gh (x - (v_prev - v_r)) | gh * -(v_prev - v_r)
//   learnable threshold: dL/dv_th += gv (1 - s) - gh   (both resets, D or not: v_th enters as -v_th next to
//     h in u = h - v_th, and the soft reset's -v_th s adds -gv s to it; docs/design.md section 2.1)

template <typename acc_t, Charge C, bool kHard, Fire F, Fire S, bool kPerNeuron>
void backward_range(const LifBackwardArgs& a, const Consts<acc_t>& consts, int64_t begin, int64_t end) {
  const Consts<acc_t> c = consts;  // a local copy: the stores cannot alias it, so it is not reloaded after each
  const int64_t T = a.T, blk = block_size<acc_t>(T);
  const bool need_k = a.grad_decay != nullptr, need_th = a.grad_threshold != nullptr;
  const auto scratch = std::make_unique_for_overwrite<acc_t[]>((2 * T + 4) * blk);  // not zero-filled
  acc_t* xb = scratch.get();  // [T, blk] conversion buffers of x, then I/O buffers
  acc_t* gsb = xb + T * blk;
  acc_t* gxb = gsb + blk;
  acc_t* v0 = gxb + blk;  // v before t = 0
  acc_t* gv = v0 + blk;  // dL/dv carried backwards in time
  acc_t* hs = gv + blk;  // h of every step, [T, blk]
  std::vector<const acc_t*> xs(T);
  for (int64_t b0 = begin; b0 < end; b0 += blk) {
    const int64_t n = std::min(blk, end - b0);
    initial_v(a.dtype, a.v_init, c, b0, n, v0, gsb);
    load_rows(a.dtype, a.x, T, b0, n, blk, xb, xs);
    const acc_t* ks = block_params<kPerNeuron>(a.o.decays, b0, c);
    const acc_t* ths = block_params<kPerNeuron>(a.o.thresholds, b0, c);
    scan_block<acc_t, C, kHard, F, true, kPerNeuron>(T, n, xs.data(), ks, ths, v0, false, c,
                                   [&](int64_t t, int64_t j, auto hj, auto, int64_t cnt, auto full) {
                                     store<decltype(full)::value>(hj, hs + t * blk + j, cnt);
                                   });
    if (a.grad_v_last.data != nullptr) {
      const acc_t* g = load_block(a.dtype, a.grad_v_last, 0, b0, n, gsb);
      std::copy(g, g + n, gv);
    } else {
      std::fill(gv, gv + n, acc_t(0));
    }
    acc_t* k_acc = need_k ? static_cast<acc_t*>(a.grad_decay) + b0 : nullptr;
    if (need_k) std::fill(k_acc, k_acc + n, acc_t(0));
    acc_t* th_acc = need_th ? static_cast<acc_t*>(a.grad_threshold) + b0 : nullptr;
    if (need_th) std::fill(th_acc, th_acc + n, acc_t(0));
    for (int64_t t = T - 1; t >= 0; --t) {
      const acc_t* gs = load_block(a.dtype, a.grad_spikes, t, b0, n, gsb);
      const acc_t* x = xs[t];
      const acc_t* h = hs + t * blk;
      acc_t* gx = out_block(a.dtype, a.grad_x, t * a.N + b0, gxb);
      const bool stream_gx = streamable(a.dtype, gx);
      // Row t of the next block's x and grad_spikes, prefetched while this one computes: the hardware
      // prefetcher alone kept 2T read streams too shallow (T=4 N=2^21 on 2 threads: 0.70-0.75 -> 0.46-0.50
      // ns per element and step in a standalone harness). The forward gains nothing from it.
      const int64_t next = b0 + blk, n_next = std::min(blk, end - next);
      const char* x_next = prefetch_row<acc_t>(a.dtype, a.x, t, next, end);
      const char* gs_next = prefetch_row<acc_t>(a.dtype, a.grad_spikes, t, next, end);
      // Four vectors at a time: each stage runs over all four before the next, so that their
      // independent exp / divide chains overlap (a vector at a time waits on each chain's latency).
      for_vector_groups<acc_t, 4>(n, [&](int64_t j0, int64_t cnt, auto width, auto full) {
        constexpr int W = decltype(width)::value;
        constexpr bool kFull = decltype(full)::value;
        constexpr int64_t V = Vectorized<acc_t>::size();
        if (j0 < n_next) {
          constexpr int64_t kGroupBytes = W * V * sizeof(acc_t);
          prefetch_lines<kGroupBytes>(x_next, j0 * sizeof(acc_t));
          prefetch_lines<kGroupBytes>(gs_next, j0 * sizeof(acc_t));
        }
        Vectorized<acc_t> hj[W], u[W], sg[W], g[W];
        LIF_UNROLL for (int w = 0; w < W; ++w) {
          hj[w] = load<kFull>(h + j0 + w * V, cnt);
          u[w] = hj[w] - threshold_at<kPerNeuron, kFull>(ths, j0 + w * V, cnt, c);
        }
        surrogate_grads<W, acc_t, S>(u, sg, c);
        LIF_UNROLL for (int w = 0; w < W; ++w) {
          const int64_t j = j0 + w * V;
          const auto gs_j = load<kFull>(gs + j, cnt), gv_j = load<kFull>(gv + j, cnt);
          if constexpr (kHard) {
            const auto reset_weight = minus_product(hj[w], c.not_detached, c.reset_gain);  // (v_reset - h) (1 - D)
            g[w] = at::vec::fmadd(sg[w], at::vec::fmadd(gv_j, reset_weight, gs_j), times_not_fired<acc_t, F>(gv_j, u[w], c));
          } else {
            const auto threshold_gain = kPerNeuron && ths != nullptr
                                            ? threshold_at<kPerNeuron, kFull>(ths, j, cnt, c) * c.not_detached
                                            : c.threshold_gain;  // v_th (1 - D)
            g[w] = at::vec::fmadd(sg[w], minus_product(gv_j, threshold_gain, gs_j), gv_j);
          }
          if (need_th) {
            store<kFull>(load<kFull>(th_acc + j, cnt) + (times_not_fired<acc_t, F>(gv_j, u[w], c) - g[w]), th_acc + j,
                         cnt);
          }
          if constexpr (C == Charge::kIF) {
            store_out<kFull>(g[w], gx + j, cnt, stream_gx);
            store<kFull>(g[w], gv + j, cnt);
          } else {
            const auto k = decay_at<kPerNeuron, kFull>(ks, j, cnt, c);
            const auto g_leak = leak(g[w], k, c);
            store_out<kFull>(C == Charge::kDecayInput ? g_leak : g[w], gx + j, cnt, stream_gx);
            const auto one_minus_k = kPerNeuron ? c.one - k : c.one_minus_k;
            store<kFull>(c.divide ? g[w] - g_leak : g[w] * one_minus_k, gv + j, cnt);
          }
        }
        if (need_k) {
          LIF_UNROLL for (int w = 0; w < W; ++w) {
            const int64_t j = j0 + w * V;
            const auto v_th = threshold_at<kPerNeuron, kFull>(ths, j, cnt, c);
            const auto v_prev = t > 0 ? reset<acc_t, kHard>(load<kFull>(h - blk + j, cnt),
                                                            fired<acc_t, F>(load<kFull>(h - blk + j, cnt) - v_th, c),
                                                            v_th, c)
                                      : load<kFull>(v0 + j, cnt);
            const auto dh_dk = C == Charge::kDecayInput ? load<kFull>(x + j, cnt) - (v_prev - c.v_r)
                                                        : (v_prev - c.v_r).neg();
            store<kFull>(load<kFull>(k_acc + j, cnt) + g[w] * dh_dk, k_acc + j, cnt);
          }
        }
      });
      commit_block(a.dtype, a.grad_x, t * a.N + b0, n, gx);
    }
    if (a.grad_v_init != nullptr) {
      acc_t* out = out_block(a.dtype, a.grad_v_init, b0, gxb);
      std::copy(gv, gv + n, out);
      commit_block(a.dtype, a.grad_v_init, b0, n, out);
    }
  }
  fence_streams();
}

// ---------------------------------------------------------------------------------------------
// Run-time options -> template parameters.

template <typename E, E V>
using Tag = std::integral_constant<E, V>;

template <typename Fn>
void with_acc(c10::ScalarType dtype, const Fn& fn) {
  if (dtype == c10::ScalarType::Double) return fn(double{});
  fn(float{});
}

template <typename Fn>
void with_charge(const LifOptions& o, const Fn& fn) {
  if (!o.leaky) return fn(Tag<Charge, Charge::kIF>{});
  if (o.decay_input) return fn(Tag<Charge, Charge::kDecayInput>{});
  fn(Tag<Charge, Charge::kNoDecay>{});
}

// Per-neuron parameters (one k per neuron for PLIF per channel, one v_th per neuron for a learnable
// threshold; IF has no decay) or one of each for all.
template <Charge C, typename Fn>
void with_per_neuron(const LifOptions& o, const Fn& fn) {
  if (o.thresholds != nullptr || (C != Charge::kIF && o.decays != nullptr)) return fn(std::true_type{});
  fn(std::false_type{});
}

template <typename Fn>
void with_hard(const LifOptions& o, const Fn& fn) {
  if (o.hard) return fn(std::true_type{});
  fn(std::false_type{});
}

template <typename Fn>
void with_surrogate(int64_t surrogate, const Fn& fn) {
  if (surrogate == 0) return fn(Tag<Fire, Fire::kSigmoid>{});
  if (surrogate == 1) return fn(Tag<Fire, Fire::kAtan>{});
  if (surrogate == 3) return fn(Tag<Fire, Fire::kPiecewiseExp>{});
  if (surrogate == 4) return fn(Tag<Fire, Fire::kSoftSign>{});
  if (surrogate == 5) return fn(Tag<Fire, Fire::kSuperSpike>{});
  if (surrogate == 6) return fn(Tag<Fire, Fire::kErf>{});
  fn(Tag<Fire, Fire::kTriangle>{});
}

// The emitted value: Heaviside when spiking, else the surrogate's primitive.
template <typename Fn>
void with_fire(const LifOptions& o, const Fn& fn) {
  if (o.spiking) return fn(Tag<Fire, Fire::kHeaviside>{});
  with_surrogate(o.surrogate, [&](auto S) {
    if constexpr (S.value != Fire::kSuperSpike) fn(S);  // no primitive: check_neuron_inputs refuses it
  });
}

}  // namespace

void lif_forward_range(const LifForwardArgs& a, int64_t begin, int64_t end) {
  with_acc(a.dtype, [&](auto acc) {
    using acc_t = decltype(acc);
    const Consts<acc_t> c = make_consts<acc_t>(a.o);
    with_charge(a.o, [&](auto C) {
      with_per_neuron<C.value>(a.o, [&](auto per_neuron) {
        with_hard(a.o, [&](auto hard) {
          with_fire(a.o, [&](auto F) {
            forward_range<acc_t, C.value, hard.value, F.value, per_neuron.value>(a, c, begin, end);
          });
        });
      });
    });
  });
}

void lif_backward_range(const LifBackwardArgs& a, int64_t begin, int64_t end) {
  with_acc(a.dtype, [&](auto acc) {
    using acc_t = decltype(acc);
    const Consts<acc_t> c = make_consts<acc_t>(a.o);
    with_charge(a.o, [&](auto C) {
      with_per_neuron<C.value>(a.o, [&](auto per_neuron) {
        with_hard(a.o, [&](auto hard) {
          with_surrogate(a.o.surrogate, [&](auto S) {
            with_fire(a.o, [&](auto F) {
              // spiking=False emits the primitive of S itself: only (F, S) = (Heaviside | S, S) is reachable.
              if constexpr (F.value == Fire::kHeaviside || F.value == S.value) {
                backward_range<acc_t, C.value, hard.value, F.value, S.value, per_neuron.value>(a, c, begin, end);
              }
            });
          });
        });
      });
    });
  });
}

#undef LIF_INLINE
#undef LIF_UNROLL

}  // namespace CPU_CAPABILITY
}  // namespace stars_fast
