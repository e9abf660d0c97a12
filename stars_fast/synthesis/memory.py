"""The synthetic memory: every synthesized image of a run, in its own append-only files in the run
folder, memory-mapped; the KD phase samples from the newest `max_size` of them.

Files in `<run>/synthetic/`:
  images.u8    raw uint8 pixels [N, C, H, W], C-order, appended batch by batch (never rewritten)
  labels.i64   raw int64 target classes [N] (what the synthesizer aimed at), appended alongside
  meta.json    {"count": N, "shape": [C, H, W], "dataset": name, ...}, replaced atomically after
               each append: the number of complete images, so a half-written batch is never read
Quantizing to 8 bits is what Fast-Datafree's PNG image pool does. The files are mapped, not read:
processes and tools (`open_synthetic`) share the page cache instead of each holding a copy, and a
checkpoint stores only `count` and a CRC-32 of every appended block (pixels and labels); resuming
truncates the files to `count` and checks every block, so the memory trained on after a resume is the
one the checkpoint saw, or the resume is refused naming the block that changed.
"""
from __future__ import annotations

import json
import os
import zlib
from typing import Dict, List, Optional, Tuple

import torch

from ..atomic import atomic_write_bytes
from ..data import DatasetInfo, denormalize, normalize
from .base import random_crop_and_flip

FOLDER = "synthetic"
IMAGES, LABELS, META = "images.u8", "labels.i64", "meta.json"


