"""Labelled image grids (PNG): one row per class, its name on the left.

`save_class_grid` draws synthetic (or any normalized) images; `save_real_reference` draws the same
grid from the real test split so the two can be compared side by side. Cells come from
torchvision.utils.make_grid, labels are drawn with PIL.ImageDraw, the PNG is encoded by Pillow and
written atomically (stars_fast.atomic).
"""
from __future__ import annotations

import io
from typing import List, Optional, Sequence

import torch

from .atomic import atomic_write_bytes
from .data import DATASETS, DatasetInfo, class_names, denormalize, load_dataset

MIN_CELL_PIXELS = 48  # small images (digits' 8x8, CIFAR's 32x32) are enlarged with nearest-neighbour
CELL_PADDING = 2
BACKGROUND = 1.0  # white, in [0, 1] pixels
LABEL_MARGIN = 6


def _check_grid_input(images: torch.Tensor, labels: Optional[torch.Tensor], info: DatasetInfo):
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a tensor [N, C, H, W], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.shape[1] != info.in_channels:
        raise ValueError(f"{info.name} images have {info.in_channels} channels, got {images.shape[1]}")
    if images.shape[0] == 0:
        raise ValueError("no images to draw")
    if not images.is_floating_point():
        raise TypeError(f"images must be normalized floats, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    if labels is not None:
        if labels.shape != (images.shape[0],) or labels.is_floating_point():
            raise ValueError(f"labels must be integers [N={images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= info.num_classes:
            raise ValueError(f"labels must lie in [0, {info.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")


def _rows(images: torch.Tensor, labels: Optional[torch.Tensor], names: Sequence[str], max_per_class: int):
    """(row label, images of the row) per class present, in label order; unlabelled images in rows of
    max_per_class."""
    if labels is None:
        return [("", images[i:i + max_per_class]) for i in range(0, images.shape[0], max_per_class)]
    return [(names[c], images[labels == c][:max_per_class]) for c in labels.unique(sorted=True).tolist()]


def save_class_grid(path: str, images: torch.Tensor, labels: Optional[torch.Tensor], info: DatasetInfo, *,
                    max_per_class: int = 8, class_names: Optional[Sequence[str]] = None) -> None:
    """Write `images` ([N, C, H, W] in the normalized input space of `info`) as a PNG at `path`: one row
    per class present in `labels` (at most `max_per_class` images each, in their order), the class name
    on the left (`class_names` or the dataset's own). Without labels: rows of `max_per_class`, unlabelled."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    if max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    _check_grid_input(images, labels, info)
    names = list(class_names) if class_names is not None else _default_names(info)
    if len(names) != info.num_classes:
        raise ValueError(f"{len(names)} class names for {info.num_classes} classes")
    images, labels = images.detach().cpu().float(), None if labels is None else labels.detach().cpu().long()
    pixels = denormalize(images, info).clamp(0.0, 1.0)
    scale = max(1, -(-MIN_CELL_PIXELS // max(pixels.shape[-2:])))  # ceil division
    if scale > 1:
        pixels = torch.nn.functional.interpolate(pixels, scale_factor=scale, mode="nearest")
    rows = _rows(pixels, labels, names, max_per_class)
    cells: List[torch.Tensor] = []
    blank = torch.full_like(pixels[0], BACKGROUND)
    for _, row in rows:
        cells.extend(row)
        cells.extend([blank] * (max_per_class - row.shape[0]))
    grid = make_grid(torch.stack(cells), nrow=max_per_class, padding=CELL_PADDING, pad_value=BACKGROUND)
    picture = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy(), mode="RGB")

    cell = pixels.shape[-2] + CELL_PADDING
    font = ImageFont.load_default(size=max(10, min(16, cell // 3)))
    measure = ImageDraw.Draw(picture)
    label_width = max((measure.textlength(label, font=font) for label, _ in rows), default=0)
    margin = int(label_width) + 2 * LABEL_MARGIN if label_width else 0
    canvas = Image.new("RGB", (picture.width + margin, picture.height), "white")
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for index, (label, _) in enumerate(rows):
        if label:
            center_y = CELL_PADDING + index * cell + (cell - CELL_PADDING) // 2
            draw.text((margin - LABEL_MARGIN, center_y), label, fill="black", font=font, anchor="rm")
    encoded = io.BytesIO()
    canvas.save(encoded, format="PNG")
    atomic_write_bytes(path, encoded.getvalue())


def _default_names(info: DatasetInfo) -> List[str]:
    return class_names(info.name) if info.name in DATASETS else [str(c) for c in range(info.num_classes)]


def save_real_reference(path: str, info: DatasetInfo, *, data_root: Optional[str] = None,
                        max_per_class: int = 8) -> None:
    """The `save_class_grid` picture of the real test split: the first `max_per_class` test images of
    each class (deterministic), with the dataset's class names."""
    dataset = load_dataset(info.name, "test", data_root)
    chosen = [i for c in range(info.num_classes)
              for i in (dataset.labels == c).nonzero().flatten()[:max_per_class].tolist()]
    if not chosen:
        raise ValueError(f"the {info.name} test split is empty")
    images = torch.stack([dataset[i][0] for i in chosen])
    save_class_grid(path, images, dataset.labels[chosen], info, max_per_class=max_per_class,
                    class_names=class_names(info.name, data_root))
