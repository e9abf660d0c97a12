"""Building the CUDA code of csrc/cuda for the CPU emulation (csrc/cuda/emulation/cuda_on_host.h) in the
tests, and the guard that ends a run whose emulated kernel hangs (a deadlock the emulation does not report)
with every thread's traceback instead of stalling it."""
import faulthandler
from pathlib import Path

from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
BUILD_ROOT = Path.home() / ".cache" / "stars_fast" / "cuda_emulated"
HANG_TIMEOUT_S = 300


def build(name: str, sources, build_subdir: str = ""):
    """The extension `name` from tests/cuda_emulated/<sources>, built once (rebuilt when a source or header
    changes) into ~/.cache/stars_fast/cuda_emulated[/build_subdir]."""
    build_dir = BUILD_ROOT / build_subdir
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name, sources=[str(ROOT / "tests" / "cuda_emulated" / s) for s in sources],
        extra_include_paths=[str(ROOT / "csrc" / "cuda")], extra_cflags=["-O1", "-g0"], build_directory=str(build_dir))


def hang_guard():
    """A generator fixture body: a test still running after HANG_TIMEOUT_S ends the run with tracebacks."""
    faulthandler.dump_traceback_later(HANG_TIMEOUT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()
