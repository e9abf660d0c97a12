"""Frozen models for the synthesis step: no parameter gradients, BatchNorm folded into the convs."""
from __future__ import annotations

import copy

import torch
from torch import nn


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and requires_grad=False on every parameter (in place); returns the model.

    Gradients still flow to the input, so the synthesis step can optimise the images through it.
    """
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Make `conv` compute bn(conv(x)) with bn's running statistics (per-channel factors in float64)."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    # the product keeps the weight's memory format (a channels-last weight stays channels-last)
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(conv.weight * scale.to(dtype).view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias.to(dtype))


def fold_bn(model: nn.Module) -> nn.Module:
    """A frozen eval-mode copy of `model` with every BatchNorm2d folded into the conv before it.

    Same outputs as model.eval() (within float rounding, about 1e-6 relative) with one pass over
    each activation less, forward and backward. It relies on the convention of this package's
    models: a BatchNorm2d registered right after a Conv2d in the same parent normalises that conv's
    output. Use it for the frozen student; teachers keep their BN layers for the BN-statistics hooks.
    The original model is left untouched: refold after every update of its weights. On the CPU,
    `fold_bn(student).to(memory_format=torch.channels_last)` is faster still (oneDNN convolutions;
    the neurons take channels-last activations without a copy).
    """
    model = copy.deepcopy(model).eval()
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                _fold_into(conv, bn)
                setattr(parent, bn_name, nn.Identity())
    return freeze(model)
