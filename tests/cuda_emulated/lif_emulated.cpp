// The CUDA LIF / IF neuron ops (csrc/cuda/lif_ops.cuh) built by the host compiler, for the tests: their
// kernels run unchanged on CPU tensors through the CUDA emulation of csrc/cuda/emulation/cuda_on_host.h.
// Built and loaded by tests/test_cuda_emulated_lif.py (torch.utils.cpp_extension.load, include path
// csrc/cuda).
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "lif_ops.cuh"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lif_forward", &stars_fast::lif_cuda::lif_forward_cuda);
  m.def("lif_backward", &stars_fast::lif_cuda::lif_backward_cuda);
  m.def("launch_count", &cuda_on_host::launch_count, "kernel launches so far in this process");
}
