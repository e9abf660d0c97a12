// CUDA kernels of the STARS loss and its feature pooling (docs/design.md section 2.2); the math is
// the same as csrc/stars_cpu.cpp:
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
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>

#include "../op_args.h"

namespace stars_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // complete in lane 0
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;  // in every lane
}

// Below this, a sum of squares may hold subnormal squares (features near 1e-20 in float): their
// relative error is then above the type's epsilon.
template <typename acc_t>
constexpr acc_t kSumSqRescaleBelow = std::numeric_limits<acc_t>::min() / std::numeric_limits<acc_t>::epsilon();

// ||z_i|| of the warp's row from its lanes' partial sums of squares sq. Where the total overflowed to
// inf (float features near 1e20) or is small enough to have lost precision (near 1e-20), as
// m sqrt(sum (z / m)^2) with m = max |z| (as the reference, the CPU op and the Triton kernel), so that
// the norms, and the silent-row rule that compares them, do not depend on the features' scale. A zero
// row has norm 0; an infinite element keeps the norm at inf; a NaN made the sum NaN, which stays.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_row_norm(const acc_t* __restrict__ z, int64_t C, acc_t sq) {
  const int lane = threadIdx.x % 32;
  const acc_t total = __shfl_sync(0xffffffffu, warp_sum(sq), 0);
  if (!(isinf(total) || total < kSumSqRescaleBelow<acc_t>)) return sqrt(total);  // the same in every lane
  acc_t m = 0;
  for (int64_t c = lane; c < C; c += 32) m = fmax(m, fabs(z[c]));
  m = warp_max(m);
  if (isinf(m) || m == acc_t(0)) return m;
  acc_t scaled = 0;
  for (int64_t c = lane; c < C; c += 32) scaled += (z[c] / m) * (z[c] / m);
  return m * sqrt(__shfl_sync(0xffffffffu, warp_sum(scaled), 0));
}

// Sum over the block, complete in thread 0 (fixed order). `smem` holds kWarps values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) total += smem[w];
  }
  return total;
}

// max that keeps NaN (fmax drops it): a NaN norm must make its side's largest norm NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || isnan(a)) ? a : b;
}

// nan_max over the block, complete in thread 0 (fixed order). `smem` holds kWarps values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_max(acc_t v, acc_t* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) v = nan_max(v, __shfl_down_sync(0xffffffffu, v, offset));
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) v = nan_max(v, smem[w]);
  }
  return v;
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_acc(-x));
}

int64_t grid_for(int64_t items_per_block_unit, int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + items_per_block_unit - 1) / items_per_block_unit, 1 << 16));
}

// ---------------------------------------------------------------------------------------------
// pool_mean: one warp per output row r, summing x[t, r, s] over (t, s).

template <typename scalar_t>
__global__ void pool_mean_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t T, int64_t R,
                                 int64_t S) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t warps_total = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32; r < R; r += warps_total) {
    acc_t sum = 0;
    for (int64_t j = lane; j < T * S; j += 32) {
      const int64_t t = j / S, s = j - t * S;
      sum += static_cast<acc_t>(x[(t * R + r) * S + s]);
    }
    sum = warp_sum(sum);
    if (lane == 0) out[r] = static_cast<scalar_t>(sum / static_cast<acc_t>(T * S));
  }
}

