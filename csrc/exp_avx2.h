// e^x of 8 floats, inlined into its AVX2 caller (the LIF and STARS CPU kernels' sigmoids).
//
// ATen's Vectorized<float>::exp calls Sleef_expf8_u10 out of line; around that call the compiler
// saves and reloads every live vector register (all are caller-saved), which cost the LIF backward
// more than the exp itself (sigmoid surrogate 14.6 ms vs atan 6.9 ms, T=4 N=2^21). This is the same
// algorithm, inline: e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 with ln 2 split in two
// (Cody-Waite), e^r by the Cephes degree-7 polynomial with FMA, times 2^n built in the exponent
// field. Max error 1.02 ulp where e^x >= 2^-125.5 (measured against float64 on every float of
// [-87.5, 89]; tests/test_csrc_kernels.py checks the sigmoid built on it); smaller results are
// flushed to 0 (the kernels' sigmoids never see the difference: 1 + e^-y is 1 in float long
// before), overflow gives inf, NaN stays NaN.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace stars_fast {

__attribute__((target("avx2,fma"), always_inline)) inline __m256 exp_avx2(__m256 x) {
  // The clamp keeps n in [-126, 129]: below, e^x < 2^-125.5 is flushed to 0 (scale 0); above
  // ln(FLT_MAX) the product overflows to inf. min/max return their second operand when it is NaN,
  // so NaN passes through.
  x = _mm256_max_ps(_mm256_set1_ps(-87.5f), _mm256_min_ps(_mm256_set1_ps(89.0f), x));
  // t = x log2 e + 1.5 2^23 rounds to an integer n held in t's low mantissa bits.
  const __m256 magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  // e^x = (2 p) 2^(n - 1): 2^(n - 1) is a normal float (or 0 for n = -126, inf for n = 129) built in
  // the exponent field from n + 126 = bits(t) - bits(magic) + 126.
  const __m256i biased = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000 - 126));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  return _mm256_mul_ps(_mm256_add_ps(p, p), scale);
}

}  // namespace stars_fast
#endif
