// CPU kernels of the multi-step LIF / IF neuron (shared/DESIGN.md section 2.1) over x[T, N].
//
// Parallel over the N elements (parallel_chunks), each task walking its range in blocks of a
// few thousand elements whose state stays in L1/L2 while the loop runs over T inside. The per-step
// loops are branch-free in the neuron options (those are template parameters), take __restrict
// pointers, and are auto-vectorized (AVX2 when the CPU has it, see run_vectorized in common.h).
// The charge / fire / reset arithmetic is written in exactly the order of
// stars_fast.reference.multistep_neuron, one rounding per operation (no FMA contraction), so the
// spikes are bit-identical to the reference and the backward's recomputation of h is identical to
// the forward's.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common.h"

namespace stars_fast {
namespace {

enum class Charge { kIF, kDecayInput, kNoDecay };
// What the neuron emits: the Heaviside spike (spiking=True), or the primitive of a surrogate
// (spiking=False). The surrogate of the backward is named by the same enum.
enum class Fire { kHeaviside, kSigmoid, kAtan, kTriangle };

// The neuron's constants (op_args.h) and the leak factor k = 1/tau with 1 - k.
template <typename acc_t>
struct Consts : NeuronConstants<acc_t> {
  acc_t k;
  acc_t one_minus_k;
};

template <typename acc_t>
Consts<acc_t> make_consts(double inv_tau, double v_threshold, std::optional<double> v_reset, double alpha,
                          bool detach_reset) {
  Consts<acc_t> c{neuron_constants<acc_t>(v_threshold, v_reset, alpha, detach_reset)};
  c.k = static_cast<acc_t>(inv_tau);
  c.one_minus_k = acc_t(1) - c.k;
  return c;
}

// charge   IF: h = v + x    LIF decay_input: h = v + (x - (v - v_r)) k    LIF: h = v - (v - v_r) k + x
template <typename acc_t, Charge C>
STARS_INLINE acc_t charge(acc_t v, acc_t x, const Consts<acc_t>& c) {
  if constexpr (C == Charge::kIF) {
    return v + x;
  } else if constexpr (C == Charge::kDecayInput) {
    return v + (x - (v - c.v_r)) * c.k;
  } else {
    return v - (v - c.v_r) * c.k + x;
  }
}

// fire at u = h - v_th   Heaviside: s = [u >= 0] (NaN stays NaN)   sigmoid: s(alpha u)
//                        atan: atan(pi/2 alpha u) / pi + 1/2
//                        triangle: 0 | (u + a)^2 / 2a^2 | 1 - (a - u)^2 / 2a^2 | 1 on u < -a | < 0 | < a | >= a
template <typename acc_t, Fire F>
STARS_INLINE acc_t fire(acc_t u, const Consts<acc_t>& c) {
  if constexpr (F == Fire::kHeaviside) {
    return u >= acc_t(0) ? acc_t(1) : (u == u ? acc_t(0) : u);
  } else if constexpr (F == Fire::kSigmoid) {
    return sigmoid_acc(c.alpha * u);
  } else if constexpr (F == Fire::kAtan) {
    return std::atan(c.atan_scale * u) / c.pi + acc_t(0.5);
  } else {
    const acc_t a = c.alpha;
    const acc_t left = (u + a) * (u + a) / c.two_alpha2;
    const acc_t right = acc_t(1) - (a - u) * (a - u) / c.two_alpha2;
    const acc_t mid = u < acc_t(0) ? left : right;
    return u < -a ? acc_t(0) : (u >= a ? acc_t(1) : mid);
  }
}

// surrogate'(u)   sigmoid: a s(au) (1 - s(au))   atan: (a/2) / (1 + (pi/2 a u)^2)
//                 triangle: max(0, a - |u|) / a^2
template <typename acc_t, Fire S>
STARS_INLINE acc_t surrogate_grad(acc_t u, const Consts<acc_t>& c) {
  if constexpr (S == Fire::kSigmoid) {
    const acc_t s = sigmoid_acc(c.alpha * u);
    return c.alpha * s * (acc_t(1) - s);
  } else if constexpr (S == Fire::kAtan) {
    const acc_t w = c.atan_scale * u;
    return c.half_alpha / (acc_t(1) + w * w);
  } else {
    static_assert(S == Fire::kTriangle, "the Heaviside has no surrogate gradient");
    const acc_t d = c.alpha - (u < acc_t(0) ? -u : u);
    return (d > acc_t(0) ? d : acc_t(0)) / c.alpha2;
  }
}

// reset   hard: v = h (1 - s) + v_reset s    soft: v = h - v_th s
template <typename acc_t, bool kHard>
STARS_INLINE acc_t reset(acc_t h, acc_t s, const Consts<acc_t>& c) {
  if constexpr (kHard) {
    return h * (acc_t(1) - s) + c.v_reset * s;
  } else {
    return h - c.v_th * s;
  }
}

// ---------------------------------------------------------------------------------------------
// One time step over a block of n elements.

// Forward: s[j] = fire(h - v_th), v[j] <- reset(h, s) with h = charge(v[j], x[j]).
template <typename acc_t, Charge C, bool kHard, Fire F>
STARS_INLINE void forward_step(const acc_t* __restrict x, acc_t* __restrict s, acc_t* __restrict v, int64_t n,
                               const Consts<acc_t> c) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t h = charge<acc_t, C>(v[j], x[j], c);
    const acc_t sj = fire<acc_t, F>(h - c.v_th, c);
    s[j] = sj;
    v[j] = reset<acc_t, kHard>(h, sj, c);
  }
}