def _read_meta(folder: str) -> Dict:
    path = os.path.join(folder, META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no readable synthetic memory in {folder} ({exc})") from exc
    if not (isinstance(meta.get("count"), int) and meta["count"] >= 0 and isinstance(meta.get("shape"), list)):
        raise ValueError(f"{path} is not a synthetic-memory header: {meta!r}")
    return meta


def _map(path: str, count: int, item_shape, dtype: torch.dtype) -> torch.Tensor:
    """The first `count` items of a raw file, memory-mapped copy-on-write (the file is never changed)."""
    numel = count * int(torch.Size(item_shape).numel())
    if count == 0:
        return torch.empty((0, *item_shape), dtype=dtype)
    size = os.path.getsize(path)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if size < numel * itemsize:
        raise ValueError(f"{path} holds {size} bytes, fewer than the {count} items its header counts")
    return torch.from_file(path, shared=False, size=numel, dtype=dtype).view(count, *item_shape)


def open_synthetic(run_dir: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A run's synthetic set: (uint8 pixels [N, C, H, W] in 0..255, memory-mapped; labels [N] int64 or None).

    Normalize for a model with stars_fast.data.normalize(pixels.float() / 255, DATASETS[dataset]);
    the dataset's name is in <run_dir>/synthetic/meta.json. Writes to the tensors never reach the files.
    """
    folder = os.path.join(run_dir, FOLDER)
    meta = _read_meta(folder)
    images = _map(os.path.join(folder, IMAGES), meta["count"], meta["shape"], torch.uint8)
    labels = _map(os.path.join(folder, LABELS), meta["count"], (), torch.int64) if meta.get("labels") else None
    return images, labels


class SyntheticMemory:
    """Append-only synthetic memory in `run_dir`/synthetic (see the module docstring).

    `writer`: whether this process writes the files (rank 0); the others see the same `add` calls
    (the gathered batches), count along and map what rank 0 wrote (call `ctx.barrier()` between).
    """

    def __init__(self, info: DatasetInfo, max_size: int, run_dir: str, device="cpu", writer: bool = True):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.info, self.max_size, self.device, self.writer = info, max_size, torch.device(device), writer
        self.folder = os.path.join(run_dir, FOLDER)
        self.shape = [info.in_channels, info.image_size, info.image_size]
        self.count, self.has_labels = 0, None
        self._images = self._labels = None  # the mapped files, up to self.count
        self._files_match = False  # whether the files hold exactly `count` images (checked before appending)
        self.blocks: List[List[int]] = []  # per appended batch: [first image, end, CRC-32 of pixels, of labels]
        if writer:
            os.makedirs(self.folder, exist_ok=True)

    def __len__(self) -> int:
        """The images KD samples from: the newest max_size."""
        return min(self.count, self.max_size)

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _write_meta(self) -> None:
        atomic_write_bytes(self._path(META), (json.dumps({
            "count": self.count, "shape": self.shape, "labels": bool(self.has_labels), "dataset": self.info.name,
            "mean": list(self.info.mean), "std": list(self.info.std)}) + "\n").encode())

    def _truncate(self) -> None:
        """Cut the files to `count` items (what a resumed checkpoint saw) and write the header."""
        for name, item_bytes in ((IMAGES, int(torch.Size(self.shape).numel())), (LABELS, 8)):
            with open(self._path(name), "ab") as f:
                size = self.count * item_bytes if name == IMAGES or self.has_labels else 0
                if f.tell() < size:
                    raise ValueError(f"{self._path(name)} is shorter than the {self.count} images the checkpoint "
                                     "counts: the synthetic memory of this run is incomplete")
                f.truncate(size)
        self._write_meta()
        self._files_match = True

    def _remap(self) -> None:
        self._images = _map(self._path(IMAGES), self.count, self.shape, torch.uint8)
        self._labels = _map(self._path(LABELS), self.count, (), torch.int64) if self.has_labels else None

    def add(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> None:
        """Append normalized inputs [B, C, H, W] (as produced by a synthesizer) and their target classes."""
        if list(images.shape[1:]) != self.shape:
            raise ValueError(f"images have shape {tuple(images.shape[1:])}, expected {tuple(self.shape)}")
        if self.has_labels is None:
            self.has_labels = labels is not None
        if (labels is not None) != self.has_labels:
            raise ValueError("give labels with every batch or with none")
        if self.writer:
            if not self._files_match:  # a new run: drop what a run killed before its first checkpoint wrote
                self._truncate()
            pixels = (denormalize(images.detach().float(), self.info).clamp(0, 1) * 255).round().to(torch.uint8)
            pixel_bytes = pixels.cpu().contiguous().numpy().tobytes()
            label_bytes = (b"" if labels is None
                           else labels.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
            for name, data in ((IMAGES, pixel_bytes), (LABELS, label_bytes)):
                if data:
                    with open(self._path(name), "ab") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
            self.blocks.append([self.count, self.count + images.shape[0], zlib.crc32(pixel_bytes),
                                zlib.crc32(label_bytes)])
        self.count += images.shape[0]
        if self.writer:
            self._write_meta()
        self._images = None  # mapped again on the next sample (after the other ranks' barrier)

    def sample(self, batch_size: int, augment: bool = True) -> torch.Tensor:
        """A batch drawn uniformly with replacement from the newest max_size images, augmented
        (random crop + flip), normalized, on `device`."""
        if self.count == 0:
            raise RuntimeError("the synthetic memory is empty: synthesize before sampling")
        if self._images is None:
            self._remap()
        index = torch.randint(self.count - len(self), self.count, (batch_size,))  # on the CPU: no device sync
        pixels = self._images[index].to(self.device).float() / 255.0
        if augment:
            pixels = random_crop_and_flip(pixels, self.info.crop_padding, self.info.flip)
        return normalize(pixels, self.info)

    def state_dict(self) -> Dict:
        """What a checkpoint keeps: the number of images and each block's checksums (the files hold the pixels)."""
        return {"count": self.count, "labels": self.has_labels, "blocks": [list(b) for b in self.blocks]}

    def load_state_dict(self, state: Dict) -> None:
        """Return to a checkpoint's memory: the first `count` images of the files, every block checked
        against its CRC-32 (ValueError naming the first block that differs)."""
        self.count, self.has_labels = int(state["count"]), state["labels"]
        self.blocks = [list(b) for b in state.get("blocks", [])]  # none in checkpoints written before them
        if self.writer:
            self._truncate()
            self._verify_blocks()
        self._images = None

    def _verify_blocks(self) -> None:
        """Each block read where it starts (a run resumed from a checkpoint written before the blocks were
        recorded has none for its first images)."""
        image_bytes = int(torch.Size(self.shape).numel())
        with open(self._path(IMAGES), "rb") as pixels, open(self._path(LABELS), "rb") as labels:
            for index, (start, end, pixel_crc, label_crc) in enumerate(self.blocks):
                pixels.seek(start * image_bytes)
                labels.seek(start * 8)
                if zlib.crc32(pixels.read((end - start) * image_bytes)) != pixel_crc or (
                        self.has_labels and zlib.crc32(labels.read((end - start) * 8)) != label_crc):
                    raise ValueError(f"{self.folder}: block {index} (images {start}-{end - 1}) fails its checksum: "
                                     "the synthetic memory changed since the checkpoint was written")
