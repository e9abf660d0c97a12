// The CUDA STARS ops and feature pooling (docs/design.md section 2.2), their host side: stars_cuda.cu
// registers them for CUDA tensors; the tests build them with the host compiler, where their kernels
// (stars_kernels.cuh) run on CPU tensors through the emulation of emulation/cuda_on_host.h. The math
// is the same as csrc/stars_cpu.cpp:
//   pool_mean          z[r] = mean_{t,s} x[t, r, s]                                   (Eq. 12)
//   quantiles          linear-interpolated quantiles of z.flatten() (a sort + gathers)
//   stars_loss_fused   per layer, with z' = (z - shift) * scale
//       (normalize: shift = mean(zT), scale = 1 / max(std_pop(zT), 1e-3 rms(zT), eps), 1 where that is 0,
//       as 0-dim device tensors; else 0 and 1), theta = fixed thresholds, or torch.quantile's linear
//       quantiles of z'_T by at::kthvalue (radix selection, no sort) of the two neighbouring ranks (known
//       on the host from q and n):
//       RCA  row i of a side is silent when ||z_i|| <= tau max_j ||z_j|| (tau = kRcaSilentTol; none is
//            silent where that side's largest norm is not finite, so NaN and inf reach the loss): a row
//            that small has no direction to compare. The pairs run over the n_A rows active (silent on
//            neither side); u = z / ||z|| on them and u = 0 on the others, so that their Gram entries
//            vanish. D = U_S U_S^T - U_T U_T^T = A A_neg^T with A = [U_S | U_T], A_neg = [U_S | -U_T] (our
//            own fp32 GEMM: no TF32 whatever the global matmul precision),
//            l_rca = sum_{i != j active} D_ij^2 / (n_A (n_A - 1)),  [dl/dU_S | dl/dU_T] = E A_neg,
//            E = 4 D (1 - I) / (n_A (n_A - 1)); dz_i = (g_i - u_i (u_i . g_i)) / ||z_i|| on active rows, no
//            RCA gradient on silent rows. n_A < 2 leaves no pair: l_rca = 0 (NaN where a feature is not
//            finite, as the reference's 0 * z) and no RCA gradient. n_A and the two thresholds depend on
//            the data: a one-block kernel finds them on the device (no host sync).
//       TAR  p^m = mean_{b,c} sigmoid((z' - theta_m) / delta),  l_tar = mean_m (p_S^m - p_T^m)^2
// All reductions are in a fixed order (per-row / per-block partials, no float atomics): deterministic.
// Everything stays on the device: the losses are accumulated by a one-block tree-reduction kernel,
// no host sync and no host-to-device copy. All launches use the current stream of the inputs' device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../op_args.h"
#include "launch.cuh"
#include "stars_kernels.cuh"

namespace stars_fast::stars_cuda {

inline int64_t grid_for(int64_t items_per_block_unit, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + items_per_block_unit - 1) / items_per_block_unit, 1 << 16));
}

// ---------------------------------------------------------------------------------------------
// pool_mean (pool_mean_kernel: one warp per output row)

