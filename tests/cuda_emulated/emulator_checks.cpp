// Kernels that check the CUDA emulation itself (csrc/cuda/emulation/cuda_on_host.h): the shuffles'
// lane arithmetic, __shared__ memory and __syncthreads per block, atomicAdd, and the CUDA bugs it must
// report rather than hang on. Bound to Python in stars_emulated.cpp.
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "emulation/cuda_on_host.h"

namespace {

constexpr int kShuffleResults = 5;

// Per thread of two warps: __shfl_sync from lane 3, __shfl_up_sync by 2, __shfl_down_sync by 5 and
// __shfl_xor_sync with 17 at `width`, then a __shfl_sync of each half warp under its own mask (lanes
// 0-15 read lane 15, lanes 16-31 lane 16), the two halves at once.
__global__ void shuffles_kernel(int* out, int width) {
  const unsigned lane = threadIdx.x % 32;
  const int value = 100 * static_cast<int>(threadIdx.x / 32) + static_cast<int>(lane);
  int* mine = out + kShuffleResults * threadIdx.x;
  mine[0] = __shfl_sync(0xffffffffu, value, 3, width);
  mine[1] = __shfl_up_sync(0xffffffffu, value, 2, width);
  mine[2] = __shfl_down_sync(0xffffffffu, value, 5, width);
  mine[3] = __shfl_xor_sync(0xffffffffu, value, 17, width);
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  mine[4] = __shfl_sync(half, value, lane < 16 ? 15 : 16);
}

// out[block, t] = the value thread (63 - t) of the same block wrote to shared memory.
__global__ void reverse_in_shared_kernel(int* out) {
  __shared__ int values[64];
  values[threadIdx.x] = 1000 * static_cast<int>(blockIdx.x) + static_cast<int>(threadIdx.x);
  __syncthreads();
  out[64 * blockIdx.x + threadIdx.x] = values[63 - threadIdx.x];
}

constexpr int kAtomicBins = 4;

// Every thread adds 1 to the shared bin threadIdx.x % kAtomicBins, `rounds` times, keeping the values
// atomicAdd returned in olds; counts[block, bin] = the bins' final values.
__global__ void atomic_add_kernel(unsigned* counts, unsigned* olds, int rounds) {
  __shared__ unsigned bins[kAtomicBins];
  if (threadIdx.x < kAtomicBins) bins[threadIdx.x] = 0;
  __syncthreads();
  unsigned* mine = olds + (blockIdx.x * blockDim.x + threadIdx.x) * rounds;
  for (int r = 0; r < rounds; ++r) mine[r] = atomicAdd(&bins[threadIdx.x % kAtomicBins], 1u);
  __syncthreads();
  if (threadIdx.x < kAtomicBins) counts[blockIdx.x * kAtomicBins + threadIdx.x] = bins[threadIdx.x];
}

__global__ void return_before_syncthreads_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

__global__ void divergent_syncthreads_kernel() {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

__global__ void shuffle_with_a_returned_lane_kernel(int* out) {
  if (threadIdx.x == 3) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void shuffle_outside_its_mask_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(0xfffffffeu, static_cast<int>(threadIdx.x), 1);
}

}  // namespace

std::vector<int> emulated_shuffles(int width) {
  std::vector<int> out(64 * kShuffleResults);
  cuda_on_host::launch(shuffles_kernel, 1, 64, nullptr, out.data(), width);
  return out;
}

std::vector<int> emulated_reverse_in_shared(unsigned blocks) {
  std::vector<int> out(64 * blocks);
  cuda_on_host::launch(reverse_in_shared_kernel, blocks, 64, nullptr, out.data());
  return out;
}

// (counts [blocks, kAtomicBins], olds [blocks, 64 threads, rounds]) of atomic_add_kernel.
std::pair<std::vector<unsigned>, std::vector<unsigned>> emulated_atomic_add(unsigned blocks, int rounds) {
  std::vector<unsigned> counts(blocks * kAtomicBins), olds(blocks * 64 * rounds);
  cuda_on_host::launch(atomic_add_kernel, blocks, 64, nullptr, counts.data(), olds.data(), rounds);
  return {counts, olds};
}

// Launches the faulty kernel `name`; the emulation must throw cuda_on_host::LaunchError.
void launch_faulty_kernel(const std::string& name) {
  std::vector<int> out(64);
  if (name == "return_before_syncthreads") {
    cuda_on_host::launch(return_before_syncthreads_kernel, 2, 64, nullptr);
  } else if (name == "divergent_syncthreads") {
    cuda_on_host::launch(divergent_syncthreads_kernel, 1, 64, nullptr);
  } else if (name == "shuffle_with_a_returned_lane") {
    cuda_on_host::launch(shuffle_with_a_returned_lane_kernel, 1, 64, nullptr, out.data());
  } else if (name == "shuffle_outside_its_mask") {
    cuda_on_host::launch(shuffle_outside_its_mask_kernel, 1, 64, nullptr, out.data());
  } else if (name == "too_many_threads") {
    cuda_on_host::launch(return_before_syncthreads_kernel, 1, 1025, nullptr);
  } else {
    throw std::invalid_argument("no faulty kernel " + name);
  }
}
