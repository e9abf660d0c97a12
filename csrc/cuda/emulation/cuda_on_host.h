// Runs CUDA device code on the CPU, unchanged, so that the tests execute the kernels of csrc/cuda/ on
// machines without a GPU. Written from the execution model of the CUDA C++ Programming Guide:
//   - a launch runs its blocks one after another, each with one host thread per CUDA thread (the
//     threads are started once per launch and reused for every block);
//   - threadIdx, blockIdx, blockDim and gridDim are thread-local;
//   - __shared__ is `static`: one copy per kernel, which is the block's own as blocks never overlap;
//   - __syncthreads() is a barrier over the block's threads; a warp is 32 consecutive linear thread
//     ids, and a shuffle is a rendezvous of the lanes its mask names;
//   - what is undefined or hangs on a GPU is reported instead: a thread returning while others of its
//     block wait at __syncthreads (or before they reach one), threads of a block meeting at different
//     __syncthreads calls, a shuffle whose mask leaves out its own lane, names lanes the block lacks or
//     that have returned, or reads a lane outside the mask. The launch then throws LaunchError.
// Launches are synchronous and serialized (one implicit stream). Provided: the qualifiers, the four
// warp shuffles, __syncthreads, __ldg, the integer min, the integer atomicAdd (atomic on the host
// too: the block's threads run concurrently), the float/integer bit reinterpretations and the host's
// math library; not (yet, as no kernel here uses them) dynamic shared memory, float atomics, votes or
// cooperative groups.
#pragma once

