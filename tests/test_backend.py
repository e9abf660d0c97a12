"""Backend selection: every backend has a usable-or-why answer, auto picks the first usable one,
and STARS_FAST_BACKEND overrides auto."""
import pytest
import torch

import stars_fast
from stars_fast import _backend


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
