"""Multi-step LIF / IF / PLIF neuron op (shared/DESIGN.md section 2.1).

Three homes for one op: `stars_fast.reference.multistep_neuron` (plain PyTorch, ground truth),
the Triton kernels in `stars_fast.kernels.lif`, and the C++/CUDA kernels behind
`torch.ops.stars_fast.lif_forward/lif_backward` (csrc/). This module registers the autograd
formula once for the compiled backends and dispatches by backend.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _backend, reference

SURROGATE_IDS = {"sigmoid": 0, "atan": 1, "triangle": 2}
NEURONS = ("lif", "if")


def _ext_forward(x, v_init, inv_tau, leaky, v_threshold, v_reset, decay_input, surrogate, alpha, spiking):
    return torch.ops.stars_fast.lif_forward(
        x, v_init, inv_tau, leaky, v_threshold, v_reset, decay_input, surrogate, alpha, spiking)


def _ext_backward(*args):
    return torch.ops.stars_fast.lif_backward(*args)


def _triton_forward(*args):
    from ..kernels import lif as triton_lif

    return triton_lif.lif_forward(*args)


def _triton_backward(*args):
    from ..kernels import lif as triton_lif

    return triton_lif.lif_backward(*args)


def _fake_forward(x, v_init, inv_tau, leaky, v_threshold, v_reset, decay_input, surrogate, alpha, spiking,
                  detach_reset):
    return torch.empty_like(x), x.new_empty(x.shape[1:])


def _fake_backward(grad_spikes, grad_v_last, x, v_init, inv_tau, leaky, v_threshold, v_reset, decay_input,
                   surrogate, alpha, spiking, detach_reset, need_inv_tau_grad):
    grad_inv_tau = x.new_empty(x.shape[1:] if need_inv_tau_grad else (0,), dtype=torch.float32)
    return torch.empty_like(x), x.new_empty(x.shape[1:]), grad_inv_tau


def _define_neuron_op(name: str, forward_impl, backward_impl, define):
    """Define `stars_fast::<name>` (+ its backward op) with fake kernels and the autograd formula.

    The forward op takes detach_reset (unused by the kernels) so the backward can read it.
    """

    @define(f"stars_fast::{name}", mutates_args=())
    def forward_op(x: Tensor, v_init: Optional[Tensor], inv_tau: Tensor, leaky: bool, v_threshold: float,
                   v_reset: Optional[float], decay_input: bool, surrogate: int, alpha: float, spiking: bool,
                   detach_reset: bool) -> Tuple[Tensor, Tensor]:
        return forward_impl(x, v_init, inv_tau, leaky, v_threshold, v_reset, decay_input, surrogate, alpha, spiking)

    @define(f"stars_fast::{name}_backward", mutates_args=())
    def backward_op(grad_spikes: Tensor, grad_v_last: Optional[Tensor], x: Tensor, v_init: Optional[Tensor],
                    inv_tau: Tensor, leaky: bool, v_threshold: float, v_reset: Optional[float], decay_input: bool,
                    surrogate: int, alpha: float, spiking: bool, detach_reset: bool,
                    need_inv_tau_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
        return backward_impl(grad_spikes, grad_v_last, x, v_init, inv_tau, leaky, v_threshold, v_reset,
                             decay_input, surrogate, alpha, spiking, detach_reset, need_inv_tau_grad)

    forward_op.register_fake(_fake_forward)
    backward_op.register_fake(_fake_backward)

    def setup_context(ctx, inputs, output):
        x, v_init, inv_tau = inputs[:3]
        ctx.save_for_backward(x, v_init, inv_tau)
        ctx.options = inputs[3:]

    def backward(ctx, grad_spikes, grad_v_last):
        x, v_init, inv_tau = ctx.saved_tensors
        need_inv_tau_grad = ctx.needs_input_grad[2]
        grad_x, grad_v_init, grad_inv_tau = backward_op(
            grad_spikes, grad_v_last, x, v_init,  # the kernels read gradients through their strides
            inv_tau, *ctx.options, need_inv_tau_grad)
        grad_inv_tau = grad_inv_tau.sum().reshape(inv_tau.shape).to(inv_tau.dtype) if need_inv_tau_grad else None
        grad_v_init = grad_v_init if ctx.needs_input_grad[1] else None
        return (grad_x, grad_v_init, grad_inv_tau) + (None,) * 8

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op


_ext_neuron = _define_neuron_op("neuron", _ext_forward, _ext_backward, torch.library.custom_op)
_triton_neuron = _define_neuron_op("neuron_triton", _triton_forward, _triton_backward, torch.library.triton_op)


def _check_neuron_input(x: Tensor, v_init: Optional[Tensor], neuron: str, surrogate: str):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have a leading time dimension: shape [T, ...]")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (fp32, fp64, fp16, bf16), got {x.dtype}")
    if neuron not in NEURONS:
        raise ValueError(f"unknown neuron {neuron!r}; expected one of {NEURONS}")
    if surrogate not in SURROGATE_IDS:
        raise ValueError(f"unknown surrogate {surrogate!r}; expected one of {tuple(SURROGATE_IDS)}")
    if v_init is not None:
        if v_init.device != x.device:
            raise ValueError(f"v_init is on {v_init.device} but x is on {x.device}")
        try:
            torch.broadcast_shapes(v_init.shape, x.shape[1:])
        except RuntimeError:
            raise ValueError(f"v_init of shape {tuple(v_init.shape)} does not broadcast to one time step of x, "
                             f"{tuple(x.shape[1:])}") from None


def multistep_neuron(
    x: Tensor,
    inv_tau: Union[float, Tensor] = 0.5,
    *,
    neuron: str = "lif",
    v_threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "sigmoid",
    alpha: Optional[float] = None,
    spiking: bool = True,
    v_init: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Run the neuron over x[T, ...] with 1/tau = inv_tau (a float, or a tensor that may need grad)."""
    _check_neuron_input(x, v_init, neuron, surrogate)
    alpha = float(reference.SURROGATE_DEFAULT_ALPHA[surrogate] if alpha is None else alpha)
    v_reset = None if v_reset is None else float(v_reset)
    leaky = neuron == "lif"
    chosen = _backend.resolve(backend, x.device)
    if chosen == "reference" or x.numel() == 0:
        return reference.multistep_neuron(
            x, inv_tau, leaky=leaky, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input,
            detach_reset=detach_reset, surrogate=surrogate, alpha=alpha, spiking=spiking, v_init=v_init)
    steps, step_shape = x.shape[0], x.shape[1:]
    x2d = x.reshape(steps, -1).contiguous()
    if v_init is not None:
        v_init = v_init.to(x.dtype).expand(step_shape).reshape(-1).contiguous()
    # 1/tau in the state dtype: fp64 for fp64 input (so float64 gradcheck sees its perturbations), else fp32.
    state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(inv_tau, Tensor):
        inv_tau = inv_tau.to(device=x.device, dtype=state_dtype).reshape(1)
    else:
        inv_tau = torch.full((1,), float(inv_tau), dtype=state_dtype, device=x.device)
    op = _triton_neuron if chosen == "triton" else _ext_neuron
    spikes, v_last = op(x2d, v_init, inv_tau, leaky, float(v_threshold), v_reset, decay_input,
                        SURROGATE_IDS[surrogate], alpha, spiking, detach_reset)
    return spikes.reshape(x.shape), v_last.reshape(step_shape)


def multistep_lif(
    x: Tensor,
    *,
    neuron: str = "lif",
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "sigmoid",
    alpha: Optional[float] = None,
    spiking: bool = True,
    v_init: Optional[Tensor] = None,
    return_v: bool = False,
    backend: str = "auto",
):
    """Multi-step LIF/IF neuron (paper Eq. 1, SpikingJelly semantics) over x[T, ...].

    Returns the spikes [T, ...] (x's dtype), and the final membrane potential when return_v.
    tau must be > 1 for LIF (1/tau is the leak factor); it is ignored for IF.
    """
    if neuron == "lif" and not tau > 1.0:
        raise ValueError(f"tau must be > 1 for a LIF neuron, got {tau}")
    spikes, v_last = multistep_neuron(
        x, 1.0 / tau, neuron=neuron, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input,
        detach_reset=detach_reset, surrogate=surrogate, alpha=alpha, spiking=spiking, v_init=v_init,
        backend=backend)
    return (spikes, v_last) if return_v else spikes
