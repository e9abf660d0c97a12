"""Multi-step LIF / IF / PLIF neuron op (docs/design.md section 2.1).

Three homes for one op: `stars_fast.reference.multistep_neuron` (plain PyTorch, ground truth),
the Triton kernels in `stars_fast.kernels.lif`, and the C++/CUDA kernels behind
`torch.ops.stars_fast.lif_forward/lif_backward` (csrc/). This module checks the arguments once for
every backend, registers the autograd formula once for the compiled backends and dispatches.

`decay` (a 1-element tensor) holds tau when `decay_is_tau` (the charge divides by tau, as
SpikingJelly's LIFNode) and k = 1/tau otherwise (the charge multiplies by k, as its
ParametricLIFNode, whose k = sigmoid(w) may need a gradient). A per-channel k reaches the kernels
as one k per neuron: `decay` of N entries in the order of x's [T, N] view. A learnable threshold (a
tensor v_threshold: one value, or one per channel) reaches them the same way, as `threshold` of N
entries that replaces the float v_threshold; its gradient comes back per neuron and autograd sums it.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _backend, reference

# Our surrogate names -> the kernels' ids; the last four are SpikingJelly's PiecewiseExp, SoftSign, SuperSpike, Erf.
SURROGATE_IDS = {"sigmoid": 0, "atan": 1, "triangle": 2, "piecewise_exp": 3, "soft_sign": 4, "super_spike": 5, "erf": 6}
NEURONS = ("lif", "if")


def _ext_forward(*args):
    return torch.ops.stars_fast.lif_forward(*args)


def _ext_backward(*args):
    return torch.ops.stars_fast.lif_backward(*args)


def _triton_forward(*args):
    from ..kernels import lif as triton_lif

    return triton_lif.lif_forward(*args)


def _triton_backward(*args):
    from ..kernels import lif as triton_lif

    return triton_lif.lif_backward(*args)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Membrane state and arithmetic dtype: fp64 for fp64 data, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(x, v_init, decay, leaky, decay_is_tau, v_threshold, v_reset, decay_input, surrogate, alpha,
                  spiking, detach_reset, need_v_last, threshold=None):
    return torch.empty_like(x), x.new_empty(x.shape[1:] if need_v_last else (0,))


def _fake_backward(grad_spikes, grad_v_last, x, v_init, decay, leaky, decay_is_tau, v_threshold, v_reset,
                   decay_input, surrogate, alpha, spiking, detach_reset, need_decay_grad, need_grad_v_init,
                   threshold=None, need_threshold_grad=False):
    grad_decay = x.new_empty(x.shape[1:] if need_decay_grad else (0,), dtype=_state_dtype(x.dtype))
    grad_threshold = x.new_empty(x.shape[1:] if need_threshold_grad else (0,), dtype=_state_dtype(x.dtype))
    return torch.empty_like(x), x.new_empty(x.shape[1:] if need_grad_v_init else (0,)), grad_decay, grad_threshold


def _reference_backward(saved, options, grad_spikes, grad_v_last, needs_input_grad):
    """The backward as a differentiable graph (for create_graph=True: double backward), by autograd
    through reference.multistep_neuron on the saved inputs. Its second derivatives are the reference's."""
    x, v_init, decay, threshold = saved
    leaky, decay_is_tau, v_threshold, v_reset, decay_input, surrogate, alpha, spiking, detach_reset = options
    k = decay.reshape(()) if decay.numel() == 1 else decay  # one k per neuron broadcasts over x's [T, N]
    mode = {"tau": k} if decay_is_tau else {"inv_tau": k}
    with torch.enable_grad():
        spikes, v_last = reference.multistep_neuron(
            x, leaky=leaky, v_threshold=v_threshold if threshold is None else threshold, v_reset=v_reset,
            decay_input=decay_input, detach_reset=detach_reset, surrogate=tuple(SURROGATE_IDS)[surrogate],
            alpha=alpha, spiking=spiking, v_init=v_init, **(mode if leaky else {}))
        pairs = [(out, g) for out, g in ((spikes, grad_spikes), (v_last, grad_v_last)) if g is not None]
        wrt = [t for t, need in zip((x, v_init, decay, threshold), needs_input_grad) if need]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], create_graph=True,
                                         allow_unused=True))
    return tuple(next(grads) if need else None for need in needs_input_grad)


