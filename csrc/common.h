// Helpers shared by the CPU kernels (lif_cpu.cpp, stars_cpu.cpp): ISA dispatch, a cache for
// large outputs, and block-wise access to rows of tensors of any float dtype.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <utility>

#include "op_args.h"

namespace stars_fast {

#define STARS_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------
// ISA dispatch. The extension is built for baseline x86-64 (SSE2). The LIF kernels are compiled
// once more for AVX2 + FMA + F16C and once for AVX-512 (F, BW, VL, DQ: ATen's AVX512 set);
// run_vectorized compiles `fn` (a lambda whose loops gcc auto-vectorizes, with everything it calls on
// the hot path marked STARS_INLINE) a second time for AVX2+FMA. FMA is only enabled as an
// instruction set: -ffp-contract=off still forbids fusing a*b+c behind our back.

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest ISA the kernels may use: the CPU's, capped by the one ATen dispatches its own kernels
// to, so that PyTorch's ATEN_CPU_CAPABILITY=default|avx2|avx512 selects ours too (read once).
inline CpuIsa cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const CpuIsa isa = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    const std::string aten = at::get_cpu_capability();  // "DEFAULT", "AVX2" or "AVX512"
    if (avx512 && aten == "AVX512") return CpuIsa::kAvx512;
    if (avx2 && (aten == "AVX2" || aten == "AVX512")) return CpuIsa::kAvx2;
    return CpuIsa::kBaseline;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

inline bool cpu_has_avx2_fma() { return cpu_isa() >= CpuIsa::kAvx2; }

#if defined(__x86_64__) || defined(__i386__)
template <typename Fn>
__attribute__((target("avx2,fma"))) void run_avx2(const Fn& fn) {
  fn();
}
#endif

template <typename Fn>
void run_baseline(const Fn& fn) {
  fn();
}

template <typename Fn>
void run_vectorized(const Fn& fn) {
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_has_avx2_fma()) return run_avx2(fn);
#endif
  run_baseline(fn);
}

// ---------------------------------------------------------------------------------------------
// fn(begin, end) over [0, n) in chunks of `chunk` handed out dynamically to the intra-op threads, so
// that a thread slowed down (say, by another process on its core) takes fewer chunks. The chunks do
// not depend on the number of threads: results are identical for any thread count.

template <typename Fn>
void parallel_chunks(int64_t n, int64_t chunk, const Fn& fn) {
  const int64_t tasks = (n + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < tasks; t = next++) fn(t * chunk, std::min(n, (t + 1) * chunk));
  });
}

// ---------------------------------------------------------------------------------------------
// Large outputs from a cache of blocks freed by earlier outputs.
//
// Fresh memory costs a page fault per 4 KiB page, which the kernel zeroes: measured here at ~1 GB/s
// against ~10 GB/s for writing memory that is already mapped, and glibc hands blocks of >= 32 MiB
// back to the OS at every free, so each [T, N] output of a memory-bound kernel would pay it again.
// Blocks of >= 1 MiB are rounded up to 2 MiB, 2 MiB-aligned (transparent huge pages are requested
// for them) and kept for reuse when their tensor dies, up to STARS_FAST_CPU_CACHE_MB (default 1024;
// 0 disables the cache) bytes, oldest dropped first.

