"""Spiking neuron modules with SpikingJelly 2.0's semantics (docs/design.md 2.1): multi-step on [T, B, ...]
or single-step, one time step per call.

The constructors take SpikingJelly's arguments, in its order: `LIFNode(tau, decay_input, v_threshold,
v_reset, surrogate_function, detach_reset, step_mode, backend, store_v_seq)`, so code written for
`spikingjelly.activation_based.neuron` runs unchanged with `surrogate_function=surrogate.ATan()`
(Sigmoid, ATan, PiecewiseQuadratic, PiecewiseExp, SoftSign, SuperSpike and Erf objects -- the surrogates of
SpikingJelly's Triton backend; their alpha and spiking flag are taken over) or with our strings "sigmoid" /
"atan" / "triangle" / "piecewise_exp" / "soft_sign" / "super_spike" / "erf" plus `alpha=` (SuperSpike has
no primitive, so no spiking=False). Differences: the default `step_mode` is 'm' (the fused kernels run the
whole sequence in one call; SpikingJelly's default is 's'), `backend` names ours
(SpikingJelly's "torch" and "cupy" mean "reference" and "cuda"), and a multi-step input must be at least
[T, B, features]. Channels-last steps give channels-last spikes (a dense x is read in place, in its layout).

Step modes. 'm': forward(x[T, B, ...]) runs all T steps. 's': forward(x[B, ...]) runs one step and
continues from the previous call's membrane potential, as SpikingJelly's single-step loop
`sum(net(x[t]) for t in range(T)) / T` expects (gradients flow through v from call to call), until
`reset()`. The mode is checked whenever it is set, so `functional.set_step_mode(net, 's')` switches the
neurons for real.

State. `v` is, as in SpikingJelly, the rest value as a float (v_reset, or 0.0 with soft reset) before any
forward and after `reset()`, and after every forward the last step's membrane potential (after its
reset), in the layout of one step. In multi-step mode each forward starts from rest by default -- what
SpikingJelly does when `functional.reset_net(net)` runs after every batch, the usual training loop --
and `v` is only a readout there, detached (it costs one write of a step; keeping its graph would hold
the batch's saved tensors until the next forward). With `stateful=True` the next forward continues from
`v`, as SpikingJelly's memory modules do, until `reset()`. A `v` assigned from outside is a state: the
next single-step or stateful forward starts from it. `reset()` and `detach()` exist in every mode, so
SpikingJelly's `functional.reset_net` and `functional.detach_net` (truncated backpropagation through
time) work on networks built from these modules.

`store_v_seq=True` keeps `v_seq` [T, B, ...], the membrane potential after each step's reset (as
SpikingJelly): in multi-step mode the forward then runs one time step per launch (the fused kernels
keep only the last step's v), slower, and only these layers pay; in single-step mode each call appends
its step, until `reset()`. `v_seq` keeps its graph (a loss may use it); `detach()` cuts it.

SpikingJelly's monitors find layers by isinstance: give them our classes, e.g.
`monitor.OutputMonitor(net, stars_fast.neurons.BaseNode)` (every neuron layer here) or
`(LIFNode, IFNode)`; `monitor.AttributeMonitor("v", ...)` and `("v_seq", ...)` then record tensors.
SpikingJelly's own `neuron.BaseNode` matches none of them (they are not its subclasses).

Learnable threshold (every node; SpikingJelly has none): `learnable_threshold=True` makes `v_threshold` an
`nn.Parameter` initialised to the given value, one scalar, or one per channel with
`per_channel_threshold=True, channels=C` (dim 2 of [T, B, C, ...]). Its gradient is the surrogate's:
dL/dv_th = sum over steps of gv (1 - s) - gh (docs/design.md 2.1), fused on every backend and summed per
channel without atomics. Not carried
over: SpikingJelly's `register_memory` / functional state API (`to_functional_forward`) and its
restart of a single-step state on a change of shape (here a clear error asks for `reset()`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ._backend import BACKENDS
from .ops.lif import SURROGATE_IDS, _finite, _state_dtype, multistep_neuron
from .reference import SURROGATE_DEFAULT_ALPHA, SURROGATES_WITHOUT_PRIMITIVE

# SpikingJelly surrogate class -> (our surrogate, our alpha from its alpha). PiecewiseQuadratic's gradient
# alpha - alpha^2 |u| on |u| <= 1/alpha is our triangle (a - |u|) / a^2 with a = 1 / alpha.
SPIKINGJELLY_SURROGATES = {
    "Sigmoid": ("sigmoid", lambda alpha: alpha),
    "ATan": ("atan", lambda alpha: alpha),
    "PiecewiseQuadratic": ("triangle", lambda alpha: 1.0 / alpha),
    "PiecewiseExp": ("piecewise_exp", lambda alpha: alpha),
    "SoftSign": ("soft_sign", lambda alpha: alpha),
    "SuperSpike": ("super_spike", lambda alpha: alpha),
    "Erf": ("erf", lambda alpha: alpha),
}
SPIKINGJELLY_BACKENDS = {"torch": "reference", "cupy": "cuda"}
STEP_MODES = ("s", "m")


def resolve_surrogate(surrogate_function, alpha: Optional[float]) -> Tuple[str, float, bool]:
    """(surrogate name, alpha, spiking) from one of our strings (+ alpha, default per surrogate) or a
    SpikingJelly surrogate object (its own alpha and spiking flag; then alpha must not be given)."""
    if isinstance(surrogate_function, str):
        if surrogate_function not in SURROGATE_IDS:
            raise ValueError(f"unknown surrogate {surrogate_function!r}; expected one of {tuple(SURROGATE_IDS)} "
                             f"or a SpikingJelly surrogate object ({', '.join(SPIKINGJELLY_SURROGATES)})")
        name, spiking = surrogate_function, True
        alpha = SURROGATE_DEFAULT_ALPHA[name] if alpha is None else _finite(alpha, "alpha")
    else:
        kind = type(surrogate_function)
        if not kind.__module__.startswith("spikingjelly") or kind.__name__ not in SPIKINGJELLY_SURROGATES:
            raise ValueError(f"surrogate_function {kind.__module__}.{kind.__name__} is not supported: give one of "
                             f"{tuple(SURROGATE_IDS)} or a SpikingJelly {', '.join(SPIKINGJELLY_SURROGATES)} object")
        if alpha is not None:
            raise ValueError("alpha is given twice: the SpikingJelly surrogate object carries its own alpha")
        name, to_ours = SPIKINGJELLY_SURROGATES[kind.__name__]
        alpha = to_ours(_finite(surrogate_function.alpha, f"{kind.__name__}.alpha"))
        spiking = bool(surrogate_function.spiking)
        if not spiking and name in SURROGATES_WITHOUT_PRIMITIVE:
            raise ValueError(f"{kind.__name__}(spiking=False) is not supported: SpikingJelly defines no primitive "
                             f"for it (its own forward raises NotImplementedError)")
    if not alpha > 0:
        raise ValueError(f"alpha (the surrogate's sharpness) must be > 0, got {alpha}")
    return name, alpha, spiking


class BaseNode(nn.Module):
    """The neuron layers' common base: give it to SpikingJelly's monitors as their instance filter."""

    def __init__(self, *, leaky: bool, decay_input: bool, v_threshold: float, v_reset: Optional[float],
                 surrogate_function, alpha: Optional[float], detach_reset: bool, step_mode: str, backend: str,
                 store_v_seq: bool, stateful: bool, learnable_threshold: bool = False,
                 per_channel_threshold: bool = False, channels: Optional[int] = None):
        super().__init__()
        backend = SPIKINGJELLY_BACKENDS.get(backend, backend)
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + BACKENDS} "
                             f"(or SpikingJelly's {tuple(SPIKINGJELLY_BACKENDS)})")
        self.surrogate, self.alpha, self.spiking = resolve_surrogate(surrogate_function, alpha)
        self.leaky = leaky
        self.decay_input = bool(decay_input)
        self.v_threshold = _finite(v_threshold, "v_threshold")
        if per_channel_threshold and not learnable_threshold:
            raise ValueError("per_channel_threshold=True needs learnable_threshold=True")
        if learnable_threshold:  # a Parameter in place of the float (the op takes either); channels: checked by
            # the subclass (_check_channels)
            shape = (channels,) if per_channel_threshold else ()
            self.v_threshold = nn.Parameter(torch.full(shape, self.v_threshold))
        self.v_reset = None if v_reset is None else _finite(v_reset, "v_reset")
        self.detach_reset = bool(detach_reset)
        self.step_mode = step_mode
        self.backend = backend
        self.stateful = bool(stateful)
        self.store_v_seq = bool(store_v_seq)
        self.reset()

    @property
    def v(self) -> Union[float, torch.Tensor]:
        """The last step's membrane potential (after its reset); the rest value, a float, before any forward."""
        return self._v

    @v.setter
    def v(self, value: Union[float, torch.Tensor]) -> None:
        self._v, self._v_carried = value, True  # set from outside: the next forward continues from it

    @property
    def step_mode(self) -> str:
        """'m' (forward takes [T, B, ...]) or 's' (forward takes one step [B, ...] and keeps v)."""
        return self._step_mode

    @step_mode.setter
    def step_mode(self, mode: str) -> None:
        if mode not in STEP_MODES:
            raise ValueError(f"step_mode must be 's' (one step per call) or 'm' (the whole [T, B, ...] sequence), "
                             f"got {mode!r}")
        self._step_mode = mode

    def reset(self) -> None:
        """Return to rest: v = v_reset (0.0 for soft reset), a float as SpikingJelly's; v_seq = None."""
        self._v = 0.0 if self.v_reset is None else self.v_reset
        self._v_carried = False  # whether a single-step or stateful forward continues from v
        self.v_seq: Optional[torch.Tensor] = None

    def detach(self) -> None:
        """Cut the graph behind v and v_seq (SpikingJelly's detach_net, truncated BPTT)."""
        if isinstance(self._v, torch.Tensor):
            self._v = self._v.detach()
        if self.v_seq is not None:
            self.v_seq = self.v_seq.detach()

    def _carried_v(self, x: torch.Tensor, step_shape: torch.Size) -> Optional[torch.Tensor]:
        """The v a single-step or stateful forward starts from (None: rest), checked against one step."""
        if not self._v_carried:
            return None
        if not isinstance(self._v, torch.Tensor):
            return x.new_full((), float(self._v))
        if self._v.shape != step_shape:
            mode = "in step_mode='s'" if self.step_mode == "s" else "stateful"
            raise ValueError(f"{type(self).__name__} {mode} holds a state of shape {tuple(self._v.shape)} but got "
                             f"a step of shape {tuple(step_shape)}: call reset() (functional.reset_net) between "
                             f"sequences")
        return self._v

    def _decay(self) -> dict:
        return {}

    def _run(self, x: torch.Tensor, v_init: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(spikes, v_last): v_last always, as SpikingJelly sets v after every forward."""
        return multistep_neuron(
            x, **self._decay(), neuron="lif" if self.leaky else "if", v_threshold=self.v_threshold,
            v_reset=self.v_reset, decay_input=self.decay_input, detach_reset=self.detach_reset,
            surrogate=self.surrogate, alpha=self.alpha, spiking=self.spiking, v_init=v_init,
            return_v=True, backend=self.backend)

    def _run_step_by_step(self, x: torch.Tensor, v_init: Optional[torch.Tensor]):
        """(spikes, v_seq): one launch per step, the only way to see every step's v (the fused kernels keep
        the last). Steps chained in the kernels' state dtype (fp32 for half x), so the spikes are the fused
        call's; gradients flow through both."""
        steps = x.to(_state_dtype(x.dtype))
        v, spikes, v_seq = v_init, [], []
        for step in steps.split(1):
            s, v = self._run(step, v)
            spikes.append(s[0])
            v_seq.append(v)
        return torch.stack(spikes).to(x.dtype), torch.stack(v_seq).to(x.dtype)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One time step x[B, ...] from the carried v (rest after reset()); keeps the new v (and appends it
        to v_seq when store_v_seq)."""
        if x.dim() < 1:
            raise ValueError(f"{type(self).__name__} in step_mode='s' expects one step [B, ...], got a scalar")
        v_init = self._carried_v(x, x.shape)
        spikes, v = self._run(x.unsqueeze(0), v_init)
        if self.store_v_seq:  # a sequence from rest starts a new v_seq
            self.v_seq = v.unsqueeze(0) if v_init is None or self.v_seq is None else torch.cat((self.v_seq, v[None]))
        self._v, self._v_carried = v, True
        return spikes[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor [T, B, ...], got {type(x).__name__}")
        if self.step_mode == "s":
            return self.single_step_forward(x)
        if x.dim() < 3:
            raise ValueError(
                f"{type(self).__name__} expects a multi-step input [T, B, ...] (time first, then batch, then "
                f"features), got shape {tuple(x.shape)}. Without a time dimension, repeat the input over T "
                f"steps: x.unsqueeze(0).repeat(T, *([1] * x.dim())); a [T, N] sequence needs a batch "
                f"dimension: x.unsqueeze(1)")
        v_init = self._carried_v(x, x.shape[1:]) if self.stateful else None
        if self.store_v_seq and x.shape[0] > 0:
            spikes, self.v_seq = self._run_step_by_step(x, v_init)
            v_last = self.v_seq[-1]
        else:
            spikes, v_last = self._run(x, v_init)
            self.v_seq = x.new_empty(x.shape) if self.store_v_seq else None  # T = 0: no step to keep
        self._v, self._v_carried = (v_last, True) if self.stateful else (v_last.detach(), False)
        return spikes

    def extra_repr(self) -> str:
        threshold = self.v_threshold
        if isinstance(threshold, torch.Tensor):  # a learnable threshold: its value, or its shape per channel
            threshold = f"learnable {list(threshold.shape)}" if threshold.dim() else \
                f"{threshold.item():.4g} (learnable)"
        return (f"v_threshold={threshold}, v_reset={self.v_reset}, surrogate={self.surrogate}, "
                f"alpha={self.alpha}, detach_reset={self.detach_reset}, step_mode={self.step_mode}, "
                f"backend={self.backend}" + (", stateful=True" if self.stateful else ""))


SurrogateArg = Union[str, object]


class LIFNode(BaseNode):
    """LIF: h = v + (x - (v - v_reset)) / tau (decay_input) or h = v - (v - v_reset) / tau + x; the charge
    divides by tau, as SpikingJelly's LIFNode."""

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate_function: Optional[SurrogateArg] = None,
                 detach_reset: bool = False, step_mode: str = "m", backend: str = "auto", store_v_seq: bool = False,
                 *, alpha: Optional[float] = None, surrogate: Optional[str] = None, stateful: bool = False,
                 learnable_threshold: bool = False, per_channel_threshold: bool = False,
                 channels: Optional[int] = None):
        if not _finite(tau, "tau") > 1.0:
            raise ValueError(f"tau must be > 1, got {tau}")
        _check_channels(channels, per_channel_threshold=per_channel_threshold)
        super().__init__(leaky=True, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate_function=_pick_surrogate(surrogate_function, surrogate), alpha=alpha,
                         detach_reset=detach_reset, step_mode=step_mode, backend=backend, store_v_seq=store_v_seq,
                         stateful=stateful, learnable_threshold=learnable_threshold,
                         per_channel_threshold=per_channel_threshold, channels=channels)
        self.tau = float(tau)

    def _decay(self) -> dict:
        return {"tau": self.tau}

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + super().extra_repr()