def _setup_context(ctx, inputs, output):
    x, v_init, decay = inputs[:3]
    threshold = inputs[13] if len(inputs) > 13 else None  # the Triton op's autograd may see 13 without one
    ctx.save_for_backward(x, v_init, decay, threshold)
    ctx.options = inputs[3:12]  # leaky .. detach_reset
    ctx.need_v_last = inputs[12]
    ctx.set_materialize_grads(False)


def _neuron_backward(ctx, grad_spikes, grad_v_last, backward_op):
    """Autograd of the neuron (both compiled homes): the gradients of (x, v_init, decay, threshold) by
    backward_op, in the places of the op's 14 inputs.

    Autograd does not materialize missing gradients: backward_op gets grad_v_last=None when v_last
    is unused, and computes grad_v_init / grad_decay / grad_threshold only for inputs that need them.
    """
    saved = ctx.saved_tensors
    x, v_init, decay, threshold = saved
    leaky = ctx.options[0]
    if not ctx.need_v_last:  # v_last was the empty [0] placeholder: whatever gradient it got is none
        grad_v_last = None
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and leaky,
             len(ctx.needs_input_grad) > 13 and ctx.needs_input_grad[13])
    if (grad_spikes is None and grad_v_last is None) or not any(needs):
        return (None,) * 14
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (grad_spikes, grad_v_last, *saved)):
        grad_x, grad_v_init, grad_decay, grad_threshold = _reference_backward(
            saved, ctx.options, grad_spikes, grad_v_last, needs)
        return (grad_x, grad_v_init, grad_decay) + (None,) * 10 + (grad_threshold,)
    if grad_spikes is None:  # only v_last is used: a stride-0 zero, never materialized
        grad_spikes = x.new_zeros(()).expand(x.shape)
    grad_x, grad_v_init, grad_decay, grad_threshold = backward_op(
        grad_spikes, grad_v_last, x, v_init,  # the kernels read gradients through their strides
        decay, *ctx.options, needs[2], needs[1], threshold, needs[3])
    if needs[2]:  # per-neuron partial sums: summed for one k; one k per neuron takes its own
        grad_decay = (grad_decay.sum() if decay.numel() == 1 else grad_decay).reshape(decay.shape).to(decay.dtype)
    else:
        grad_decay = None
    grad_threshold = grad_threshold.to(threshold.dtype) if needs[3] else None  # one v_th per neuron: its own
    return ((grad_x if needs[0] else None, grad_v_init if needs[1] else None, grad_decay) + (None,) * 10
            + (grad_threshold,))


class _ExtNeuron(torch.autograd.Function):
    """The C++/CUDA kernels (torch.ops.stars_fast.lif_forward / lif_backward, whose fake kernels are
    registered below) under autograd. A plain autograd.Function, not a custom_op wrapper: that costs
    ~0.2 ms less per forward + backward (0.32 against 0.50-0.53 ms measured at [4, 64]), which every
    neuron layer of a synthesis step pays. Takes the Triton op's 14 arguments (detach_reset, 12th, is
    only read by the backward) and returns (spikes, v_last)."""

    @staticmethod
    def forward(ctx, *inputs):  # ctx first, not a setup_context: that binds the arguments by inspect, ~0.1 ms
        output = _ext_forward(*inputs[:11], inputs[12], inputs[13])  # the C++ op takes no detach_reset
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_spikes, grad_v_last):
        return _neuron_backward(ctx, grad_spikes, grad_v_last, _ext_backward)


def _fake_ext_forward(*args):
    """The fake of the C++ lif_forward (the Triton op's arguments without detach_reset)."""
    return _fake_forward(*args[:11], False, *args[11:])


if _backend.extension_built():  # fake kernels of the C++ ops, for torch.compile and FakeTensor
    torch.library.register_fake("stars_fast::lif_forward")(_fake_ext_forward)
    torch.library.register_fake("stars_fast::lif_backward")(_fake_backward)


_triton_neuron = None  # the op below, defined the first time the triton backend is chosen


