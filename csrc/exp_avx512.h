// e^x of 16 floats, inlined into the LIF CPU kernels' AVX-512 build (lif_cpu_avx512.cpp): the
// algorithm of exp_avx2.h lane for lane (the same clamp, Cody-Waite split, 8-entry table, degree-4
// polynomial and exponent-field scaling, in the same order), so that it returns exactly what
// exp_avx2 returns for every float (tests/test_cpu_isa.py compares the two builds' LIF outputs).
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

namespace stars_fast {

__attribute__((target("avx512f"), always_inline)) inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-86.5f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(11.541560173034668f), magic);
  const __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.086639404296875f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(3.993272912339307e-06f), r);
  const __m512 r2 = _mm512_mul_ps(r, r);
  const __m512 inner = _mm512_fmadd_ps(r2, _mm512_set1_ps(1.0f / 24.0f),
                                       _mm512_fmadd_ps(r, _mm512_set1_ps(1.0f / 6.0f), _mm512_set1_ps(0.5f)));
  const __m512 q = _mm512_fmadd_ps(r2, inner, r);
  // The permute reads the low 4 bits of t's bits: the table twice, so that bit 3 does not matter.
  const __m512 table = _mm512_setr_ps(2.0f, 2.1810154914855957f, 2.3784141540527344f, 2.593679189682007f,
                                      2.8284270763397217f, 3.0844216346740723f, 3.3635857105255127f,
                                      3.668016195297241f, 2.0f, 2.1810154914855957f, 2.3784141540527344f,
                                      2.593679189682007f, 2.8284270763397217f, 3.0844216346740723f,
                                      3.3635857105255127f, 3.668016195297241f);
  const __m512 tj = _mm512_permutexvar_ps(_mm512_castps_si512(t), table);
  const __m512i biased =
      _mm512_srai_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B400000 - 1008)), 3);
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(biased, 23));
  return _mm512_mul_ps(_mm512_fmadd_ps(tj, q, tj), scale);
}

}  // namespace stars_fast
#endif
