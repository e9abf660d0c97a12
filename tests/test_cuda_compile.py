"""Every csrc/cuda/*.cu compiles with nvcc (no GPU needed), and its kernels keep the SMs busy: `nvcc -c`
with torch's include dirs and the flags setup.py uses, for sm_80 and sm_90 (one -gencode each), and from
`-Xptxas -v`, per kernel and target, the registers, spill bytes and static shared memory, hence the
blocks and warps resident per SM (occupancy) at BLOCK_THREADS threads a block. No kernel may spill to
local memory, and the memory-bound kernels (MEMORY_BOUND: they stream HBM, and only many resident warps
keep enough bytes in flight) need MIN_MEMORY_BOUND_OCCUPANCY. The table is printed (`pytest -s` shows
it). Skipped when no CUDA toolkit is found (set CUDA_HOME, e.g. /usr/local/cuda)."""
import ast
import os
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from occupancy import MIN_MEMORY_BOUND_OCCUPANCY, SM_LIMITS, resident_warps

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_SOURCES.glob("*.cu"))
TARGETS = (80, 90)
BLOCK_THREADS = 256  # kThreads: every launch's block (test_every_launch_uses_block_threads reads the sources)
MEMORY_BOUND = ("lif_forward_kernel", "lif_backward_kernel", "pool_mean_kernel")


@dataclass(frozen=True)
class KernelResources:
    """One kernel compiled for one target, as ptxas -v reports it."""

    file: str
    kernel: str
    target: int
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int

    @property
    def warps(self) -> int:
        return resident_warps(self.registers, self.shared_bytes, BLOCK_THREADS, SM_LIMITS[self.target])

    @property
    def occupancy(self) -> float:
        return self.warps / SM_LIMITS[self.target].max_warps


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


def test_every_launch_uses_block_threads():
    """BLOCK_THREADS is the sources' kThreads, and every launch_kernel call passes kThreads as its block."""
    sources = {p.name: p.read_text() for p in sorted(CUDA_SOURCES.glob("*.cu*"))}
    defined = {name: int(n) for name, text in sources.items()
               for n in re.findall(r"constexpr int kThreads = (\d+);", text)}
    assert defined and set(defined.values()) == {BLOCK_THREADS}, defined
    blocks = [(name, _call_arguments(text, m.end())[2]) for name, text in sources.items()
              for m in re.finditer(r"(?<!void )\blaunch_kernel\(", text)]
    assert blocks and all(block == "kThreads" for _, block in blocks), blocks


def _call_arguments(text, start):
    """The top-level arguments of the call whose '(' ends just before text[start] (<> count as brackets:
    template arguments)."""
    args, depth, begin = [], 0, start
    for i in range(start, len(text)):
        if text[i] in "(<[{":
            depth += 1
        elif text[i] in ")>]}":
            if depth == 0:
                return args + [text[begin:i].strip()]
            depth -= 1
        elif text[i] == "," and depth == 0:
            args.append(text[begin:i].strip())
            begin = i + 1
    raise AssertionError(f"unterminated call at {start}")


@pytest.mark.skipif(CUDA_HOME is None, reason="nvcc not found (set CUDA_HOME to a CUDA toolkit to run this test)")
def test_cuda_sources_compile(tmp_path):
    assert CU_FILES, "no csrc/cuda/*.cu sources"
    kernels, failures = compile_kernels(tmp_path)
    assert not failures, "nvcc failed:\n" + "\n".join(failures)
    per_target = {t: sorted((k.file, k.kernel) for k in kernels if k.target == t) for t in TARGETS}
    assert per_target[TARGETS[0]] and all(names == per_target[TARGETS[0]] for names in per_target.values()), \
        "ptxas -v did not report the same kernels for every target"
    print("\n" + occupancy_table(kernels))
    spilling = [f"{k.kernel} sm_{k.target}: {k.spill_stores} / {k.spill_loads} bytes" for k in kernels
                if k.spill_stores or k.spill_loads]
    assert not spilling, "kernels spill registers (spill stores / loads):\n" + "\n".join(spilling)
    starved = [f"{k.kernel} sm_{k.target}: {k.registers} registers, {k.shared_bytes} bytes smem -> "
               f"{k.warps} warps/SM = {k.occupancy:.1%}" for k in kernels
               if any(name in k.kernel for name in MEMORY_BOUND) and k.occupancy < MIN_MEMORY_BOUND_OCCUPANCY]
    assert not starved, (f"memory-bound kernels below {MIN_MEMORY_BOUND_OCCUPANCY:.0%} occupancy at "
                         f"{BLOCK_THREADS} threads a block:\n" + "\n".join(starved))


