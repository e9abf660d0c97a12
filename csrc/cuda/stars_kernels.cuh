// Device code of the STARS ops (stars_ops.cuh launches it): the kernels, their helpers and the argument
// structs they take by value. No ATen, so that the host compiler builds it too, on the CUDA emulation of
// emulation/cuda_on_host.h (the tests run these kernels on the CPU that way).
//
// Sums of products (the GEMM tiles, dot products, sums of squares) accumulate with fma(): setup.py builds
// every kernel with --fmad=false, which the LIF kernels need to match their reference bit for bit, and
// which here would only double the instructions (a multiply, then an add). fma() is one FFMA / DFMA on
// the GPU whatever that flag says, and std::fma on the emulation's host: the same single rounding.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#if !defined(__CUDACC__)
#include "emulation/cuda_on_host.h"
#endif

// Its own namespace: the other ops' device code may name its helpers alike.
namespace stars_fast::stars_cuda {

constexpr int kThreads = 256;  // every kernel's block
constexpr int kWarps = kThreads / 32;

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

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
  for (int64_t c = lane; c < C; c += 32) scaled = fma(z[c] / m, z[c] / m, scaled);
  return m * sqrt(__shfl_sync(0xffffffffu, warp_sum(scaled), 0));
}

// Sum over the block, in every thread (fixed order). `smem` holds kWarps values.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarps; ++w) total += smem[w];
  return total;
}

// max that keeps NaN (fmax drops it): a NaN norm must make its side's largest norm NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || isnan(a)) ? a : b;
}

// nan_max over the block, in every thread. `smem` holds kWarps values.
template <typename acc_t>
__device__ __forceinline__ acc_t block_max(acc_t v, acc_t* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) v = nan_max(v, __shfl_down_sync(0xffffffffu, v, offset));
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = smem[0];
  for (int w = 1; w < kWarps; ++w) v = nan_max(v, smem[w]);
  return v;
}

// Minimum over the block, in every thread. `smem` holds kWarps values.
template <typename T>
__device__ __forceinline__ T block_min(T v, T* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    const T other = __shfl_down_sync(0xffffffffu, v, offset);
    v = other < v ? other : v;
  }
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = smem[0];
  for (int w = 1; w < kWarps; ++w) v = smem[w] < v ? smem[w] : v;
  return v;
}

// Sum of v over the block's threads before this one (in thread order), in every thread. `smem` holds
// kWarps values.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  T inclusive = v;
  for (int offset = 1; offset < 32; offset *= 2) {
    const T other = __shfl_up_sync(0xffffffffu, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  __syncthreads();  // smem may still be read from a previous call
  if (lane == 31) smem[warp] = inclusive;
  __syncthreads();
  T before = inclusive - v;
  for (int w = 0; w < warp; ++w) before += smem[w];
  return before;
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
    // Element j = t S + s of the row, j = lane, lane + 32, ...: (t, s) advanced by (32 / S, 32 % S) with one
    // carry, not by a 64-bit division per element (the same elements in the same order).
    const int64_t step_t = 32 / S, step_s = 32 - step_t * S;
    int64_t t = lane / S, s = lane - t * S;
    for (int64_t j = lane; j < T * S; j += 32) {
      sum += static_cast<acc_t>(x[(t * R + r) * S + s]);
      t += step_t;
      s += step_s;
      if (s >= S) {
        s -= S;
        ++t;
      }
    }
    sum = warp_sum(sum);
    if (lane == 0) out[r] = static_cast<scalar_t>(sum / static_cast<acc_t>(T * S));
  }
}

// ---------------------------------------------------------------------------------------------
// Layer constants: the teacher's standardization (shift, scale) and the TAR thresholds theta, fixed or
// torch.quantile's linear quantiles of the standardized teacher, by exact selection (no sort).

constexpr int kMaxThresholds = 64;  // per launch: ThresholdSpec is a kernel argument

// The thresholds of a launch, the same for each of its layers.
struct ThresholdSpec {
  int64_t count;    // M
  bool quantiles;   // value[] holds quantiles q in [0, 1], already rounded to the data's precision
                    // (as torch.quantile); else the fixed thresholds
  bool normalize;   // standardize by the teacher's moments; else shift 0, scale 1
  double eps;       // the absolute floor of the std
  double std_tol;   // its floor relative to rms(zT) (op_args.h's kNormalizeStdTol)
  double value[kMaxThresholds];
};

// Blocks per layer of layer_constants_block: one per quantile, one for fixed thresholds.
__host__ __device__ constexpr int64_t constant_blocks(const ThresholdSpec& spec) {
  return spec.quantiles ? spec.count : 1;
}