#include <math.h>  // C math at global scope, with the float overloads (std's) that CUDA's math API also has

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <source_location>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __grid_constant__

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace cuda_on_host {

// A launch that a GPU would refuse, or device code that is undefined (or would hang) on a GPU.
class LaunchError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Stands for cudaStream_t: launches run to completion in order.
using Stream = struct StreamTag*;

namespace detail {

constexpr unsigned kWarpSize = 32;
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kSlotBytes = 16;  // the largest value a shuffle moves

// Unwinds a thread's kernel after its error was recorded; the thread then counts as returned.
struct KernelFault {};

// Waits are on atomics (futexes): a completed round wakes its waiters without their contending for a
// mutex, which matters with hundreds of threads on a few cores.
using Counter = std::atomic<uint32_t>;

// The lanes of one warp that meet in the shuffles of one mask. Two slot sets, by round parity: a lane
// may publish for the next round while others still read this one (and never two rounds ahead, as
// the next round needs every participant to have read this one first).
struct Exchange {
  uint32_t mask = 0;
  uint32_t arrived = 0;  // lanes that published in the open round
  Counter round{0};      // rounds completed
  uint32_t participants[2] = {0, 0};
  alignas(16) unsigned char slots[2][kWarpSize][kSlotBytes];
};

struct Warp {
  std::mutex mutex;    // guards the fields below and the exchanges' arrivals
  uint32_t lanes = 0;  // lanes the block has
  uint32_t live = 0;   // lanes that have not returned
  std::vector<std::unique_ptr<Exchange>> exchanges;  // one per mask in use

  Exchange& exchange_for(uint32_t mask) {
    for (auto& x : exchanges) {
      if (x->mask == mask) return *x;
    }
    exchanges.push_back(std::make_unique<Exchange>());
    exchanges.back()->mask = mask;
    return *exchanges.back();
  }
};

// The state of one launch.
struct Grid {
  dim3 grid, block;
  unsigned threads = 0;
  std::function<void()> body;  // the kernel with its arguments bound

  Counter block_serial{0};  // incremented to start the next block (or, with `stop`, to end the workers)
  uint3 block_index{0, 0, 0};
  std::atomic<bool> stop{false};
  Counter live{0};  // threads of the block that have not returned

  std::mutex mutex;  // guards what follows and the changes of `live`
  bool returned = false;              // some thread of the block has returned
  unsigned at_barrier = 0;            // threads waiting at __syncthreads
  Counter barrier_round{0};           // __syncthreads rounds completed
  std::source_location barrier_site;  // the __syncthreads call of the open round
  std::string error;                  // the first error of the launch

  std::unique_ptr<Warp[]> warps;
  unsigned num_warps = 0;
};

struct ThreadState {
  Grid* grid = nullptr;
  unsigned tid = 0;  // linear thread id in the block
};
inline thread_local ThreadState self;

inline std::string describe_position() {
  return "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
         std::to_string(blockIdx.z) + ") thread (" + std::to_string(threadIdx.x) + ", " +
         std::to_string(threadIdx.y) + ", " + std::to_string(threadIdx.z) + ")";
}

// Records the first error of the launch; the caller holds `grid.mutex`.
inline void record_error_locked(Grid& grid, const std::string& what) {
  if (grid.error.empty()) grid.error = describe_position() + ": " + what;
}

inline void record_error(const std::string& what) {
  Grid& grid = *self.grid;
  const std::lock_guard<std::mutex> lock(grid.mutex);
  record_error_locked(grid, what);
}

[[noreturn]] inline void fail(const std::string& what) {
  record_error(what);
  throw KernelFault{};
}

// Completes an exchange's open round once every live lane of its mask has published; the caller
// holds the warp's mutex and wakes the round's waiters (notify_all on x.round) after releasing it.
inline bool complete_round_if_full(const Warp& warp, Exchange& x) {
  if (x.arrived == 0 || x.arrived != (x.mask & warp.live)) return false;
  x.participants[x.round.load() % 2] = x.arrived;
  x.arrived = 0;
  x.round.fetch_add(1);
  return true;
}

// The thread has returned from the kernel (or was unwound): it leaves the block's barrier and its
// warp's exchanges, and the rounds it held up complete without it, after the error is recorded.
inline void retire() {
  Grid& grid = *self.grid;
  const unsigned lane = self.tid % kWarpSize;
  Warp& warp = grid.warps[self.tid / kWarpSize];
  std::vector<Exchange*> completed;
  {
    const std::lock_guard<std::mutex> lock(warp.mutex);
    warp.live &= ~(1u << lane);
    for (auto& x : warp.exchanges) {
      if (x->arrived != 0 && (x->mask >> lane & 1u)) {
        record_error("returned while lanes of its mask wait in a shuffle");
        if (complete_round_if_full(warp, *x)) completed.push_back(x.get());
      }
    }
  }
  for (Exchange* x : completed) x->round.notify_all();
  bool barrier_released = false;
  {
    const std::lock_guard<std::mutex> lock(grid.mutex);
    grid.returned = true;
    const uint32_t live = grid.live.fetch_sub(1) - 1;
    if (grid.at_barrier > 0) {
      record_error_locked(grid, "returned while " + std::to_string(grid.at_barrier) +
                                    " threads of its block wait at __syncthreads");
      if (grid.at_barrier == live) {
        grid.at_barrier = 0;
        grid.barrier_round.fetch_add(1);
        barrier_released = true;
      }
    }
  }
  if (barrier_released) grid.barrier_round.notify_all();
  grid.live.notify_all();  // the launcher waits for 0
}

// The value of `source`'s lane in the exchange of `mask`; a lane out of range (source < 0) reads its
// own value, as the shuffles' width and delta rules say.
template <typename T>
T exchange(uint32_t mask, T value, int source) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= kSlotBytes, "a shuffle moves a scalar");
  Grid& grid = *self.grid;
  const unsigned lane = self.tid % kWarpSize;
  const uint32_t me = 1u << lane;
  Warp& warp = grid.warps[self.tid / kWarpSize];
  std::unique_lock<std::mutex> lock(warp.mutex);
  if (!(mask & me)) fail("executes a shuffle whose mask leaves out its own lane");
  if (mask & ~warp.lanes) fail("shuffle mask names lanes the block does not have");
  if (mask & ~warp.live) fail("shuffle mask names a lane that has returned");
  Exchange& x = warp.exchange_for(mask);
  const uint32_t round = x.round.load();
  unsigned char(&slots)[kWarpSize][kSlotBytes] = x.slots[round % 2];
  std::memcpy(slots[lane], &value, sizeof(T));
  x.arrived |= me;
  const bool completed = complete_round_if_full(warp, x);
  lock.unlock();
  if (completed) {
    x.round.notify_all();
  } else {
    x.round.wait(round);
  }
  if (source < 0) return value;
  if (!(x.participants[round % 2] >> source & 1u)) {
    fail("shuffle reads lane " + std::to_string(source) + ", which is not in the mask");
  }
  T result;
  std::memcpy(&result, slots[source], sizeof(T));
  return result;
}

