"""The STARS term of the synthesis objective (paper Eq. 18): lambda_rca * L_RCA + lambda_tar * L_TAR
between the teacher's and the frozen student's pooled pre-activation taps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..ops.stars import DEFAULT_QUANTILES, stars_loss


@dataclass
class StarsRegularizer:
    """Options of `stars_fast.stars_loss`; lambda 0 switches a term off (the RCA-only / TAR-only ablations)."""

    lambda_rca: float = 1.0
    lambda_tar: float = 1.0
    quantiles: Sequence[float] = DEFAULT_QUANTILES
    thresholds: Optional[Sequence[float]] = None
    delta: float = 0.5
    normalize: Optional[str] = None  # None or "teacher" (teacher-centric normalization before thresholding)
    backend: str = "auto"

    @property
    def active(self) -> bool:
        return self.lambda_rca > 0 or self.lambda_tar > 0

    def __call__(self, teacher_taps: Sequence[torch.Tensor], student_taps: Sequence[torch.Tensor]
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, L_RCA, L_TAR); backpropagate through `total` (the parts may be detached diagnostics)."""
        if len(teacher_taps) != len(student_taps):
            raise ValueError(f"the teacher has {len(teacher_taps)} STARS taps but the student has "
                             f"{len(student_taps)}; the model pair must tap the same number of stages")
        return stars_loss(
            [t.float() for t in teacher_taps], [s.float() for s in student_taps],
            quantiles=self.quantiles, thresholds=self.thresholds, delta=self.delta,
            lambda_rca=self.lambda_rca, lambda_tar=self.lambda_tar, normalize=self.normalize,
            return_parts=True, backend=self.backend)
