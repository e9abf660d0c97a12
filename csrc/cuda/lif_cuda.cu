// The multi-step LIF / IF neuron ops (lif_forward, lif_backward) for CUDA tensors: host code in
// lif_ops.cuh, kernels in lif_kernels.cuh.
#include <torch/library.h>

#include "lif_ops.cuh"

namespace stars_fast {

TORCH_LIBRARY_IMPL(stars_fast, CUDA, m) {
  m.impl("lif_forward", &lif_cuda::lif_forward_cuda);
  m.impl("lif_backward", &lif_cuda::lif_backward_cuda);
}

}  // namespace stars_fast