inline unsigned checked_width(int width) {
  if (width < 1 || width > static_cast<int>(kWarpSize) || !std::has_single_bit(static_cast<unsigned>(width))) {
    fail("shuffle width " + std::to_string(width) + " is not a power of two in [1, 32]");
  }
  return static_cast<unsigned>(width);
}

inline unsigned lane_id() { return self.tid % kWarpSize; }

inline void worker(Grid& grid, unsigned tid) {
  self = ThreadState{&grid, tid};
  threadIdx = uint3{tid % grid.block.x, tid / grid.block.x % grid.block.y, tid / (grid.block.x * grid.block.y)};
  blockDim = grid.block;
  gridDim = grid.grid;
  uint32_t started = 0;
  for (;;) {
    grid.block_serial.wait(started);
    started = grid.block_serial.load();
    if (grid.stop.load()) return;
    blockIdx = grid.block_index;
    try {
      grid.body();
    } catch (const KernelFault&) {
    } catch (const std::exception& e) {
      record_error(std::string("threw ") + e.what());
    } catch (...) {
      record_error("threw an exception");
    }
    retire();
  }
}

inline void check_configuration(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0) {
    throw LaunchError("cuda_on_host: launch with an empty grid or block");
  }
  if (threads > kMaxThreadsPerBlock || block.z > 64) {
    throw LaunchError("cuda_on_host: " + std::to_string(threads) + " threads per block (at most 1024, z <= 64)");
  }
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    throw LaunchError("cuda_on_host: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                      std::to_string(grid.z) + ") exceeds (2^31 - 1, 65535, 65535)");
  }
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline uint64_t& launches() {
  static uint64_t n = 0;
  return n;
}

// Runs `body` as a kernel over the grid, block after block (x fastest, as blockIdx is linearized).
inline void run_grid(dim3 grid_dim, dim3 block_dim, std::function<void()> body) {
  check_configuration(grid_dim, block_dim);
  const std::lock_guard<std::mutex> serialized(launch_mutex());  // __shared__ statics are one per kernel
  ++launches();
  Grid grid;
  grid.grid = grid_dim;
  grid.block = block_dim;
  grid.threads = block_dim.x * block_dim.y * block_dim.z;
  grid.body = std::move(body);
  grid.num_warps = (grid.threads + kWarpSize - 1) / kWarpSize;
  grid.warps = std::make_unique<Warp[]>(grid.num_warps);
  std::vector<std::thread> threads;
  const auto stop_workers = [&] {
    grid.stop.store(true);
    grid.block_serial.fetch_add(1);
    grid.block_serial.notify_all();
    for (auto& t : threads) t.join();
  };
  threads.reserve(grid.threads);
  try {
    for (unsigned t = 0; t < grid.threads; ++t) threads.emplace_back(worker, std::ref(grid), t);
  } catch (const std::system_error& e) {  // out of threads: end those started (a joinable thread would terminate)
    stop_workers();
    throw LaunchError(std::string("cuda_on_host: cannot start the block's threads: ") + e.what());
  }
  // Between blocks every thread has returned: the launcher alone touches the block's state.
  for (unsigned z = 0; z < grid_dim.z && grid.error.empty(); ++z) {
    for (unsigned y = 0; y < grid_dim.y && grid.error.empty(); ++y) {
      for (unsigned x = 0; x < grid_dim.x && grid.error.empty(); ++x) {
        for (unsigned w = 0; w < grid.num_warps; ++w) {
          const unsigned lanes = std::min(kWarpSize, grid.threads - w * kWarpSize);
          grid.warps[w].lanes = grid.warps[w].live = lanes == kWarpSize ? ~0u : (1u << lanes) - 1;
          grid.warps[w].exchanges.clear();
        }
        {
          const std::lock_guard<std::mutex> lock(grid.mutex);
          grid.live.store(grid.threads);
          grid.returned = false;
          grid.at_barrier = 0;
          grid.block_index = uint3{x, y, z};
        }
        grid.block_serial.fetch_add(1);
        grid.block_serial.notify_all();
        for (uint32_t live; (live = grid.live.load()) != 0;) grid.live.wait(live);
        const std::lock_guard<std::mutex> lock(grid.mutex);  // the last retire's error is visible
      }
    }
  }
  stop_workers();
  if (!grid.error.empty()) throw LaunchError("cuda_on_host: " + grid.error);
}

}  // namespace detail