def _define_triton_neuron_op():
    """`stars_fast::neuron_triton` (+ its backward op): Triton launchers as torch.library.triton_op,
    so that torch.compile sees into the kernels; fake kernels and the autograd formula registered."""
    global _triton_neuron

    @torch.library.triton_op("stars_fast::neuron_triton", mutates_args=())
    def forward_op(x: Tensor, v_init: Optional[Tensor], decay: Tensor, leaky: bool, decay_is_tau: bool,
                   v_threshold: float, v_reset: Optional[float], decay_input: bool, surrogate: int, alpha: float,
                   spiking: bool, detach_reset: bool, need_v_last: bool,
                   threshold: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return _triton_forward(x, v_init, decay, leaky, decay_is_tau, v_threshold, v_reset, decay_input,
                               surrogate, alpha, spiking, need_v_last, threshold)

    @torch.library.triton_op("stars_fast::neuron_triton_backward", mutates_args=())
    def backward_op(grad_spikes: Tensor, grad_v_last: Optional[Tensor], x: Tensor, v_init: Optional[Tensor],
                    decay: Tensor, leaky: bool, decay_is_tau: bool, v_threshold: float, v_reset: Optional[float],
                    decay_input: bool, surrogate: int, alpha: float, spiking: bool, detach_reset: bool,
                    need_decay_grad: bool, need_grad_v_init: bool, threshold: Optional[Tensor] = None,
                    need_threshold_grad: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return _triton_backward(grad_spikes, grad_v_last, x, v_init, decay, leaky, decay_is_tau, v_threshold,
                                v_reset, decay_input, surrogate, alpha, spiking, detach_reset, need_decay_grad,
                                need_grad_v_init, threshold, need_threshold_grad)

    forward_op.register_fake(_fake_forward)
    backward_op.register_fake(_fake_backward)
    forward_op.register_autograd(lambda ctx, gs, gv: _neuron_backward(ctx, gs, gv, backward_op),
                                 setup_context=_setup_context)
    _triton_neuron = forward_op


_backend.on_first_choice("triton", _define_triton_neuron_op)


def is_finite_number(value) -> bool:
    """False for NaN and +-inf. Written as arithmetic, not math.isfinite, so that torch.compile with
    dynamic=True, which traces Python floats as symbols (SymFloat), can evaluate it."""
    return value - value == 0


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not is_finite_number(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value if isinstance(value, torch.SymFloat) else float(value)


def _check_one_or_per_channel(t: Tensor, name: str, per_channel: str, x_shape):
    """A float tensor of one element or of one value per channel ([C], dim 2 of x[T, B, C, ...])."""
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.numel() != 1 and (t.dim() != 1 or len(x_shape) < 3 or t.shape[0] != x_shape[2]):
        raise ValueError(f"{name} must be a 1-element tensor or {per_channel}, shape [C] with x of shape "
                         f"[T, B, C, ...]; got {name} of shape {tuple(t.shape)} and x of shape {tuple(x_shape)}")


def _check_decay(leaky: bool, inv_tau, tau, x_shape):
    """LIF: exactly one of inv_tau (float in (0, 1], a 1-element float tensor, or a float tensor [C] of
    one k per channel, dim 2 of x) or tau (float > 1). Tensor values are not checked (no device sync)."""
    if not leaky:
        return  # IF ignores the leak
    if (inv_tau is None) == (tau is None):
        raise ValueError("a LIF neuron needs exactly one of inv_tau (multiply by 1/tau) or tau (divide by tau)")
    if tau is not None:
        if not _finite(tau, "tau") > 1.0:
            raise ValueError(f"tau must be > 1 for a LIF neuron, got {tau}")
    elif isinstance(inv_tau, Tensor):
        _check_one_or_per_channel(inv_tau, "inv_tau", "one k per channel", x_shape)
    elif not 0.0 < _finite(inv_tau, "inv_tau") <= 1.0:
        raise ValueError(f"inv_tau (1/tau) must be in (0, 1], got {inv_tau}")


def _check_threshold(v_threshold, x_shape):
    """v_threshold: a finite number, or a learnable threshold: a float tensor of one element or one value per
    channel ([C], dim 2 of x). Tensor values are not checked (no device sync)."""
    if not isinstance(v_threshold, Tensor):
        return _finite(v_threshold, "v_threshold")
    _check_one_or_per_channel(v_threshold, "v_threshold", "one value per channel", x_shape)
    return v_threshold


def _check_neuron_args(x: Tensor, v_init: Optional[Tensor], neuron: str, surrogate: str, alpha, v_threshold,
                       v_reset, inv_tau, tau,
                       spiking: bool = True) -> Tuple[float, Union[float, Tensor], Optional[float]]:
    """Every argument check of the neuron, for all backends; returns (alpha, v_threshold, v_reset) as floats
    (v_threshold stays a tensor when it is one)."""
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
    if not spiking and surrogate in reference.SURROGATES_WITHOUT_PRIMITIVE:
        raise ValueError(f"spiking=False emits the surrogate's primitive, and {surrogate!r} has none (SpikingJelly "
                         f"defines none); use spiking=True or another surrogate")
    alpha = _finite(reference.SURROGATE_DEFAULT_ALPHA[surrogate] if alpha is None else alpha, "alpha")
    if not alpha > 0:
        raise ValueError(f"alpha (the surrogate's sharpness) must be > 0, got {alpha}")
    v_threshold = _check_threshold(v_threshold, x.shape)
    v_reset = None if v_reset is None else _finite(v_reset, "v_reset")
    _check_decay(neuron == "lif", inv_tau, tau, x.shape)
    if v_init is not None:
        if not isinstance(v_init, Tensor) or not v_init.is_floating_point():
            raise TypeError("v_init must be a floating-point tensor")
        if v_init.device != x.device:
            raise ValueError(f"v_init is on {v_init.device} but x is on {x.device}")
        try:
            torch.broadcast_shapes(v_init.shape, x.shape[1:])
        except RuntimeError:
            raise ValueError(f"v_init of shape {tuple(v_init.shape)} does not broadcast to one time step of x, "
                             f"{tuple(x.shape[1:])}") from None
        if v_init.dim() > x.dim() - 1:
            raise ValueError(f"v_init of shape {tuple(v_init.shape)} has more dimensions than one time step of x")
    return alpha, v_threshold, v_reset


def _is_per_channel(inv_tau) -> bool:
    return isinstance(inv_tau, Tensor) and inv_tau.numel() > 1


def _per_neuron_view(inv_tau: Tensor, x: Tensor) -> Tensor:
    """A per-channel k [C] broadcast to one step of x[T, B, C, ...]: one k per neuron, a view (the
    reference broadcasts it; _decay_tensor copies it for the kernels). Autograd sums its gradient back
    per channel: a plain reduction, deterministic."""
    return inv_tau.reshape((1, -1) + (1,) * (x.dim() - 3)).expand(x.shape[1:])


def _decay_tensor(leaky: bool, inv_tau, tau, x: Tensor) -> Tuple[Tensor, bool]:
    """(decay, decay_is_tau): tau for divide mode, k for multiply mode, in the state dtype on x's device;
    a per-channel k arrives as its per-neuron view (in the state dtype), made contiguous [N] in x's memory
    order: what the kernels read."""
    dtype = _state_dtype(x.dtype)
    if leaky and _is_per_channel(inv_tau):
        return inv_tau.reshape(-1).contiguous(), False
    if leaky and tau is not None:
        return torch.full((1,), float(tau), dtype=dtype, device=x.device), True
    if leaky and isinstance(inv_tau, Tensor):
        return inv_tau.to(device=x.device, dtype=dtype).reshape(1), False
    return torch.full((1,), float(inv_tau) if leaky else 1.0, dtype=dtype, device=x.device), False


def _memory_order(x: Tensor) -> Optional[List[int]]:
    """x's dimensions from the outermost in memory to the innermost, time kept first; None when that is
    x's own order. In this order a dense x with time outermost (steps in channels-last, say) is contiguous,
    so the kernels read its storage as [T, N] without a copy; a strided x is copied in this order."""
    if x.is_contiguous():
        return None
    order = [0] + sorted(range(1, x.dim()), key=lambda d: -x.stride(d))
    return None if order == list(range(x.dim())) else order


def _in_input_layout(order: Optional[List[int]], spikes: Tensor,
                     v_last: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """The outputs, computed in memory order, permuted back to x's dimensions: spikes with x's layout
    (x's strides when x is dense), v_last with the layout of one step."""
    if order is None:
        return spikes, v_last
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return spikes.permute(inverse), (None if v_last is None else v_last.permute([d - 1 for d in inverse[1:]]))


def multistep_neuron(
    x: Tensor,
    inv_tau: Union[float, Tensor, None] = None,
    *,
    tau: Optional[float] = None,
    neuron: str = "lif",
    v_threshold: Union[float, Tensor] = 1.0,
    v_reset: Optional[float] = 0.0,
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "sigmoid",
    alpha: Optional[float] = None,
    spiking: bool = True,
    v_init: Optional[Tensor] = None,
    return_v: bool = True,
    backend: str = "auto",
) -> Tuple[Tensor, Optional[Tensor]]:
    """Run the neuron over x[T, ...]; returns (spikes, v_last), v_last None unless return_v. The spikes
    keep x's memory layout (channels-last steps give channels-last spikes, without copying x), v_last
    the layout of one step.

    LIF takes exactly one of tau (h divides by tau, SpikingJelly's LIFNode) or inv_tau = 1/tau (h
    multiplies by it: a float, or a tensor that may need grad, as ParametricLIFNode). IF ignores both.
    inv_tau may also be a tensor [C] of one k per channel, the channel dim being dim 2 of x[T, B, C, ...]
    (PLIF per channel); its gradient is reduced per channel without atomics (deterministic).
    v_threshold may be a tensor (a learnable threshold): one element, or one value per channel [C] like
    inv_tau; its gradient is reduced the same way.
    """
    alpha, v_threshold, v_reset = _check_neuron_args(x, v_init, neuron, surrogate, alpha, v_threshold, v_reset,
                                                     inv_tau, tau, spiking)
    leaky = neuron == "lif"
    chosen = _backend.reference_under_transforms(_backend.resolve(backend, x.device, x.dtype))
    order = _memory_order(x)
    if leaky and _is_per_channel(inv_tau):  # one k per neuron (a view), permuted with x below
        inv_tau = _per_neuron_view(inv_tau.to(device=x.device, dtype=_state_dtype(x.dtype)), x)
    threshold = None  # a learnable threshold: one v_th per neuron (a view), permuted with x below
    if isinstance(v_threshold, Tensor):
        threshold = v_threshold.to(device=x.device, dtype=_state_dtype(x.dtype))
        threshold = (_per_neuron_view(threshold, x) if _is_per_channel(threshold)
                     else threshold.reshape(()).expand(x.shape[1:]))
    if order is not None:  # run in x's memory order (a view of a dense x); the outputs get x's layout back
        step_order = [d - 1 for d in order[1:]]
        if v_init is not None:
            v_init = v_init.expand(x.shape[1:]).permute(step_order).contiguous()
        if leaky and _is_per_channel(inv_tau):
            inv_tau = inv_tau.permute(step_order)
        if threshold is not None:
            threshold = threshold.permute(step_order)
        x = x.permute(order)
    if chosen == "reference" or x.numel() == 0:
        decay = ({"tau": tau} if tau is not None else {"inv_tau": inv_tau}) if leaky else {}
        spikes, v_last = reference.multistep_neuron(
            x, leaky=leaky, v_threshold=v_threshold if threshold is None else threshold, v_reset=v_reset,
            decay_input=decay_input, detach_reset=detach_reset, surrogate=surrogate, alpha=alpha, spiking=spiking,
            v_init=v_init, **decay)
        return _in_input_layout(order, spikes, v_last if return_v else None)
    steps, step_shape = x.shape[0], x.shape[1:]
    x2d = x.reshape(steps, -1).contiguous()
    if v_init is not None:
        v_init = v_init.to(x.dtype).expand(step_shape).reshape(-1).contiguous()
    decay, decay_is_tau = _decay_tensor(leaky, inv_tau, tau, x)
    if threshold is not None:  # [N] in x's memory order, what the kernels read instead of the float
        threshold, v_threshold = threshold.reshape(-1).contiguous(), 0.0
    op = _triton_neuron if chosen == "triton" else _ExtNeuron.apply
    spikes, v_last = op(x2d, v_init, decay, leaky, decay_is_tau, v_threshold, v_reset, decay_input,
                        SURROGATE_IDS[surrogate], alpha, spiking, detach_reset, return_v, threshold)
    return _in_input_layout(order, spikes.reshape(x.shape), v_last.reshape(step_shape) if return_v else None)


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
    """Multi-step LIF/IF neuron (paper Eq. 1, SpikingJelly 2.0 semantics: the charge divides by tau) over x[T, ...].

    Returns the spikes [T, ...] (x's dtype), and the final membrane potential when return_v.
    tau must be a finite number > 1 for LIF; it is ignored for IF.
    """
    spikes, v_last = multistep_neuron(
        x, tau=tau if neuron == "lif" else None, neuron=neuron, v_threshold=v_threshold, v_reset=v_reset,
        decay_input=decay_input, detach_reset=detach_reset, surrogate=surrogate, alpha=alpha, spiking=spiking,
        v_init=v_init, return_v=return_v, backend=backend)
    return (spikes, v_last) if return_v else spikes