// Unsigned keys in the order of the values they encode (-0.0 just below +0.0; NaN beyond +-inf, by its
// sign bit): the radix selection runs on them.
__device__ __forceinline__ uint32_t ordered_key(float x) {
  const uint32_t bits = __float_as_uint(x);
  return bits ^ ((bits >> 31) ? 0xffffffffu : 0x80000000u);
}
__device__ __forceinline__ uint64_t ordered_key(double x) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x));
  return bits ^ ((bits >> 63) ? ~uint64_t(0) : uint64_t(1) << 63);
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float(key ^ ((key >> 31) ? 0x80000000u : 0xffffffffu));
}
__device__ __forceinline__ double key_value(uint64_t key) {
  return __longlong_as_double(static_cast<long long>(key ^ ((key >> 63) ? uint64_t(1) << 63 : ~uint64_t(0))));
}

// at::lerp as torch.quantile gets it: ATen's CPU kernel is fmadd(coeff, end - start, base) and its CUDA
// kernel is the same formula contracted by nvcc; spelled with fma as this build contracts nothing.
template <typename acc_t>
__device__ __forceinline__ acc_t torch_lerp(acc_t a, acc_t b, acc_t w) {
  return fabs(w) < acc_t(0.5) ? fma(w, b - a, a) : fma(w - acc_t(1), b - a, b);
}

// op_args.h's normalize_scale (ATen-free, for the device): 1 / max(std_pop, tol rms, eps), 1 where that
// is 0; NaN stays NaN.
__device__ __forceinline__ double device_normalize_scale(double mean, double std_pop, double eps, double tol) {
  const double floor = tol * hypot(mean, std_pop);
  double s = std_pop < floor ? floor : std_pop;
  s = s < eps ? eps : s;
  return s == 0 ? 1.0 : 1.0 / s;
}

constexpr int kDigitBits = 11;  // radix of the selection: 3 passes over float keys, 6 over double
constexpr int kRadixBins = 1 << kDigitBits;
constexpr int kBinsPerThread = kRadixBins / kThreads;
static_assert(kRadixBins % kThreads == 0, "each thread scans whole bins");

