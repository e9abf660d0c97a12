// CPU kernels of the STARS loss and its feature pooling (shared/DESIGN.md section 2.2).
//
//   pool_mean          z[r] = mean_{t,s} x[t, r, s]                                  (Eq. 12)
//   quantiles          linear-interpolated quantiles of z.flatten() by exact selection
//   stars_loss_fused   per layer l, with u = z / max(||z||, eps) row-wise and z' = (z - shift) * scale:
//       RCA  D = U_S U_S^T - U_T U_T^T,  l_rca = sum_{i != j} D_ij^2 / (B (B - 1))         (Eq. 14)
//       TAR  p^m = mean_{b,c} sigmoid((z' - theta_m) / delta),  l_tar = mean_m (p_S^m - p_T^m)^2
//       total = sum_l coef_rca[l] l_rca + coef_tar[l] l_tar, and d total / d z for both sides.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <numeric>
#include <vector>

#include "common.h"

namespace stars_fast {
namespace {

// ---------------------------------------------------------------------------------------------
// pool_mean

template <typename scalar_t>
void pool_mean_kernel(const scalar_t* x, int64_t T, int64_t R, int64_t S, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t count = static_cast<acc_t>(T * S);
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / (T * S)), [&](int64_t begin, int64_t end) {
    run_vectorized([&]() __attribute__((always_inline)) {
      for (int64_t r = begin; r < end; ++r) {
        acc_t sum = 0;
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* __restrict row = x + (t * R + r) * S;
          acc_t row_sum = 0;
#pragma omp simd reduction(+ : row_sum)
          for (int64_t s = 0; s < S; ++s) row_sum += static_cast<acc_t>(row[s]);
          sum += row_sum;
        }
        out[r] = static_cast<scalar_t>(sum / count);
      }
    });
  });
}

