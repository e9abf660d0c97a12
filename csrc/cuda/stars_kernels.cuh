// Device code of the STARS ops (stars_ops.cuh launches it): the kernels and their helpers. No ATen, so
// that the host compiler builds it too, on the CUDA emulation of emulation/cuda_on_host.h (the tests run
// these kernels on the CPU that way).
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#if !defined(__CUDACC__)
#include "emulation/cuda_on_host.h"
#endif

// Its own namespace: the other ops' device code may name its helpers alike.
namespace stars_fast::stars_cuda {

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

// at::opmath_type: float for float, half and bfloat16, double for double.
template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// ---------------------------------------------------------------------------------------------
// pool_mean: one warp per output row r, summing x[t, r, s] over (t, s).

template <typename scalar_t>
__global__ void pool_mean_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, int64_t T, int64_t R,
                                 int64_t S) {
  using acc_t = opmath_t<scalar_t>;
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

}  // namespace stars_fast::stars_cuda