// One block of a layer's constants over its teacher z [n] (block m of constant_blocks(spec)):
//   moments   (normalize) mean and population std of z in double (as the CPU op: features near 1e20
//             would overflow float squares), shift = mean and scale = device_normalize_scale in acc_t;
//             written by block 0 to shift_scale [2] (none for the quantiles op: nullptr);
//   quantile  (spec.quantiles) theta[m] = lerp(zn_(lo), zn_(hi), rank - lo) with rank = q_m (n - 1) in
//             double, lo = floor(rank), hi = ceil(rank) (both at most n - 1), zn_(r) the r-th smallest of
//             zn = (z - shift) * scale: torch.quantile(zn, q_m). zn is non-decreasing in z, so zn_(r) is
//             the r-th smallest z put through the same acc_t arithmetic as the loss kernels' (thresholds
//             and exceedances agree); the selection therefore runs on z, in the same passes as the
//             moments. Radix selection of rank lo over ordered_key(z): per pass, a shared histogram of the
//             next kDigitBits of the keys that share the bits found so far (integer atomics: exact
//             counts), whose prefix sums tell the bin holding the rank. Rank hi is the same key when it
//             is tied with lo's, else the smallest key above (one more pass).
//   fixed     (otherwise) block 0 writes theta[i] = value[i].
// A NaN in z makes shift, scale (normalize) and every quantile NaN, as on the CPU. The selection needs
// n < 2^32 (unsigned bins; the host checks).
template <typename acc_t>
__device__ void layer_constants_block(const acc_t* __restrict__ z, int64_t n, const ThresholdSpec& spec, int64_t m,
                                      acc_t* __restrict__ shift_scale, acc_t* __restrict__ theta) {
  using Key = decltype(ordered_key(acc_t(0)));
  constexpr int kKeyBits = 8 * sizeof(Key);
  constexpr int kDigitPasses = (kKeyBits + kDigitBits - 1) / kDigitBits;
  __shared__ unsigned histogram[kRadixBins];
  __shared__ double dsmem[kWarps];
  __shared__ int64_t ismem[kWarps];
  __shared__ Key ksmem[kWarps];
  __shared__ int64_t chosen[3];  // the bin holding the wanted rank, the keys in lower bins, the keys in it
  const bool select = spec.quantiles, normalize = spec.normalize;
  // q (n - 1) rounded to double before `rank - lo` (--fmad=false): torch.quantile's weight.
  const double rank = select ? spec.value[m] * static_cast<double>(n - 1) : 0.0;
  const int64_t lo = min_i64(static_cast<int64_t>(rank), n - 1);
  const int64_t hi = min_i64(static_cast<int64_t>(ceil(rank)), n - 1);
  const int passes = static_cast<int>(max_i64(select ? kDigitPasses : 0, normalize ? 2 : 0));
  double mean = 0, m2 = 0;
  int64_t nan_count = 0;
  Key prefix = 0;      // the high bits of rank lo's key found so far
  int64_t want = lo;   // rank lo among the keys that share them
  int64_t equal = 0;   // how many share them; after the last pass, the keys equal to rank lo's
  for (int pass = 0; pass < passes; ++pass) {
    const bool digit_pass = select && pass < kDigitPasses;
    const int found = kDigitBits * pass;
    const int shift = static_cast<int>(max_i64(kKeyBits - found - kDigitBits, 0));
    const Key found_mask = found == 0 ? Key(0) : ~Key(0) << (kKeyBits - found);
    const Key digit_mask = (Key(1) << (kKeyBits - found - shift)) - 1;
    if (digit_pass) {
      for (int b = threadIdx.x; b < kRadixBins; b += kThreads) histogram[b] = 0;
      __syncthreads();
    }
    double moment = 0;
    int64_t nans = 0;
    // A thread's consecutive keys in one bin are added at once: tied values (a constant layer, zeros)
    // then cost one atomic per thread, not a serialized one per value.
    unsigned run_bin = 0, run = 0;
    for (int64_t e = threadIdx.x; e < n; e += kThreads) {
      const acc_t x = z[e];
      if (pass == 0) {
        nans += isnan(x);
        if (normalize) moment += static_cast<double>(x);
      } else if (pass == 1 && normalize) {
        const double d = static_cast<double>(x) - mean;
        moment = fma(d, d, moment);
      }
      if (digit_pass) {
        const Key key = ordered_key(x);
        if ((key & found_mask) == prefix) {
          const unsigned bin = static_cast<unsigned>((key >> shift) & digit_mask);
          if (run > 0 && bin != run_bin) {
            atomicAdd(&histogram[run_bin], run);
            run = 0;
          }
          run_bin = bin;
          ++run;
        }
      }
    }
    if (run > 0) atomicAdd(&histogram[run_bin], run);
    if (pass == 0) {
      nan_count = block_sum(nans, ismem);
      mean = block_sum(moment, dsmem) / static_cast<double>(n);
    } else if (pass == 1 && normalize) {
      m2 = block_sum(moment, dsmem);
    }
    if (digit_pass) {
      __syncthreads();  // the histogram is complete
      const int first_bin = threadIdx.x * kBinsPerThread;
      int64_t mine = 0;
      for (int j = 0; j < kBinsPerThread; ++j) mine += histogram[first_bin + j];
      int64_t below = block_exclusive_scan(mine, ismem);
      if (below <= want && want < below + mine) {  // exactly one thread: 0 <= want < the keys counted
        for (int j = 0; j < kBinsPerThread; ++j) {
          const int64_t count = histogram[first_bin + j];
          if (want < below + count) {
            chosen[0] = first_bin + j;
            chosen[1] = below;
            chosen[2] = count;
            break;
          }
          below += count;
        }
      }
      __syncthreads();
      prefix |= static_cast<Key>(chosen[0]) << shift;
      want -= chosen[1];
      equal = chosen[2];
    }
  }
  Key next = prefix;  // rank hi's key
  if (select && hi > lo && want + 1 >= equal) {  // rank lo is the last of its ties: hi is the next key up
    Key smallest_above = ~Key(0);
    for (int64_t e = threadIdx.x; e < n; e += kThreads) {
      const Key key = ordered_key(z[e]);
      if (key > prefix && key < smallest_above) smallest_above = key;
    }
    next = block_min(smallest_above, ksmem);
  }
  if (threadIdx.x != 0) return;
  constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();
  acc_t shift = 0, scale = 1;
  if (normalize) {
    const double std_pop = sqrt(m2 / static_cast<double>(n));
    shift = nan_count > 0 ? kNaN : static_cast<acc_t>(mean);
    scale = nan_count > 0 ? kNaN : static_cast<acc_t>(device_normalize_scale(mean, std_pop, spec.eps, spec.std_tol));
  }
  if (m == 0 && shift_scale != nullptr) {
    shift_scale[0] = shift;
    shift_scale[1] = scale;
  }
  if (select) {
    const acc_t below = (key_value(prefix) - shift) * scale, above = (key_value(next) - shift) * scale;
    const acc_t weight = static_cast<acc_t>(rank - static_cast<double>(lo));
    theta[m] = nan_count > 0 ? kNaN : torch_lerp(below, above, weight);
  } else if (m == 0) {
    for (int64_t i = 0; i < spec.count; ++i) theta[i] = static_cast<acc_t>(spec.value[i]);
  }
}

// The quantiles op: theta[i] = quantile value[i] of z [n]; block i.
template <typename acc_t>
__global__ void quantiles_kernel(const acc_t* __restrict__ z, int64_t n, const __grid_constant__ ThresholdSpec spec,
                                 acc_t* __restrict__ theta) {
  layer_constants_block<acc_t>(z, n, spec, blockIdx.x, nullptr, theta);
}

