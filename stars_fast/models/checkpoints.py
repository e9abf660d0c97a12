"""Teacher checkpoints (Fast-Datafree format), portable student files (student.pth / best.pth),
and atomic checkpoint writes."""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from .students import STUDENTS, build_student
from .teachers import TEACHERS, build_teacher

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


def _load_weights_only(path: str, map_location):
    """torch.load(weights_only=True); a missing file raises FileNotFoundError, anything torch.load
    cannot read (garbage, a truncated file, a refused global: many exception types) ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (the unpickler raises IndexError, KeyError, ... on garbage)
        raise ValueError(f"{path} is not a checkpoint torch.load can read with weights_only=True "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def load_teacher(name: str, path: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build teacher `name` and load the checkpoint at `path` into it (strictly, weights_only=True).

    Accepts Fast-Datafree's {'state_dict': ...} files and bare state dicts, with or without the
    'module.' prefix. A zip archive (torch.save's format) has every record's CRC checked first, so a
    flipped bit is refused rather than distilled from; a file that names its `arch` (a model file of
    save_student) must name this teacher. The model is returned in eval mode on the CPU.
    """
    model = build_teacher(name, num_classes, in_channels)
    if zipfile.is_zipfile(path):
        verify_checkpoint(path)
    checkpoint = _load_weights_only(path, "cpu")
    if isinstance(checkpoint, Mapping) and "arch" in checkpoint and checkpoint["arch"] != name:
        role = "a spiking student" if checkpoint["arch"] in STUDENTS else "a model"
        raise ValueError(f"{path} is {role} file of arch {checkpoint['arch']!r}, not a {name!r} teacher")
    load_state_dict_strict(model, _unwrap_state_dict(checkpoint), source=f"checkpoint {path!r} for {name!r}")
    return model.eval()


def save_checkpoint(obj, path: str) -> None:
    """torch.save(obj) to `path` atomically (stars_fast.atomic.atomic_write: a temporary file in the
    same folder, fsync, os.replace), so a crash never leaves a truncated checkpoint and the previous
    one stays until the new one is complete; mode 0666 & ~umask, like any file open() creates."""
    atomic_write(path, lambda f: torch.save(obj, f))


def verify_checkpoint(path: str) -> None:
    """Raise ValueError if `path` is not an intact torch.save zip archive: every record's CRC-32 is
    checked (ZipFile.testzip), so flipped bytes inside a tensor are caught before the file is used."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable checkpoint ({exc})") from exc
    if bad is not None:
        raise ValueError(f"{path} is corrupted: record {bad!r} fails its CRC check")


def save_student(path: str, model: nn.Module, *, arch: str, num_classes: int, in_channels: int,
                 T: Optional[int], neuron: Optional[str], acc: Optional[float], epoch: Optional[int],
                 **extra) -> None:
    """Write a portable model file atomically, Fast-Datafree style plus what rebuilds the model:
    {'state_dict', 'arch', 'num_classes', 'in_channels', 'T', 'neuron', 'acc', 'epoch', **extra}
    (best.pth also passes best_acc1). Teachers are written with T=None, neuron=None."""
    model = getattr(model, "module", model)  # DistributedDataParallel -> the model
    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    save_checkpoint({"state_dict": state_dict, "arch": arch, "num_classes": int(num_classes),
                     "in_channels": int(in_channels), "T": None if T is None else int(T), "neuron": neuron,
                     "acc": acc, "epoch": epoch, **extra}, path)


def load_student(path: str, map_location="cpu") -> Tuple[nn.Module, Dict[str, object]]:
    """A file of save_student -> (the rebuilt model in eval mode, its metadata without state_dict).

    Read with weights_only=True; a file that is not such a checkpoint raises ValueError saying why.
    A student (arch in STUDENTS) is rebuilt with its T and neuron, a teacher (arch in TEACHERS) as an ANN.
    """
    checkpoint = _load_weights_only(path, map_location)
    required = ("state_dict", "arch", "num_classes", "in_channels", "T", "neuron")
    if not isinstance(checkpoint, Mapping) or any(key not in checkpoint for key in required):
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"{path} is not a stars_fast model file: expected the keys {list(required)} "
                         f"(written by save_student), found {found}")
    meta = {key: value for key, value in checkpoint.items() if key != "state_dict"}
    arch, num_classes, in_channels = meta["arch"], meta["num_classes"], meta["in_channels"]
    if not (isinstance(num_classes, int) and num_classes >= 1 and isinstance(in_channels, int) and in_channels >= 1):
        raise ValueError(f"{path}: num_classes and in_channels must be positive integers, got "
                         f"{num_classes!r} and {in_channels!r}")
    if arch in STUDENTS:
        if not (isinstance(meta["T"], int) and meta["T"] >= 1 and isinstance(meta["neuron"], str)):
            raise ValueError(f"{path}: student {arch!r} needs an integer T >= 1 and a neuron name, "
                             f"got T={meta['T']!r}, neuron={meta['neuron']!r}")
        try:
            model = build_student(arch, num_classes, T=meta["T"], neuron=meta["neuron"], in_channels=in_channels)
        except (ValueError, KeyError) as exc:
            raise ValueError(f"{path}: cannot rebuild student {arch!r}: {exc}") from exc
    elif arch in TEACHERS:
        model = build_teacher(arch, num_classes, in_channels)
    else:
        raise ValueError(f"{path}: unknown arch {arch!r}; expected one of {STUDENTS + TEACHERS}")
    try:
        load_state_dict_strict(model, _unwrap_state_dict(checkpoint), source=path)
    except (CheckpointMismatchError, TypeError) as exc:
        raise ValueError(str(exc)) from exc
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    return model.eval(), meta
