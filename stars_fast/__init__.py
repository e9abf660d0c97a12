"""stars_fast: fused kernels and a driver for data-free ANN-to-SNN distillation with STARS.

Public API: multistep_lif (the spiking neuron op), stars_loss / StarsLoss (RCA + TAR),
pool_features (Eq. 12 pooling), available_backends (what runs here and why not the others).
"""
from ._backend import available_backends
from .ops.lif import multistep_lif
from .ops.stars import StarsLoss, pool_features, stars_loss

__all__ = ["multistep_lif", "stars_loss", "StarsLoss", "pool_features", "available_backends"]
__version__ = "0.1.0"