// ---------------------------------------------------------------------------------------------
// stars_loss_fused: five launches for up to kMaxLayersPerLaunch layers, each over the blocks of all its
// layers (blockIdx.z the layer where every layer needs as many blocks, as B is the same for all; else
// consecutive ranges of blockIdx.x, StarsLaunch's first_*_block), a block's role told by its index:
//   1 rows_and_constants_kernel           row norms, u and probes of both sides; the layer constants
//   2 pairs_and_soft_sums_kernel          TAR partial sums of both sides; the silent rows, n_A
//   3 gram_difference_kernel              E = 4 D (1 - I) / (n_A (n_A - 1)), D = A A_neg^T; row sums of D^2
//   4 gram_gradient_and_finalize_kernel   G = E A_neg; l_rca, l_tar, the TAR weights w, parts
//   5 gradient_kernel                     d total / d z of both sides; the total over the layers

constexpr int kMaxLayersPerLaunch = 16;
constexpr int kTile = 16;  // GEMM tiles: kTile x kTile, one thread each
static_assert(kTile * kTile == kThreads, "a GEMM tile is one block");
constexpr int kTarItems = 4;  // elements per thread per block of the TAR partial sums
constexpr int64_t kTarPerBlock = static_cast<int64_t>(kThreads) * kTarItems;

// rca_info[]: what the RCA steps after rca_pairs read instead of a host-side 1 / (B (B - 1)).
constexpr int kInfoEScale = 0;   // 4 / (n_A (n_A - 1)), 0 when n_A < 2
constexpr int kInfoPairs = 1;    // n_A (n_A - 1), 0 when n_A < 2
constexpr int kInfoNoPairs = 2;  // l_rca when n_A < 2: sum of the probes (0, or NaN for non-finite features)
constexpr int kInfoSize = 3;

// A layer's buffers, at these offsets (acc_t elements) in its workspace, from the shapes alone: the host
// sizes the workspace and the kernels find their parts in it.
struct LayerLayout {
  int64_t K;                                        // Cs + Ct
  int64_t gram_tiles;                               // kTile-wide tiles along B
  int64_t tar_blocks_s, tar_blocks_t, tar_blocks;   // TAR partial-sum blocks of each side; the larger
  int64_t A, A_neg;                                 // [B, K]: [U_S | U_T], [U_S | -U_T]
  int64_t norms, probes;                            // [2, B]: student, teacher
  int64_t rca_info;                                 // [kInfoSize]
  int64_t E;                                        // [B, B]
  int64_t G;                                        // [B, K]: dl/d[U_S | U_T]
  int64_t row_sq;                                   // [B, gram_tiles]: sum_{j != i} D_ij^2 per tile of j
  int64_t tar_partial;                              // [2, tar_blocks, M]
  int64_t w;                                        // [M]: TAR gradient weights
  int64_t shift_scale, theta;                       // [2], [M]: the layer constants
  int64_t size;
  int64_t soft_sums_blocks;                         // of pairs_and_soft_sums_kernel: TAR of both sides, rca_pairs
  int64_t gram_gradient_blocks;                     // of gram_gradient_and_finalize_kernel: G's tiles, finalize
};

__host__ __device__ inline LayerLayout layer_layout(int64_t B, int64_t Cs, int64_t Ct, int64_t M) {
  LayerLayout y{};
  y.K = Cs + Ct;
  y.gram_tiles = ceil_div(B, kTile);
  y.tar_blocks_s = ceil_div(B * Cs, kTarPerBlock);
  y.tar_blocks_t = ceil_div(B * Ct, kTarPerBlock);
  y.tar_blocks = max_i64(y.tar_blocks_s, y.tar_blocks_t);
  y.A = 0;
  y.A_neg = y.A + B * y.K;
  y.norms = y.A_neg + B * y.K;
  y.probes = y.norms + 2 * B;
  y.rca_info = y.probes + 2 * B;
  y.E = y.rca_info + kInfoSize;
  y.G = y.E + B * B;
  y.row_sq = y.G + B * y.K;
  y.tar_partial = y.row_sq + B * y.gram_tiles;
  y.w = y.tar_partial + 2 * y.tar_blocks * M;
  y.shift_scale = y.w + M;
  y.theta = y.shift_scale + 2;
  y.size = y.theta + M;
  y.soft_sums_blocks = 2 * y.tar_blocks + 1;
  y.gram_gradient_blocks = y.gram_tiles * ceil_div(y.K, kTile) + 1;
  return y;
}

template <typename acc_t>
struct StarsLayer {
  const acc_t* zt;   // [B, Ct] teacher
  const acc_t* zs;   // [B, Cs] student
  acc_t* grad_t;     // [B, Ct] d total / d zt
  acc_t* grad_s;     // [B, Cs]
  acc_t* work;       // layer_layout's buffers
  uint8_t* in_pair;  // [B]: the row is active and the layer has a pair
  int64_t Ct, Cs;
  acc_t coef_rca, coef_tar;
};

