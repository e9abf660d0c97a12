"""Loading teacher checkpoints (Fast-Datafree format) and writing checkpoints atomically."""
from __future__ import annotations

import os
import tempfile
from typing import Dict, Mapping

import torch
from torch import Tensor, nn

from .teachers import build_teacher

MODULE_PREFIX = "module."  # added by DataParallel / DistributedDataParallel


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys do not match the model: lists the missing and unexpected keys."""


def _unwrap_state_dict(checkpoint) -> Dict[str, Tensor]:
    """{'state_dict': sd, ...} or a bare sd -> sd, with any 'module.' prefix stripped."""
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"expected a state dict or {{'state_dict': ...}}, got {type(checkpoint).__name__}")
    return {key[len(MODULE_PREFIX):] if key.startswith(MODULE_PREFIX) else key: value
            for key, value in checkpoint.items()}


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint"):
    """model.load_state_dict(strict=True), raising CheckpointMismatchError that names every missing
    and unexpected key, or the shape mismatches (BatchNorm's num_batches_tracked may be absent, as in
    checkpoints from old PyTorch versions)."""
    expected = set(model.state_dict())
    given = set(state_dict)
    missing = sorted(k for k in expected - given if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source} does not match {type(model).__name__}: "
            f"missing keys {missing or 'none'}; unexpected keys {unexpected or 'none'}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # same keys, other shapes (e.g. another num_classes)
        raise CheckpointMismatchError(f"{source} does not match {type(model).__name__}: {exc}") from exc


def load_teacher(name: str, path: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build teacher `name` and load the checkpoint at `path` into it (strictly, weights_only=True).

    Accepts Fast-Datafree's {'state_dict': ...} files and bare state dicts, with or without the
    'module.' prefix. The model is returned in eval mode on the CPU.
    """
    model = build_teacher(name, num_classes, in_channels)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    load_state_dict_strict(model, _unwrap_state_dict(checkpoint), source=f"checkpoint {path!r} for {name!r}")
    return model.eval()


def save_checkpoint(obj, path: str) -> None:
    """torch.save(obj) to `path` atomically: write a temporary file in the same folder, fsync, then
    os.replace, so a crash never leaves a truncated checkpoint behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise
