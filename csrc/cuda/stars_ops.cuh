// The CUDA STARS ops and feature pooling (docs/design.md section 2.2), their host side: stars_cuda.cu
// registers them for CUDA tensors; the tests build them with the host compiler, where their kernels
// (stars_kernels.cuh) run on CPU tensors through the emulation of emulation/cuda_on_host.h. The math
// is the same as csrc/stars_cpu.cpp:
//   pool_mean          z[r] = mean_{t,s} x[t, r, s]                                   (Eq. 12)
//   quantiles          torch.quantile(z.flatten(), q) ('linear'), by exact radix selection: one launch
//   stars_loss_fused   per layer, with z' = (z - shift) * scale
//       (normalize: shift = mean(zT), scale = 1 / max(std_pop(zT), 1e-3 rms(zT), eps), 1 where that is 0,
//       moments in double; else 0 and 1), theta = fixed thresholds, or torch.quantile's linear quantiles
//       of z'_T (radix selection of the two neighbouring ranks of q (n - 1), layer_constants_block):
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
//            the data: a one-block step finds them on the device (no host sync).
//       TAR  p^m = mean_{b,c} sigmoid((z' - theta_m) / delta),  l_tar = mean_m (p_S^m - p_T^m)^2
//     Five launches for up to kMaxLayersPerLaunch layers (the grids span the layers; stars_kernels.cuh
//     lists them), and no other kernel for float32 features: the per-layer buffers are one workspace.
// All reductions are in a fixed order (per-row / per-block partials, integer atomics only for the
// selection's counts): deterministic. Everything stays on the device: the kernels take their arguments
// by value (sizes, pointers, the quantiles), no host sync and no host-to-device copy. All launches use
// the current stream of the inputs' device.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
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
// Thresholds

// The selection counts in unsigned 32-bit bins.
inline void check_selection_size(const char* op, int64_t n) {
  TORCH_CHECK(n <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()), op,
              ": at most 2^32 - 1 values per quantile selection, got ", n);
}

// values[first, first + count) as the kernels' ThresholdSpec: quantiles rounded to acc_t (as torch.quantile
// takes q in the data's dtype), or fixed thresholds.
template <typename acc_t>
ThresholdSpec threshold_spec(at::ArrayRef<double> values, int64_t first, int64_t count, bool quantiles,
                             bool normalize, double eps) {
  ThresholdSpec spec{};
  spec.count = count;
  spec.quantiles = quantiles;
  spec.normalize = normalize;
  spec.eps = eps;
  spec.std_tol = kNormalizeStdTol;
  for (int64_t i = 0; i < count; ++i) {
    const double v = values[first + i];
    spec.value[i] = quantiles ? static_cast<double>(static_cast<acc_t>(v)) : v;
  }
  return spec;
}