class IFNode(BaseNode):
    """IF: h = v + x."""

    def __init__(self, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                 surrogate_function: Optional[SurrogateArg] = None, detach_reset: bool = False, step_mode: str = "m",
                 backend: str = "auto", store_v_seq: bool = False, *, alpha: Optional[float] = None,
                 surrogate: Optional[str] = None, stateful: bool = False, learnable_threshold: bool = False,
                 per_channel_threshold: bool = False, channels: Optional[int] = None):
        _check_channels(channels, per_channel_threshold=per_channel_threshold)
        super().__init__(leaky=False, decay_input=True, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate_function=_pick_surrogate(surrogate_function, surrogate), alpha=alpha,
                         detach_reset=detach_reset, step_mode=step_mode, backend=backend, store_v_seq=store_v_seq,
                         stateful=stateful, learnable_threshold=learnable_threshold,
                         per_channel_threshold=per_channel_threshold, channels=channels)


class ParametricLIFNode(BaseNode):
    """PLIF: LIF with a learnable w and 1/tau = k = sigmoid(w) (the charge multiplies by k, as
    SpikingJelly's ParametricLIFNode), w initialised to -log(init_tau - 1).

    w is one scalar, as SpikingJelly's; with `per_channel=True, channels=C` it is a vector [C], one time
    constant per channel: k_c = sigmoid(w_c) for the channels at dim 2 of a multi-step input [T, B, C, ...]
    (dim 1 of a single step [B, C, ...]; [T, B, C] needs no spatial dims). Fused on every backend; the
    gradient of w is summed per channel without atomics (deterministic)."""

    def __init__(self, init_tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate_function: Optional[SurrogateArg] = None,
                 detach_reset: bool = False, step_mode: str = "m", backend: str = "auto", store_v_seq: bool = False,
                 *, alpha: Optional[float] = None, surrogate: Optional[str] = None, stateful: bool = False,
                 per_channel: bool = False, channels: Optional[int] = None, learnable_threshold: bool = False,
                 per_channel_threshold: bool = False):
        if not _finite(init_tau, "init_tau") > 1.0:
            raise ValueError(f"init_tau must be > 1, got {init_tau}")
        _check_channels(channels, per_channel=per_channel, per_channel_threshold=per_channel_threshold)
        super().__init__(leaky=True, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate_function=_pick_surrogate(surrogate_function, surrogate), alpha=alpha,
                         detach_reset=detach_reset, step_mode=step_mode, backend=backend, store_v_seq=store_v_seq,
                         stateful=stateful, learnable_threshold=learnable_threshold,
                         per_channel_threshold=per_channel_threshold, channels=channels)
        self.per_channel = bool(per_channel)
        self.channels = channels
        w0 = -math.log(init_tau - 1.0)
        self.w = nn.Parameter(torch.full((channels,), w0) if per_channel else torch.tensor(w0))

    def inv_tau(self) -> torch.Tensor:
        """k = 1/tau = sigmoid(w): a scalar, or [C] per channel."""
        return self.w.sigmoid()

    def _decay(self) -> dict:
        return {"inv_tau": self.inv_tau()}

    def _run(self, x: torch.Tensor, v_init: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.per_channel and (x.dim() < 3 or x.shape[2] != self.channels):
            shape = tuple(x.shape) if self.step_mode == "m" else tuple(x.shape[1:])
            where = "dim 2 of a multi-step input [T, B, C, ...]" if self.step_mode == "m" else \
                "dim 1 of a single step [B, C, ...]"
            raise ValueError(f"ParametricLIFNode(per_channel=True, channels={self.channels}) expects its "
                             f"{self.channels} channels at {where}, got shape {shape}")
        return super()._run(x, v_init)

    def extra_repr(self) -> str:
        tau = f"channels={self.channels}, per_channel=True" if self.per_channel else \
            f"tau={1.0 / self.w.sigmoid().item():.4f}"
        return f"{tau}, decay_input={self.decay_input}, " + super().extra_repr()


def _check_channels(channels: Optional[int], **per_channel_flags: bool) -> None:
    """channels, the number of channels: an int >= 1 when one of the node's per-channel options is on, else
    None (it would be ignored)."""
    used = [name for name, on in per_channel_flags.items() if on]
    if used and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
        raise ValueError(f"{used[0]}=True needs channels, the number of channels (an int >= 1), got {channels!r}")
    if not used and channels is not None:
        raise ValueError(f"channels is only used with {' or '.join(f'{name}=True' for name in per_channel_flags)}")


def _pick_surrogate(surrogate_function: Optional[SurrogateArg], surrogate: Optional[str]) -> SurrogateArg:
    """`surrogate=` is our short name for `surrogate_function=`; giving both is an error; neither: "sigmoid"
    (alpha 4, SpikingJelly's default Sigmoid())."""
    if surrogate is not None and surrogate_function is not None:
        raise ValueError("give the surrogate once: surrogate_function= or surrogate=, not both")
    chosen = surrogate if surrogate is not None else surrogate_function
    return "sigmoid" if chosen is None else chosen


NEURON_KINDS = {"lif": LIFNode, "if": IFNode, "plif": ParametricLIFNode}


def make_neuron(kind: str, backend: str = "auto", **options) -> nn.Module:
    """Build a neuron module by name: "lif", "if" or "plif" (options as the module's arguments)."""
    if kind not in NEURON_KINDS:
        raise ValueError(f"unknown neuron {kind!r}; expected one of {tuple(NEURON_KINDS)}")
    return NEURON_KINDS[kind](backend=backend, **options)
