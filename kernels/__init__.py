"""Triton kernels of stars_fast, shipped as the package stars_fast.kernels (setup.py maps this folder).

One module per op. The launchers take the same arguments, in the same order, as the operator
schemas in csrc/ops.cpp, so stars_fast.ops can dispatch to either backend. They launch through
torch.library.wrap_triton, so they can be called inside a torch.library.triton_op.

    lif_forward, lif_backward   the multi-step LIF / IF neuron (lif.py)
    stars_loss_fused, pool_mean the STARS loss with its gradients, and the Eq. 12 pooling (stars.py)
"""
if __name__ == "kernels":
    # Imported as a top-level `kernels`: the repository root is on sys.path (`python -m ...` or
    # `python -m pytest` run from it). That name belongs to whatever is installed (PyPI's `kernels`,
    # which transformers imports), so the name is handed over to it, or to nobody, as it would be
    # anywhere else; this folder is only ever stars_fast.kernels.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        __name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        del sys.modules[__name__]
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _installed
    _spec.loader.exec_module(_installed)
else:
    from .lif import lif_backward, lif_forward
    from .stars import pool_mean, stars_loss_fused

    __all__ = ["lif_forward", "lif_backward", "stars_loss_fused", "pool_mean"]