// kernel<<<grid, block, 0, stream>>>(args...), run to completion; the arguments are converted to the
// kernel's parameter types and copied, as a launch does.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream, Args&&... args) {
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  detail::run_grid(grid, block, [kernel, &params] { std::apply(kernel, params); });
}

// Kernel launches so far in this process.
inline uint64_t launch_count() {
  const std::lock_guard<std::mutex> lock(detail::launch_mutex());
  return detail::launches();
}

}  // namespace cuda_on_host

// Device-side intrinsics.

inline void __syncthreads(const std::source_location site = std::source_location::current()) {
  using namespace cuda_on_host::detail;
  Grid& grid = *self.grid;
  std::unique_lock<std::mutex> lock(grid.mutex);
  if (grid.returned) {
    record_error_locked(grid, "reached __syncthreads after a thread of its block returned");
    lock.unlock();
    throw KernelFault{};
  }
  const std::source_location& first = grid.barrier_site;
  if (grid.at_barrier == 0) {
    grid.barrier_site = site;
  } else if (first.line() != site.line() || first.column() != site.column() ||
             std::strcmp(first.file_name(), site.file_name()) != 0) {
    record_error_locked(grid, "threads of one block meet at different __syncthreads (" +
                                  std::string(site.file_name()) + ":" + std::to_string(site.line()) + " and " +
                                  first.file_name() + ":" + std::to_string(first.line()) + ")");
  }
  const uint32_t round = grid.barrier_round.load();
  if (++grid.at_barrier == grid.live.load()) {
    grid.at_barrier = 0;
    grid.barrier_round.fetch_add(1);
    lock.unlock();
    grid.barrier_round.notify_all();
    return;
  }
  lock.unlock();
  grid.barrier_round.wait(round);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  using namespace cuda_on_host::detail;
  const unsigned w = checked_width(width), lane = lane_id();
  const unsigned source = (lane & ~(w - 1)) + (static_cast<unsigned>(src_lane) & (w - 1));
  return exchange(mask, var, static_cast<int>(source));
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace cuda_on_host::detail;
  const unsigned w = checked_width(width), lane = lane_id();
  return exchange(mask, var, lane % w < delta ? -1 : static_cast<int>(lane - delta));
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  using namespace cuda_on_host::detail;
  const unsigned w = checked_width(width), lane = lane_id();
  return exchange(mask, var, lane % w + delta >= w ? -1 : static_cast<int>(lane + delta));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  using namespace cuda_on_host::detail;
  const unsigned w = checked_width(width), lane = lane_id();
  const unsigned source = lane ^ static_cast<unsigned>(lane_mask);
  // a source in a later group of `width` lanes reads the caller's own value; an earlier group is readable
  return exchange(mask, var, source >= (lane / w + 1) * w || source >= kWarpSize ? -1 : static_cast<int>(source));
}

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// CUDA's integer min (the float one is the math library's fmin).
template <typename T>
  requires std::is_integral_v<T>
constexpr T min(T a, T b) {
  return b < a ? b : a;
}

namespace cuda_on_host::detail {
template <typename T>
T atomic_add(T* address, T val) {
  return std::atomic_ref<T>(*address).fetch_add(val);
}
}  // namespace cuda_on_host::detail

// atomicAdd of the integer types: stores old + val at address and returns old, as one atomic step.
inline int atomicAdd(int* address, int val) { return cuda_on_host::detail::atomic_add(address, val); }
inline unsigned atomicAdd(unsigned* address, unsigned val) { return cuda_on_host::detail::atomic_add(address, val); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long val) {
  return cuda_on_host::detail::atomic_add(address, val);
}

// The bits of a float or double as an integer and back (no conversion of the value).
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return std::bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return std::bit_cast<double>(x); }