inline at::Tensor pool_mean_cuda(const at::Tensor& x_in) {
  check_pool_mean_input(x_in);
  const DeviceScope scope(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), R = x.size(1), S = x.size(2);
  at::Tensor out = at::empty({R}, x.options());
  if (R == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_mean_cuda", [&] {
    launch_kernel(pool_mean_kernel<scalar_t>, grid_for(kWarps, R), kThreads, scope.stream(),
                  x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, R, S);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// quantiles: as torch.quantile(z.flatten(), q, interpolation='linear'): rank = q (n - 1),
// lerp(sorted[floor rank], sorted[ceil rank], rank - floor rank); NaN anywhere -> NaN.

inline at::Tensor quantiles_cuda(const at::Tensor& z, at::ArrayRef<double> q) {
  check_quantiles_input(z, q);
  const DeviceScope scope(z.device());
  const at::ScalarType acc = acc_dtype(z.scalar_type());
  const at::Tensor sorted = std::get<0>(at::sort(z.reshape(-1).to(acc)));
  const int64_t n = sorted.numel(), M = static_cast<int64_t>(q.size());
  std::vector<int64_t> lo(M), hi(M);
  std::vector<double> w(M);
  AT_DISPATCH_FLOATING_TYPES(acc, "quantiles_ranks", [&] {
    for (int64_t i = 0; i < M; ++i) {  // as torch.quantile: q in the data's precision, its rank in double
      const double rank = static_cast<double>(static_cast<scalar_t>(q[i])) * static_cast<double>(n - 1);
      lo[i] = std::min(static_cast<int64_t>(rank), n - 1);
      hi[i] = std::min(static_cast<int64_t>(std::ceil(rank)), n - 1);
      w[i] = static_cast<double>(static_cast<scalar_t>(rank - static_cast<double>(lo[i])));
    }
  });
  const auto long_opts = at::TensorOptions().dtype(at::kLong);
  const at::Tensor below = sorted.index_select(0, at::tensor(lo, long_opts).to(z.device()));
  const at::Tensor above = sorted.index_select(0, at::tensor(hi, long_opts).to(z.device()));
  const at::Tensor weights = at::tensor(w, at::TensorOptions().dtype(at::kDouble)).to(z.device(), acc);
  const at::Tensor result = at::lerp(below, above, weights);
  // NaN sorts last: a NaN in z makes every quantile NaN.
  const at::Tensor has_nan = sorted.select(0, n - 1).isnan();
  return at::where(has_nan, at::full({}, std::numeric_limits<double>::quiet_NaN(), result.options()), result)
      .to(z.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// stars_loss_fused

// out = a b^T (TRANS_B) or a b by gemm_kernel, the rows with keep[r] == 0 read as zeros.
template <typename acc_t, bool TRANS_B>
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& keep, DeviceStream stream) {
  const int64_t M = a.size(0), K = a.size(1), N = TRANS_B ? b.size(0) : b.size(1);
  at::Tensor out = at::empty({M, N}, a.options());
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile), block(kTile, kTile);
  launch_kernel(gemm_kernel<acc_t, TRANS_B>, grid, block, stream, a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                keep.const_data_ptr<uint8_t>(), out.data_ptr<acc_t>(), M, N, K);
  return out;
}

// Layer constants on the device: [shift, scale] (acc_t) and theta [M] (acc_t), no host sync.
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> layer_constants(const at::Tensor& zt, at::ArrayRef<double> quantiles,
                                                  std::optional<at::ArrayRef<double>> thresholds, bool normalize,
                                                  double eps) {
  const auto opts = zt.options();
  at::Tensor shift = normalize ? zt.mean() : at::zeros({}, opts);
  // The std in double (torch.std of float on the GPU accumulates in float: squares of features near 1e20
  // overflow it to inf, which made every normalized feature 0 and L_TAR a silent 0), as the CPU op does.
  at::Tensor scale = at::ones({}, opts);
  if (normalize) {  // normalize_scale (op_args.h) on the device: 1 / max(std, tau_std rms, eps), 1 where that is 0
    const at::Tensor zd = zt.to(at::kDouble);
    const at::Tensor std_pop = zd.std(/*dim=*/{}, /*correction=*/0);
    const at::Tensor s = at::maximum(std_pop, at::hypot(zd.mean(), std_pop) * kNormalizeStdTol).clamp_min(eps);
    scale = at::where(s == 0, at::ones_like(s), s.reciprocal()).to(opts.dtype());
  }
  const at::Tensor shift_scale = at::stack({shift, scale});
  if (thresholds.has_value()) {  // fills on the device (kernel arguments), not a host-to-device copy
    std::vector<at::Tensor> values;
    for (double t : *thresholds) values.push_back(at::full({}, t, opts));
    return {shift_scale, at::stack(values)};
  }
  const at::Tensor zn = ((zt - shift) * scale).reshape(-1);
  const int64_t n = zn.numel();
  std::vector<at::Tensor> theta;
  for (double q : quantiles) {  // as torch.quantile: q in the data's precision, its rank in double
    const double rank = static_cast<double>(static_cast<acc_t>(q)) * static_cast<double>(n - 1);
    const int64_t lo = static_cast<int64_t>(rank), hi = std::min<int64_t>(static_cast<int64_t>(std::ceil(rank)), n - 1);
    const at::Tensor below = std::get<0>(at::kthvalue(zn, lo + 1));
    const at::Tensor above = hi == lo ? below : std::get<0>(at::kthvalue(zn, hi + 1));
    theta.push_back(at::lerp(below, above, static_cast<double>(static_cast<acc_t>(rank - static_cast<double>(lo)))));
  }
  const at::Tensor result = at::stack(theta);
  return {shift_scale, at::where(zn.isnan().any(), at::full({}, std::numeric_limits<double>::quiet_NaN(), opts), result)};
}

template <typename acc_t>
void stars_layer_cuda(const at::Tensor& zt_in, const at::Tensor& zs_in, at::ArrayRef<double> quantiles,
                      std::optional<at::ArrayRef<double>> thresholds, bool normalize, double coef_rca,
                      double coef_tar, double delta, double eps, DeviceStream stream, acc_t* parts, acc_t* total,
                      at::Tensor& grad_t_out, at::Tensor& grad_s_out) {
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor zt = zt_in.to(acc).contiguous(), zs = zs_in.to(acc).contiguous();
  const int64_t B = zt.size(0), Ct = zt.size(1), Cs = zs.size(1), K = Cs + Ct;
  const int64_t ns = B * Cs, nt = B * Ct;
  const auto opts = zt.options();
  // Named tensors, not a structured binding: the binding's type would be dependent on acc_t here, and
  // nvcc then refuses `theta.const_data_ptr<acc_t>()` without the `template` keyword.
  const std::pair<at::Tensor, at::Tensor> constants = layer_constants<acc_t>(zt, quantiles, thresholds, normalize, eps);
  const at::Tensor& shift_scale = constants.first;
  const at::Tensor& theta = constants.second;
  const int64_t M = theta.numel();

  // RCA: row norms and u (normalize_rows_kernel), the layer's silent rows, n_A and its factors on the
  // device (rca_pairs_kernel: in_pair, rca_info), D = A A_neg^T over the rows in a pair, E, G = E A_neg.
  at::Tensor A = at::empty({B, K}, opts), A_neg = at::empty({B, K}, opts);
  at::Tensor norms = at::empty({2, B}, opts), probes = at::empty({2, B}, opts);
  launch_kernel(normalize_rows_kernel<acc_t>, dim3(grid_for(kWarps, B), 2), kThreads, stream,
                zs.const_data_ptr<acc_t>(), zt.const_data_ptr<acc_t>(), B, Cs, Ct, A.data_ptr<acc_t>(),
                A_neg.data_ptr<acc_t>(), norms.data_ptr<acc_t>(), probes.data_ptr<acc_t>());
  at::Tensor in_pair = at::empty({B}, opts.dtype(at::kByte)), rca_info = at::empty({kInfoSize}, opts);
  launch_kernel(rca_pairs_kernel<acc_t>, 1, kThreads, stream, norms.const_data_ptr<acc_t>(),
                probes.const_data_ptr<acc_t>(), B, static_cast<acc_t>(kRcaSilentTol), in_pair.data_ptr<uint8_t>(),
                rca_info.data_ptr<acc_t>());
  at::Tensor E = gemm<acc_t, true>(A, A_neg, in_pair, stream);  // A A_neg^T
  at::Tensor row_sq = at::empty({B}, opts);
  launch_kernel(rca_scale_kernel<acc_t>, grid_for(1, B), kThreads, stream, E.data_ptr<acc_t>(), B,
                rca_info.const_data_ptr<acc_t>(), row_sq.data_ptr<acc_t>());
  const at::Tensor G = gemm<acc_t, false>(E, A_neg, in_pair, stream);  // E A_neg

  const int64_t per_block = kThreads * kTarItems;
  const int64_t blocks_s = (ns + per_block - 1) / per_block, blocks_t = (nt + per_block - 1) / per_block;
  const int64_t blocks_per_side = std::max(blocks_s, blocks_t);
  at::Tensor partial = at::zeros({2 * blocks_per_side, M}, opts);
  const acc_t inv_delta = static_cast<acc_t>(1.0 / delta);
  launch_kernel(tar_partial_kernel<acc_t>, dim3(blocks_per_side, 2), kThreads, stream, zs.const_data_ptr<acc_t>(),
                zt.const_data_ptr<acc_t>(), ns, nt, theta.const_data_ptr<acc_t>(), M,
                shift_scale.const_data_ptr<acc_t>(), inv_delta, blocks_per_side, partial.data_ptr<acc_t>());
  at::Tensor w = at::empty({M}, opts);
  launch_kernel(finalize_kernel<acc_t>, 1, kThreads, stream, row_sq.const_data_ptr<acc_t>(), B,
                rca_info.const_data_ptr<acc_t>(), partial.const_data_ptr<acc_t>(), blocks_s, blocks_t,
                blocks_per_side, ns, nt, M, static_cast<acc_t>(coef_rca), static_cast<acc_t>(coef_tar),
                w.data_ptr<acc_t>(), parts, total);

  at::Tensor grad_t = at::empty({B, Ct}, opts), grad_s = at::empty({B, Cs}, opts);
  launch_kernel(gradient_kernel<acc_t>, dim3(grid_for(kWarps, B), 2), kThreads, stream, zs.const_data_ptr<acc_t>(),
                zt.const_data_ptr<acc_t>(), A.const_data_ptr<acc_t>(), G.const_data_ptr<acc_t>(),
                norms.const_data_ptr<acc_t>(), in_pair.const_data_ptr<uint8_t>(), B, Cs, Ct,
                theta.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), M, shift_scale.const_data_ptr<acc_t>(),
                inv_delta, static_cast<acc_t>(coef_rca), static_cast<acc_t>(coef_tar), grad_s.data_ptr<acc_t>(),
                grad_t.data_ptr<acc_t>());
  grad_t_out = grad_t.to(zt_in.scalar_type());
  grad_s_out = grad_s.to(zs_in.scalar_type());
}

inline std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> stars_loss_fused_cuda(
    at::TensorList z_teacher, at::TensorList z_student, at::ArrayRef<double> quantiles,
    std::optional<at::ArrayRef<double>> thresholds, bool normalize, at::ArrayRef<double> coef_rca,
    at::ArrayRef<double> coef_tar, double delta, double eps) {
  const bool any_fp64 = check_stars_inputs(z_teacher, z_student, quantiles, thresholds, coef_rca, coef_tar, delta, eps);
  const size_t L = z_teacher.size();
  const DeviceScope scope(z_teacher[0].device());
  // total and parts: float64 when any input is float64, else float32 (as the CPU kernel).
  const at::ScalarType out_dtype = any_fp64 ? at::kDouble : at::kFloat;
  const auto opts = z_teacher[0].options().dtype(out_dtype);
  at::Tensor total = at::zeros({}, opts);
  at::Tensor parts = at::empty({static_cast<int64_t>(L), 2}, opts);
  std::vector<at::Tensor> grad_teacher(L), grad_student(L);
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "stars_loss_fused_cuda", [&] {
    using acc_t = scalar_t;
    for (size_t l = 0; l < L; ++l) {
      stars_layer_cuda<acc_t>(z_teacher[l], z_student[l], quantiles, thresholds, normalize, coef_rca[l], coef_tar[l],
                              delta, eps, scope.stream(), parts.data_ptr<acc_t>() + 2 * l, total.data_ptr<acc_t>(),
                              grad_teacher[l], grad_student[l]);
    }
  });
  return {total, parts, grad_teacher, grad_student};
}

}  // namespace stars_fast::stars_cuda