// Every kernel's argument (__grid_constant__: read in place, not copied per thread).
template <typename acc_t>
struct StarsLaunch {
  StarsLayer<acc_t> layers[kMaxLayersPerLaunch];
  int64_t num_layers, B;
  int64_t row_blocks;  // per side and layer in launches 1 and 5 (rows strided over them)
  // Layer l's blocks of launches 2 and 4: [first[l], first[l + 1]) (layer_layout's counts, summed).
  int64_t first_soft_sums_block[kMaxLayersPerLaunch + 1];
  int64_t first_gram_gradient_block[kMaxLayersPerLaunch + 1];
  ThresholdSpec thresholds;
  acc_t inv_delta;     // 1 / delta
  acc_t silent_tol;    // tau of the silent rows
  acc_t* parts;        // [num_layers, 2]: l_rca, l_tar
  acc_t* total;
  bool add_to_total;   // the launches of later layers add to the total of the earlier ones
};

// The layer owning block `block` of a launch, from its first blocks (first[l] <= block < first[l + 1]).
__device__ __forceinline__ int64_t layer_of_block(const int64_t* first, int64_t num_layers, int64_t block) {
  int64_t l = 0;
  while (l + 1 < num_layers && block >= first[l + 1]) ++l;
  return l;
}

// Row norms, u = z / ||z|| into columns [col, col + C) of A and (times sign) A_neg, and the row's
// probe sum_c 0 * z_c (0, or NaN where an element is NaN or inf: what the loss is when no pair is left).
// Which rows are silent is not known yet (it needs the largest norm of the side): a zero row's u is
// 0 / 0 here, and the products read the silent rows as zeros (gemm_tile's keep).
// Student: col 0, sign +1; teacher: col C_S, sign -1. One warp per row, rows strided over `blocks`
// blocks, this one `block`.
template <typename acc_t>
__device__ void normalize_rows(const acc_t* __restrict__ zs, const acc_t* __restrict__ zt, int64_t B, int64_t Cs,
                               int64_t Ct, bool teacher, int64_t block, int64_t blocks, acc_t* __restrict__ A,
                               acc_t* __restrict__ A_neg, acc_t* __restrict__ norms, acc_t* __restrict__ probes) {
  const acc_t* z = teacher ? zt : zs;
  const int64_t C = teacher ? Ct : Cs, K = Cs + Ct, col = teacher ? Cs : 0, side = teacher ? B : 0;
  const acc_t sign = teacher ? acc_t(-1) : acc_t(1);
  const int lane = threadIdx.x % 32;
  for (int64_t i = block * kWarps + threadIdx.x / 32; i < B; i += blocks * kWarps) {
    acc_t sq = 0, probe = 0;
    for (int64_t c = lane; c < C; c += 32) {
      sq = fma(z[i * C + c], z[i * C + c], sq);
      probe += z[i * C + c] * acc_t(0);
    }
    const acc_t norm = warp_row_norm(z + i * C, C, sq);
    probe = warp_sum(probe);
    if (lane == 0) {
      norms[side + i] = norm;
      probes[side + i] = probe;
    }
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t u = z[i * C + c] / norm;
      A[i * K + col + c] = u;
      A_neg[i * K + col + c] = sign * u;
    }
  }
}

// One block: the silent-row rule of the layer, on the device. The largest norm of each side (NaN-
// propagating), its threshold tau max (none where it is not finite: -1, below every norm), the active
// rows (silent on neither side; `!(norm <= thr)` counts a NaN row active) and their number n_A, then
// in_pair[i] = active and n_A >= 2 (fewer than two active rows leave no pair, and no row of the layer
// gets an RCA gradient), and rca_info. Fixed-order reductions: deterministic.
template <typename acc_t>
__device__ void rca_pairs(const acc_t* __restrict__ norms, const acc_t* __restrict__ probes, int64_t B, acc_t tol,
                          uint8_t* __restrict__ in_pair, acc_t* __restrict__ rca_info) {
  __shared__ acc_t smem[kWarps];
  __shared__ int64_t ismem[kWarps];
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
  const acc_t thr_s = isfinite(tol * max_s) ? tol * max_s : acc_t(-1);
  const acc_t thr_t = isfinite(tol * max_t) ? tol * max_t : acc_t(-1);
  int64_t count = 0;
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) count += !(norm_s[i] <= thr_s) && !(norm_t[i] <= thr_t);
  count = block_sum(count, ismem);
  const bool pairs = count >= 2;
  if (threadIdx.x == 0) {
    const double n_pairs = static_cast<double>(count) * static_cast<double>(count - 1);
    rca_info[kInfoEScale] = pairs ? static_cast<acc_t>(4.0 / n_pairs) : acc_t(0);
    rca_info[kInfoPairs] = pairs ? static_cast<acc_t>(count) * static_cast<acc_t>(count - 1) : acc_t(0);
    rca_info[kInfoNoPairs] = pairs ? acc_t(0) : probe;
  }
  for (int64_t i = threadIdx.x; i < B; i += blockDim.x) {
    in_pair[i] = pairs && !(norm_s[i] <= thr_s) && !(norm_t[i] <= thr_t);
  }
}

