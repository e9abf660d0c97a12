// The LIF CPU kernels (lif_cpu_kernel.h) compiled for AVX-512 F + BW + VL + DQ (the ISA of ATen's
// AVX512 build, with AVX2, FMA and F16C); lif_cpu.cpp picks them when cpu_isa() (common.h) says
// kAvx512. As in lif_cpu_avx2.cpp, every header outside the kernels is included first, for the
// baseline target, so that only the kernels and ATen's AVX-512 Vectorized (namespace
// at::vec::AVX512) get AVX-512 code; -ffp-contract=off still forbids fusing a*b+c.
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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// The pragma does not define the ISA macros, and sleef.h (ATen's AVX-512 Vectorized calls its
// 16-wide functions) declares those only under __AVX512F__.
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "lif_cpu_kernel.h"
#pragma GCC pop_options
#endif
