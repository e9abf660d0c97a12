"""Triton kernels of stars_fast, shipped as the package stars_fast.kernels (setup.py maps this folder).

One module per op. The launchers take the same arguments, in the same order, as the operator
schemas in csrc/ops.cpp, so stars_fast.ops can dispatch to either backend. They launch through
torch.library.wrap_triton, so they can be called inside a torch.library.triton_op.

    lif_forward, lif_backward   the multi-step LIF / IF neuron (lif.py)
    stars_loss_fused, pool_mean the STARS loss with its gradients, and the Eq. 12 pooling (stars.py)
"""
from .lif import lif_backward, lif_forward
from .stars import pool_mean, stars_loss_fused

__all__ = ["lif_forward", "lif_backward", "stars_loss_fused", "pool_mean"]