// partial[side, block, m] = sum over the block's elements of sigmoid(((z - shift) scale - theta_m) / delta)
// for the student (side 0) or the teacher (side 1); each block covers a fixed range, so the sums are
// deterministic.
template <typename acc_t>
__device__ void tar_partial(const acc_t* __restrict__ z, int64_t n, bool teacher, int64_t block,
                            const acc_t* __restrict__ theta, int64_t M, const acc_t* __restrict__ shift_scale,
                            acc_t inv_delta, int64_t blocks_per_side, acc_t* __restrict__ partial) {
  __shared__ acc_t smem[kWarps];
  const acc_t shift = shift_scale[0], scale = shift_scale[1];
  const int64_t e0 = block * kTarPerBlock;
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
    if (threadIdx.x == 0) partial[((teacher ? blocks_per_side : 0) + block) * M + m] = total;
  }
}

// The block's tile (tile_row, tile_col) of a[M, K] b^T (TRANS_B: b is [N, K]) or a b (b is [K, N]): this
// thread's element (tile_row kTile + threadIdx.x / kTile, tile_col kTile + threadIdx.x % kTile), 0 outside,
// in acc_t with a fixed summation order, through shared memory. Our own GEMM so that TF32 never applies.
// Both products of the loss index a's rows and b's rows by the batch row: a row r of a or of b
// (b[r, :] in either layout) with keep[r] == 0 reads as zeros, not as its values times 0, so that the
// silent rows' u (0 / 0 for a zero row) never reach the active rows' sums.
template <typename acc_t, bool TRANS_B>
__device__ acc_t gemm_tile(const acc_t* __restrict__ a, const acc_t* __restrict__ b, const uint8_t* __restrict__ keep,
                           int64_t M, int64_t N, int64_t K, int64_t tile_row, int64_t tile_col,
                           acc_t (&ta)[kTile][kTile], acc_t (&tb)[kTile][kTile + 1]) {
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t row = tile_row * kTile + ty;
  const bool keep_row = row < M && keep[row];
  acc_t sum = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTile) {
    ta[ty][tx] = (keep_row && k0 + tx < K) ? a[row * K + k0 + tx] : acc_t(0);
    const int64_t bn = tile_col * kTile + (TRANS_B ? ty : tx), bk = k0 + (TRANS_B ? tx : ty);
    const acc_t bv = (bn < N && bk < K && keep[TRANS_B ? bn : bk]) ? (TRANS_B ? b[bn * K + bk] : b[bk * N + bn])
                                                                   : acc_t(0);
    if (TRANS_B) tb[tx][ty] = bv; else tb[ty][tx] = bv;  // tb[k][n]
    __syncthreads();
    for (int k = 0; k < kTile; ++k) sum = fma(ta[ty][k], tb[k][tx], sum);
    __syncthreads();
  }
  return sum;
}

// One block: p^m from the TAR partials, l_rca (the sum of row_sq over n_A (n_A - 1), or rca_info's
// no-pair value), l_tar, the TAR weights w_m = 2 (p_S^m - p_T^m) / M and parts = (l_rca, l_tar).
template <typename acc_t>
__device__ void finalize_layer(const acc_t* __restrict__ row_sq, int64_t row_sq_count,
                               const acc_t* __restrict__ rca_info, const acc_t* __restrict__ partial,
                               const LayerLayout& lay, int64_t ns, int64_t nt, int64_t M, acc_t* __restrict__ w,
                               acc_t* __restrict__ parts) {
  __shared__ acc_t smem[kWarps];
  acc_t sq = 0;
  for (int64_t i = threadIdx.x; i < row_sq_count; i += blockDim.x) sq += row_sq[i];
  sq = block_sum(sq, smem);
  const acc_t pairs = rca_info[kInfoPairs];
  const acc_t rca = pairs > acc_t(0) ? sq / pairs : rca_info[kInfoNoPairs];
  acc_t tar = 0;
  for (int64_t m = 0; m < M; ++m) {
    acc_t ps = 0, pt = 0;
    for (int64_t b = threadIdx.x; b < lay.tar_blocks_s; b += blockDim.x) ps += partial[b * M + m];
    for (int64_t b = threadIdx.x; b < lay.tar_blocks_t; b += blockDim.x) pt += partial[(lay.tar_blocks + b) * M + m];
    ps = block_sum(ps, smem);
    pt = block_sum(pt, smem);
    const acc_t d = ps / static_cast<acc_t>(ns) - pt / static_cast<acc_t>(nt);
    tar = fma(d, d, tar);
    if (threadIdx.x == 0) w[m] = acc_t(2) * d / static_cast<acc_t>(M);
  }
  if (threadIdx.x == 0) {
    parts[0] = rca;
    parts[1] = tar / static_cast<acc_t>(M);
  }
}

