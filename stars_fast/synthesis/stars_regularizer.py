"""The STARS term of the synthesis objective (paper Eq. 18): lambda_rca * L_RCA + lambda_tar * L_TAR
between the teacher's and the frozen student's pooled pre-activation taps, over the selected
layers S with weights w_l (Eq. 15, 17)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..ops.stars import DEFAULT_QUANTILES, stars_loss


@dataclass
class StarsRegularizer:
    """Options of `stars_fast.stars_loss`; lambda 0 switches a term off (the RCA-only / TAR-only ablations).

    layers: 0-based indices of the taps in S (the order of `model(x, return_taps=True)`), None for all;
    weights: their w_l (one per selected layer), None for equal weights; thresholds: fixed TAR
    thresholds that replace the teacher quantiles; start_epoch: the first epoch (0-based) whose
    synthesis includes the term (the driver's epochs; before it the objective has no STARS term).
    """

    lambda_rca: float = 1.0
    lambda_tar: float = 1.0
    quantiles: Sequence[float] = DEFAULT_QUANTILES
    thresholds: Optional[Sequence[float]] = None
    delta: float = 0.5
    normalize: Optional[str] = None  # None or "teacher" (teacher-centric normalization before thresholding)
    layers: Optional[Sequence[int]] = None
    weights: Optional[Sequence[float]] = None
    start_epoch: int = 0
    backend: str = "auto"

    def __post_init__(self):
        if self.layers is not None:
            if len(self.layers) == 0 or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ValueError(f"the STARS layers must be distinct tap indices >= 0, got {list(self.layers)}")
        if self.weights is not None:
            expected = "the taps" if self.layers is None else f"the {len(self.layers)} selected layers"
            if self.layers is not None and len(self.weights) != len(self.layers):
                raise ValueError(f"{len(self.weights)} STARS weights for {expected}; give one per layer")
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(f"the STARS weights must be >= 0 with a positive sum, got {list(self.weights)}")
        if self.start_epoch < 0:
            raise ValueError(f"the STARS start epoch must be >= 0, got {self.start_epoch}")

    @property
    def active(self) -> bool:
        return self.lambda_rca > 0 or self.lambda_tar > 0

    def select(self, taps: Sequence[torch.Tensor], who: str) -> Sequence[torch.Tensor]:
        """The taps of the selected layers S, or ValueError naming the model's tap count."""
        if self.layers is None:
            return taps
        if max(self.layers) >= len(taps):
            raise ValueError(f"--stars-layers {' '.join(map(str, self.layers))}: the {who} has {len(taps)} taps "
                             f"(indices 0..{len(taps) - 1})")
        return [taps[i] for i in self.layers]

    def terms(self, teacher_taps: Sequence[torch.Tensor], student_taps: Sequence[torch.Tensor]
              ) -> Dict[str, torch.Tensor]:
        """{"rca": lambda_rca L_RCA, "tar": lambda_tar L_TAR}, each differentiable on its own (a loss call
        each; for measuring each term's gradient), the terms with lambda 0 left out."""
        weights = {"rca": (self.lambda_rca, 0.0), "tar": (0.0, self.lambda_tar)}
        return {name: self._loss(teacher_taps, student_taps, lambda_rca, lambda_tar)[0]
                for name, (lambda_rca, lambda_tar) in weights.items() if lambda_rca + lambda_tar > 0}

    def __call__(self, teacher_taps: Sequence[torch.Tensor], student_taps: Sequence[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, L_RCA, L_TAR); backpropagate through `total` (the parts may be detached diagnostics)."""
        return self._loss(teacher_taps, student_taps, self.lambda_rca, self.lambda_tar)

    def _loss(self, teacher_taps, student_taps, lambda_rca: float, lambda_tar: float):
        if len(teacher_taps) != len(student_taps):
            raise ValueError(f"the teacher has {len(teacher_taps)} STARS taps but the student has "
                             f"{len(student_taps)}; the model pair must tap the same number of stages")
        teacher_taps, student_taps = self.select(teacher_taps, "teacher"), self.select(student_taps, "student")
        if self.weights is not None and len(self.weights) != len(teacher_taps):
            raise ValueError(f"{len(self.weights)} STARS weights for {len(teacher_taps)} layers; give one per layer")
        return stars_loss(
            [t.float() for t in teacher_taps], [s.float() for s in student_taps],
            quantiles=self.quantiles, thresholds=self.thresholds, delta=self.delta, weights=self.weights,
            lambda_rca=lambda_rca, lambda_tar=lambda_tar, normalize=self.normalize,
            return_parts=True, backend=self.backend)