at::Tensor pool_mean_cpu(const at::Tensor& x_in) {
  check_pool_mean_input(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), R = x.size(1), S = x.size(2);
  at::Tensor out = at::empty({R}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_mean", [&] {
    pool_mean_kernel(x.const_data_ptr<scalar_t>(), T, R, S, out.data_ptr<scalar_t>());
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// quantiles: as torch.quantile(z.flatten(), q, interpolation='linear'): rank = q (n - 1) and
// result = lerp(z_(floor rank), z_(ceil rank), rank - floor rank), z_(r) the r-th smallest value.
// Exact selection without a sort: a histogram of the top 16 bits of order-preserving integer keys
// tells which bucket holds each wanted order statistic; only those buckets' values are gathered, and
// std::nth_element picks the statistics among them (on a shrinking tail for ascending ranks).

constexpr int kBucketBits = 16;
constexpr int64_t kBuckets = int64_t(1) << kBucketBits;

template <typename acc_t>
STARS_INLINE int64_t bucket_of(acc_t x) {
  using key_t = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  constexpr int kBits = 8 * sizeof(key_t);
  const key_t bits = bit_cast<key_t>(x);
  // Negative values: all bits flipped; positive: sign bit set. Unsigned order = float order.
  const key_t key = (bits >> (kBits - 1)) != 0 ? ~bits : bits | (key_t(1) << (kBits - 1));
  return static_cast<int64_t>(key >> (kBits - kBucketBits));
}

template <typename acc_t>
acc_t torch_lerp(acc_t a, acc_t b, acc_t w) {
  return w < acc_t(0.5) ? a + w * (b - a) : b - (b - a) * (acc_t(1) - w);
}

// v[0, n) without NaN -> res[i] = quantile q[i]
template <typename acc_t>
void select_quantiles(const acc_t* v, int64_t n, at::ArrayRef<double> q, acc_t* res) {
  const int64_t M = static_cast<int64_t>(q.size());
  std::vector<int64_t> lo(M), hi(M), ranks;
  std::vector<acc_t> frac(M);
  for (int64_t i = 0; i < M; ++i) {  // in the data's precision, as torch.quantile
    const acc_t rank = static_cast<acc_t>(q[i]) * static_cast<acc_t>(n - 1);
    lo[i] = std::min(static_cast<int64_t>(rank), n - 1);
    hi[i] = std::min(static_cast<int64_t>(std::ceil(rank)), n - 1);
    frac[i] = rank - static_cast<acc_t>(lo[i]);
    ranks.push_back(lo[i]);
    ranks.push_back(hi[i]);
  }
  std::sort(ranks.begin(), ranks.end());
  ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  // start[b] = number of values in the buckets before b.
  std::vector<int64_t> start(kBuckets + 1, 0);
  for (int64_t e = 0; e < n; ++e) ++start[bucket_of(v[e]) + 1];
  std::partial_sum(start.begin(), start.end(), start.begin());
  // The buckets holding the wanted ranks (ascending), each gathered into its slot of `cand`.
  std::vector<int32_t> slot(kBuckets, -1);
  std::vector<int64_t> rank_bucket(ranks.size()), offset, fill;
  int64_t total = 0;
  for (size_t k = 0; k < ranks.size(); ++k) {
    const int64_t b = std::upper_bound(start.begin(), start.end(), ranks[k]) - start.begin() - 1;
    rank_bucket[k] = b;
    if (slot[b] < 0) {
      slot[b] = static_cast<int32_t>(offset.size());
      offset.push_back(total);
      total += start[b + 1] - start[b];
    }
  }
  fill = offset;
  std::vector<acc_t> cand(total);
  for (int64_t e = 0; e < n; ++e) {
    const int32_t s = slot[bucket_of(v[e])];
    if (s >= 0) cand[fill[s]++] = v[e];
  }
  std::vector<acc_t> value(ranks.size());
  std::vector<int64_t> placed(offset.size(), -1);  // per bucket: index already in its sorted place
  for (size_t k = 0; k < ranks.size(); ++k) {
    const int64_t b = rank_bucket[k], s = slot[b], local = ranks[k] - start[b];
    acc_t* base = cand.data() + offset[s];
    if (local > placed[s]) {
      std::nth_element(base + placed[s] + 1, base + local, base + (start[b + 1] - start[b]));
      placed[s] = local;
    }
    value[k] = base[local];
  }
  const auto value_at = [&](int64_t r) { return value[std::lower_bound(ranks.begin(), ranks.end(), r) - ranks.begin()]; };
  for (int64_t i = 0; i < M; ++i) res[i] = torch_lerp(value_at(lo[i]), value_at(hi[i]), frac[i]);
}

at::Tensor quantiles_cpu(const at::Tensor& z, at::ArrayRef<double> q) {
  check_quantiles_input(z, q);
  const at::ScalarType acc = acc_dtype(z.scalar_type());
  const at::Tensor values = z.contiguous().view(-1).to(acc);
  const int64_t M = static_cast<int64_t>(q.size());
  at::Tensor out = at::empty({M}, z.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "quantiles", [&] {
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    scalar_t* res = out.data_ptr<scalar_t>();
    if (std::any_of(v, v + values.numel(), [](scalar_t a) { return std::isnan(a); })) {
      std::fill(res, res + M, std::numeric_limits<scalar_t>::quiet_NaN());  // as torch.quantile
    } else {
      select_quantiles(v, values.numel(), q, res);
    }
  });
  return out.to(z.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// stars_loss_fused

// TAR soft exceedances of one side: sig[m, e] = sigmoid(((z_e - shift) scale - theta_m) / delta) for
// e in [0, n), and p[m] = mean_e sig[m, e], summed in fixed chunks (deterministic whatever the
// number of threads).
template <typename acc_t>
void soft_exceedance(const acc_t* z, int64_t n, acc_t shift, acc_t scale, const std::vector<acc_t>& theta,
                     acc_t inv_delta, acc_t* sig, std::vector<double>& p) {
  constexpr int64_t kChunk = 4096;
  const int64_t M = static_cast<int64_t>(theta.size()), chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks * M);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    run_vectorized([&]() __attribute__((always_inline)) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t e0 = c * kChunk, e1 = std::min(n, e0 + kChunk);
        for (int64_t m = 0; m < M; ++m) {
          const acc_t th = theta[m];
          acc_t* __restrict s = sig + m * n;
          for (int64_t e = e0; e < e1; ++e) s[e] = sigmoid_acc(((z[e] - shift) * scale - th) * inv_delta);
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t e = e0; e < e1; ++e) sum += s[e];
          partial[c * M + m] = sum;
        }
      }
    });
  });
  p.assign(M, 0.0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t m = 0; m < M; ++m) p[m] += partial[c * M + m];
  }
  for (double& pm : p) pm /= static_cast<double>(n);
}

