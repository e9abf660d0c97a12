"""NAYER, noisy-layer generation (Tran et al., CVPR 2024), as its `NAYER` synthesizer, with STARS.

A `NoisyLayerGenerator` (generator.py) maps a fixed per-class label embedding, through BatchNorm and
a re-drawn noisy linear layer, to images. The schedule follows NAYER's `synthesize`, which its
driver calls once per epoch (the paper's presets have ep_steps == kd_steps, one round per epoch):

- the whole generator is rebuilt with fresh weights at every epoch e with e % g_life == 0 or
  (e - warmup) % g_life == 0 (once per such epoch), and otherwise kept, learning across batches;
- a round makes `gwp_loops` batches during the `warmup` epochs and `g_loops` batches after them;
- each batch: the noisy layers are re-drawn from N(0, 1), the targets are class-balanced (every
  class once per num_classes samples, the remainder random), and a fresh Adam (lr_g, betas 0.5 /
  0.999) trains the generator for `iterations` steps on the shared objective (objective.py: BN +
  one-hot + adversarial + STARS) of the generated images under a random crop + flip drawn per
  sample (the flip where the dataset allows it; NAYER skips it on Tiny-ImageNet); the
  adversarial term is off during the warm-up. The step with the lowest loss gives the batch.

BN momentum (NAYER's `bn_mmt`, `--bn-mmt`, default 0.9 as NAYER's driver): after the first
batch, each teacher BatchNorm's BN target is (1 - m) x the batch's statistics + m x a moving
average of the final statistics of the earlier batches (bn_hooks.py); the average is updated after
every batch, is kept across rounds and generator rebuilds, and is part of `state_dict()`.

Label embedding: NAYER embeds "a image of {class}" with CLIP ViT-B/32's text encoder and ships the
result as `label_embedding/{dataset}_le.pickle`. `--label-embedding PATH` reads those pickle files
as they are, and files written by `torch.save(tensor, PATH)`, without executing anything from the
file (stars_fast.safe_pickle); `python -m stars_fast.label_embedding` computes them. The file holds
a floating-point tensor [num_classes, D] (row i embeds class i, in the dataset's label order).
Without it, a fixed random embedding is used: N(0, 1), D = 512, drawn from seed 0, the same for
every run (classes then get arbitrary rather than semantically related codes).
"""
from __future__ import annotations

import pickle
import zipfile
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from ..data import DatasetInfo, normalize
from ..safe_pickle import restricted_load
from .base import StepGradientNorms, SynthesisResult, random_crop_and_flip
from .generator import NoisyLayerGenerator
from .objective import BestSoFar, InversionObjective, Synthesizer
from .stars_regularizer import StarsRegularizer

RANDOM_EMBEDDING_DIM = 512
NO_FLIP_DATASETS = ("tiny-imagenet",)  # NAYER's synthesis augmentation has no flip on (Tiny-)ImageNet
RANDOM_EMBEDDING_SEED = 0


def random_label_embedding(num_classes: int, dim: int = RANDOM_EMBEDDING_DIM,
                           seed: int = RANDOM_EMBEDDING_SEED) -> Tensor:
    """The default label embedding: [num_classes, dim] ~ N(0, 1) from a fixed seed (global RNG untouched)."""
    return torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed))


def check_label_embedding(embedding, num_classes: int, source: str = "the label embedding") -> Tensor:
    """`embedding` as a float32 [num_classes, D] tensor (detached), or ValueError naming the expected format."""
    expected = f"expected a floating-point tensor of shape [num_classes={num_classes}, D]"
    if not isinstance(embedding, Tensor):
        raise ValueError(f"{source} holds a {type(embedding).__name__}; {expected}")
    if embedding.dim() != 2 or embedding.shape[0] != num_classes or embedding.shape[1] < 1:
        raise ValueError(f"{source} has shape {list(embedding.shape)}; {expected}")
    if not embedding.is_floating_point() or not torch.isfinite(embedding).all():
        raise ValueError(f"{source} has dtype {embedding.dtype} or non-finite values; {expected}")
    return embedding.detach().float()