// d total / d z per row of one side (one warp per row, rows strided over gridDim.x):
//   RCA  rows in a pair (in_pair): g = row i of G (dl/du), dz = (g - u (u . g)) / ||z_i||; the other
//        rows (silent, or no pair left in the layer) have no RCA term, so no 0 / 0 on a zero row
//   TAR  +- coef_tar scale / (delta B C) * sum_m w_m s_m (1 - s_m)
template <typename acc_t>
__device__ void gradient_rows(const acc_t* __restrict__ zs, const acc_t* __restrict__ zt, bool teacher,
                              const acc_t* __restrict__ A, const acc_t* __restrict__ G,
                              const acc_t* __restrict__ norms, const uint8_t* __restrict__ in_pair, int64_t B,
                              int64_t Cs, int64_t Ct, const acc_t* __restrict__ theta, const acc_t* __restrict__ w,
                              int64_t M, const acc_t* __restrict__ shift_scale, acc_t inv_delta, acc_t coef_rca,
                              acc_t coef_tar, acc_t* __restrict__ grad_s, acc_t* __restrict__ grad_t) {
  const acc_t shift = shift_scale[0], scale = shift_scale[1];
  const acc_t tar_chain = coef_tar * scale * inv_delta;
  const acc_t* z = teacher ? zt : zs;
  acc_t* out = teacher ? grad_t : grad_s;
  const int64_t C = teacher ? Ct : Cs, K = Cs + Ct, col = teacher ? Cs : 0, side = teacher ? B : 0;
  const acc_t tar_coef = (teacher ? -tar_chain : tar_chain) / (static_cast<acc_t>(B) * static_cast<acc_t>(C));
  const int lane = threadIdx.x % 32;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32; i < B;
       i += static_cast<int64_t>(gridDim.x) * kWarps) {
    const acc_t* u = A + i * K + col;
    const acc_t* g = G + i * K + col;
    const bool paired = in_pair[i];  // the same in the whole warp: the shuffle below is warp-uniform
    acc_t dot = 0, inv_norm = 0;
    if (paired) {
      for (int64_t c = lane; c < C; c += 32) dot = fma(u[c], g[c], dot);
      dot = __shfl_sync(0xffffffffu, warp_sum(dot), 0);
      inv_norm = acc_t(1) / norms[side + i];
    }
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t zn = (z[i * C + c] - shift) * scale;
      acc_t tar = 0;
      for (int64_t m = 0; m < M; ++m) {
        const acc_t s = sigmoid((zn - theta[m]) * inv_delta);
        tar = fma(w[m], s * (acc_t(1) - s), tar);
      }
      const acc_t rca = paired ? coef_rca * ((g[c] - u[c] * dot) * inv_norm) : acc_t(0);
      out[i * C + c] = rca + tar_coef * tar;
    }
  }
}

// Launch 1, blocks x of layer z: [0, row_blocks) the student's rows, [row_blocks, 2 row_blocks) the
// teacher's, then the layer constants' (constant_blocks).
template <typename acc_t>
__global__ void rows_and_constants_kernel(const __grid_constant__ StarsLaunch<acc_t> args) {
  const StarsLayer<acc_t>& y = args.layers[blockIdx.z];
  const LayerLayout lay = layer_layout(args.B, y.Cs, y.Ct, args.thresholds.count);
  const int64_t rows = args.row_blocks, block = blockIdx.x;
  if (block < 2 * rows) {
    normalize_rows(y.zs, y.zt, args.B, y.Cs, y.Ct, block >= rows, block % rows, rows, y.work + lay.A,
                   y.work + lay.A_neg, y.work + lay.norms, y.work + lay.probes);
  } else {
    layer_constants_block(y.zt, args.B * y.Ct, args.thresholds, block - 2 * rows, y.work + lay.shift_scale,
                          y.work + lay.theta);
  }
}

// Launch 2, a layer's blocks (soft_sums_blocks): TAR partial blocks of the student, then of the teacher
// (tar_blocks each), then rca_pairs.
template <typename acc_t>
__global__ void pairs_and_soft_sums_kernel(const __grid_constant__ StarsLaunch<acc_t> args) {
  const int64_t l = layer_of_block(args.first_soft_sums_block, args.num_layers, blockIdx.x);
  const StarsLayer<acc_t>& y = args.layers[l];
  const int64_t M = args.thresholds.count;
  const LayerLayout lay = layer_layout(args.B, y.Cs, y.Ct, M);
  const int64_t block = blockIdx.x - args.first_soft_sums_block[l];
  if (block < 2 * lay.tar_blocks) {
    const bool teacher = block >= lay.tar_blocks;
    tar_partial(teacher ? y.zt : y.zs, args.B * (teacher ? y.Ct : y.Cs), teacher, block % lay.tar_blocks,
                y.work + lay.theta, M, y.work + lay.shift_scale, args.inv_delta, lay.tar_blocks,
                y.work + lay.tar_partial);
  } else {
    rca_pairs(y.work + lay.norms, y.work + lay.probes, args.B, args.silent_tol, y.in_pair, y.work + lay.rca_info);
  }
}