at::Tensor pool_mean_cuda(const at::Tensor& x_in) {
  check_pool_mean_input(x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), R = x.size(1), S = x.size(2);
  at::Tensor out = at::empty({R}, x.options());
  if (R == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pool_mean_cuda", [&] {
    pool_mean_kernel<scalar_t><<<grid_for(kWarps, R), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, R, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// quantiles: as torch.quantile(z.flatten(), q, interpolation='linear'): rank = q (n - 1),
// lerp(sorted[floor rank], sorted[ceil rank], rank - floor rank); NaN anywhere -> NaN.

at::Tensor quantiles_cuda(const at::Tensor& z, at::ArrayRef<double> q) {
  check_quantiles_input(z, q);
  const c10::cuda::CUDAGuard guard(z.device());
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
// out[M, N] = a[M, K] b^T (TRANS_B: b is [N, K]) or a b (b is [K, N]), in acc_t with a fixed
// summation order: 16 x 16 tiles through shared memory. Our own GEMM so that TF32 never applies.
// Both products of the loss index a's rows and b's rows by the batch row: a row r of a or of b
// (b[r, :] in either layout) with keep[r] == 0 reads as zeros, not as its values times 0, so that the
// silent rows' u (0 / 0 for a zero row) never reach the active rows' sums.

constexpr int kTile = 16;

template <typename acc_t, bool TRANS_B>
__global__ void gemm_kernel(const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                            const uint8_t* __restrict__ keep, acc_t* __restrict__ out, int64_t M, int64_t N,
                            int64_t K) {
  __shared__ acc_t ta[kTile][kTile];
  __shared__ acc_t tb[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t row = blockIdx.y * static_cast<int64_t>(kTile) + ty, col = blockIdx.x * static_cast<int64_t>(kTile) + tx;
  const bool keep_row = row < M && keep[row];
  acc_t sum = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    ta[ty][tx] = (keep_row && k0 + tx < K) ? a[row * K + k0 + tx] : acc_t(0);
    const int64_t bn = blockIdx.x * static_cast<int64_t>(kTile) + (TRANS_B ? ty : tx), bk = k0 + (TRANS_B ? tx : ty);
    const acc_t bv = (bn < N && bk < K && keep[TRANS_B ? bn : bk]) ? (TRANS_B ? b[bn * K + bk] : b[bk * N + bn])
                                                                   : acc_t(0);
    if (TRANS_B) tb[tx][ty] = bv; else tb[ty][tx] = bv;  // tb[k][n]
    __syncthreads();
    for (int k = 0; k < kTile; ++k) sum += ta[ty][k] * tb[k][tx];
    __syncthreads();
  }
  if (row < M && col < N) out[row * N + col] = sum;
}

template <typename acc_t, bool TRANS_B>
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& keep, cudaStream_t stream) {
  const int64_t M = a.size(0), K = a.size(1), N = TRANS_B ? b.size(0) : b.size(1);
  at::Tensor out = at::empty({M, N}, a.options());
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile), block(kTile, kTile);
  gemm_kernel<acc_t, TRANS_B><<<grid, block, 0, stream>>>(a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                                                           keep.const_data_ptr<uint8_t>(), out.data_ptr<acc_t>(),
                                                           M, N, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------------
// stars_loss_fused

// Row norms, u = z / ||z|| into columns [col, col + C) of A and (times sign) A_neg, and the row's
// probe sum_c 0 * z_c (0, or NaN where an element is NaN or inf: what the loss is when no pair is left).
// Which rows are silent is not known yet (it needs the largest norm of the side): a zero row's u is
// 0 / 0 here, and the products read the silent rows as zeros (gemm_kernel's keep).
// blockIdx.y: 0 student (col 0, sign +1), 1 teacher (col C_S, sign -1). One warp per row.
template <typename acc_t>
__global__ void normalize_rows_kernel(const acc_t* __restrict__ zs, const acc_t* __restrict__ zt, int64_t B,
                                      int64_t Cs, int64_t Ct, acc_t* __restrict__ A, acc_t* __restrict__ A_neg,
                                      acc_t* __restrict__ norms, acc_t* __restrict__ probes) {
  const bool teacher = blockIdx.y == 1;
  const acc_t* z = teacher ? zt : zs;
  const int64_t C = teacher ? Ct : Cs, K = Cs + Ct, col = teacher ? Cs : 0;
  const acc_t sign = teacher ? acc_t(-1) : acc_t(1);
  const int lane = threadIdx.x % 32;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32; i < B;
       i += static_cast<int64_t>(gridDim.x) * kWarps) {
    acc_t sq = 0, probe = 0;
    for (int64_t c = lane; c < C; c += 32) {
      sq += z[i * C + c] * z[i * C + c];
      probe += z[i * C + c] * acc_t(0);
    }
    const acc_t norm = warp_row_norm(z + i * C, C, sq);
    probe = warp_sum(probe);
    if (lane == 0) {
      norms[blockIdx.y * B + i] = norm;
      probes[blockIdx.y * B + i] = probe;
    }
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t u = z[i * C + c] / norm;
      A[i * K + col + c] = u;
      A_neg[i * K + col + c] = sign * u;
    }
  }
}

// rca_info[]: what the RCA kernels after rca_pairs_kernel read instead of a host-side 1 / (B (B - 1)).
constexpr int kInfoEScale = 0;   // 4 / (n_A (n_A - 1)), 0 when n_A < 2
constexpr int kInfoPairs = 1;    // n_A (n_A - 1), 0 when n_A < 2
constexpr int kInfoNoPairs = 2;  // l_rca when n_A < 2: sum of the probes (0, or NaN for non-finite features)
constexpr int kInfoSize = 3;

// One block: the silent-row rule of the layer, on the device. The largest norm of each side (NaN-
// propagating), its threshold tau max (none where it is not finite: -1, below every norm), the active
// rows (silent on neither side; `!(norm <= thr)` counts a NaN row active) and their number n_A, then
// in_pair[i] = active and n_A >= 2 (fewer than two active rows leave no pair, and no row of the layer
// gets an RCA gradient), and rca_info. Fixed-order reductions: deterministic.
template <typename acc_t>
__global__ void rca_pairs_kernel(const acc_t* __restrict__ norms, const acc_t* __restrict__ probes, int64_t B,
                                 acc_t tol, uint8_t* __restrict__ in_pair, acc_t* __restrict__ rca_info) {
  __shared__ acc_t smem[kWarps];
  __shared__ int64_t ismem[kWarps];
  __shared__ acc_t thr[2];
  __shared__ int64_t n_active;
  const acc_t* norm_s = norms;
  const acc_t* norm_t = norms + B;
  acc_t max_s = 0, max_t = 0, probe = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    max_s = nan_max(max_s, norm_s[i]);
    max_t = nan_max(max_t, norm_t[i]);
    probe += probes[i] + probes[B + i];
  }
  max_s = block_max(max_s, smem);
  max_t = block_max(max_t, smem);
  probe = block_sum(probe, smem);
  if (threadIdx.x == 0) {
    const acc_t thr_s = tol * max_s, thr_t = tol * max_t;
    thr[0] = isfinite(thr_s) ? thr_s : acc_t(-1);
    thr[1] = isfinite(thr_t) ? thr_t : acc_t(-1);
  }
  __syncthreads();
  const acc_t thr_s = thr[0], thr_t = thr[1];
  int64_t count = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) count += !(norm_s[i] <= thr_s) && !(norm_t[i] <= thr_t);
  count = block_sum(count, ismem);
  if (threadIdx.x == 0) {
    n_active = count;
    const bool pairs = count >= 2;
    const double n_pairs = static_cast<double>(count) * static_cast<double>(count - 1);
    rca_info[kInfoEScale] = pairs ? static_cast<acc_t>(4.0 / n_pairs) : acc_t(0);
    rca_info[kInfoPairs] = pairs ? static_cast<acc_t>(count) * static_cast<acc_t>(count - 1) : acc_t(0);
    rca_info[kInfoNoPairs] = pairs ? acc_t(0) : probe;
  }
  __syncthreads();
  const bool pairs = n_active >= 2;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    in_pair[i] = pairs && !(norm_s[i] <= thr_s) && !(norm_t[i] <= thr_t);
  }
}

