"""Backend selection: every backend has a usable-or-why answer, auto picks the first usable one,
and STARS_FAST_BACKEND overrides auto."""
import pytest
import torch

import stars_fast
from stars_fast import _backend

from conftest import require_backend


def test_every_backend_reported_with_a_reason_when_unusable():
    reasons = stars_fast.available_backends("cpu")
    assert set(reasons) == {"triton", "cuda", "cpu", "reference"}
    assert reasons["reference"] == ""
    assert "CUDA tensors" in reasons["cuda"]
    cuda_reasons = stars_fast.available_backends("cuda")
    assert "CPU tensors" in cuda_reasons["cpu"]


def test_auto_prefers_the_cpu_extension_then_reference():
    expected = "cpu" if stars_fast.available_backends("cpu")["cpu"] == "" else "reference"
    assert _backend.resolve("auto", torch.device("cpu")) == expected


def test_environment_override(monkeypatch):
    monkeypatch.setenv(_backend.ENV_OVERRIDE, "reference")
    assert _backend.resolve("auto", "cpu") == "reference"
    # An explicit backend argument wins over the environment.
    monkeypatch.setenv(_backend.ENV_OVERRIDE, "cuda")
    assert _backend.resolve("reference", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="not usable"):
        _backend.resolve("auto", "cpu")


def test_unusable_or_unknown_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cuda"):
        stars_fast.multistep_lif(torch.randn(2, 3), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        _backend.resolve("tpu", "cpu")


def _simulate_cuda(monkeypatch, *, has_cuda_kernels=True, triton_ok=True):
    """Pretend the extension has CUDA kernels and Triton imports, so CUDA choices can be tested without a GPU."""
    monkeypatch.setattr(_backend, "_extension_status", lambda: (True, has_cuda_kernels, "" if has_cuda_kernels
                                                                else "extension built without CUDA kernels"))
    monkeypatch.setattr(_backend, "_triton_status", lambda: (True, "") if triton_ok else (False, "no triton"))


def test_auto_is_dtype_aware_on_cuda(monkeypatch):
    _simulate_cuda(monkeypatch)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, None):
        assert _backend.resolve("auto", "cuda", dtype) == "triton"
    assert _backend.resolve("auto", "cuda", torch.float64) == "cuda"  # Triton has no float64
    assert "float64" in stars_fast.available_backends("cuda", torch.float64)["triton"]
    assert stars_fast.available_backends("cuda", torch.float32)["triton"] == ""
    with pytest.raises(RuntimeError, match="float64"):
        _backend.resolve("triton", "cuda", torch.float64)
    _simulate_cuda(monkeypatch, has_cuda_kernels=False)
    assert _backend.resolve("auto", "cuda", torch.float64) == "reference"
    assert _backend.resolve("auto", "cuda", torch.float32) == "triton"
    _simulate_cuda(monkeypatch, has_cuda_kernels=False, triton_ok=False)
    assert _backend.resolve("auto", "cuda", torch.float32) == "reference"
    reasons = stars_fast.available_backends("cuda", torch.float64)
    assert reasons["triton"] == "no triton" and "without CUDA kernels" in reasons["cuda"]


def test_auto_on_the_cpu_ignores_the_dtype():
    expected = "cpu" if stars_fast.available_backends("cpu")["cpu"] == "" else "reference"
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        assert _backend.resolve("auto", "cpu", dtype) == expected


def test_environment_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv(_backend.ENV_OVERRIDE, "gpu")
    with pytest.raises(ValueError, match="STARS_FAST_BACKEND"):
        _backend.resolve("auto", "cpu")
    monkeypatch.setenv(_backend.ENV_OVERRIDE, "cuda")
    with pytest.raises(RuntimeError, match="STARS_FAST_BACKEND"):
        stars_fast.multistep_lif(torch.randn(2, 3))
    monkeypatch.setenv(_backend.ENV_OVERRIDE, "auto")
    assert _backend.resolve("auto", "cpu") in ("cpu", "reference")


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_vmap_and_dynamic_compile_of_the_ops(backend):
    """torch.func.vmap runs the ops (through the reference inside the transform, the same values as a
    loop over the batch); torch.compile(fullgraph=True, dynamic=True) of both ops gives the eager
    values and gradients, with the loss's options as traced arguments and a second batch size."""
    require_backend(backend)
    x = torch.randn(3, 4, 2, 16) + 0.5  # vmap over dim 0: 3 sequences [T=4, 2, 16]
    lif = lambda x: stars_fast.multistep_lif(x, tau=2.0, backend=backend)  # noqa: E731
    assert torch.equal(torch.func.vmap(lif)(x), torch.stack([lif(x[i]) for i in range(3)]))
    zt, zs = torch.randn(3, 8, 4), torch.randn(3, 8, 5)
    loss = lambda a, b: stars_fast.stars_loss([a], [b], backend=backend)  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(loss)(zt, zs), torch.stack([loss(zt[i], zs[i]) for i in range(3)]))
    grad = torch.func.grad(lambda b: loss(zt[0], b))(zs[0])
    student = zs[0].clone().requires_grad_(True)
    torch.testing.assert_close(grad, torch.autograd.grad(loss(zt[0], student), student)[0])
    if backend == "triton" and _backend.triton_interpreter():
        return  # the interpreter runs kernels on the tensors' data, which graph tracing's fake tensors lack

    compiled_lif = torch.compile(lif, fullgraph=True, dynamic=True, backend="aot_eager")
    assert torch.equal(compiled_lif(x[0]), lif(x[0]))

    def options_loss(a, b, q, delta, w):
        return stars_fast.stars_loss(a, b, quantiles=[q, 0.9], delta=delta, weights=[w, 1.0], normalize=True,
                                     backend=backend)
    compiled_loss = torch.compile(options_loss, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, q, delta, w in ((8, 0.5, 0.5, 2.0), (13, 0.7, 0.3, 1.0)):
        features = [torch.randn(batch, c, requires_grad=True) for c in (4, 6, 5, 3)]
        expected = options_loss(features[:2], features[2:], q, delta, w)
        got = compiled_loss(features[:2], features[2:], q, delta, w)
        torch.testing.assert_close(got, expected)
        for g, e in zip(torch.autograd.grad(got, features), torch.autograd.grad(expected, features)):
            torch.testing.assert_close(g, e)