// Backward's recomputation: the same step, keeping h instead of s.
template <typename acc_t, Charge C, bool kHard, Fire F>
STARS_INLINE void recompute_step(const acc_t* __restrict x, acc_t* __restrict h, acc_t* __restrict v, int64_t n,
                                 const Consts<acc_t> c) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t hj = charge<acc_t, C>(v[j], x[j], c);
    h[j] = hj;
    v[j] = reset<acc_t, kHard>(hj, fire<acc_t, F>(hj - c.v_th, c), c);
  }
}

// Reverse step (gv = dL/dv after step t on entry, before it on exit):
//   sg = surrogate'(h - v_th)
//   dv/dh = hard: (1 - s) + (v_reset - h) sg (1 - D)      soft: 1 - v_th sg (1 - D)
//   gh = gs sg + gv dv/dh;   gx = gh k (LIF decay_input) | gh;   gv <- gh (1 - k) (LIF) | gh (IF)
template <typename acc_t, Charge C, bool kHard, Fire F, Fire S>
STARS_INLINE void backward_step(const acc_t* __restrict h, const acc_t* __restrict gs, acc_t* __restrict gx,
                                acc_t* __restrict gv, acc_t* __restrict gh, int64_t n, const Consts<acc_t> c) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t hj = h[j];
    const acc_t u = hj - c.v_th;
    const acc_t sg = surrogate_grad<acc_t, S>(u, c);
    acc_t dv_dh;
    if constexpr (kHard) {
      dv_dh = (acc_t(1) - fire<acc_t, F>(u, c)) + (c.v_reset - hj) * sg * c.not_detached;
    } else {
      dv_dh = acc_t(1) - c.v_th * sg * c.not_detached;
    }
    const acc_t g = gs[j] * sg + gv[j] * dv_dh;
    gh[j] = g;
    gx[j] = C == Charge::kDecayInput ? g * c.k : g;
    gv[j] = C == Charge::kIF ? g : g * c.one_minus_k;
  }
}

// v before step t > 0, from h of step t - 1: v_prev = reset(h, fire(h - v_th)).
template <typename acc_t, bool kHard, Fire F>
STARS_INLINE void previous_v(const acc_t* __restrict h, acc_t* __restrict v, int64_t n, const Consts<acc_t> c) {
  for (int64_t j = 0; j < n; ++j) v[j] = reset<acc_t, kHard>(h[j], fire<acc_t, F>(h[j] - c.v_th, c), c);
}

