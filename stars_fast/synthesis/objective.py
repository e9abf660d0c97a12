"""What the synthesizers (DeepInversion, CMI, NAYER) share: the `Synthesizer` interface the driver
uses, and the teacher-side synthesis objective with STARS (Eq. 18):

    bn * L_BN + oh * CE(teacher(x), y) + adv * L_adv + lambda_rca * L_RCA + lambda_tar * L_TAR

L_BN comes from hooks on every teacher BatchNorm (bn_hooks.py); L_adv = -mean(mask * KL(teacher ||
student)) over the samples where both nets predict the same class (Fast-Datafree's "decision
adversarial" loss); the STARS term compares the teacher's taps with the frozen student's taps.
Each method adds its own terms (image priors, the contrastive loss) on top.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import fold_bn
from .base import SynthesisResult, frozen
from .bn_hooks import BNStatsHooks
from .stars_regularizer import StarsRegularizer


class Synthesizer(abc.ABC):
    """The interface of a synthesizer, as the training driver uses it.

    The driver calls `set_epoch(epoch)` (0-based) at the start of every epoch, then `synthesize()`
    once per round; `state_dict()` / `load_state_dict()` carry what persists between rounds (a
    generator, a memory bank) through checkpoints, as tensors and plain Python types.
    """

    epoch = 0

    @abc.abstractmethod
    def synthesize(self, progress=None) -> SynthesisResult:
        """One synthesis round; `progress` (e.g. a tqdm bar) is advanced once per optimization step."""

    @property
    @abc.abstractmethod
    def steps_per_round(self) -> int:
        """Optimization steps of the next `synthesize()` call (for progress bars)."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        """Nothing persists between rounds unless a subclass says otherwise."""


def masked_disagreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """mean over the batch of KL(softmax(t) || softmax(s)), counted only where argmax s == argmax t."""
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction="none").sum(1)
    mask = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return (kl * mask).mean()


@dataclass
class InversionLoss:
    """One evaluation of the objective: the loss (with its graph), its terms (detached, for the log),
    and the teacher's taps (with their graph; CMI's instance features)."""

    loss: Tensor
    terms: Dict[str, Tensor]
    teacher_taps: List[Tensor]


def channels_last_on_cpu(model: nn.Module) -> nn.Module:
    """`model` (in place) with channels-last weights, so that its convolutions run on channels-last
    activations, when it lives on the CPU: oneDNN's convolutions are faster so (one synthesis step
    ResNet-34 -> S-ResNet-18, B=32, fused backend: 5.19 s NCHW, 4.43 s channels-last). Outputs are
    the same up to float rounding. GPU models are left as they are (not measured there)."""
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


class InversionObjective:
    """The shared objective on a frozen teacher and a frozen student; see the module docstring."""

    def __init__(self, teacher: nn.Module, student: nn.Module, *, bn: float, oh: float, adv: float,
                 stars: Optional[StarsRegularizer] = None, amp: bool = False):
        self.teacher, self.student = channels_last_on_cpu(teacher), student
        self.bn, self.oh, self.adv = bn, oh, adv
        self.stars = stars if stars is not None and stars.active else None
        self.amp = amp

    @contextlib.contextmanager
    def round(self, adversarial: bool = True) -> Iterator[Callable[[Tensor, Tensor], InversionLoss]]:
        """One synthesis round: BN hooks on the teacher, both nets frozen, the student's BatchNorm folded
        into its convolutions (its weights do not change during the round; it runs only when the
        adversarial or STARS term needs it) and, like the teacher, channels-last on the CPU. Yields
        `loss(inputs, targets) -> InversionLoss`; `adversarial=False` drops the adversarial term
        (NAYER's warm-up)."""
        adv = self.adv if adversarial else 0.0
        needs_student = adv > 0 or self.stars is not None
        student = channels_last_on_cpu(fold_bn(self.student)) if needs_student else None
        with BNStatsHooks(self.teacher) as hooks, frozen(self.teacher):
            yield partial(self._loss, hooks=hooks, student=student, adv=adv)

    def _loss(self, inputs: Tensor, targets: Tensor, *, hooks: BNStatsHooks, student: Optional[nn.Module],
              adv: float) -> InversionLoss:
        zero = inputs.new_zeros(())
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=self.amp):
            t_logits, t_taps = self.teacher(inputs, return_taps=True)
            if student is not None:
                s_logits, s_taps = student(inputs, return_taps=True)
        t_logits = t_logits.float()
        loss_bn = hooks.loss()
        loss_oh = F.cross_entropy(t_logits, targets)
        loss_adv = -masked_disagreement(s_logits.float(), t_logits) if adv > 0 else zero
        loss_stars, loss_rca, loss_tar = self.stars(t_taps, s_taps) if self.stars is not None else (zero,) * 3
        loss = self.bn * loss_bn + self.oh * loss_oh + adv * loss_adv + loss_stars
        terms = {"loss_bn": loss_bn, "loss_oh": loss_oh, "loss_adv": loss_adv, "loss_rca": loss_rca,
                 "loss_tar": loss_tar}
        return InversionLoss(loss, {k: v.detach() for k, v in terms.items()}, t_taps)


class BestSoFar:
    """Keeps the tensors of the step with the lowest loss so far (Fast-Datafree's `best_inputs`),
    with torch.where instead of a comparison on the host, so no step waits for the device."""

    def __init__(self):
        self.loss: Optional[Tensor] = None
        self.tensors: List[Tensor] = []

    def update(self, loss: Tensor, *tensors: Tensor) -> None:
        loss, tensors = loss.detach(), [t.detach() for t in tensors]
        if self.loss is None:
            self.loss, self.tensors = loss, tensors
            return
        better = loss < self.loss
        self.loss = torch.where(better, loss, self.loss)
        self.tensors = [torch.where(better, new, old) for new, old in zip(tensors, self.tensors)]