// E <- 4 D (1 - I) / (n_A (n_A - 1)) in place (the factor from rca_info; the silent rows and columns of
// D are already 0), row_sq[i] = sum_{j != i} D_ij^2. One block per row.
template <typename acc_t>
__global__ void rca_scale_kernel(acc_t* __restrict__ E, int64_t B, const acc_t* __restrict__ rca_info,
                                 acc_t* __restrict__ row_sq) {
  __shared__ acc_t smem[kWarps];
  const acc_t e_scale = rca_info[kInfoEScale];
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    acc_t sq = 0;
    for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
      const acc_t d = j == i ? acc_t(0) : E[i * B + j];
      sq += d * d;
      E[i * B + j] = d * e_scale;
    }
    const acc_t total = block_sum(sq, smem);
    if (threadIdx.x == 0) row_sq[i] = total;
  }
}

constexpr int kTarItems = 4;  // elements per thread per block of the TAR partial sums

// partial[side, block, m] = sum over the block's elements of sigmoid(((z - shift) scale - theta_m) / delta).
// blockIdx.y: 0 student, 1 teacher; each block covers a fixed range, so the sums are deterministic.
template <typename acc_t>
__global__ void tar_partial_kernel(const acc_t* __restrict__ zs, const acc_t* __restrict__ zt, int64_t ns,
                                   int64_t nt, const acc_t* __restrict__ theta, int64_t M,
                                   const acc_t* __restrict__ shift_scale, acc_t inv_delta, int64_t blocks_per_side,
                                   acc_t* __restrict__ partial) {
  __shared__ acc_t smem[kWarps];
  const acc_t shift = shift_scale[0], scale = shift_scale[1];
  const bool teacher = blockIdx.y == 1;
  const acc_t* z = teacher ? zt : zs;
  const int64_t n = teacher ? nt : ns;
  const int64_t e0 = blockIdx.x * static_cast<int64_t>(kThreads * kTarItems);
  acc_t zn[kTarItems];
  bool valid[kTarItems];
  for (int r = 0; r < kTarItems; ++r) {
    const int64_t e = e0 + r * kThreads + threadIdx.x;
    valid[r] = e < n;
    zn[r] = valid[r] ? (z[e] - shift) * scale : acc_t(0);
  }
  for (int64_t m = 0; m < M; ++m) {
    acc_t sum = 0;
    for (int r = 0; r < kTarItems; ++r) {
      if (valid[r]) sum += sigmoid((zn[r] - theta[m]) * inv_delta);
    }
    const acc_t total = block_sum(sum, smem);
    if (threadIdx.x == 0) partial[(blockIdx.y * blocks_per_side + blockIdx.x) * M + m] = total;
  }
}

// One block, tree reductions (block_sum): p^m from the partials, l_rca (the sum of row_sq over
// n_A (n_A - 1), or rca_info's no-pair value), l_tar, the TAR weights w_m = 2 (p_S^m - p_T^m) / M,
// parts[layer] and total += coef_rca l_rca + coef_tar l_tar (layers run in stream order).
template <typename acc_t>
__global__ void finalize_kernel(const acc_t* __restrict__ row_sq, int64_t B, const acc_t* __restrict__ rca_info,
                                const acc_t* __restrict__ partial,
                                int64_t blocks_s, int64_t blocks_t, int64_t blocks_per_side, int64_t ns, int64_t nt,
                                int64_t M, acc_t coef_rca, acc_t coef_tar, acc_t* __restrict__ w,
                                acc_t* __restrict__ parts, acc_t* __restrict__ total) {
  __shared__ acc_t smem[kWarps];
  acc_t sq = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) sq += row_sq[i];
  sq = block_sum(sq, smem);
  const acc_t pairs = rca_info[kInfoPairs];
  const acc_t rca = pairs > acc_t(0) ? sq / pairs : rca_info[kInfoNoPairs];  // complete in thread 0
  acc_t tar = 0;
  for (int64_t m = 0; m < M; ++m) {
    acc_t ps = 0, pt = 0;
    for (int64_t b = threadIdx.x; b < blocks_s; b += blockDim.x) ps += partial[b * M + m];
    for (int64_t b = threadIdx.x; b < blocks_t; b += blockDim.x) pt += partial[(blocks_per_side + b) * M + m];
    ps = block_sum(ps, smem);
    pt = block_sum(pt, smem);
    if (threadIdx.x == 0) {
      const acc_t d = ps / static_cast<acc_t>(ns) - pt / static_cast<acc_t>(nt);
      tar += d * d;
      w[m] = acc_t(2) * d / static_cast<acc_t>(M);
    }
  }
  if (threadIdx.x == 0) {
    tar /= static_cast<acc_t>(M);
    parts[0] = rca;
    parts[1] = tar;
    *total += coef_rca * rca + coef_tar * tar;
  }
}