// PLIF: dL/dk += gh (x - (v_prev - v_r)) (decay_input) | gh * -(v_prev - v_r)
template <typename acc_t, Charge C>
STARS_INLINE void inv_tau_grad_step(const acc_t* __restrict x, const acc_t* __restrict v_prev,
                                    const acc_t* __restrict gh, acc_t* __restrict acc, int64_t n,
                                    const Consts<acc_t> c) {
  for (int64_t j = 0; j < n; ++j) {
    if constexpr (C == Charge::kDecayInput) {
      acc[j] += gh[j] * (x[j] - (v_prev[j] - c.v_r));
    } else {
      acc[j] += gh[j] * -(v_prev[j] - c.v_r);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// A thread's range [begin, end) of elements, block by block.

// Elements per block: the backward keeps h for T steps of a block (T * block values) in cache.
inline int64_t block_size(int64_t T) { return std::clamp<int64_t>(8192 / std::max<int64_t>(T, 1), 256, 2048); }

template <typename acc_t>
struct ForwardArgs {
  int64_t T;
  RowReader<acc_t> x, v_init;
  bool has_v_init;
  RowWriter<acc_t> spikes, v_last;
  Consts<acc_t> c;
};

template <typename acc_t>
STARS_INLINE void initial_v(const RowReader<acc_t>& v_init, bool has_v_init, acc_t v_start, acc_t* v,
                            int64_t b0, int64_t n, acc_t* buf) {
  if (has_v_init) {
    const acc_t* v0 = v_init.block(0, b0, n, buf);
    std::copy(v0, v0 + n, v);
  } else {
    std::fill(v, v + n, v_start);
  }
}

template <typename acc_t, Charge C, bool kHard, Fire F>
STARS_INLINE void forward_range(const ForwardArgs<acc_t>& a, int64_t begin, int64_t end) {
  const int64_t blk = block_size(a.T);
  std::vector<acc_t> scratch(3 * blk);
  acc_t* xb = scratch.data();
  acc_t* sb = xb + blk;
  acc_t* vb = sb + blk;
  for (int64_t b0 = begin; b0 < end; b0 += blk) {
    const int64_t n = std::min(blk, end - b0);
    acc_t* v = a.v_last.block(0, b0, n, vb);
    initial_v(a.v_init, a.has_v_init, a.c.v_start, v, b0, n, xb);
    for (int64_t t = 0; t < a.T; ++t) {
      const acc_t* x = a.x.block(t, b0, n, xb);
      acc_t* s = a.spikes.block(t, b0, n, sb);
      forward_step<acc_t, C, kHard, F>(x, s, v, n, a.c);
      a.spikes.commit(t, b0, n, s);
    }
    a.v_last.commit(0, b0, n, v);
  }
}

template <typename acc_t>
struct BackwardArgs {
  int64_t T;
  RowReader<acc_t> grad_spikes, grad_v_last, x, v_init;
  bool has_grad_v_last, has_v_init, need_inv_tau_grad;
  RowWriter<acc_t> grad_x, grad_v_init, grad_inv_tau;
  Consts<acc_t> c;
};

template <typename acc_t, Charge C, bool kHard, Fire F, Fire S>
STARS_INLINE void backward_range(const BackwardArgs<acc_t>& a, int64_t begin, int64_t end) {
  const int64_t T = a.T, blk = block_size(T);
  std::vector<acc_t> scratch((T + 8) * blk);
  acc_t* xb = scratch.data();  // I/O conversion buffers
  acc_t* gsb = xb + blk;
  acc_t* gxb = gsb + blk;
  acc_t* kb = gxb + blk;
  acc_t* v0 = kb + blk;  // v before t = 0
  acc_t* v = v0 + blk;   // running v of the recomputation, then v_prev for PLIF
  acc_t* gv = v + blk;   // dL/dv carried backwards in time
  acc_t* gh = gv + blk;  // dL/dh of the current step
  acc_t* hs = gh + blk;  // h of every step, [T, n]
  for (int64_t b0 = begin; b0 < end; b0 += blk) {
    const int64_t n = std::min(blk, end - b0);
    // Recompute h[t] from x with the forward's arithmetic.
    initial_v(a.v_init, a.has_v_init, a.c.v_start, v0, b0, n, xb);
    std::copy(v0, v0 + n, v);
    for (int64_t t = 0; t < T; ++t) {
      recompute_step<acc_t, C, kHard, F>(a.x.block(t, b0, n, xb), hs + t * n, v, n, a.c);
    }
    // Reverse scan.
    if (a.has_grad_v_last) {
      const acc_t* g = a.grad_v_last.block(0, b0, n, gsb);
      std::copy(g, g + n, gv);
    } else {
      std::fill(gv, gv + n, acc_t(0));
    }
    acc_t* k_acc = nullptr;
    if (a.need_inv_tau_grad) {
      k_acc = a.grad_inv_tau.block(0, b0, n, kb);
      std::fill(k_acc, k_acc + n, acc_t(0));
    }
    for (int64_t t = T - 1; t >= 0; --t) {
      acc_t* gx = a.grad_x.block(t, b0, n, gxb);
      backward_step<acc_t, C, kHard, F, S>(hs + t * n, a.grad_spikes.block(t, b0, n, gsb), gx, gv, gh, n, a.c);
      a.grad_x.commit(t, b0, n, gx);
      if (k_acc != nullptr) {
        const acc_t* v_prev = v0;
        if (t > 0) {
          previous_v<acc_t, kHard, F>(hs + (t - 1) * n, v, n, a.c);
          v_prev = v;
        }
        inv_tau_grad_step<acc_t, C>(a.x.block(t, b0, n, xb), v_prev, gh, k_acc, n, a.c);
      }
    }
    acc_t* g = a.grad_v_init.block(0, b0, n, gxb);
    std::copy(gv, gv + n, g);
    a.grad_v_init.commit(0, b0, n, g);
    if (k_acc != nullptr) a.grad_inv_tau.commit(0, b0, n, k_acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Run-time options -> template parameters.

template <typename E, E V>
using Tag = std::integral_constant<E, V>;

template <typename Fn>
void with_charge(bool leaky, bool decay_input, const Fn& fn) {
  if (!leaky) return fn(Tag<Charge, Charge::kIF>{});
  if (decay_input) return fn(Tag<Charge, Charge::kDecayInput>{});
  fn(Tag<Charge, Charge::kNoDecay>{});
}

template <typename Fn>
void with_bool(bool b, const Fn& fn) {
  if (b) return fn(std::true_type{});
  fn(std::false_type{});
}

// surrogate: 0 sigmoid, 1 atan, 2 triangle (as in ops.cpp)
template <typename Fn>
void with_surrogate(int64_t surrogate, const Fn& fn) {
  if (surrogate == 0) return fn(Tag<Fire, Fire::kSigmoid>{});
  if (surrogate == 1) return fn(Tag<Fire, Fire::kAtan>{});
  fn(Tag<Fire, Fire::kTriangle>{});
}

// The emitted value: Heaviside when spiking, else the surrogate's primitive.
template <typename Fn>
void with_fire(bool spiking, int64_t surrogate, const Fn& fn) {
  if (spiking) return fn(Tag<Fire, Fire::kHeaviside>{});
  with_surrogate(surrogate, fn);
}

// Elements per parallel task (see parallel_chunks).
constexpr int64_t kChunk = 32768;

std::tuple<at::Tensor, at::Tensor> lif_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& v_init,
                                                   const at::Tensor& inv_tau, bool leaky, double v_threshold,
                                                   std::optional<double> v_reset, bool decay_input, int64_t surrogate,
                                                   double alpha, bool spiking) {
  check_neuron_inputs("lif_forward", x, v_init, inv_tau, surrogate, alpha);
  const int64_t T = x.size(0), N = x.size(1);
  const double k = inv_tau.item<double>();
  at::Tensor spikes = empty_output(x.sizes(), x.options());
  at::Tensor v_last = empty_output({N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(acc_dtype(x.scalar_type()), "lif_forward", [&] {
    using acc_t = scalar_t;
    ForwardArgs<acc_t> args{T,
                            RowReader<acc_t>(x),
                            v_init.has_value() ? RowReader<acc_t>(*v_init) : RowReader<acc_t>(),
                            v_init.has_value(),
                            RowWriter<acc_t>(spikes),
                            RowWriter<acc_t>(v_last),
                            make_consts<acc_t>(k, v_threshold, v_reset, alpha, false)};
    with_charge(leaky, decay_input, [&](auto C) {
      with_bool(v_reset.has_value(), [&](auto hard) {
        with_fire(spiking, surrogate, [&](auto F) {
          parallel_chunks(N, kChunk, [&](int64_t begin, int64_t end) {
            run_vectorized([&]() __attribute__((always_inline)) {
              forward_range<acc_t, C.value, hard.value, F.value>(args, begin, end);
            });
          });
        });
      });
    });
  });
  return {spikes, v_last};
}

// grad_v_init [N] (x's dtype) is dL/dv before t = 0, also when v_init is None (v_reset there);
// grad_inv_tau holds the [N] float32 per-element partial sums of dL/d(1/tau) (accumulated in the
// state dtype) when need_inv_tau_grad, else it is empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_backward_cpu(
    const at::Tensor& grad_spikes, const std::optional<at::Tensor>& grad_v_last, const at::Tensor& x,
    const std::optional<at::Tensor>& v_init, const at::Tensor& inv_tau, bool leaky, double v_threshold,
    std::optional<double> v_reset, bool decay_input, int64_t surrogate, double alpha, bool spiking,
    bool detach_reset, bool need_inv_tau_grad) {
  check_neuron_inputs("lif_backward", x, v_init, inv_tau, surrogate, alpha);
  check_neuron_grads(x, grad_spikes, grad_v_last, leaky, need_inv_tau_grad);
  const int64_t T = x.size(0), N = x.size(1);
  const double k = inv_tau.item<double>();
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  at::Tensor grad_x = empty_output(x.sizes(), x.options());
  at::Tensor grad_v_init = empty_output({N}, x.options());
  at::Tensor grad_inv_tau = empty_output({need_inv_tau_grad ? N : 0}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(acc, "lif_backward", [&] {
    using acc_t = scalar_t;
    BackwardArgs<acc_t> args{T,
                             RowReader<acc_t>(grad_spikes),
                             grad_v_last.has_value() ? RowReader<acc_t>(*grad_v_last) : RowReader<acc_t>(),
                             RowReader<acc_t>(x),
                             v_init.has_value() ? RowReader<acc_t>(*v_init) : RowReader<acc_t>(),
                             grad_v_last.has_value(),
                             v_init.has_value(),
                             need_inv_tau_grad,
                             RowWriter<acc_t>(grad_x),
                             RowWriter<acc_t>(grad_v_init),
                             RowWriter<acc_t>(grad_inv_tau),
                             make_consts<acc_t>(k, v_threshold, v_reset, alpha, detach_reset)};
    with_charge(leaky, decay_input, [&](auto C) {
      with_bool(v_reset.has_value(), [&](auto hard) {
        with_surrogate(surrogate, [&](auto S) {
          with_fire(spiking, surrogate, [&](auto F) {
            // spiking=False emits the primitive of S itself: only (F, S) = (S, S) is reachable.
            if constexpr (F.value == Fire::kHeaviside || F.value == S.value) {
              parallel_chunks(N, kChunk, [&](int64_t begin, int64_t end) {
                run_vectorized([&]() __attribute__((always_inline)) {
                  backward_range<acc_t, C.value, hard.value, F.value, S.value>(args, begin, end);
                });
              });
            }
          });
        });
      });
    });
  });
  return {grad_x, grad_v_init, grad_inv_tau};
}

}  // namespace

TORCH_LIBRARY_IMPL(stars_fast, CPU, m) {
  m.impl("lif_forward", &lif_forward_cpu);
  m.impl("lif_backward", &lif_backward_cpu);
}

}  // namespace stars_fast