// Gradient of one side, row i of z [B, C]:
//   RCA  g = dl_rca/du_i (a row of E U), dz = (g - u (u . g)) / ||z_i|| (or g / eps when ||z_i|| < eps)
//   TAR  dz += tar_coef * sum_m w_m sig_m (1 - sig_m)      (tar_coef carries scale / (delta B C))
//   out = rca_coef * dz_rca + dz_tar
template <typename acc_t>
void side_gradient(const acc_t* u, int64_t ldu, const acc_t* g, int64_t ldg, const acc_t* norm, acc_t eps,
                   const acc_t* sig, const std::vector<acc_t>& w, acc_t rca_coef, acc_t tar_coef, int64_t B,
                   int64_t C, acc_t* out) {
  const int64_t M = static_cast<int64_t>(w.size()), n = B * C;
  at::parallel_for(0, B, std::max<int64_t>(1, 8192 / C), [&](int64_t b0, int64_t b1) {
    run_vectorized([&]() __attribute__((always_inline)) {
      for (int64_t i = b0; i < b1; ++i) {
        const acc_t* __restrict ui = u + i * ldu;
        const acc_t* __restrict gi = g + i * ldg;
        acc_t* __restrict oi = out + i * C;
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t c = 0; c < C; ++c) dot += ui[c] * gi[c];
        const bool clamped = norm[i] < eps;
        const acc_t proj = clamped ? acc_t(0) : dot;
        const acc_t inv_norm = acc_t(1) / (clamped ? eps : norm[i]);
        for (int64_t c = 0; c < C; ++c) oi[c] = rca_coef * ((gi[c] - ui[c] * proj) * inv_norm);
        for (int64_t m = 0; m < M; ++m) {
          const acc_t wm = tar_coef * w[m];
          const acc_t* __restrict sm = sig + m * n + i * C;
          for (int64_t c = 0; c < C; ++c) oi[c] += wm * (sm[c] * (acc_t(1) - sm[c]));
        }
      }
    });
  });
}

// Row norms of z [B, C] and u = z / max(norm, eps) written into columns [col, col + C) of A (and of
// A_neg with the sign `sign`).
template <typename acc_t>
void normalize_rows(const acc_t* z, int64_t B, int64_t C, acc_t eps, acc_t* norm, acc_t* A, acc_t* A_neg, int64_t K,
                    int64_t col, acc_t sign) {
  at::parallel_for(0, B, std::max<int64_t>(1, 8192 / C), [&](int64_t b0, int64_t b1) {
    run_vectorized([&]() __attribute__((always_inline)) {
      for (int64_t i = b0; i < b1; ++i) {
        const acc_t* __restrict zi = z + i * C;
        acc_t* __restrict ai = A + i * K + col;
        acc_t* __restrict ni = A_neg + i * K + col;
        acc_t sq = 0;
#pragma omp simd reduction(+ : sq)
        for (int64_t c = 0; c < C; ++c) sq += zi[c] * zi[c];
        norm[i] = std::sqrt(sq);
        const acc_t denom = norm[i] > eps ? norm[i] : eps;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t uc = zi[c] / denom;
          ai[c] = uc;
          ni[c] = sign * uc;
        }
      }
    });
  });
}

