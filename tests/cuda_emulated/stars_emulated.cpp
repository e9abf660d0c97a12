// The CUDA STARS ops (csrc/cuda/stars_ops.cuh) built by the host compiler, for the tests: their kernels
// run unchanged on CPU tensors through the CUDA emulation of csrc/cuda/emulation/cuda_on_host.h.
// With the emulation's own checks (emulator_checks.cpp); built and loaded by tests/test_cuda_emulated.py
// (torch.utils.cpp_extension.load, include path csrc/cuda).
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "stars_ops.cuh"

// emulator_checks.cpp
std::vector<int> emulated_shuffles(int width);
std::vector<int> emulated_reverse_in_shared(unsigned blocks);
std::pair<std::vector<unsigned>, std::vector<unsigned>> emulated_atomic_add(unsigned blocks, int rounds);
void launch_faulty_kernel(const std::string& name);

namespace {

using namespace stars_fast::stars_cuda;

// stars_loss_fused's arguments as Python gives them (lists), as the op's schema reads them.
auto stars_loss_fused(const std::vector<at::Tensor>& z_teacher, const std::vector<at::Tensor>& z_student,
                      const std::vector<double>& quantiles, const std::optional<std::vector<double>>& thresholds,
                      bool normalize, const std::vector<double>& coef_rca, const std::vector<double>& coef_tar,
                      double delta, double eps) {
  std::optional<at::ArrayRef<double>> fixed;
  if (thresholds.has_value()) fixed = *thresholds;
  return stars_loss_fused_cuda(z_teacher, z_student, quantiles, fixed, normalize, coef_rca, coef_tar, delta, eps);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool_mean", &pool_mean_cuda);
  m.def("quantiles", [](const at::Tensor& z, const std::vector<double>& q) { return quantiles_cuda(z, q); });
  m.def("stars_loss_fused", &stars_loss_fused);
  m.def("launch_count", &cuda_on_host::launch_count, "kernel launches so far in this process");
  m.def("emulated_shuffles", &emulated_shuffles);
  m.def("emulated_reverse_in_shared", &emulated_reverse_in_shared);
  m.def("emulated_atomic_add", &emulated_atomic_add);
  m.def("launch_faulty_kernel", &launch_faulty_kernel);
}
