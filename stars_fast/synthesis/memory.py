"""The bounded memory of synthesized images that the KD phase samples from."""
from __future__ import annotations

from typing import Dict

import torch

from ..data import DatasetInfo, denormalize, normalize
from .base import random_crop_and_flip


class SyntheticMemory:
    """A ring buffer of at most `max_size` images, stored as uint8 pixels.

    Quantizing to 8 bits is what Fast-Datafree's PNG image pool does; it also keeps the memory
    (and the checkpoint that carries it) 4x smaller than float32. Once full, the oldest images go.
    """

    def __init__(self, info: DatasetInfo, max_size: int, device="cpu"):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.info, self.max_size, self.device = info, max_size, torch.device(device)
        self.images = torch.empty((0, info.in_channels, info.image_size, info.image_size),
                                  dtype=torch.uint8, device=self.device)
        self.next_slot = 0  # where the next image goes once the buffer is full

    def __len__(self) -> int:
        return self.images.shape[0]

    def add(self, images: torch.Tensor) -> None:
        """Store normalized inputs [B, C, H, W] (as produced by a synthesizer)."""
        pixels = (denormalize(images.detach().float(), self.info).clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels[-self.max_size:].to(self.device)
        room = self.max_size - len(self)
        if room > 0:
            self.images = torch.cat([self.images, pixels[:room]])
            pixels = pixels[room:]
        if pixels.shape[0]:  # the buffer is full: overwrite the oldest
            slots = (self.next_slot + torch.arange(pixels.shape[0], device=self.device)) % self.max_size
            self.images[slots] = pixels
            self.next_slot = (self.next_slot + pixels.shape[0]) % self.max_size

    def sample(self, batch_size: int, augment: bool = True) -> torch.Tensor:
        """A batch drawn uniformly with replacement, augmented (random crop + flip), normalized."""
        if len(self) == 0:
            raise RuntimeError("the synthetic memory is empty: synthesize before sampling")
        index = torch.randint(0, len(self), (batch_size,), device=self.device)
        pixels = self.images[index].float() / 255.0
        if augment:
            pixels = random_crop_and_flip(pixels, self.info.crop_padding, self.info.flip)
        return normalize(pixels, self.info)

    def state_dict(self) -> Dict:
        return {"images": self.images.cpu(), "next_slot": self.next_slot, "max_size": self.max_size}

    def load_state_dict(self, state: Dict) -> None:
        images = state["images"]
        if images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"stored images have shape {tuple(images.shape[1:])}, "
                             f"expected {tuple(self.images.shape[1:])}")
        self.images = images[-self.max_size:].to(self.device)
        self.next_slot = int(state["next_slot"]) % self.max_size
