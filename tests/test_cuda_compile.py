"""Every csrc/cuda/*.cu compiles with nvcc (no GPU needed): `nvcc -c` with torch's include dirs and the
flags setup.py uses, for sm_90, and no kernel spills registers to local memory (`-Xptxas -v`; the
register table is printed, `pytest -s` shows it). Skipped when no CUDA toolkit is found (set
CUDA_HOME, e.g. /usr/local/cuda)."""
import ast
import os
import re
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
             "-gencode", "arch=compute_90,code=sm_90", "-Xptxas", "-v", *(f"-I{p}" for p in includes),
             *_nvidia_wheel_includes()]
    nvcc = str(CUDA_HOME / "bin" / "nvcc")
    procs = {cu: subprocess.Popen([nvcc, "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o")), *flags],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cu in CU_FILES}
    failures, reports = [], {}
    for cu, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0 or not (tmp_path / (cu.stem + ".o")).exists():
            failures.append(f"{cu.relative_to(ROOT)} (exit {proc.returncode}):\n{out[-4000:]}")
        else:
            reports[cu.name] = out
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    kernels = [(name, *row) for name, out in reports.items() for row in ptxas_kernels(out)]
    assert kernels, "ptxas -v reported no kernel"
    print("\n| file | kernel | registers | stack bytes | spill stores | spill loads |\n|---|---|---|---|---|---|")
    for row in kernels:
        print("| " + " | ".join(str(v) for v in row) + " |")
    spilling = [row for row in kernels if row[4] or row[5]]
    assert not spilling, f"kernels spill registers (file, kernel, regs, stack, spill stores, spill loads): {spilling}"


def ptxas_kernels(out):
    """(kernel, registers, stack frame bytes, spill store bytes, spill load bytes) per entry function in
    the output of `ptxas -v` (via nvcc -Xptxas -v), names demangled by c++filt when it is there."""
    rows, name, props = [], None, None
    for line in out.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            name = m.group(1)
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)
        elif (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)) \
                and name and props == name:
            stack, stores, loads = map(int, m.groups())
            rows.append([name, None, stack, stores, loads])
        elif (m := re.search(r"Used (\d+) registers", line)) and rows and rows[-1][0] == name and rows[-1][1] is None:
            rows[-1][1] = int(m.group(1))
    if shutil.which("c++filt") and rows:
        names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True, text=True)
        for row, pretty in zip(rows, names.stdout.splitlines()):
            row[0] = re.sub(r"\(.*", "", pretty.replace("(anonymous namespace)::", ""))[:100]
    return [tuple(r) for r in rows]
