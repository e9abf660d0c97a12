"""Builds stars_fast and its extension stars_fast._C.

C++ (CPU kernels) always. CUDA kernels from csrc/cuda/ when torch is a CUDA build, a CUDA toolkit
is found and a GPU is visible, or when STARS_FAST_BUILD_CUDA=1 forces it (=0 disables it).
Install after torch: pip install --no-build-isolation -e .
"""
import glob
import os

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("STARS_FAST_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and torch.cuda.is_available()


def _nvidia_wheel_includes():
    """-isystem flags for the headers of the CUDA libraries shipped as pip wheels with torch (cuBLAS, cuSPARSE,
    ...): ATen's CUDA headers include them and a bare CUDA toolkit may lack them; -isystem dirs are searched
    after the toolkit's own include dir."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = sorted(p for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "*", "include")))
    return [flag for d in dirs for flag in ("-isystem", d)]


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # -g0 overrides the -g that Python's own compile flags add: no debug info, so a faster build and a
    # smaller _C.so (stripped at link time, -s); the kernels' code is the same.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math", "-g0"]
    if _want_cuda():
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        nvcc = ["-O3", "-std=c++20", "--fmad=false", "-DSTARS_FAST_WITH_CUDA"]
        wheel_includes = _nvidia_wheel_includes()
        return cpp_extension.CUDAExtension(
            "stars_fast._C", sources,
            extra_compile_args={"cxx": cxx + ["-DSTARS_FAST_WITH_CUDA"] + wheel_includes, "nvcc": nvcc + wheel_includes},
            extra_link_args=["-fopenmp", "-s"], py_limited_api=False)
    return cpp_extension.CppExtension(
        "stars_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp", "-s"])


class BuildExtensionKeepingObjects(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Object files under build/ (pip's editable install would use a fresh temporary folder each time):
    ninja then recompiles only the sources that changed, so installing an extra relinks in seconds."""

    def finalize_options(self):
        if self.build_temp is None:
            self.build_temp = os.path.join(HERE, "build", "objects")
        super().finalize_options()


setup(
    name="stars_fast",
    version="0.1.0",
    description="Fused spiking-neuron and STARS-loss kernels for data-free ANN-to-SNN distillation",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    packages=["stars_fast", "stars_fast.ops", "stars_fast.models", "stars_fast.synthesis", "stars_fast.kernels"],
    package_dir={"stars_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionKeepingObjects},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "torchvision", "numpy", "tqdm", "scikit-learn", "pillow", "pyyaml"],
    extras_require={"plots": ["matplotlib"],  # python -m stars_fast.analyze
                    "test": ["pytest", "pytest-benchmark", "expecttest", "spikingjelly==2.0.0", "matplotlib",
                             "transformers"]},  # transformers: the offline CLIP-text test of label_embedding
)
