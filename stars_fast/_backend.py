"""Which backend runs an op, and why the others were skipped.

Order of preference for backend="auto": CUDA tensors -> triton, cuda, reference;
CPU tensors -> cpu, reference. STARS_FAST_BACKEND overrides "auto" (e.g. STARS_FAST_BACKEND=reference).
The "triton" backend also accepts CPU tensors when TRITON_INTERPRET=1 (Triton's interpreter; slow,
used by the tests).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Tuple

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


def available_backends(device="cpu") -> Dict[str, str]:
    """Map each backend to "" if usable for tensors on `device`, else the reason it is not."""
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
    return {name: reasons[name] for name in BACKENDS}


@torch.compiler.assume_constant_result
def resolve(backend: str, device) -> str:
    """The backend that will run: `backend` itself if usable, or auto's first usable choice.

    A constant for torch.compile: evaluated once while tracing, not traced into the graph.
    """
    if backend == "auto":
        backend = os.environ.get(ENV_OVERRIDE, "auto")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")
    reasons = available_backends(device)
    if backend == "auto":
        order = ("triton", "cuda", "reference") if torch.device(device).type == "cuda" else ("cpu", "reference")
        return next(name for name in order if not reasons[name])
    if reasons[backend]:
        raise RuntimeError(f"backend {backend!r} is not usable on {device}: {reasons[backend]}")
    return backend
