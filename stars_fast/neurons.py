"""Multi-step spiking neuron modules on [T, B, ...] (SpikingJelly 2.0 multi-step semantics).

Every module is stateless between calls (the membrane starts at v_reset, or 0 for soft reset, each
forward) and runs the fused op `stars_fast.multistep_lif` on the chosen backend.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .ops.lif import multistep_neuron


class _MultiStepNeuron(nn.Module):
    def __init__(self, *, leaky: bool, decay_input: bool, v_threshold: float, v_reset: Optional[float],
                 surrogate: str, alpha: Optional[float], detach_reset: bool, backend: str):
        super().__init__()
        self.leaky = leaky
        self.decay_input = decay_input
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.surrogate = surrogate
        self.alpha = alpha
        self.detach_reset = detach_reset
        self.backend = backend

    def inv_tau(self):
        return 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spikes, _ = multistep_neuron(
            x, self.inv_tau(), neuron="lif" if self.leaky else "if", v_threshold=self.v_threshold,
            v_reset=self.v_reset, decay_input=self.decay_input, detach_reset=self.detach_reset,
            surrogate=self.surrogate, alpha=self.alpha, backend=self.backend)
        return spikes

    def extra_repr(self) -> str:
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, surrogate={self.surrogate}, "
                f"detach_reset={self.detach_reset}, backend={self.backend}")


class LIFNode(_MultiStepNeuron):
    """LIF: h = v + (x - (v - v_reset)) / tau (decay_input) or h = v - (v - v_reset) / tau + x."""

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate: str = "sigmoid", alpha: Optional[float] = None,
                 detach_reset: bool = False, backend: str = "auto"):
        if not tau > 1.0:
            raise ValueError(f"tau must be > 1, got {tau}")
        super().__init__(leaky=True, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate=surrogate, alpha=alpha, detach_reset=detach_reset, backend=backend)
        self.tau = tau

    def inv_tau(self):
        return 1.0 / self.tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self.decay_input}, " + super().extra_repr()


class IFNode(_MultiStepNeuron):
    """IF: h = v + x."""

    def __init__(self, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0, surrogate: str = "sigmoid",
                 alpha: Optional[float] = None, detach_reset: bool = False, backend: str = "auto"):
        super().__init__(leaky=False, decay_input=True, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate=surrogate, alpha=alpha, detach_reset=detach_reset, backend=backend)


class ParametricLIFNode(_MultiStepNeuron):
    """PLIF: LIF with a learnable scalar w, 1/tau = sigmoid(w), w initialised to -log(init_tau - 1)."""

    def __init__(self, init_tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: Optional[float] = 0.0, surrogate: str = "sigmoid", alpha: Optional[float] = None,
                 detach_reset: bool = False, backend: str = "auto"):
        if not init_tau > 1.0:
            raise ValueError(f"init_tau must be > 1, got {init_tau}")
        super().__init__(leaky=True, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                         surrogate=surrogate, alpha=alpha, detach_reset=detach_reset, backend=backend)
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    def inv_tau(self):
        return self.w.sigmoid()

    def extra_repr(self) -> str:
        return f"tau={1.0 / self.w.sigmoid().item():.4f}, decay_input={self.decay_input}, " + super().extra_repr()


NEURON_KINDS = {"lif": LIFNode, "if": IFNode, "plif": ParametricLIFNode}


def make_neuron(kind: str, backend: str = "auto", **options) -> nn.Module:
    """Build a neuron module by name: "lif", "if" or "plif" (options as the module's arguments)."""
    if kind not in NEURON_KINDS:
        raise ValueError(f"unknown neuron {kind!r}; expected one of {tuple(NEURON_KINDS)}")
    return NEURON_KINDS[kind](backend=backend, **options)
