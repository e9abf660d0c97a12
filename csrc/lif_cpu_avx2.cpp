// The LIF CPU kernels (lif_cpu_kernel.h) compiled for AVX2 + FMA + F16C (the ISA of ATen's AVX2
// build); lif_cpu.cpp picks them when the CPU has all three. Every header outside the kernels is
// included first, for the baseline target, so that only the kernels and ATen's AVX2 Vectorized
// (namespace at::vec::AVX2) get AVX2 code. FMA is only enabled as an instruction set:
// -ffp-contract=off still forbids fusing a*b+c.
#if defined(__x86_64__) || defined(__i386__)
#include <ATen/ATen.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The pragma does not define the ISA macros, and sleef.h (ATen's AVX2 Vectorized calls its 8-wide
// functions) declares those only under __AVX__.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "lif_cpu_kernel.h"
#pragma GCC pop_options
#endif