struct LayerResult {
  double rca, tar;
  at::Tensor grad_teacher, grad_student;
};

template <typename acc_t>
LayerResult stars_layer(const at::Tensor& zt_in, const at::Tensor& zs_in, const at::Tensor& theta_in, double shift,
                        double scale, double coef_rca, double coef_tar, double delta, double eps_d) {
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor zt = zt_in.to(acc).contiguous(), zs = zs_in.to(acc).contiguous();
  const int64_t B = zt.size(0), Ct = zt.size(1), Cs = zs.size(1), K = Cs + Ct;
  const acc_t eps = static_cast<acc_t>(eps_d);
  const auto opts = zt.options();

  // RCA: A = [U_S | U_T], A_neg = [U_S | -U_T], so D = A A_neg^T = U_S U_S^T - U_T U_T^T.
  at::Tensor A = empty_output({B, K}, opts), A_neg = empty_output({B, K}, opts), norms = at::empty({2, B}, opts);
  acc_t* norm_s = norms.data_ptr<acc_t>();
  acc_t* norm_t = norm_s + B;
  normalize_rows(zs.const_data_ptr<acc_t>(), B, Cs, eps, norm_s, A.data_ptr<acc_t>(), A_neg.data_ptr<acc_t>(), K, 0,
                 acc_t(1));
  normalize_rows(zt.const_data_ptr<acc_t>(), B, Ct, eps, norm_t, A.data_ptr<acc_t>(), A_neg.data_ptr<acc_t>(), K, Cs,
                 acc_t(-1));
  at::Tensor E = at::mm(A, A_neg.t());
  // l_rca = sum_{i != j} D_ij^2 / (B (B - 1));  E = 4 D (1 - I) / (B (B - 1)) = dl_rca / dG_S (times 2).
  const double pairs = static_cast<double>(B) * static_cast<double>(B - 1);
  const acc_t e_scale = static_cast<acc_t>(4.0 / pairs);
  std::vector<double> row_sq(B);
  acc_t* e = E.data_ptr<acc_t>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      acc_t* ei = e + i * B;
      ei[i] = 0;
      double sq = 0;
      for (int64_t j = 0; j < B; ++j) {
        sq += static_cast<double>(ei[j]) * static_cast<double>(ei[j]);
        ei[j] *= e_scale;
      }
      row_sq[i] = sq;
    }
  });
  const double rca = std::accumulate(row_sq.begin(), row_sq.end(), 0.0) / pairs;
  // [dl/dU_S | dl/dU_T] = E A_neg = [E U_S | -E U_T]
  at::Tensor G = empty_output({B, K}, opts);
  at::mm_out(G, E, A_neg);

  // TAR
  const at::Tensor theta_t = theta_in.to(at::kDouble).contiguous();
  const double* th = theta_t.const_data_ptr<double>();
  const int64_t M = theta_t.numel();
  std::vector<acc_t> theta(th, th + M);
  const acc_t shift_a = static_cast<acc_t>(shift), scale_a = static_cast<acc_t>(scale);
  const acc_t inv_delta = static_cast<acc_t>(1.0 / delta);
  at::Tensor sig_t = empty_output({M, B * Ct}, opts), sig_s = empty_output({M, B * Cs}, opts);
  std::vector<double> p_t, p_s;
  soft_exceedance(zt.const_data_ptr<acc_t>(), B * Ct, shift_a, scale_a, theta, inv_delta, sig_t.data_ptr<acc_t>(),
                  p_t);
  soft_exceedance(zs.const_data_ptr<acc_t>(), B * Cs, shift_a, scale_a, theta, inv_delta, sig_s.data_ptr<acc_t>(),
                  p_s);
  double tar = 0;
  std::vector<acc_t> w(M);  // d l_tar / d p_S^m = 2 (p_S^m - p_T^m) / M
  for (int64_t m = 0; m < M; ++m) {
    const double d = p_s[m] - p_t[m];
    tar += d * d;
    w[m] = static_cast<acc_t>(2.0 * d / static_cast<double>(M));
  }
  tar /= static_cast<double>(M);

  // d total / d z: chain factor scale / delta of z' and sigmoid, and 1 / (B C) of the mean.
  at::Tensor grad_t = empty_output({B, Ct}, opts), grad_s = empty_output({B, Cs}, opts);
  const acc_t* a = A.const_data_ptr<acc_t>();
  const acc_t* g = G.const_data_ptr<acc_t>();
  const double tar_chain = coef_tar * scale / delta;
  side_gradient(a, K, g, K, norm_s, eps, sig_s.const_data_ptr<acc_t>(), w, static_cast<acc_t>(coef_rca),
                static_cast<acc_t>(tar_chain / static_cast<double>(B * Cs)), B, Cs, grad_s.data_ptr<acc_t>());
  side_gradient(a + Cs, K, g + Cs, K, norm_t, eps, sig_t.const_data_ptr<acc_t>(), w, static_cast<acc_t>(coef_rca),
                static_cast<acc_t>(-tar_chain / static_cast<double>(B * Ct)), B, Ct, grad_t.data_ptr<acc_t>());
  return {rca, tar, grad_t.to(zt_in.scalar_type()), grad_s.to(zs_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> stars_loss_fused_cpu(
    at::TensorList z_teacher, at::TensorList z_student, at::TensorList thresholds, at::ArrayRef<double> shift,
    at::ArrayRef<double> scale, at::ArrayRef<double> coef_rca, at::ArrayRef<double> coef_tar, double delta,
    double eps) {
  const bool any_fp64 = check_stars_inputs(z_teacher, z_student, thresholds, shift, scale, coef_rca, coef_tar, delta, eps);
  const size_t L = z_teacher.size();
  // total and parts: float64 when any input is float64 (so that float64 gradcheck sees an exact
  // loss), else float32.
  const at::ScalarType out_dtype = any_fp64 ? at::kDouble : at::kFloat;
  std::vector<double> parts(2 * L);
  std::vector<at::Tensor> grad_teacher(L), grad_student(L);
  double total = 0;
  for (size_t l = 0; l < L; ++l) {
    const bool fp64 = z_teacher[l].scalar_type() == at::kDouble || z_student[l].scalar_type() == at::kDouble;
    const LayerResult r =
        fp64 ? stars_layer<double>(z_teacher[l], z_student[l], thresholds[l], shift[l], scale[l], coef_rca[l],
                                   coef_tar[l], delta, eps)
             : stars_layer<float>(z_teacher[l], z_student[l], thresholds[l], shift[l], scale[l], coef_rca[l],
                                  coef_tar[l], delta, eps);
    parts[2 * l] = r.rca;
    parts[2 * l + 1] = r.tar;
    total += coef_rca[l] * r.rca + coef_tar[l] * r.tar;
    grad_teacher[l] = r.grad_teacher;
    grad_student[l] = r.grad_student;
  }
  at::Tensor parts_t = at::tensor(parts, at::kDouble).view({static_cast<int64_t>(L), 2}).to(out_dtype);
  return {at::scalar_tensor(total, out_dtype), parts_t, grad_teacher, grad_student};
}

}  // namespace

TORCH_LIBRARY_IMPL(stars_fast, CPU, m) {
  m.impl("pool_mean", &pool_mean_cpu);
  m.impl("quantiles", &quantiles_cpu);
  m.impl("stars_loss_fused", &stars_loss_fused_cpu);
}

}  // namespace stars_fast
