"""BatchNorm-statistics hooks: DeepInversion's feature-distribution prior (paper Eq. 3).

Fast-Datafree's `DeepInversionHook` form: for every `nn.BatchNorm2d` of the teacher, over the
batch statistics of its *input*,

    r = ||running_mean - mean(x)||_2 + ||running_var - var(x)||_2      (biased variance)

and the BN loss is the sum of r over all hooked layers.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn


class BNStatsHook:
    """Forward hook on one BatchNorm2d; after each forward, `r_feature` holds that layer's r."""

    def __init__(self, module: nn.BatchNorm2d):
        self.module = module
        self.r_feature: Optional[torch.Tensor] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.BatchNorm2d, inputs, output) -> None:
        x = inputs[0].float()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        self.r_feature = torch.norm(module.running_mean - mean, 2) + torch.norm(module.running_var - var, 2)

    def remove(self) -> None:
        self._handle.remove()


class BNStatsHooks:
    """Hooks on every BatchNorm2d of `model`; `loss()` sums their r. Use as a context manager
    so the hooks only exist (and only cost time) during synthesis."""

    def __init__(self, model: nn.Module):
        self.hooks: List[BNStatsHook] = [BNStatsHook(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.hooks:
            raise ValueError("the teacher has no nn.BatchNorm2d layer: the BN-statistics prior needs at least one")

    def loss(self) -> torch.Tensor:
        """Sum of r over the layers run by the last forward."""
        terms = [h.r_feature for h in self.hooks if h.r_feature is not None]
        if not terms:
            raise RuntimeError("no BatchNorm layer ran since the hooks were attached")
        return torch.stack(terms).sum()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def __enter__(self) -> "BNStatsHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
