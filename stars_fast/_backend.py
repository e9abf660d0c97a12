"""Which backend runs an op, and why the others were skipped.

Order of preference for backend="auto", by the input's device and dtype: CUDA float64 -> cuda,
reference (Triton has no float64); other CUDA tensors -> triton, cuda, reference; CPU tensors -> cpu,
reference. STARS_FAST_BACKEND overrides "auto" (e.g. STARS_FAST_BACKEND=reference). The cpu backend
runs AVX-512, AVX2 or baseline kernels (cpu_isa(); ATEN_CPU_CAPABILITY caps them as it caps PyTorch's).
The "triton" backend also accepts CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter; slow,
used by the tests).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Tuple

import torch

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_OVERRIDE = "STARS_FAST_BACKEND"


@functools.lru_cache(maxsize=None)
def _extension_status() -> Tuple[bool, bool, str]:
    """(has CPU kernels, has CUDA kernels, reason) of the compiled extension stars_fast._C."""
    try:
        from stars_fast import _C  # noqa: F401  (importing registers torch.ops.stars_fast.*)
    except ImportError as exc:  # not built: pip install --no-build-isolation -e .
        return False, False, f"extension stars_fast._C is not built ({exc})"
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("stars_fast::lif_forward", "CUDA")
    return True, has_cuda, "extension built without CUDA kernels" if not has_cuda else ""


def extension_built() -> bool:
    """Whether stars_fast._C imports (and so torch.ops.stars_fast.* exist)."""
    return _extension_status()[0]


def cpu_isa() -> str:
    """The vector ISA the cpu backend's kernels use here: "avx512", "avx2" or "baseline" (the CPU's
    widest, capped by PyTorch's ATEN_CPU_CAPABILITY=default|avx2|avx512), or "" when not built."""
    return torch.ops.stars_fast.cpu_isa() if extension_built() else ""


@functools.lru_cache(maxsize=None)
def _triton_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401

        from stars_fast import kernels  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        return False, f"triton unavailable ({type(exc).__name__}: {exc})"
    return True, ""


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device="cpu", dtype: Optional[torch.dtype] = None) -> Dict[str, str]:
    """Map each backend to "" if usable for tensors on `device` (of `dtype`, if given), else the reason it is not."""
    device = torch.device(device)
    has_cpu, has_cuda, ext_reason = _extension_status()
    triton_ok, triton_reason = _triton_status()
    reasons = {"reference": ""}
    if device.type == "cuda":
        reasons["triton"] = triton_reason
        reasons["cuda"] = "" if has_cuda else ext_reason
        reasons["cpu"] = "the cpu backend needs CPU tensors"
    else:
        if not triton_ok:
            reasons["triton"] = triton_reason
        elif not triton_interpreter():
            reasons["triton"] = "Triton kernels need CUDA tensors (set TRITON_INTERPRET=1 to interpret them on the CPU)"
        else:
            reasons["triton"] = ""
        reasons["cuda"] = "the cuda backend needs CUDA tensors"
        reasons["cpu"] = "" if has_cpu else ext_reason
    if dtype == torch.float64 and not reasons["triton"]:
        reasons["triton"] = "the Triton kernels take float32, float16 or bfloat16, not float64"
    return {name: reasons[name] for name in BACKENDS}


_FIRST_CHOICE_HOOKS: Dict[str, list] = {name: [] for name in BACKENDS}


def on_first_choice(backend: str, hook) -> None:
    """Run hook() the first time resolve() picks `backend`: set-up only that backend needs stays off
    `import stars_fast` (defining the Triton ops as torch.library.triton_op imports torch._inductor and
    torch._dynamo, about 1 s). resolve() is a constant for torch.compile, so the hook runs eagerly even
    when the first choice happens while a graph is traced."""
    _FIRST_CHOICE_HOOKS[backend].append(hook)


def _chosen(backend: str) -> str:
    hooks = _FIRST_CHOICE_HOOKS[backend]
    while hooks:
        hooks.pop(0)()
    return backend


def _auto_order(device: torch.device, dtype: Optional[torch.dtype]) -> Tuple[str, ...]:
    if device.type != "cuda":
        return ("cpu", "reference")
    return ("cuda", "reference") if dtype == torch.float64 else ("triton", "cuda", "reference")


def reference_under_transforms(chosen: str) -> str:
    """"reference" instead of a fused backend inside torch.func transforms (vmap, grad, jacrev, ...): the
    fused ops' autograd Functions have no batching or forward-mode rules, the reference's plain ops do."""
    return "reference" if chosen != "reference" and torch._C._are_functorch_transforms_active() else chosen


def resolve(backend: str, device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that will run: `backend` itself if usable, or auto's first usable choice for
    tensors on `device` of `dtype` (None: any dtype but float64).

    A constant for torch.compile: evaluated once while tracing, not traced into the graph.
    """
    device = torch.device(device)
    source = "backend"
    if backend == "auto" and os.environ.get(ENV_OVERRIDE, "auto") != "auto":
        backend, source = os.environ[ENV_OVERRIDE], f"the environment variable {ENV_OVERRIDE}"
    if backend not in BACKENDS + ("auto",):
        if source == "backend":
            raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")
        raise ValueError(f"{ENV_OVERRIDE}={backend!r} names no backend; expected one of {('auto',) + BACKENDS}")
    reasons = available_backends(device, dtype)
    if backend == "auto":
        return _chosen(next(name for name in _auto_order(device, dtype) if not reasons[name]))
    if reasons[backend]:
        what = f"{device}" + (f" for {dtype}" if dtype is not None else "")
        chosen = f"backend {backend!r}" + (f" (from {source})" if source != "backend" else "")
        raise RuntimeError(f"{chosen} is not usable on {what}: {reasons[backend]}")
    return _chosen(backend)


# torch.compiler.assume_constant_result(resolve) without its import of torch._dynamo (about 1 s, which
# every `import stars_fast` would pay): the decorator only sets this attribute, which tests check.
resolve._dynamo_marked_constant = True
