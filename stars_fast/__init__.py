"""stars_fast: fused kernels and a driver for data-free ANN-to-SNN distillation with STARS.

Public API: multistep_lif (the spiking neuron op), stars_loss / StarsLoss (RCA + TAR),
pool_features (Eq. 12 pooling), available_backends (what runs here and why not the others), cpu_isa
(the vector ISA of the cpu backend's kernels).
"""
import importlib

# name -> the module defining it; imported on first use (PEP 562), so that `python -m stars_fast.train
# --help` and other torch-free entry points do not pay for importing torch
_EXPORTS = {"multistep_lif": ".ops.lif", "stars_loss": ".ops.stars", "StarsLoss": ".ops.stars",
            "pool_features": ".ops.stars", "available_backends": "._backend", "cpu_isa": "._backend"}

__all__ = ["multistep_lif", "stars_loss", "StarsLoss", "pool_features", "available_backends", "cpu_isa"]
__version__ = "0.1.0"


# subpackages and modules reachable as attributes (stars_fast.neurons), imported on first use too
_SUBMODULES = ("neurons", "reference", "ops", "models", "synthesis", "kernels", "data", "distill")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stars_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