// d total / d z per row (one warp per row; blockIdx.y 0 student, 1 teacher):
//   RCA  rows in a pair (in_pair): g = row i of G (dl/du), dz = (g - u (u . g)) / ||z_i||; the other
//        rows (silent, or no pair left in the layer) have no RCA term, so no 0 / 0 on a zero row
//   TAR  +- coef_tar scale / (delta B C) * sum_m w_m s_m (1 - s_m)
template <typename acc_t>
__global__ void gradient_kernel(const acc_t* __restrict__ zs, const acc_t* __restrict__ zt,
                                const acc_t* __restrict__ A, const acc_t* __restrict__ G,
                                const acc_t* __restrict__ norms, const uint8_t* __restrict__ in_pair, int64_t B,
                                int64_t Cs, int64_t Ct, const acc_t* __restrict__ theta, const acc_t* __restrict__ w,
                                int64_t M, const acc_t* __restrict__ shift_scale, acc_t inv_delta, acc_t coef_rca,
                                acc_t coef_tar, acc_t* __restrict__ grad_s, acc_t* __restrict__ grad_t) {
  const acc_t shift = shift_scale[0], scale = shift_scale[1];
  const acc_t tar_chain = coef_tar * scale * inv_delta;
  const bool teacher = blockIdx.y == 1;
  const acc_t* z = teacher ? zt : zs;
  acc_t* out = teacher ? grad_t : grad_s;
  const int64_t C = teacher ? Ct : Cs, K = Cs + Ct, col = teacher ? Cs : 0;
  const acc_t tar_coef = (teacher ? -tar_chain : tar_chain) / (static_cast<acc_t>(B) * static_cast<acc_t>(C));
  const int lane = threadIdx.x % 32;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32; i < B;
       i += static_cast<int64_t>(gridDim.x) * kWarps) {
    const acc_t* u = A + i * K + col;
    const acc_t* g = G + i * K + col;
    const bool paired = in_pair[i];  // the same in the whole warp: the shuffle below is warp-uniform
    acc_t dot = 0, inv_norm = 0;
    if (paired) {
      for (int64_t c = lane; c < C; c += 32) dot += u[c] * g[c];
      dot = __shfl_sync(0xffffffffu, warp_sum(dot), 0);
      inv_norm = acc_t(1) / norms[blockIdx.y * B + i];
    }
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t zn = (z[i * C + c] - shift) * scale;
      acc_t tar = 0;
      for (int64_t m = 0; m < M; ++m) {
        const acc_t s = sigmoid((zn - theta[m]) * inv_delta);
        tar += w[m] * (s * (acc_t(1) - s));
      }
      const acc_t rca = paired ? coef_rca * ((g[c] - u[c] * dot) * inv_norm) : acc_t(0);
      out[i * C + c] = rca + tar_coef * tar;
    }
  }
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
                      double coef_tar, double delta, double eps, acc_t* parts, acc_t* total, at::Tensor& grad_t_out,
                      at::Tensor& grad_s_out) {
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const at::Tensor zt = zt_in.to(acc).contiguous(), zs = zs_in.to(acc).contiguous();
  const int64_t B = zt.size(0), Ct = zt.size(1), Cs = zs.size(1), K = Cs + Ct;
  const int64_t ns = B * Cs, nt = B * Ct;
  const auto opts = zt.options();
  const auto stream = at::cuda::getCurrentCUDAStream();
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
  normalize_rows_kernel<acc_t><<<dim3(grid_for(kWarps, B), 2), kThreads, 0, stream>>>(
      zs.const_data_ptr<acc_t>(), zt.const_data_ptr<acc_t>(), B, Cs, Ct, A.data_ptr<acc_t>(),
      A_neg.data_ptr<acc_t>(), norms.data_ptr<acc_t>(), probes.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor in_pair = at::empty({B}, opts.dtype(at::kByte)), rca_info = at::empty({kInfoSize}, opts);
  rca_pairs_kernel<acc_t><<<1, kThreads, 0, stream>>>(norms.const_data_ptr<acc_t>(), probes.const_data_ptr<acc_t>(),
                                                      B, static_cast<acc_t>(kRcaSilentTol),
                                                      in_pair.data_ptr<uint8_t>(), rca_info.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor E = gemm<acc_t, true>(A, A_neg, in_pair, stream);  // A A_neg^T
  at::Tensor row_sq = at::empty({B}, opts);
  rca_scale_kernel<acc_t><<<grid_for(1, B), kThreads, 0, stream>>>(E.data_ptr<acc_t>(), B,
                                                                  rca_info.const_data_ptr<acc_t>(),
                                                                  row_sq.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor G = gemm<acc_t, false>(E, A_neg, in_pair, stream);  // E A_neg

  const int64_t per_block = kThreads * kTarItems;
  const int64_t blocks_s = (ns + per_block - 1) / per_block, blocks_t = (nt + per_block - 1) / per_block;
  const int64_t blocks_per_side = std::max(blocks_s, blocks_t);
  at::Tensor partial = at::zeros({2 * blocks_per_side, M}, opts);
  const acc_t inv_delta = static_cast<acc_t>(1.0 / delta);
  tar_partial_kernel<acc_t><<<dim3(blocks_per_side, 2), kThreads, 0, stream>>>(
      zs.const_data_ptr<acc_t>(), zt.const_data_ptr<acc_t>(), ns, nt, theta.const_data_ptr<acc_t>(), M,
      shift_scale.const_data_ptr<acc_t>(), inv_delta, blocks_per_side, partial.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor w = at::empty({M}, opts);
  finalize_kernel<acc_t><<<1, kThreads, 0, stream>>>(row_sq.const_data_ptr<acc_t>(), B,
                                                     rca_info.const_data_ptr<acc_t>(),
                                                     partial.const_data_ptr<acc_t>(), blocks_s, blocks_t,
                                                     blocks_per_side, ns, nt, M, static_cast<acc_t>(coef_rca),
                                                     static_cast<acc_t>(coef_tar), w.data_ptr<acc_t>(), parts, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor grad_t = at::empty({B, Ct}, opts), grad_s = at::empty({B, Cs}, opts);
  gradient_kernel<acc_t><<<dim3(grid_for(kWarps, B), 2), kThreads, 0, stream>>>(
      zs.const_data_ptr<acc_t>(), zt.const_data_ptr<acc_t>(), A.const_data_ptr<acc_t>(), G.const_data_ptr<acc_t>(),
      norms.const_data_ptr<acc_t>(), in_pair.const_data_ptr<uint8_t>(), B, Cs, Ct, theta.const_data_ptr<acc_t>(),
      w.const_data_ptr<acc_t>(), M, shift_scale.const_data_ptr<acc_t>(), inv_delta, static_cast<acc_t>(coef_rca),
      static_cast<acc_t>(coef_tar), grad_s.data_ptr<acc_t>(), grad_t.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  grad_t_out = grad_t.to(zt_in.scalar_type());
  grad_s_out = grad_s.to(zs_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> stars_loss_fused_cuda(
    at::TensorList z_teacher, at::TensorList z_student, at::ArrayRef<double> quantiles,
    std::optional<at::ArrayRef<double>> thresholds, bool normalize, at::ArrayRef<double> coef_rca,
    at::ArrayRef<double> coef_tar, double delta, double eps) {
  const bool any_fp64 = check_stars_inputs(z_teacher, z_student, quantiles, thresholds, coef_rca, coef_tar, delta, eps);
  const size_t L = z_teacher.size();
  const c10::cuda::CUDAGuard guard(z_teacher[0].device());
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
                              delta, eps, parts.data_ptr<acc_t>() + 2 * l, total.data_ptr<acc_t>(), grad_teacher[l],
                              grad_student[l]);
    }
  });
  return {total, parts, grad_teacher, grad_student};
}

}  // namespace

TORCH_LIBRARY_IMPL(stars_fast, CUDA, m) {
  m.impl("pool_mean", &pool_mean_cuda);
  m.impl("quantiles", &quantiles_cuda);
  m.impl("stars_loss_fused", &stars_loss_fused_cuda);
}

}  // namespace stars_fast