class OutputCache {
 public:
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive static destructors
    return *cache;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t numel = c10::multiply_integers(sizes);
    const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (limit_ == 0 || nbytes < kMinBytes) return at::empty(sizes, options);
    const size_t block = (nbytes + kAlign - 1) / kAlign * kAlign;
    void* ptr = take(block);
    if (ptr == nullptr) {
      ptr = std::aligned_alloc(kAlign, block);
      TORCH_CHECK(ptr != nullptr, "stars_fast: out of memory allocating ", block, " bytes");
#ifdef MADV_HUGEPAGE
      madvise(ptr, block, MADV_HUGEPAGE);
#endif
    }
    return at::from_blob(ptr, sizes, [this, block](void* p) { give(p, block); }, options);
  }

 private:
  static constexpr size_t kMinBytes = size_t(1) << 20;
  static constexpr size_t kAlign = size_t(2) << 20;

  OutputCache() {
    const char* env = std::getenv("STARS_FAST_CPU_CACHE_MB");
    limit_ = (env != nullptr ? std::strtoull(env, nullptr, 10) : 1024) << 20;
  }

  void* take(size_t block) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second == block) {
        void* ptr = it->first;
        free_.erase(it);
        cached_ -= block;
        return ptr;
      }
    }
    return nullptr;
  }

  void give(void* ptr, size_t block) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (!free_.empty() && cached_ + block > limit_) {
      std::free(free_.front().first);
      cached_ -= free_.front().second;
      free_.pop_front();
    }
    if (block > limit_) {
      std::free(ptr);
      return;
    }
    free_.emplace_back(ptr, block);
    cached_ += block;
  }

  std::mutex mutex_;
  std::deque<std::pair<void*, size_t>> free_;  // oldest first
  size_t cached_ = 0, limit_ = 0;
};

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return OutputCache::get().empty(sizes, options);
}

// ---------------------------------------------------------------------------------------------
// Rows of a [R, N] tensor (or an [N] tensor, R = 1) read or written block by block as acc_t.
// A row is used in place when it already is acc_t with unit stride; otherwise (another dtype, or
// stride 0 as for the gradient of .sum()) the block is converted through a caller's buffer.

template <typename acc_t>
class RowReader {
 public:
  RowReader() = default;
  explicit RowReader(const at::Tensor& t) {
    t_ = (t.dim() == 2 ? t.stride(1) : t.stride(0)) > 1 ? t.contiguous() : t;
    row_stride_ = t_.dim() == 2 ? t_.stride(0) : 0;
    col_stride_ = t_.dim() == 2 ? t_.stride(1) : t_.stride(0);
    direct_ = t_.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && col_stride_ == 1;
  }
  // Pointer to elements [begin, begin + n) of row r, as acc_t.
  const acc_t* block(int64_t r, int64_t begin, int64_t n, acc_t* buf) const {
    if (direct_) return t_.const_data_ptr<acc_t>() + r * row_stride_ + begin;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t_.scalar_type(), "RowReader", [&] {
      const scalar_t* src = t_.const_data_ptr<scalar_t>() + r * row_stride_ + begin * col_stride_;
      if (col_stride_ == 0) {
        std::fill(buf, buf + n, static_cast<acc_t>(src[0]));
      } else {
        for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<acc_t>(src[j]);
      }
    });
    return buf;
  }

 private:
  at::Tensor t_;
  int64_t row_stride_ = 0, col_stride_ = 1;
  bool direct_ = false;
};

// Contiguous output rows: block() gives where to write (in place, or the caller's buffer), and
// commit() stores a buffered block into the tensor's dtype.
template <typename acc_t>
class RowWriter {
 public:
  RowWriter() = default;
  explicit RowWriter(const at::Tensor& t) : t_(t) {
    TORCH_INTERNAL_ASSERT(t.is_contiguous());
    row_stride_ = t.dim() == 2 ? t.size(1) : 0;
    direct_ = t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value;
  }
  acc_t* block(int64_t r, int64_t begin, int64_t, acc_t* buf) const {
    return direct_ ? t_.data_ptr<acc_t>() + r * row_stride_ + begin : buf;
  }
  void commit(int64_t r, int64_t begin, int64_t n, const acc_t* buf) const {
    if (direct_) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t_.scalar_type(), "RowWriter", [&] {
      scalar_t* dst = t_.data_ptr<scalar_t>() + r * row_stride_ + begin;
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(buf[j]);
    });
  }

 private:
  at::Tensor t_;
  int64_t row_stride_ = 0;
  bool direct_ = false;
};

}  // namespace stars_fast
