"""Every csrc/cuda/*.cu compiles with nvcc (no GPU needed): `nvcc -c` with torch's include dirs and the
flags setup.py uses. Skipped when no CUDA toolkit is found (set CUDA_HOME, e.g. /usr/local/cuda)."""
import ast
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _cuda_home():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parents[1] if nvcc else None


def _setup_nvcc_flags():
    """The `nvcc = [...]` list of setup.py, so that this test compiles what the build compiles."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "nvcc" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no `nvcc = [...]` flag list")


def _include_paths():
    try:
        return cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        return cpp_extension.include_paths(cuda=True)


def _nvidia_wheel_includes():
    """As setup.py: -isystem flags for the headers of the CUDA libraries pip ships with torch (cuBLAS, ...)."""
    try:
        import nvidia
    except ImportError:
        return []
    dirs = sorted(str(p) for base in nvidia.__path__ for p in Path(base).glob("*/include"))
    return [flag for d in dirs for flag in ("-isystem", d)]


CUDA_HOME = _cuda_home()


@pytest.mark.skipif(CUDA_HOME is None, reason="nvcc not found (set CUDA_HOME to a CUDA toolkit to run this test)")
def test_cuda_sources_compile(tmp_path):
    assert CU_FILES, "no csrc/cuda/*.cu sources"
    includes = [*_include_paths(), str(CUDA_HOME / "include"), sysconfig.get_paths()["include"]]
    flags = [*_setup_nvcc_flags(), *cpp_extension.COMMON_NVCC_FLAGS, "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", "--compiler-options", "-fPIC",
             "-gencode", "arch=compute_90,code=sm_90", *(f"-I{p}" for p in includes), *_nvidia_wheel_includes()]
    nvcc = str(CUDA_HOME / "bin" / "nvcc")
    procs = {cu: subprocess.Popen([nvcc, "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o")), *flags],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cu in CU_FILES}
    failures = []
    for cu, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0 or not (tmp_path / (cu.stem + ".o")).exists():
            failures.append(f"{cu.relative_to(ROOT)} (exit {proc.returncode}):\n{out[-4000:]}")
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