def load_label_embedding(path: str, num_classes: int) -> Tensor:
    """Read a label-embedding file and check it: a torch.save zip archive with torch.load(weights_only=True),
    anything else (NAYER's `pickle.dump(tensor)` files) with the restricted unpickler, which refuses
    every global but tensor reconstruction (pickle.UnpicklingError, reported as a ValueError)."""
    source = f"label-embedding file {path!r}"
    try:
        if zipfile.is_zipfile(path):
            embedding = torch.load(path, map_location="cpu", weights_only=True)
        else:
            embedding = restricted_load(path, tensors=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{source} is not a plain tensor pickle ({exc}); nothing in it was run") from exc
    except RuntimeError as exc:  # a zip archive that is not torch.save's (torch's reader refuses its layout)
        raise ValueError(f"{source} is a zip archive but not a torch.save file ({str(exc).splitlines()[-1]})") from exc
    return check_label_embedding(embedding, num_classes, source=source)


def balanced_targets(batch_size: int, num_classes: int, device) -> Tensor:
    """NAYER's targets: 0..K-1 repeated batch_size // K times, then batch_size % K random classes."""
    repeats, rest = divmod(batch_size, num_classes)
    return torch.cat([torch.arange(num_classes, device=device).repeat(repeats),
                      torch.randint(0, num_classes, (rest,), device=device)])


class NayerSynthesizer(Synthesizer):
    """Noisy-layer synthesis against a frozen teacher (and frozen student) -> `SynthesisResult`.

    Persistent between rounds (state_dict): the generator and the epoch it was built in.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, info: DatasetInfo, *, batch_size: int,
                 iterations: int, lr_g: float, bn: float, oh: float, adv: float, g_life: int, g_loops: int,
                 gwp_loops: int, warmup: int, label_embedding: Optional[Tensor] = None,
                 stars: Optional[StarsRegularizer] = None, latent_size: int = 1000, ngf: int = 64,
                 bn_momentum: float = 0.9, amp: bool = False, device="cpu"):
        if batch_size < 2:
            raise ValueError("NAYER's generator normalizes over the batch: it needs at least 2 images per batch")
        if g_life < 1 or g_loops < 1 or gwp_loops < 1:
            raise ValueError(f"g_life, g_loops and gwp_loops must be >= 1, got {g_life}, {g_loops}, {gwp_loops}")
        if label_embedding is None:
            label_embedding = random_label_embedding(info.num_classes)
        self.label_embedding = check_label_embedding(label_embedding, info.num_classes)
        self.info, self.batch_size, self.iterations, self.lr_g = info, batch_size, iterations, lr_g
        self.g_life, self.g_loops, self.gwp_loops, self.warmup = g_life, g_loops, gwp_loops, warmup
        self.latent_size, self.ngf, self.device = latent_size, ngf, torch.device(device)
        self.flip = info.flip and info.name not in NO_FLIP_DATASETS
        self.objective = InversionObjective(teacher, student, bn=bn, oh=oh, adv=adv, stars=stars, amp=amp,
                                            bn_momentum=bn_momentum)
        self.generator: Optional[NoisyLayerGenerator] = None
        self.built_epoch: Optional[int] = None

    @property
    def loops(self) -> int:
        """Batches the next round makes."""
        return self.gwp_loops if self.epoch < self.warmup else self.g_loops

    @property
    def steps_per_round(self) -> int:
        return self.loops * self.iterations

    def _new_generator(self) -> NoisyLayerGenerator:
        generator = NoisyLayerGenerator(self.label_embedding, self.batch_size, latent_size=self.latent_size,
                                        ngf=self.ngf, img_size=self.info.image_size, nc=self.info.in_channels)
        return generator.to(self.device)

    def _rebuild_due(self) -> bool:
        boundary = self.epoch % self.g_life == 0 or (self.epoch - self.warmup) % self.g_life == 0
        return self.generator is None or (boundary and self.built_epoch != self.epoch)

    def synthesize(self, progress=None) -> SynthesisResult:
        if self._rebuild_due():
            self.generator, self.built_epoch = self._new_generator(), self.epoch
        generator = self.generator.train()
        images, all_targets, terms = [], [], {}
        grad_norms = StepGradientNorms(generator.parameters(), self.grad_shares_every)
        with self.objective.round(adversarial=self.epoch >= self.warmup,
                                  stars=self.objective.stars_on(self.epoch)) as objective:
            for _ in range(self.loops):
                generator.reset_noisy_layers()
                targets = balanced_targets(self.batch_size, self.info.num_classes, self.device)
                optimizer = torch.optim.Adam(generator.parameters(), lr=self.lr_g, betas=(0.5, 0.999))
                best = BestSoFar()
                for _ in range(self.iterations):
                    pixels = generator(targets)
                    measure = grad_norms.due()
                    out = objective(normalize(random_crop_and_flip(pixels, self.info.crop_padding, self.flip),
                                              self.info), targets, measure)
                    if measure:
                        grad_norms.record_terms(out.weighted)
                    best.update(out.loss, pixels)
                    optimizer.zero_grad(set_to_none=True)
                    out.loss.backward()
                    grad_norms.record()
                    optimizer.step()
                    terms = {"synth_loss": out.loss.detach(), **out.terms}
                    if progress is not None:
                        progress.update(1)
                self.objective.end_batch()  # the BN momentum target takes this batch's last statistics
                images.append(normalize(best.tensors[0], self.info))
                all_targets.append(targets)
        return SynthesisResult(torch.cat(images), torch.cat(all_targets), {k: float(v) for k, v in terms.items()},
                               grad_norms.values(), grad_norms.term_values())

    def state_dict(self) -> Dict:
        moving = self.objective.bn_moving
        return {"generator": None if self.generator is None else self.generator.state_dict(),
                "built_epoch": self.built_epoch,
                "bn_moving": None if moving is None else [[m.cpu(), v.cpu()] for m, v in moving]}

    def load_state_dict(self, state: Dict) -> None:
        self.generator, self.built_epoch = None, state["built_epoch"]
        moving = state.get("bn_moving")  # absent in checkpoints written before the BN momentum existed
        self.objective.bn_moving = None if moving is None else [(m.to(self.device), v.to(self.device))
                                                                for m, v in moving]
        if state["generator"] is not None:
            self.generator = self._new_generator()
            self.generator.load_state_dict(state["generator"])
