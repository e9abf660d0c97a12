"""DeepInversion (Yin et al., 2020) under Fast-Datafree's protocol, with STARS (paper Algorithm 1).

Each `synthesize()` call optimizes a fresh batch of images directly with Adam for `iterations`
steps on

    L = bn * L_BN + oh * CE(teacher(x), y) + adv * L_adv + tv * TV(x) + l2 * ||x||_2
        + lambda_rca * L_RCA + lambda_tar * L_TAR                                   (Eq. 18)

with random sorted targets y, x jittered and flipped per sample before every forward, and x
clipped to valid pixels after every step. All but the image priors are the objective the three
synthesizers share (objective.py): L_adv = -mean(mask * KL(teacher || student)) rewards images on
which the student still disagrees with the teacher, masked to the samples where both predict the
same class (Fast-Datafree's "decision adversarial" loss); the student is frozen (eval mode, no
parameter gradients, BatchNorm folded into its convolutions for the round, since its weights do
not change during it) and is run only when the adversarial or STARS term needs it.

Differences from Fast-Datafree's `DeepInvSyntheiszer`, on purpose: its best-loss tracking
aliases the live tensor, so it returns the last iterate, which is what we return outright; its
tiny (-0.001x) student-BN term is left out; jitter and flip are drawn per sample, not per batch.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..data import DatasetInfo
from .base import SynthesisResult, jitter_and_flip, pixel_bounds
from .objective import InversionObjective, Synthesizer
from .stars_regularizer import StarsRegularizer


def total_variation(x: Tensor) -> Tensor:
    """DeepInversion's image prior: L2 norms of the differences to the right, down and diagonal neighbours."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(torch.norm(d) for d in diffs)


class DeepInversionSynthesizer(Synthesizer):
    """Optimizes image batches against a frozen teacher (and frozen student) -> `SynthesisResult`."""

    def __init__(self, teacher: nn.Module, student: nn.Module, info: DatasetInfo, *, batch_size: int,
                 iterations: int, lr_g: float, bn: float, oh: float, adv: float, tv: float = 0.0,
                 l2: float = 0.0, stars: Optional[StarsRegularizer] = None, amp: bool = False, device="cpu"):
        if batch_size < 2 and stars is not None and stars.active:
            raise ValueError("STARS' relational term needs a synthesis batch of at least 2 images")
        self.info, self.batch_size, self.iterations, self.lr_g = info, batch_size, iterations, lr_g
        self.tv, self.l2, self.device = tv, l2, torch.device(device)
        self.objective = InversionObjective(teacher, student, bn=bn, oh=oh, adv=adv, stars=stars, amp=amp)

    @property
    def steps_per_round(self) -> int:
        return self.iterations

    def synthesize(self, progress=None) -> SynthesisResult:
        shape = (self.batch_size, self.info.in_channels, self.info.image_size, self.info.image_size)
        images = torch.randn(shape, device=self.device).requires_grad_()
        targets = torch.randint(0, self.info.num_classes, (self.batch_size,), device=self.device).sort()[0]
        optimizer = torch.optim.Adam([images], lr=self.lr_g, betas=(0.5, 0.99))
        low, high = pixel_bounds(self.info, self.device)
        terms = {}
        with self.objective.round() as objective:
            for _ in range(self.iterations):
                terms = self.step(images, targets, optimizer, objective)
                with torch.no_grad():
                    images.copy_(torch.maximum(torch.minimum(images, high), low))
                if progress is not None:
                    progress.update(1)
        return SynthesisResult(images.detach(), targets, {k: float(v) for k, v in terms.items()})

    def step(self, images: Tensor, targets: Tensor, optimizer, objective) -> Dict[str, Tensor]:
        """One optimization step of the images: the shared objective (`objective`, from
        `self.objective.round()`) on the jittered and flipped images plus the image priors, backward
        to the images, Adam step. Returns the loss terms as detached tensors (no device sync)."""
        out = objective(jitter_and_flip(images, flip=self.info.flip), targets)
        zero = images.new_zeros(())
        loss_tv = total_variation(images) if self.tv > 0 else zero
        loss_l2 = torch.norm(images) if self.l2 > 0 else zero
        loss = out.loss + self.tv * loss_tv + self.l2 * loss_l2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"synth_loss": loss.detach(), **out.terms, "loss_tv": loss_tv.detach(), "loss_l2": loss_l2.detach()}
