"""What the synthesizers (DeepInversion, CMI, NAYER) share: the `Synthesizer` interface the driver
uses, and the teacher-side synthesis objective with STARS (Eq. 18):

    bn * (L_BN - student_bn * L_BN(student)) + oh * CE(teacher(x), y) + adv * L_adv
        + lambda_rca * L_RCA + lambda_tar * L_TAR

L_BN comes from hooks on every teacher BatchNorm (bn_hooks.py; NAYER's momentum target with
`bn_momentum` > 0). The adversarial term is either CMI's and NAYER's "decision adversarial" loss
L_adv = -mean(mask * KL(teacher || student)) over the samples where both nets predict the same
class ("masked_kl"), or DeepInversion's L_adv = -JS(student, teacher) at temperature 3, unmasked,
with Fast-Datafree's clamps ("jsdiv"); DeepInversion also subtracts 0.001 x the student's own
BN-statistics loss (`student_bn`). The STARS term compares the teacher's taps with the frozen
student's taps. Each method adds its own terms (image priors, the contrastive loss) on top.

Several processes (torchrun): every batch-level quantity is computed over all processes' images
(collectives.py): the BN moments, the batch means of the cross-entropy and adversarial terms, and
the STARS loss on the gathered taps of the full batch (RCA's Gram matrix, TAR's quantiles), so
every process holds the loss that one process would compute on the whole batch, and its images
get that loss's gradient.
"""
from __future__ import annotations

import abc
import contextlib
import copy
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import fold_bn, freeze
from .base import SynthesisResult, frozen
from .bn_hooks import BNStatsHooks
from .collectives import all_gather_batch, all_reduce_sum
from .stars_regularizer import StarsRegularizer

ADVERSARIAL_LOSSES = ("masked_kl", "jsdiv")


class Synthesizer(abc.ABC):
    """The interface of a synthesizer, as the training driver uses it.

    The driver calls `set_epoch(epoch)` (0-based) at the start of every epoch, then `synthesize()`
    once per round; `state_dict()` / `load_state_dict()` carry what persists between rounds (a
    generator, a memory bank) through checkpoints, as tensors and plain Python types.
    """

    epoch = 0
    grad_shares_every = 0  # --grad-shares: every N-th step measures each term's gradient norm (0: never)

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


def batch_mean(per_sample: Tensor) -> Tensor:
    """The mean of a per-sample loss over the whole batch (over every process's share under torchrun)."""
    count = all_reduce_sum(per_sample.new_tensor(float(per_sample.shape[0])))
    return all_reduce_sum(per_sample.sum()) / count


