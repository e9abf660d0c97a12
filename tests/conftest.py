"""Test set-up shared by every test file.

Without a GPU the Triton kernels run under Triton's interpreter: TRITON_INTERPRET=1 must be set
before any kernel is defined, so it is set here, before stars_fast is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import stars_fast  # noqa: E402


def backend_usable(name: str, device: str = "cpu") -> bool:
    return stars_fast.available_backends(device)[name] == ""


def require_backend(name: str, device: str = "cpu"):
    reason = stars_fast.available_backends(device)[name]
    if reason:
        pytest.skip(f"backend {name!r} unusable here: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
