"""BatchNorm-statistics hooks: DeepInversion's feature-distribution prior (paper Eq. 3), with NAYER's
momentum target.

Fast-Datafree's / NAYER's `DeepInversionHook` form: for every `nn.BatchNorm2d` of the model, over
the batch statistics (mean, biased variance per channel) of its *input*,

    r = ||running_mean - target_mean||_2 + ||running_var - target_var||_2

and the BN loss is the sum of r over all hooked layers. The target is the batch's own statistics,
or with a momentum rate m > 0 (NAYER's `bn_mmt`) and a moving average (mean_ma, var_ma) of the
final statistics of earlier batches:

    target = (1 - m) * batch statistics + m * moving average      (plain statistics before the first update)
    after each synthesized batch: moving <- batch's last statistics (first time), else m * moving + (1 - m) * last

Under torchrun the batch statistics are those of all processes' images together (collectives.py),
so N processes optimize the loss of one process holding the whole batch.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .collectives import all_reduce_sum

Moments = Tuple[Tensor, Tensor]  # (mean [C], biased variance [C])


def batch_moments(x: Tensor) -> Moments:
    """Per-channel mean and biased variance of x [B, C, H, W] over (B, H, W), over every process's
    batch under torchrun. Around c, the batch mean held as a constant (no gradient):
    mean = c + E[x - c], var = E[(x - c)^2] - E[x - c]^2 -- sums that are reduced before anything
    else uses them (collectives.py's condition for exact gradients), without the cancellation of
    E[x^2] - E[x]^2."""
    x = x.float()
    with torch.no_grad():
        count = all_reduce_sum(x.new_tensor(float(x.shape[0] * x.shape[2] * x.shape[3])))
        center = all_reduce_sum(x.sum(dim=(0, 2, 3))) / count
    centered = x - center.view(1, -1, 1, 1)
    sums = all_reduce_sum(torch.stack([centered.sum(dim=(0, 2, 3)), centered.square().sum(dim=(0, 2, 3))]))
    shift, second = sums[0] / count, sums[1] / count
    return center + shift, second - shift.square()


class BNStatsHook:
    """Forward hook on one BatchNorm2d; after each forward, `r_feature` holds that layer's r and
    `last` the (detached) batch moments it was computed from."""

    def __init__(self, module: nn.BatchNorm2d, momentum: float = 0.0, moving: Optional[Moments] = None):
        self.module, self.momentum, self.moving = module, momentum, moving
        self.r_feature: Optional[Tensor] = None
        self.last: Optional[Moments] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs, output) -> None:
        mean, var = batch_moments(inputs[0])
        self.last = (mean.detach(), var.detach())
        if self.moving is not None and self.momentum > 0:
            mean = (1 - self.momentum) * mean + self.momentum * self.moving[0]
            var = (1 - self.momentum) * var + self.momentum * self.moving[1]
        self.r_feature = torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2)

    def update_moving(self) -> None:
        """NAYER's `update_mmt`: fold the last forward's moments into the moving average."""
        if self.last is None:
            raise RuntimeError("update_moving() before any forward through the hooked BatchNorm")
        if self.moving is None:
            self.moving = self.last
        else:
            m = self.momentum
            self.moving = (m * self.moving[0] + (1 - m) * self.last[0], m * self.moving[1] + (1 - m) * self.last[1])

    def remove(self) -> None:
        self._handle.remove()


class BNStatsHooks:
    """Hooks on every BatchNorm2d of `model`; `loss()` sums their r. Use as a context manager
    so the hooks only exist (and only cost time) during synthesis.

    `momentum` > 0 and `moving` (one (mean, var) pair per BatchNorm, in module order, or None
    before the first update) give NAYER's momentum target; `moving_state()` returns it for the
    next round (the hooks are rebuilt every round, the average is not)."""

    def __init__(self, model: nn.Module, momentum: float = 0.0, moving: Optional[Sequence[Moments]] = None):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"the BN momentum must be in [0, 1), got {momentum}")
        modules = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not modules:
            raise ValueError("the model has no nn.BatchNorm2d layer: the BN-statistics prior needs at least one")
        if moving is not None and len(moving) != len(modules):
            raise ValueError(f"{len(moving)} moving BN statistics for {len(modules)} BatchNorm layers")
        moving = [None] * len(modules) if moving is None else list(moving)
        self.hooks: List[BNStatsHook] = [BNStatsHook(m, momentum, avg) for m, avg in zip(modules, moving)]

    def loss(self) -> Tensor:
        """Sum of r over the layers run by the last forward."""
        terms = [h.r_feature for h in self.hooks if h.r_feature is not None]
        if not terms:
            raise RuntimeError("no BatchNorm layer ran since the hooks were attached")
        return torch.stack(terms).sum()

    def update_moving(self) -> None:
        for h in self.hooks:
            h.update_moving()

    def moving_state(self) -> Optional[List[Moments]]:
        """The moving averages (None before the first update)."""
        if any(h.moving is None for h in self.hooks):
            return None
        return [h.moving for h in self.hooks]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def __enter__(self) -> "BNStatsHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
