// Kernel launches, device selection and device properties for the host code of csrc/cuda, written once
// for nvcc and for the host compiler; the latter runs the kernels on the CUDA emulation of
// emulation/cuda_on_host.h (on CPU tensors, in the tests).
#pragma once

#include <c10/core/Device.h>

#include <utility>

#if defined(__CUDACC__)
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#else
#include "emulation/cuda_on_host.h"
#endif

namespace stars_fast {

#if defined(__CUDACC__)
using DeviceStream = cudaStream_t;

// Makes the op's device current, for its allocations and launches, and gives that device's current stream.
class DeviceScope {
 public:
  explicit DeviceScope(c10::Device device) : guard_(device) {}
  DeviceStream stream() const { return at::cuda::getCurrentCUDAStream(); }
  int multiprocessor_count() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

 private:
  c10::cuda::CUDAGuard guard_;
};

// kernel<<<grid, block, 0, stream>>>(args...), then the launch's error check.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, DeviceStream stream, Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#else
using DeviceStream = cuda_on_host::Stream;

// The emulation works on CPU tensors: no device to select, one implicit stream. One multiprocessor, so
// that grids sized by it leave work to the kernels' grid-stride loops at sizes the tests can afford.
class DeviceScope {
 public:
  explicit DeviceScope(c10::Device) {}
  DeviceStream stream() const { return nullptr; }
  int multiprocessor_count() const { return 1; }
};

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, DeviceStream stream, Args&&... args) {
  cuda_on_host::launch(kernel, grid, block, stream, std::forward<Args>(args)...);
}
#endif

}  // namespace stars_fast
