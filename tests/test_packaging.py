"""The source checkout as a working directory: commands run from the repository root (python -m puts
it first on sys.path) import the installed packages, not folders of the repository that share a name."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_from_root(code, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)


def test_repository_kernels_folder_does_not_shadow_an_installed_kernels(tmp_path):
    """PyPI's `kernels` (imported by transformers) must win over the repository's kernels/ folder."""
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("WHO = 'installed'\n")
    (installed / "sub.py").write_text("WHAT = 'installed submodule'\n")
    out = _run_from_root("import kernels, kernels.sub; print(kernels.WHO, '|', kernels.sub.WHAT)",
                         pythonpath=str(tmp_path / "site"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "installed | installed submodule"


def test_repository_kernels_folder_is_no_top_level_package(tmp_path):
    """Without an installed `kernels`, the name is unknown from the root too (as from anywhere else)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
            "else:\n    print('found', kernels.__file__)")
    out = _run_from_root(code, pythonpath=str(empty))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "missing kernels"


def test_triton_kernels_import_as_stars_fast_kernels():
    out = _run_from_root("import stars_fast.kernels as k; print(k.__name__, sorted(k.__all__))")
    if "No module named 'triton'" in out.stderr:
        pytest.skip("triton is not installed")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "stars_fast.kernels"


def test_transformers_imports_from_the_repository_root():
    """transformers' hub-kernels integration imports `kernels` at import time (when installed)."""
    pytest.importorskip("transformers")
    pytest.importorskip("kernels")
    out = _run_from_root("import transformers.integrations.hub_kernels")
    assert out.returncode == 0, out.stderr[-2000:]


def test_subpackages_are_attributes_of_the_package():
    out = _run_from_root("import stars_fast; print(stars_fast.neurons.LIFNode.__name__, stars_fast.models.__name__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["LIFNode", "stars_fast.models"]


def test_importing_the_package_does_not_import_dynamo():
    """`import stars_fast` (and its neurons and ops) stays off torch._dynamo and torch._inductor, about
    1 s of a 2 s import: the Triton ops' torch.library definitions wait for the triton backend's first use."""
    code = ("import sys, stars_fast, stars_fast.neurons, stars_fast.ops; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    out = _run_from_root(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_backend_resolution_is_marked_constant_as_torch_marks_it():
    """resolve() carries by hand the mark torch.compiler.assume_constant_result would set (the decorator
    imports torch._dynamo); the decorator must still set exactly that mark."""
    import torch

    from stars_fast import _backend

    def probe():
        return None
    before = set(vars(probe))
    marked = torch.compiler.assume_constant_result(probe)
    assert {name: getattr(marked, name) for name in set(vars(marked)) - before} == {"_dynamo_marked_constant": True}
    assert _backend.resolve._dynamo_marked_constant is True
