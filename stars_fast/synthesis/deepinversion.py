"""DeepInversion (Yin et al., 2020) under Fast-Datafree's protocol, with STARS (paper Algorithm 1).

Each `synthesize()` call optimizes a fresh batch of images directly with Adam for `iterations`
steps on

    L = bn * L_BN + oh * CE(teacher(x), y) + adv * L_adv + tv * TV(x) + l2 * ||x||_2
        + lambda_rca * L_RCA + lambda_tar * L_TAR                                   (Eq. 18)

with random sorted targets y, x jittered and flipped per sample before every forward, and x
clipped to valid pixels after every step. L_adv = -mean(mask * KL(teacher || student)) rewards
images on which the student still disagrees with the teacher, masked to the samples where both
predict the same class (Fast-Datafree's "decision adversarial" loss). The student is frozen
(eval mode, no parameter gradients, BatchNorm folded into its convolutions for the round, since
its weights do not change during it) and is run only when the adversarial or STARS term needs it.

Differences from Fast-Datafree's `DeepInvSyntheiszer`, on purpose: its best-loss tracking
aliases the live tensor, so it returns the last iterate, which is what we return outright; its
tiny (-0.001x) student-BN term is left out; jitter and flip are drawn per sample, not per batch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DatasetInfo
from ..models import fold_bn
from .base import SynthesisResult, frozen, jitter_and_flip, pixel_bounds
from .bn_hooks import BNStatsHooks
from .stars_regularizer import StarsRegularizer


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """DeepInversion's image prior: L2 norms of the differences to the right, down and diagonal neighbours."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(torch.norm(d) for d in diffs)


def masked_disagreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """mean over the batch of KL(softmax(t) || softmax(s)), counted only where argmax s == argmax t."""
    kl = F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1), reduction="none").sum(1)
    mask = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    return (kl * mask).mean()


class DeepInversionSynthesizer:
    """Optimizes image batches against a frozen teacher (and frozen student) -> `SynthesisResult`."""

    def __init__(self, teacher: nn.Module, student: nn.Module, info: DatasetInfo, *, batch_size: int,
                 iterations: int, lr_g: float, bn: float, oh: float, adv: float, tv: float = 0.0,
                 l2: float = 0.0, stars: Optional[StarsRegularizer] = None, amp: bool = False, device="cpu"):
        if batch_size < 2 and stars is not None and stars.active:
            raise ValueError("STARS' relational term needs a synthesis batch of at least 2 images")
        self.teacher, self.student, self.info = teacher, student, info
        self.batch_size, self.iterations, self.lr_g = batch_size, iterations, lr_g
        self.bn, self.oh, self.adv, self.tv, self.l2 = bn, oh, adv, tv, l2
        self.stars = stars if stars is not None and stars.active else None
        self.amp, self.device = amp, torch.device(device)

    def synthesize(self, progress=None) -> SynthesisResult:
        """One synthesis round; `progress` (e.g. a tqdm bar) is advanced once per iteration."""
        shape = (self.batch_size, self.info.in_channels, self.info.image_size, self.info.image_size)
        images = torch.randn(shape, device=self.device).requires_grad_()
        targets = torch.randint(0, self.info.num_classes, (self.batch_size,), device=self.device).sort()[0]
        optimizer = torch.optim.Adam([images], lr=self.lr_g, betas=(0.5, 0.99))
        low, high = pixel_bounds(self.info, self.device)
        student = fold_bn(self.student) if self.adv > 0 or self.stars is not None else None
        losses = {}
        with BNStatsHooks(self.teacher) as hooks, frozen(self.teacher):
            for _ in range(self.iterations):
                losses = self.step(images, targets, optimizer, hooks, student)
                with torch.no_grad():
                    images.copy_(torch.maximum(torch.minimum(images, high), low))
                if progress is not None:
                    progress.update(1)
        return SynthesisResult(images.detach(), targets, {k: float(v) for k, v in losses.items()})

    def step(self, images, targets, optimizer, hooks: BNStatsHooks, student: Optional[nn.Module]) -> dict:
        """One optimization step of the images: forward through the teacher (and the frozen, BN-folded
        `student` when given), all loss terms, backward to the images, Adam step. Returns the loss
        terms as detached tensors (no device sync)."""
        inputs = jitter_and_flip(images, flip=self.info.flip)
        zero = images.new_zeros(())
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            t_logits, t_taps = self.teacher(inputs, return_taps=True)
            if student is not None:
                s_logits, s_taps = student(inputs, return_taps=True)
        t_logits = t_logits.float()
        loss_bn = hooks.loss()
        loss_oh = F.cross_entropy(t_logits, targets)
        loss_adv = -masked_disagreement(s_logits.float(), t_logits) if self.adv > 0 else zero
        loss_stars, loss_rca, loss_tar = self.stars(t_taps, s_taps) if self.stars is not None else (zero,) * 3
        loss_tv = total_variation(images) if self.tv > 0 else zero
        loss_l2 = torch.norm(images) if self.l2 > 0 else zero
        loss = (self.bn * loss_bn + self.oh * loss_oh + self.adv * loss_adv + self.tv * loss_tv
                + self.l2 * loss_l2 + loss_stars)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        terms = {"synth_loss": loss, "loss_bn": loss_bn, "loss_oh": loss_oh, "loss_adv": loss_adv,
                 "loss_rca": loss_rca, "loss_tar": loss_tar, "loss_tv": loss_tv, "loss_l2": loss_l2}
        return {k: v.detach() for k, v in terms.items()}
