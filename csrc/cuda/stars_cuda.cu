// The STARS ops (pool_mean, quantiles, stars_loss_fused) for CUDA tensors: host code in stars_ops.cuh,
// kernels in stars_kernels.cuh.
#include <torch/library.h>

#include "stars_ops.cuh"

namespace stars_fast {

TORCH_LIBRARY_IMPL(stars_fast, CUDA, m) {
  m.impl("pool_mean", &stars_cuda::pool_mean_cuda);
  m.impl("quantiles", &stars_cuda::quantiles_cuda);
  m.impl("stars_loss_fused", &stars_cuda::stars_loss_fused_cuda);
}

}  // namespace stars_fast