// quantiles: as torch.quantile(z.flatten(), q, interpolation='linear'), quantiles_kernel, one block per
// q (one launch per kMaxThresholds of them); NaN anywhere -> NaN.
inline at::Tensor quantiles_cuda(const at::Tensor& z, at::ArrayRef<double> q) {
  check_quantiles_input(z, q);
  const DeviceScope scope(z.device());
  const at::Tensor values = z.reshape(-1).to(acc_dtype(z.scalar_type())).contiguous();
  const int64_t n = values.numel(), M = static_cast<int64_t>(q.size());
  check_selection_size("quantiles", n);
  at::Tensor out = at::empty({M}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "quantiles_cuda", [&] {
    for (int64_t first = 0; first < M; first += kMaxThresholds) {
      const int64_t count = std::min<int64_t>(kMaxThresholds, M - first);
      launch_kernel(quantiles_kernel<scalar_t>, count, kThreads, scope.stream(), values.const_data_ptr<scalar_t>(), n,
                    threshold_spec<scalar_t>(q, first, count, true, false, 0.0), out.data_ptr<scalar_t>() + first);
    }
  });
  return out.to(z.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// stars_loss_fused

// Layers [first, first + count) (count <= kMaxLayersPerLaunch) in the five launches of stars_kernels.cuh,
// with one workspace for their buffers. parts: this group's [count, 2]; total is written, or added to
// when add_to_total (a later group).
template <typename acc_t>
void stars_layers_cuda(at::TensorList z_teacher, at::TensorList z_student, size_t first, size_t count,
                       const ThresholdSpec& thresholds, at::ArrayRef<double> coef_rca, at::ArrayRef<double> coef_tar,
                       double delta, DeviceStream stream, acc_t* parts, acc_t* total, bool add_to_total,
                       std::vector<at::Tensor>& grad_teacher, std::vector<at::Tensor>& grad_student) {
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t B = z_teacher[first].size(0), M = thresholds.count;
  const auto opts = z_teacher[first].options().dtype(acc);
  std::vector<at::Tensor> zt(count), zs(count), grad_t(count), grad_s(count);
  StarsLaunch<acc_t> args{};
  std::vector<int64_t> offset(count);
  int64_t work_size = 0;
  for (size_t l = 0; l < count; ++l) {
    zt[l] = z_teacher[first + l].to(acc).contiguous();
    zs[l] = z_student[first + l].to(acc).contiguous();
    check_selection_size("stars_loss_fused", zt[l].numel());
    grad_t[l] = at::empty_like(zt[l]);
    grad_s[l] = at::empty_like(zs[l]);
    const LayerLayout lay = layer_layout(B, zs[l].size(1), zt[l].size(1), M);
    offset[l] = work_size;
    work_size += lay.size;
    args.first_soft_sums_block[l + 1] = args.first_soft_sums_block[l] + lay.soft_sums_blocks;
    args.first_gram_gradient_block[l + 1] = args.first_gram_gradient_block[l] + lay.gram_gradient_blocks;
  }
  at::Tensor work = at::empty({work_size}, opts);
  at::Tensor in_pair = at::empty({static_cast<int64_t>(count), B}, opts.dtype(at::kByte));
  for (size_t l = 0; l < count; ++l) {
    args.layers[l] = StarsLayer<acc_t>{zt[l].const_data_ptr<acc_t>(), zs[l].const_data_ptr<acc_t>(),
                                       grad_t[l].data_ptr<acc_t>(), grad_s[l].data_ptr<acc_t>(),
                                       work.data_ptr<acc_t>() + offset[l], in_pair.data_ptr<uint8_t>() + l * B,
                                       zt[l].size(1), zs[l].size(1), static_cast<acc_t>(coef_rca[first + l]),
                                       static_cast<acc_t>(coef_tar[first + l])};
  }
  args.num_layers = static_cast<int64_t>(count);
  args.B = B;
  args.row_blocks = grid_for(kWarps, B);
  args.thresholds = thresholds;
  args.inv_delta = static_cast<acc_t>(1.0 / delta);
  args.silent_tol = static_cast<acc_t>(kRcaSilentTol);
  args.parts = parts;
  args.total = total;
  args.add_to_total = add_to_total;
  const unsigned layers = static_cast<unsigned>(count);
  const int64_t gram_tiles = ceil_div(B, kTile);
  launch_kernel(rows_and_constants_kernel<acc_t>, dim3(2 * args.row_blocks + constant_blocks(thresholds), 1, layers),
                kThreads, stream, args);
  launch_kernel(pairs_and_soft_sums_kernel<acc_t>, args.first_soft_sums_block[count], kThreads, stream, args);
  launch_kernel(gram_difference_kernel<acc_t>, dim3(gram_tiles, gram_tiles, layers), kThreads, stream, args);
  launch_kernel(gram_gradient_and_finalize_kernel<acc_t>, args.first_gram_gradient_block[count], kThreads, stream,
                args);
  launch_kernel(gradient_kernel<acc_t>, dim3(args.row_blocks, 2, layers), kThreads, stream, args);
  for (size_t l = 0; l < count; ++l) {
    grad_teacher[first + l] = grad_t[l].to(z_teacher[first + l].scalar_type());
    grad_student[first + l] = grad_s[l].to(z_student[first + l].scalar_type());
  }
}

inline std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> stars_loss_fused_cuda(
    at::TensorList z_teacher, at::TensorList z_student, at::ArrayRef<double> quantiles,
    std::optional<at::ArrayRef<double>> thresholds, bool normalize, at::ArrayRef<double> coef_rca,
    at::ArrayRef<double> coef_tar, double delta, double eps) {
  const bool any_fp64 = check_stars_inputs(z_teacher, z_student, quantiles, thresholds, coef_rca, coef_tar, delta, eps);
  const at::ArrayRef<double> values = thresholds.has_value() ? *thresholds : quantiles;
  TORCH_CHECK(values.size() <= static_cast<size_t>(kMaxThresholds), "stars_loss_fused: at most ", kMaxThresholds,
              " thresholds on CUDA");
  const size_t L = z_teacher.size();
  const DeviceScope scope(z_teacher[0].device());
  // total and parts: float64 when any input is float64, else float32 (as the CPU kernel).
  const at::ScalarType out_dtype = any_fp64 ? at::kDouble : at::kFloat;
  const auto opts = z_teacher[0].options().dtype(out_dtype);
  at::Tensor total = at::empty({}, opts);
  at::Tensor parts = at::empty({static_cast<int64_t>(L), 2}, opts);
  std::vector<at::Tensor> grad_teacher(L), grad_student(L);
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "stars_loss_fused_cuda", [&] {
    using acc_t = scalar_t;
    const ThresholdSpec spec = threshold_spec<acc_t>(values, 0, static_cast<int64_t>(values.size()),
                                                     !thresholds.has_value(), normalize, eps);
    for (size_t first = 0; first < L; first += kMaxLayersPerLaunch) {
      const size_t count = std::min<size_t>(kMaxLayersPerLaunch, L - first);
      stars_layers_cuda<acc_t>(z_teacher, z_student, first, count, spec, coef_rca, coef_tar, delta, scope.stream(),
                               parts.data_ptr<acc_t>() + 2 * first, total.data_ptr<acc_t>(), first > 0,
                               grad_teacher, grad_student);
    }
  });
  return {total, parts, grad_teacher, grad_student};
}

}  // namespace stars_fast::stars_cuda
