"""Test set-up shared by every test file.

Without a GPU the Triton kernels run under Triton's interpreter: TRITON_INTERPRET=1 must be set
before any kernel is defined, so it is set here, before stars_fast is imported. The driver tests
share a quickly trained digits teacher (`teacher_cache`, `pair`).
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


@pytest.fixture(autouse=True)
def _restore_threads():
    """train.main sets PyTorch's thread count (1 for digits); give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory):
    """A private teacher cache holding a quickly trained digits teacher (shared by every test)."""
    from stars_fast import train
    from stars_fast.data import DATASETS

    cache = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("STARS_FAST_CACHE")
    os.environ["STARS_FAST_CACHE"] = cache
    recipe = dict(train.DIGITS_TEACHER_RECIPE)
    train.DIGITS_TEACHER_RECIPE["epochs"] = 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the CLI uses for digits; far faster on a shared 2-core machine
    try:
        with torch.random.fork_rng():
            train.digits_teacher("digits_cnn", DATASETS["digits"], "cpu", progress=False)
        yield cache
    finally:
        torch.set_num_threads(threads)
        train.DIGITS_TEACHER_RECIPE.update(recipe)
        if old is None:
            del os.environ["STARS_FAST_CACHE"]
        else:
            os.environ["STARS_FAST_CACHE"] = old


@pytest.fixture
def pair(teacher_cache):
    """The cached digits teacher (frozen) and a fresh digits student (T=2, reference backend)."""
    from stars_fast import models, train
    from stars_fast.data import DATASETS

    teacher = models.freeze(train.digits_teacher("digits_cnn", DATASETS["digits"], "cpu", progress=False))
    student = models.build_student("digits_snn", 10, T=2, in_channels=1, backend="reference")
    return teacher, student