// Launch 3, block (x, y): tile (y, x) of D = A A_neg^T over the rows in a pair, stored as
// E = 4 D (1 - I) / (n_A (n_A - 1)) (the factor from rca_info), and per row of the tile the sum of its
// off-diagonal D^2 (row_sq[row, x]; summed in a fixed order by finalize_layer).
template <typename acc_t>
__global__ void gram_difference_kernel(const __grid_constant__ StarsLaunch<acc_t> args) {
  __shared__ acc_t ta[kTile][kTile];
  __shared__ acc_t tb[kTile][kTile + 1];
  const StarsLayer<acc_t>& y = args.layers[blockIdx.z];
  const int64_t B = args.B;
  const LayerLayout lay = layer_layout(B, y.Cs, y.Ct, args.thresholds.count);
  const acc_t dot = gemm_tile<acc_t, true>(y.work + lay.A, y.work + lay.A_neg, y.in_pair, B, B, lay.K, blockIdx.y,
                                           blockIdx.x, ta, tb);
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t row = blockIdx.y * static_cast<int64_t>(kTile) + ty, col = blockIdx.x * static_cast<int64_t>(kTile) + tx;
  const acc_t d = (row < B && col < B && row != col) ? dot : acc_t(0);
  if (row < B && col < B) y.work[lay.E + row * B + col] = d * y.work[lay.rca_info + kInfoEScale];
  ta[ty][tx] = d * d;  // gemm_tile's last barrier is behind every read of ta
  __syncthreads();
  if (tx == 0 && row < B) {
    acc_t sq = 0;
    for (int k = 0; k < kTile; ++k) sq += ta[ty][k];
    y.work[lay.row_sq + row * lay.gram_tiles + blockIdx.x] = sq;
  }
}

// Launch 4, a layer's blocks (gram_gradient_blocks): the tiles of G = E A_neg (rows in a pair), row-major,
// then finalize_layer.
template <typename acc_t>
__global__ void gram_gradient_and_finalize_kernel(const __grid_constant__ StarsLaunch<acc_t> args) {
  __shared__ acc_t ta[kTile][kTile];
  __shared__ acc_t tb[kTile][kTile + 1];
  const int64_t l = layer_of_block(args.first_gram_gradient_block, args.num_layers, blockIdx.x);
  const StarsLayer<acc_t>& y = args.layers[l];
  const int64_t B = args.B, M = args.thresholds.count;
  const LayerLayout lay = layer_layout(B, y.Cs, y.Ct, M);
  const int64_t block = blockIdx.x - args.first_gram_gradient_block[l], k_tiles = ceil_div(lay.K, kTile);
  if (block < lay.gram_tiles * k_tiles) {
    const int64_t tile_row = block / k_tiles, tile_col = block % k_tiles;
    const acc_t g = gemm_tile<acc_t, false>(y.work + lay.E, y.work + lay.A_neg, y.in_pair, B, lay.K, B, tile_row,
                                            tile_col, ta, tb);
    const int64_t row = tile_row * kTile + threadIdx.x / kTile, col = tile_col * kTile + threadIdx.x % kTile;
    if (row < B && col < lay.K) y.work[lay.G + row * lay.K + col] = g;
  } else {
    finalize_layer(y.work + lay.row_sq, B * lay.gram_tiles, y.work + lay.rca_info, y.work + lay.tar_partial, lay,
                   B * y.Cs, B * y.Ct, M, y.work + lay.w, args.parts + 2 * l);
  }
}

// Launch 5. blockIdx.y 0, 1: gradient_rows of the student, teacher; thread 0 of block (0, 0, 0) also
// sums total (+)= coef_rca l_rca + coef_tar l_tar over the layers in order.
template <typename acc_t>
__global__ void gradient_kernel(const __grid_constant__ StarsLaunch<acc_t> args) {
  const StarsLayer<acc_t>& y = args.layers[blockIdx.z];
  const int64_t M = args.thresholds.count;
  const LayerLayout lay = layer_layout(args.B, y.Cs, y.Ct, M);
  gradient_rows(y.zs, y.zt, blockIdx.y == 1, y.work + lay.A, y.work + lay.G, y.work + lay.norms, y.in_pair, args.B,
                y.Cs, y.Ct, y.work + lay.theta, y.work + lay.w, M, y.work + lay.shift_scale, args.inv_delta,
                y.coef_rca, y.coef_tar, y.grad_s, y.grad_t);
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0) {
    acc_t total = args.add_to_total ? *args.total : acc_t(0);
    for (int64_t l = 0; l < args.num_layers; ++l) {
      total += args.layers[l].coef_rca * args.parts[2 * l] + args.layers[l].coef_tar * args.parts[2 * l + 1];
    }
    *args.total = total;
  }
}

}  // namespace stars_fast::stars_cuda
