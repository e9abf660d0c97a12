"""Image generators of the generator-based synthesizers: Fast-Datafree's generator (CMI) and NAYER's
noisy-layer generator built around it.

Both output pixels in [0, 1] (a final sigmoid); the synthesizers augment and normalize them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Generator(nn.Module):
    """Fast-Datafree's DCGAN-style generator: latent z [B, nz] -> pixels [B, nc, img_size, img_size].

    A linear layer to a 2*ngf-channel map of side img_size/4, then twice (BN, upsample x2, conv3x3),
    BN and LeakyReLU(0.2) between them, and a final conv3x3 + sigmoid.
    """

    def __init__(self, nz: int = 256, ngf: int = 64, img_size: int = 32, nc: int = 3):
        super().__init__()
        if img_size % 4:
            raise ValueError(f"img_size must be a multiple of 4, got {img_size}")
        self.init_size = img_size // 4
        self.l1 = nn.Linear(nz, 2 * ngf * self.init_size ** 2)
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, nc, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        out = self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)


@torch.no_grad()
def reset_generator(model: nn.Module) -> None:
    """Fast-Datafree's `reset_model`: conv / linear weights ~ N(0, 0.02), BN weights ~ N(1, 0.02), biases 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class NoisyLayerGenerator(nn.Module):
    """NAYER's generator: label embedding -> BatchNorm1d -> noisy linear layer -> `Generator`.

    `label_embedding` [num_classes, D] is fixed (a buffer). The batch is cut into consecutive chunks
    of num_classes samples, and chunk i goes through its own linear layer i (D -> latent_size), the
    "noisy layers" that `reset_noisy_layers` re-draws from N(0, 1) before each synthesized batch;
    everything else is learned across batches for the generator's life. Batches of up to
    `batch_size` samples.
    """

    def __init__(self, label_embedding: Tensor, batch_size: int, latent_size: int = 1000, ngf: int = 64,
                 img_size: int = 32, nc: int = 3):
        super().__init__()
        if label_embedding.dim() != 2:
            raise ValueError(f"label_embedding must be [num_classes, D], got shape {tuple(label_embedding.shape)}")
        num_classes, dim = label_embedding.shape
        self.register_buffer("label_embedding", label_embedding.detach().float().clone())
        self.norm = nn.BatchNorm1d(dim)
        self.chunk = num_classes
        layers = math.ceil(batch_size / num_classes)
        self.noisy_layers = nn.ModuleList(nn.Linear(dim, latent_size) for _ in range(layers))
        self.body = Generator(nz=latent_size, ngf=ngf, img_size=img_size, nc=nc)

    @torch.no_grad()
    def reset_noisy_layers(self) -> None:
        for layer in self.noisy_layers:
            nn.init.normal_(layer.weight, 0.0, 1.0)
            nn.init.zeros_(layer.bias)

    def forward(self, targets: Tensor) -> Tensor:
        chunks = self.norm(self.label_embedding[targets]).split(self.chunk)
        if len(chunks) > len(self.noisy_layers):
            raise ValueError(f"{len(targets)} targets, but this generator makes at most "
                             f"{len(self.noisy_layers) * self.chunk} images per batch")
        return self.body(torch.cat([layer(chunk) for layer, chunk in zip(self.noisy_layers, chunks)]))
