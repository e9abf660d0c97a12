import pytest
import torch

import stars_fast


def backend_usable(name: str, device: str = "cpu") -> bool:
    return stars_fast.available_backends(device)[name] == ""


def require_backend(name: str, device: str = "cpu"):
    reason = stars_fast.available_backends(device)[name]
    if reason:
        pytest.skip(f"backend {name!r} unusable here: {reason}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
