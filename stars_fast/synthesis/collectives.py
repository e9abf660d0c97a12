"""Differentiable collectives for a synthesis objective that every process computes in full.

Under torchrun each process holds its share x_r of the synthetic batch. The batch-level terms
(BN moments, the RCA Gram matrix, the TAR quantiles, batch means) are computed on every process
from the same reduced or gathered tensors, so every process holds the same loss L. Then
dL/dx_r = (dL/dy) (dy/dx_r) with dL/dy the same on every process, and the backward of each
collective needs no communication:

    y = sum_r x_r          (all_reduce_sum)   ->  grad x_r = grad y
    y = cat_r x_r          (all_gather_batch) ->  grad x_r = grad y[rows of rank r]

This holds when the reduced or gathered tensor is all that later computations use of x_r: a tensor
that is reduced and then also combined with local data before a second reduction (a mean
subtracted from x_r, say) gets a local gradient on each process, which the identity backward would
not add up (bn_hooks.batch_moments is written to avoid that). torch.distributed.nn's collectives
instead sum the gradients over the processes, which counts a replicated loss N times. Without a
process group, or with one process, both are the identity.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.detach().clone().contiguous()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _AllGatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(size)]
        dist.all_gather(parts, x.detach().contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum of `x` over the processes (every process the same shape), with the gradient of a
    loss that every process computes identically from it."""
    return x if world()[1] == 1 else _AllReduceSum.apply(x)


def all_gather_batch(x: Tensor) -> Tensor:
    """Every process's `x` (the same shape on all), concatenated along dim 0 in rank order, with
    the gradient of a loss that every process computes identically from it."""
    return x if world()[1] == 1 else _AllGatherBatch.apply(x)