def occupancy_table(kernels):
    """A Markdown table of KernelResources with their resident warps and occupancy."""
    lines = [f"| file | kernel | target | registers | stack / spill stores / spill loads bytes | smem bytes | "
             f"warps/SM ({BLOCK_THREADS} threads a block) | occupancy |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k.file} | {k.kernel} | sm_{k.target} | {k.registers} | {k.stack_bytes} / {k.spill_stores} / "
              f"{k.spill_loads} | {k.shared_bytes} | {k.warps} | {k.occupancy:.1%} |" for k in kernels]
    return "\n".join(lines)


def compile_kernels(out_dir, targets=TARGETS):
    """Compiles every csrc/cuda/*.cu into out_dir as the build does, for `targets` (one -gencode each, the
    targets' device passes in parallel threads of one nvcc: the host code is compiled once; the files in
    parallel) -> (KernelResources of every kernel and target, nvcc failures as text)."""
    includes = [*_include_paths(), str(CUDA_HOME / "include"), sysconfig.get_paths()["include"]]
    gencodes = [flag for t in targets for flag in ("-gencode", f"arch=compute_{t},code=sm_{t}")]
    flags = [*_setup_nvcc_flags(), *cpp_extension.COMMON_NVCC_FLAGS, "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", "--compiler-options", "-fPIC", *gencodes, "--threads", str(len(targets)),
             "-Xptxas", "-v", *(f"-I{p}" for p in includes), *_nvidia_wheel_includes()]
    nvcc = str(CUDA_HOME / "bin" / "nvcc")
    objects = {cu: Path(out_dir) / (cu.stem + ".o") for cu in CU_FILES}
    procs = {cu: subprocess.Popen([nvcc, "-c", str(cu), "-o", str(obj), *flags], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
             for cu, obj in objects.items()}
    kernels, failures = [], []
    for cu, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0 or not objects[cu].exists():
            failures.append(f"{cu.relative_to(ROOT)} (exit {proc.returncode}):\n{out[-4000:]}")
        else:
            kernels += ptxas_kernels(cu.name, out)
    return kernels, failures


def ptxas_kernels(file, out):
    """KernelResources of every entry function and target in the output of `ptxas -v` (via nvcc -Xptxas
    -v) for the source `file`, names demangled by c++filt when it is there."""
    rows, name, target, props, frame = [], None, None, None, None
    for line in out.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)a?'", line):
            name, target, frame = m.group(1), int(m.group(2)), None
        elif m := re.search(r"Function properties for (\S+)", line):
            props = m.group(1)
        elif (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)) \
                and name and props == name:
            frame = tuple(map(int, m.groups()))
        elif (m := re.search(r"Used (\d+) registers", line)) and name and frame:
            shared = re.search(r"(\d+) bytes smem", line)
            rows.append(KernelResources(file, name, target, int(m.group(1)), *frame,
                                        int(shared.group(1)) if shared else 0))
            name = frame = None
    return [replace(row, kernel=pretty) for row, pretty in zip(rows, _demangled([r.kernel for r in rows]))]


def _demangled(names):
    """The kernels' names without return type, parameter list, stars_fast:: and anonymous namespaces (as
    mangled if c++filt is absent)."""
    if not shutil.which("c++filt") or not names:
        return names
    pretty = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return [re.sub(r"^void |\(.*|stars_fast::|\(anonymous namespace\)::", "", p)[:100] for p in pretty]
