"""CMI, contrastive model inversion (Fang et al., 2021), as Fast-Datafree's `CMISynthesizer`, with STARS.

Each `synthesize()` call resets the generator (Fast-Datafree's `reset_model`), draws latents z and
random sorted targets y, and for `iterations` steps:

    pixels = G(z)
    global view = random crop (zero padding) + flip;  local view = random resized crop (scale 0.25-1) + flip
    L = the shared objective on the global view (BN + one-hot + adversarial + STARS, objective.py)
        + cr * L_cr
    Adam step on G and z (lr_g, betas 0.5 / 0.999), and on the instance head (lr_g)

L_cr is InfoNCE between the two views: instance features f (Fast-Datafree's: the spatial means of
the *inputs* of every teacher BatchNorm2d, concatenated in module order; for a ResNet-34 teacher the
inputs of layer1..layer4, as its driver chooses) of the local and global views of the batch and of `n_neg` negatives from a memory bank go through
an MLP head with L2-normalized output; logits = h(f_local) h(f_global)^T / cr_T (global side
detached), each sample's positive is its own other view, and the cross-entropy is averaged over the
batch and, separately, over the bank rows (Fast-Datafree's split, so the bank does not dilute the
batch's gradient). The batch with the lowest L is returned and its features join the bank.

Differences from Fast-Datafree are listed in the README's Fidelity section (e.g. the bank is a FIFO
of the newest rows, not a ring buffer pre-filled with noise).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import DatasetInfo, normalize
from .base import StepGradientNorms, SynthesisResult, frozen, random_crop_and_flip
from .generator import Generator, reset_generator
from .objective import BestSoFar, InversionObjective, Synthesizer
from .stars_regularizer import StarsRegularizer


def random_resized_crop_and_flip(pixels: Tensor, scale=(0.25, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True) -> Tensor:
    """torchvision's RandomResizedCrop (to the input size, bilinear) + RandomHorizontalFlip, drawn per
    sample and differentiable: each crop covers a fraction in `scale` of the image area with aspect
    ratio in `ratio` (sides clipped to the image), at a uniform position."""
    b = pixels.shape[0]
    device = pixels.device
    area = torch.empty(b, device=device).uniform_(*scale)
    log_ratio = torch.empty(b, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    width = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # fractions of the image side
    height = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    center_x = (torch.rand(b, device=device) * 2 - 1) * (1 - width)  # in grid coordinates [-1, 1]
    center_y = (torch.rand(b, device=device) * 2 - 1) * (1 - height)
    if flip:
        width = torch.where(torch.rand(b, device=device) < 0.5, -width, width)  # a mirrored crop
    theta = torch.zeros(b, 2, 3, device=device, dtype=pixels.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = width, center_x
    theta[:, 1, 1], theta[:, 1, 2] = height, center_y
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InstanceMeanHooks:
    """Fast-Datafree's `InstanceMeanHook`s: after each forward, `features()` is [B, sum C] = the
    spatial means of the inputs of `modules`, concatenated in their order. A context manager."""

    def __init__(self, modules: Sequence[nn.Module]):
        if not modules:
            raise ValueError("CMI needs at least one module to take instance features from")
        self.means: List[Optional[Tensor]] = [None] * len(modules)
        self.handles = [m.register_forward_hook(partial(self._hook, i)) for i, m in enumerate(modules)]

    def _hook(self, index: int, module, inputs, output) -> None:
        self.means[index] = inputs[0].float().mean(dim=(2, 3))

    def features(self) -> Tensor:
        return torch.cat(self.means, dim=1)

    def __enter__(self) -> "InstanceMeanHooks":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def instance_feature_modules(teacher: nn.Module, layers: Optional[Sequence[str]] = None) -> List[nn.Module]:
    """The modules whose inputs give CMI's instance features: the named submodules `layers`, else every
    BatchNorm2d of the teacher (Fast-Datafree's default). A named nn.Sequential is hooked at its first
    child, which gets the same input (our ResNets run a stage's blocks one by one, not the Sequential)."""
    if layers is not None:
        modules = [teacher.get_submodule(name) for name in layers]
        return [m[0] if isinstance(m, nn.Sequential) and len(m) else m for m in modules]
    return [m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]


def fast_datafree_feature_layers(teacher_arch: str) -> Optional[List[str]]:
    """Fast-Datafree's driver: a ResNet-34 teacher gives CMI the inputs of its four stages; any other
    teacher the inputs of all its BatchNorm layers (None)."""
    return ["layer1", "layer2", "layer3", "layer4"] if teacher_arch == "resnet34" else None


class InstanceHead(nn.Module):
    """Fast-Datafree's `MLPHead`: Linear(D, D) - ReLU - Linear(D, head_dim), L2-normalized rows."""

    def __init__(self, dim_in: int, head_dim: int):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, head_dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(x), dim=1)


class FeatureBank:
    """The memory bank of negatives: the newest `size` feature rows, sampled without replacement."""

    def __init__(self, size: int, device):
        if size < 1:
            raise ValueError(f"the bank size must be >= 1, got {size}")
        self.size, self.device = size, torch.device(device)
        self.features: Optional[Tensor] = None

    def __len__(self) -> int:
        return 0 if self.features is None else self.features.shape[0]

    def add(self, features: Tensor) -> None:
        features = features.detach().to(self.device)
        self.features = features if self.features is None else torch.cat([self.features, features])
        self.features = self.features[-self.size:]

    def sample(self, k: int, dim: int) -> Tensor:
        """Up to k rows [min(k, len), dim] (an empty [0, dim] tensor while the bank is empty)."""
        if self.features is None:
            return torch.empty(0, dim, device=self.device)
        index = torch.randperm(len(self), device=self.device)[:k]
        return self.features[index]

    def state_dict(self) -> Dict:
        return {"features": None if self.features is None else self.features.cpu()}

    def load_state_dict(self, state: Dict) -> None:
        features = state["features"]
        self.features = None if features is None else features[-self.size:].to(self.device)


class CMISynthesizer(Synthesizer):
    """Generator-based contrastive synthesis against a frozen teacher (and frozen student) -> `SynthesisResult`.

    Persistent between rounds (state_dict): the instance head, its optimizer, the bank of negatives.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, info: DatasetInfo, *, batch_size: int,
                 iterations: int, lr_g: float, bn: float, oh: float, adv: float, cr: float, cr_T: float,
                 stars: Optional[StarsRegularizer] = None, nz: int = 256, ngf: int = 64, head_dim: int = 256,
                 bank_size: int = 40960, n_neg: int = 4096, feature_layers: Optional[Sequence[str]] = None,
                 amp: bool = False, device="cpu"):
        if batch_size < 2 and stars is not None and stars.active:
            raise ValueError("STARS' relational term needs a synthesis batch of at least 2 images")
        self.teacher, self.info = teacher, info
        self.batch_size, self.iterations, self.lr_g = batch_size, iterations, lr_g
        self.cr, self.cr_T, self.nz, self.n_neg = cr, cr_T, nz, n_neg
        self.amp, self.device = amp, torch.device(device)
        self.objective = InversionObjective(teacher, student, bn=bn, oh=oh, adv=adv, stars=stars, amp=amp)
        self.feature_modules = instance_feature_modules(teacher, feature_layers)
        self.generator = Generator(nz=nz, ngf=ngf, img_size=info.image_size, nc=info.in_channels).to(self.device)
        self.feature_dim = self._feature_dim()
        self.head = InstanceHead(self.feature_dim, head_dim).to(self.device)
        self.head_optimizer = torch.optim.Adam(self.head.parameters(), lr=lr_g)
        self.bank = FeatureBank(bank_size, self.device)

    def _feature_dim(self) -> int:
        """Width of the instance features: the hooked modules' input channels, summed."""
        probe = torch.zeros(2, self.info.in_channels, self.info.image_size, self.info.image_size, device=self.device)
        with torch.no_grad(), frozen(self.teacher), InstanceMeanHooks(self.feature_modules) as hooks:
            self.teacher(probe)
            return hooks.features().shape[1]

    @property
    def steps_per_round(self) -> int:
        return self.iterations

    def _instance_features(self, inputs: Tensor, hooks: InstanceMeanHooks) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            self.teacher(inputs)
        return hooks.features()

    def synthesize(self, progress=None) -> SynthesisResult:
        reset_generator(self.generator)
        self.generator.train()
        z = torch.randn(self.batch_size, self.nz, device=self.device).requires_grad_()
        targets = torch.randint(0, self.info.num_classes, (self.batch_size,), device=self.device).sort()[0]
        optimizer = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": [z]}], lr=self.lr_g,
                                     betas=(0.5, 0.999))
        best, terms = BestSoFar(), {}
        grad_norms = StepGradientNorms([*self.generator.parameters(), z], self.grad_shares_every)
        with self.objective.round(stars=self.objective.stars_on(self.epoch)) as objective, \
                InstanceMeanHooks(self.feature_modules) as hooks:
            for _ in range(self.iterations):
                pixels = self.generator(z)
                global_view = normalize(random_crop_and_flip(pixels, self.info.crop_padding, self.info.flip), self.info)
                local_view = normalize(random_resized_crop_and_flip(pixels, flip=self.info.flip), self.info)
                measure = grad_norms.due()
                out = objective(global_view, targets, measure)
                global_features = hooks.features()
                local_features = self._instance_features(local_view, hooks)
                negative_local, negative_global = self.bank.sample(self.n_neg, 2 * self.feature_dim).chunk(2, dim=1)
                projected = self.head(torch.cat([local_features, negative_local, global_features, negative_global]))
                projected_local, projected_global = projected.chunk(2)
                logits = projected_local @ projected_global.detach().T / self.cr_T
                per_row = F.cross_entropy(logits, torch.arange(len(logits), device=self.device), reduction="none")
                loss_cr = per_row[:self.batch_size].mean()
                if len(per_row) > self.batch_size:
                    loss_cr = loss_cr + per_row[self.batch_size:].mean()
                loss = out.loss + self.cr * loss_cr
                if measure:
                    grad_norms.record_terms({**out.weighted, "cr": self.cr * loss_cr})
                best.update(loss, pixels, torch.cat([local_features, global_features], dim=1))
                optimizer.zero_grad(set_to_none=True)
                self.head_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norms.record()
                optimizer.step()
                self.head_optimizer.step()
                terms = {"synth_loss": loss.detach(), **out.terms, "loss_cr": loss_cr.detach()}
                if progress is not None:
                    progress.update(1)
        best_pixels, best_features = best.tensors
        self.bank.add(best_features)
        return SynthesisResult(normalize(best_pixels, self.info), targets, {k: float(v) for k, v in terms.items()},
                               grad_norms.values(), grad_norms.term_values())

    def state_dict(self) -> Dict:
        return {"head": self.head.state_dict(), "head_optimizer": self.head_optimizer.state_dict(),
                "bank": self.bank.state_dict()}

    def load_state_dict(self, state: Dict) -> None:
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        self.bank.load_state_dict(state["bank"])
