"""Spiking students: the teachers' architectures with every ReLU replaced by a multi-step neuron.

- s_resnet18 (DAFL CIFAR ResNet-18), s_resnet19, s_resnet20 (the ResNet-19 / ResNet-20 of
  teachers.py) and s_vgg16 mirror their ANN exactly (same conv-BN layout and state-dict names;
  S-ResNet-19 keeps the ANN's single fc, not TET's fc1-LIF-fc2 head); digits_snn mirrors digits_cnn.
- Direct coding: the image is repeated over T time steps, and every conv / BN / linear runs on all
  steps at once with time folded into the batch ([T*B, C, H, W], time-major); each neuron unfolds
  it to [T, B, ...] and runs the fused op. The logits are averaged over T.
- Taps: `model(x, return_taps=True)` -> (logits, taps), one per stage: the input of the stage's
  last neuron (pre-LIF, [T, B, C, H, W]) pooled over T, H and W by stars_fast.pool_features.
- `model.T` may be changed after building; the neurons follow.
"""
from __future__ import annotations

from functools import partial
from typing import List

from torch import Tensor, nn

from ..neurons import make_neuron
from ..ops.stars import pool_features
from .teachers import ARCHITECTURES, VGG, DigitsCNN, ResNet, ResNetCifar, TapNet


class Spiking(nn.Module):
    """A multi-step neuron (stars_fast.neurons) applied to time-folded activations [T*B, ...]; a
    channels-last input gives channels-last spikes, nothing copied (the neuron op reads any dense layout)."""

    def __init__(self, neuron: str = "lif", backend: str = "auto", **options):
        super().__init__()
        self.neuron = make_neuron(neuron, backend=backend, **options)
        self.T = 1  # set by the owning SpikingNet

    def forward(self, x: Tensor) -> Tensor:
        return self.neuron(x.unflatten(0, (self.T, -1))).flatten(0, 1)


class SpikingNet(TapNet):
    """Turns an architecture of teachers.py (listed after it in the bases) into a spiking student:
    direct coding over `T` steps in, logits averaged over T out, taps pooled over T, H, W."""

    @property
    def T(self) -> int:
        return self._T

    @T.setter
    def T(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"T must be >= 1, got {steps}")
        self._T = int(steps)
        for module in self.modules():
            if isinstance(module, Spiking):
                module.T = self._T

    def forward(self, x: Tensor, return_taps: bool = False):
        steps, batch = self.T, x.shape[0]
        seq = x.repeat(steps, *([1] * (x.dim() - 1)))  # [T*B, C, H, W], time-major
        taps: List[Tensor] = [] if return_taps else None
        logits = self.body(seq, taps).unflatten(0, (steps, batch)).mean(0)
        if not return_taps:
            return logits
        return logits, [pool_features(f.unflatten(0, (steps, batch))) for f in taps]


class SpikingResNet(SpikingNet, ResNet):
    """S-ResNet with DAFL / Fast-Datafree names (s_resnet18)."""


class SpikingResNetCifar(SpikingNet, ResNetCifar):
    """S-ResNet with RepDistiller / MPBN names (s_resnet19, s_resnet20)."""


class SpikingVGG(SpikingNet, VGG):
    """S-VGG with Fast-Datafree's VGG layout (s_vgg16)."""


class SpikingDigitsCNN(SpikingNet, DigitsCNN):
    """The digits student (digits_snn)."""


SPIKING_CLASSES = {ResNet: SpikingResNet, ResNetCifar: SpikingResNetCifar, VGG: SpikingVGG,
                   DigitsCNN: SpikingDigitsCNN}
# student name -> the ANN architecture it mirrors (a key of teachers.ARCHITECTURES)
STUDENT_ARCHITECTURES = {
    "s_resnet18": "resnet18",
    "s_resnet19": "resnet19",
    "s_resnet20": "resnet20",
    "s_vgg16": "vgg16",
    "digits_snn": "digits_cnn",
}
STUDENTS = tuple(STUDENT_ARCHITECTURES)


def build_student(name: str, num_classes: int, T: int = 4, neuron: str = "lif", backend: str = "auto",
                  in_channels: int = 3, **neuron_options) -> SpikingNet:
    """Build a spiking student by name (one of STUDENTS), randomly initialised.

    neuron: "lif", "if" or "plif"; backend: the neurons' backend ("auto", "cpu", "reference", ...);
    neuron_options: the neuron's arguments (tau / init_tau, v_threshold, v_reset, surrogate, ...).
    """
    if name not in STUDENT_ARCHITECTURES:
        raise ValueError(f"unknown student {name!r}; expected one of {STUDENTS}")
    cls, arguments = ARCHITECTURES[STUDENT_ARCHITECTURES[name]]
    act = partial(Spiking, neuron, backend, **neuron_options)
    model = SPIKING_CLASSES[cls](*arguments, num_classes, in_channels, act)
    model.T = T
    return model