def masked_disagreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per sample KL(softmax(t) || softmax(s)), counted only where argmax s == argmax t (else 0)."""
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction="none").sum(1)
    return kl * (student_logits.argmax(1) == teacher_logits.argmax(1)).float()


def js_divergence(student_logits: Tensor, teacher_logits: Tensor, T: float = 3.0) -> Tensor:
    """Per sample, Fast-Datafree's `jsdiv`: P = softmax(s/T), Q = softmax(t/T), M = (P + Q) / 2, each
    clamped to [0.01, 0.99] after M is formed; 0.5 * sum M (log M - log P) + 0.5 * sum M (log M - log Q)."""
    p, q = F.softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    return 0.5 * (m * (m.log() - p.log())).sum(1) + 0.5 * (m * (m.log() - q.log())).sum(1)


@dataclass
class InversionLoss:
    """One evaluation of the objective: the loss (with its graph) and its terms (detached, for the log);
    `weighted`, when asked for (measure=True), each weighted term with its graph (their sum is `loss`)."""

    loss: Tensor
    terms: Dict[str, Tensor]
    weighted: Optional[Dict[str, Tensor]] = None


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
    """The shared objective on a frozen teacher and a frozen student; see the module docstring.

    `bn_momentum` > 0: NAYER's momentum BN target; the moving averages (`bn_moving`) persist
    across rounds and are updated by `end_batch()` after each synthesized batch."""

    def __init__(self, teacher: nn.Module, student: nn.Module, *, bn: float, oh: float, adv: float,
                 stars: Optional[StarsRegularizer] = None, amp: bool = False, adversarial: str = "masked_kl",
                 student_bn: float = 0.0, bn_momentum: float = 0.0):
        if adversarial not in ADVERSARIAL_LOSSES:
            raise ValueError(f"unknown adversarial loss {adversarial!r}; expected one of {ADVERSARIAL_LOSSES}")
        if not 0.0 <= bn_momentum < 1.0:
            raise ValueError(f"the BN momentum must be in [0, 1), got {bn_momentum}")
        self.teacher, self.student = channels_last_on_cpu(teacher), student
        self.bn, self.oh, self.adv = bn, oh, adv
        self.stars = stars if stars is not None and stars.active else None
        self.amp, self.adversarial, self.student_bn = amp, adversarial, student_bn
        self.bn_momentum = bn_momentum
        self.bn_moving: Optional[List] = None
        self._hooks: Optional[BNStatsHooks] = None

    def stars_on(self, epoch: int) -> bool:
        """Whether the STARS term is in the objective at `epoch` (0-based; --stars-start-epoch)."""
        return self.stars is not None and epoch >= self.stars.start_epoch

    @contextlib.contextmanager
    def round(self, adversarial: bool = True, stars: bool = True
              ) -> Iterator[Callable[[Tensor, Tensor], InversionLoss]]:
        """One synthesis round: BN hooks on the teacher, both nets frozen, the student (run only when
        the adversarial or STARS term needs it) with its BatchNorm folded into its convolutions (its
        weights do not change during the round) unless its BN-statistics term needs the BN inputs,
        and, like the teacher, channels-last on the CPU. Yields `loss(inputs, targets) ->
        InversionLoss`; `adversarial=False` drops the adversarial term (NAYER's warm-up) and
        `stars=False` the STARS term (before --stars-start-epoch)."""
        adv = self.adv if adversarial else 0.0
        stars = self.stars if stars else None
        student_bn = self.student_bn if adv > 0 else 0.0  # Fast-Datafree runs the student for the adversarial term only
        student = None
        if student_bn:
            student = channels_last_on_cpu(freeze(copy.deepcopy(self.student)))
        elif adv > 0 or stars is not None:
            student = channels_last_on_cpu(fold_bn(self.student))
        with contextlib.ExitStack() as stack:
            hooks = stack.enter_context(BNStatsHooks(self.teacher, self.bn_momentum, self.bn_moving))
            student_hooks = stack.enter_context(BNStatsHooks(student)) if student_bn else None
            stack.enter_context(frozen(self.teacher))
            self._hooks = hooks
            try:
                yield partial(self._loss, hooks=hooks, student=student, adv=adv, stars=stars,
                              student_hooks=student_hooks, student_bn=student_bn)
            finally:
                self._hooks = None

    def end_batch(self) -> None:
        """After the last step of a synthesized batch (inside `round`): NAYER's moving-average update
        of the BN target from that step's statistics (nothing without a momentum)."""
        if self.bn_momentum > 0:
            self._hooks.update_moving()
            self.bn_moving = self._hooks.moving_state()

    def _loss(self, inputs: Tensor, targets: Tensor, measure: bool = False, *, hooks: BNStatsHooks,
              student: Optional[nn.Module], adv: float, stars: Optional[StarsRegularizer],
              student_hooks: Optional[BNStatsHooks], student_bn: float) -> InversionLoss:
        zero = inputs.new_zeros(())
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=self.amp):
            t_logits, t_taps = self.teacher(inputs, return_taps=True)
            if student is not None:
                s_logits, s_taps = student(inputs, return_taps=True)
        t_logits = t_logits.float()
        loss_bn = hooks.loss()
        loss_bn_student = student_hooks.loss() if student_hooks is not None else zero
        loss_oh = batch_mean(F.cross_entropy(t_logits, targets, reduction="none"))
        loss_adv = zero
        if adv > 0:
            disagreement = (js_divergence(s_logits.float(), t_logits) if self.adversarial == "jsdiv"
                            else masked_disagreement(s_logits.float(), t_logits))
            loss_adv = -batch_mean(disagreement)
        loss_stars = loss_rca = loss_tar = zero
        if stars is not None:
            taps = ([all_gather_batch(t) for t in t_taps], [all_gather_batch(s) for s in s_taps])
            loss_stars, loss_rca, loss_tar = stars(*taps)
        loss = self.bn * (loss_bn - student_bn * loss_bn_student) + self.oh * loss_oh + adv * loss_adv + loss_stars
        terms = {"loss_bn": loss_bn, "loss_oh": loss_oh, "loss_adv": loss_adv, "loss_rca": loss_rca,
                 "loss_tar": loss_tar}
        if student_hooks is not None:
            terms["loss_bn_student"] = loss_bn_student
        weighted = None
        if measure:
            weighted = {"bn": self.bn * (loss_bn - student_bn * loss_bn_student), "oh": self.oh * loss_oh,
                        "adv": adv * loss_adv, **(stars.terms(*taps) if stars is not None else {})}
        return InversionLoss(loss, {k: v.detach() for k, v in terms.items()}, weighted)


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
