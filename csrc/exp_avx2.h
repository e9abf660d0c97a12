// e^x of 8 floats, inlined into its AVX2 caller (the LIF and STARS CPU kernels' sigmoids).
//
// ATen's Vectorized<float>::exp calls Sleef_expf8_u10 out of line; around that call the compiler
// saves and reloads every live vector register (all are caller-saved), which cost the LIF backward
// more than the exp itself (sigmoid surrogate 14.6 ms vs atan 6.9 ms, T=4 N=2^21). This one is inline
// and table-driven, with a short dependency chain: e^x = 2^k 2^(j/8) e^r, n = 8k + j = round(8 x log2 e),
// r = x - n ln2/8 (|r| <= ln2/16, ln2/8 split in two: Cody-Waite), 2^(j/8) from an 8-entry table
// (one in-register permute), e^r - 1 by its degree-4 Taylor polynomial (truncation < 2^-29
// relative) in Estrin form, 2^k built in the exponent field. Against the Cephes degree-7 polynomial
// it replaced (Horner: a 7-FMA chain) the LIF backward took 0.93x the time at T=4 N=2^21 on two
// threads, 0.90-0.91x on one at N=2^15 (the two kernels alternating in one process).
// Max error 0.89 ulp over every float of [-86.5, 89] (measured against float64); inputs below -86.5
// give e^-86.5 ~ 2.7e-38 (the sigmoids 1 / (1 + e) built on it cannot tell that from 0:
// tests/test_csrc_kernels.py checks them), overflow gives inf, NaN stays NaN.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace stars_fast {

__attribute__((target("avx2,fma"), always_inline)) inline __m256 exp_avx2(__m256 x) {
  // The clamp keeps k in [-125, 128], where 2^(k-1) is a normal float; above ln(FLT_MAX) the product
  // overflows to inf. min/max return their second operand when it is NaN, so NaN passes through.
  x = _mm256_max_ps(_mm256_set1_ps(-86.5f), _mm256_min_ps(_mm256_set1_ps(89.0f), x));
  // t = 8 x log2 e + 1.5 2^23 rounds to the integer n, held in t's low mantissa bits.
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(11.541560173034668f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  // ln2/8 = 0.086639404296875 (12 significant bits: n times it is exact) + 3.9932729e-6.
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.086639404296875f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(3.993272912339307e-06f), r);
  // q = e^r - 1 = r + r^2 (1/2 + r/6 + r^2/24)
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 inner = _mm256_fmadd_ps(r2, _mm256_set1_ps(1.0f / 24.0f),
                                       _mm256_fmadd_ps(r, _mm256_set1_ps(1.0f / 6.0f), _mm256_set1_ps(0.5f)));
  const __m256 q = _mm256_fmadd_ps(r2, inner, r);
  // 2 2^(j/8) for j = n mod 8 (the permute reads the low 3 bits of t's bits, which are n's).
  const __m256 table = _mm256_setr_ps(2.0f, 2.1810154914855957f, 2.3784141540527344f, 2.593679189682007f,
                                      2.8284270763397217f, 3.0844216346740723f, 3.3635857105255127f,
                                      3.668016195297241f);
  const __m256 tj = _mm256_permutevar8x32_ps(table, _mm256_castps_si256(t));
  // 2^(k-1), k = floor(n / 8): exponent field k - 1 + 127 = floor((n + 1008) / 8), n = bits(t) - bits(magic).
  const __m256i biased = _mm256_srai_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 - 1008)), 3);
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  return _mm256_mul_ps(_mm256_fmadd_ps(tj, q, tj), scale);
}

}  // namespace stars_fast
#endif
