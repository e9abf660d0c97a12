"""Pieces every synthesizer shares: the frozen-student context, per-sample jitter/flip, pixel clipping."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import DatasetInfo


@dataclass
class SynthesisResult:
    """One synthesized batch (normalized inputs, detached), its target classes, the final loss terms."""

    images: torch.Tensor
    targets: torch.Tensor
    losses: Dict[str, float] = field(default_factory=dict)
    grad_norms: List[float] = field(default_factory=list)  # per step, StepGradientNorms
    term_grad_norms: Dict[str, List[float]] = field(default_factory=dict)  # per measured step and term


class StepGradientNorms:
    """||g||_2 of each synthesis step's gradient over the synthesized variables (the pixels, or the
    generator's parameters and latents): read after the step's backward, before the optimizer uses it,
    so it costs no extra backward; kept on the device until `values()` at the end of the round.

    With `terms_every` = N > 0, every N-th step (`due()`) also measures each weighted loss term's own
    gradient norm (`record_terms`: one extra backward per term), to show which term drives the synthesis."""

    def __init__(self, variables: Iterable[torch.Tensor], terms_every: int = 0):
        self.variables = list(variables)
        self.terms_every = terms_every
        self._norms: List[torch.Tensor] = []
        self._terms: Dict[str, List[torch.Tensor]] = {}

    def due(self) -> bool:
        """Whether the coming step's terms are measured."""
        return self.terms_every > 0 and len(self._norms) % self.terms_every == 0

    def record(self) -> None:
        grads = [v.grad for v in self.variables if v.grad is not None]
        if grads:
            self._norms.append(torch.nn.utils.get_total_norm(grads))

    def record_terms(self, terms: Dict[str, torch.Tensor]) -> None:
        """||d term / d variables||_2 of each term (a loss with its graph, already weighted), before the
        step's backward (the graph is kept for it)."""
        for name, term in terms.items():
            if not term.requires_grad:
                continue
            grads = torch.autograd.grad(term, self.variables, retain_graph=True, allow_unused=True)
            grads = [g for g in grads if g is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else term.new_zeros(())
            self._terms.setdefault(name, []).append(norm.detach())

    def values(self) -> List[float]:
        return torch.stack(self._norms).tolist() if self._norms else []

    def term_values(self) -> Dict[str, List[float]]:
        return {name: torch.stack(norms).tolist() for name, norms in self._terms.items()}


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients inside the block; both restored on exit.

    During synthesis the student only routes gradients to the images (Algorithm 1, line 18).
    """
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _gather_pixels(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[b, c, i, j] = x[b, c, rows[b, i], cols[b, j]] (differentiable)."""
    b, c = x.shape[:2]
    x = x.gather(2, rows[:, None, :, None].expand(b, c, rows.shape[1], x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(b, c, x.shape[2], cols.shape[1]))


def _maybe_flip(cols: torch.Tensor, flip: bool) -> torch.Tensor:
    if not flip:
        return cols
    flipped = torch.rand(cols.shape[0], 1, device=cols.device) < 0.5
    return torch.where(flipped, cols.flip(1), cols)


def jitter_and_flip(x: torch.Tensor, lim: float = 1.0 / 8.0, flip: bool = True) -> torch.Tensor:
    """DeepInversion's augmentation as Fast-Datafree draws it, once for the whole batch: a circular
    shift (torch.roll) by offsets uniform in [-int(H * lim), int(H * lim)] and [-int(W * lim),
    int(W * lim)], then, when `flip`, a horizontal flip with probability 1/2. The draws come from
    torch's CPU generator (Fast-Datafree uses Python's `random`), so no device is waited for."""
    lim_h, lim_w = int(x.shape[2] * lim), int(x.shape[3] * lim)
    off_h = int(torch.randint(-lim_h, lim_h + 1, ()))
    off_w = int(torch.randint(-lim_w, lim_w + 1, ()))
    x = torch.roll(x, shifts=(off_h, off_w), dims=(2, 3))
    if flip and float(torch.rand(())) < 0.5:
        x = torch.flip(x, dims=(3,))
    return x


def random_crop_and_flip(pixels: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """The KD-phase augmentation (torchvision RandomCrop(size, padding) + RandomHorizontalFlip),
    per sample, on pixels [B, C, H, W]; the padding is zeros, as torchvision's."""
    b, _, h, w = pixels.shape
    padded = F.pad(pixels, (padding, padding, padding, padding))
    rows = torch.randint(0, 2 * padding + 1, (b, 1), device=pixels.device) + torch.arange(h, device=pixels.device)
    cols = torch.randint(0, 2 * padding + 1, (b, 1), device=pixels.device) + torch.arange(w, device=pixels.device)
    return _gather_pixels(padded, rows, _maybe_flip(cols, flip))


def pixel_bounds(info: DatasetInfo, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel [1, C, 1, 1] bounds of the normalized space that map to pixels in [0, 1]."""
    mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, device=device).view(1, -1, 1, 1)
    return -mean / std, (1.0 - mean) / std
