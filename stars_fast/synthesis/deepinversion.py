"""DeepInversion (Yin et al., 2020) as Fast-Datafree's `DeepInvSyntheiszer`, with STARS (paper Algorithm 1).

Each `synthesize()` call optimizes a fresh batch of images x ~ N(0, 1) directly with Adam (lr_g,
betas 0.5 / 0.99) for `iterations` steps on

    L = bn * (L_BN - 0.001 * L_BN(student)) + oh * CE(teacher(x'), y) - adv * JS_3(student(x'), teacher(x'))
        + tv * TV(x) + l2 * ||x||_2 + lambda_rca * L_RCA + lambda_tar * L_TAR              (Eq. 18)

with random sorted targets y and x' = x jittered and flipped (one draw for the whole batch, base.py)
before every forward; x is clipped to valid pixels after every step. JS_3 is Fast-Datafree's
clamped Jensen-Shannon divergence at temperature 3, unmasked (objective.py `js_divergence`);
L_BN(student) is the BN-statistics loss of the frozen student's own BatchNorm layers (in eval
mode, on x'), counted when the adversarial term runs the student, as in Fast-Datafree; the image
priors act on the un-augmented x, TV being Fast-Datafree's mean absolute difference of neighbours.

The batch returned is the last iterate: Fast-Datafree keeps `best_inputs = inputs.data`, a view
of the tensor that Adam and the clipping then keep updating in place, so its "best" batch is the
final one. Differences that remain are listed in the README's Fidelity section.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..data import DatasetInfo
from .base import StepGradientNorms, SynthesisResult, jitter_and_flip, pixel_bounds
from .collectives import all_reduce_sum
from .objective import InversionObjective, Synthesizer
from .stars_regularizer import StarsRegularizer

STUDENT_BN_WEIGHT = 0.001  # Fast-Datafree: loss_bn = teacher's r - 0.001 * student's r


def total_variation(x: Tensor) -> Tensor:
    """Fast-Datafree's `get_image_prior_losses`: the sum over the right, down and both diagonal
    neighbour differences of the mean absolute difference (the mean over every process's images)."""
    diffs = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
             x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(all_reduce_sum(d.abs().sum()) / all_reduce_sum(d.new_tensor(float(d.numel()))) for d in diffs)


def l2_norm(x: Tensor) -> Tensor:
    """||x||_2 of the whole batch (every process's images)."""
    return all_reduce_sum(x.square().sum()).sqrt()


class DeepInversionSynthesizer(Synthesizer):
    """Optimizes image batches against a frozen teacher (and frozen student) -> `SynthesisResult`."""

    def __init__(self, teacher: nn.Module, student: nn.Module, info: DatasetInfo, *, batch_size: int,
                 iterations: int, lr_g: float, bn: float, oh: float, adv: float, tv: float = 0.0,
                 l2: float = 0.0, stars: Optional[StarsRegularizer] = None, amp: bool = False, device="cpu"):
        if batch_size < 2 and stars is not None and stars.active:
            raise ValueError("STARS' relational term needs a synthesis batch of at least 2 images")
        self.info, self.batch_size, self.iterations, self.lr_g = info, batch_size, iterations, lr_g
        self.tv, self.l2, self.device = tv, l2, torch.device(device)
        self.objective = InversionObjective(teacher, student, bn=bn, oh=oh, adv=adv, stars=stars, amp=amp,
                                            adversarial="jsdiv", student_bn=STUDENT_BN_WEIGHT)

    @property
    def steps_per_round(self) -> int:
        return self.iterations

    def synthesize(self, progress=None) -> SynthesisResult:
        shape = (self.batch_size, self.info.in_channels, self.info.image_size, self.info.image_size)
        images = torch.randn(shape, device=self.device).requires_grad_()
        targets = torch.randint(0, self.info.num_classes, (self.batch_size,), device=self.device).sort()[0]
        optimizer = torch.optim.Adam([images], lr=self.lr_g, betas=(0.5, 0.99))
        low, high = pixel_bounds(self.info, self.device)
        terms, grad_norms = {}, StepGradientNorms([images], self.grad_shares_every)
        with self.objective.round(stars=self.objective.stars_on(self.epoch)) as objective:
            for _ in range(self.iterations):
                terms = self.step(images, targets, optimizer, objective, grad_norms)
                with torch.no_grad():
                    images.copy_(torch.maximum(torch.minimum(images, high), low))
                if progress is not None:
                    progress.update(1)
        return SynthesisResult(images.detach(), targets, {k: float(v) for k, v in terms.items()},
                               grad_norms.values(), grad_norms.term_values())

    def step(self, images: Tensor, targets: Tensor, optimizer, objective,
             grad_norms: Optional[StepGradientNorms] = None) -> Dict[str, Tensor]:
        """One optimization step of the images: the shared objective (`objective`, from
        `self.objective.round()`) on the jittered and flipped images plus the image priors, backward
        to the images, Adam step. Returns the loss terms as detached tensors (no device sync)."""
        measure = grad_norms is not None and grad_norms.due()
        out = objective(jitter_and_flip(images, flip=self.info.flip), targets, measure)
        zero = images.new_zeros(())
        loss_tv = total_variation(images) if self.tv > 0 else zero
        loss_l2 = l2_norm(images) if self.l2 > 0 else zero
        loss = out.loss + self.tv * loss_tv + self.l2 * loss_l2
        if measure:
            grad_norms.record_terms({**out.weighted, "tv": self.tv * loss_tv, "l2": self.l2 * loss_l2})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_norms is not None:
            grad_norms.record()
        optimizer.step()
        return {"synth_loss": loss.detach(), **out.terms, "loss_tv": loss_tv.detach(), "loss_l2": loss_l2.detach()}
