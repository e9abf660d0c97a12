"""The run's teacher: loaded from --teacher-ckpt, or for digits trained once and cached."""
from __future__ import annotations

import hashlib
import os
import sys

import torch

from . import models
from .data import DatasetInfo, load_dataset
from .distill import train_supervised


def cache_dir() -> str:
    """Where the digits teacher is cached: $STARS_FAST_CACHE, else $XDG_CACHE_HOME/stars_fast,
    else ~/.cache/stars_fast."""
    if os.environ.get("STARS_FAST_CACHE"):
        return os.environ["STARS_FAST_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "stars_fast")


# bump "version" when the recipe changes, so cached teachers of the old recipe are not reused
DIGITS_TEACHER_RECIPE = {"epochs": 30, "lr": 0.05, "batch_size": 64, "seed": 0, "version": 1}


def _architecture_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the state-dict names and shapes, so a changed architecture misses the cache."""
    layout = [(key, tuple(value.shape)) for key, value in model.state_dict().items()]
    return hashlib.sha1(repr(layout).encode()).hexdigest()[:10]


def digits_teacher(name: str, info: DatasetInfo, device, progress: bool, log=print) -> torch.nn.Module:
    """The digits teacher: loaded from the cache, or trained on the digits train split and cached.

    It is trained under its own fixed seed (in a forked RNG), so every run and seed shares one teacher;
    the cache file name holds a fingerprint of the architecture and the recipe's version.
    """
    recipe = DIGITS_TEACHER_RECIPE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        teacher = models.build_teacher(name, info.num_classes, in_channels=info.in_channels)
        path = os.path.join(cache_dir(), f"digits-{name}-{_architecture_fingerprint(teacher)}-r{recipe['version']}.pt")
        if os.path.isfile(path):
            try:
                with torch.random.fork_rng(devices=[]):  # a failed load leaves the recipe's stream untouched
                    return models.load_teacher(name, path, info.num_classes, in_channels=info.in_channels).to(device)
            except (ValueError, models.CheckpointMismatchError) as exc:
                log(f"the cached digits teacher is damaged ({str(exc).splitlines()[0]}): training it again")
        log(f"training the digits teacher {name!r} (cached afterwards at {path})")
        train_supervised(teacher, load_dataset("digits", "train"), info, epochs=recipe["epochs"], lr=recipe["lr"],
                         batch_size=recipe["batch_size"], device=device,
                         generator=torch.Generator().manual_seed(recipe["seed"]), progress=progress)
    models.save_checkpoint({"state_dict": teacher.state_dict()}, path)
    return teacher


def load_run_teacher(config, info: DatasetInfo, device, log=print) -> torch.nn.Module:
    """The frozen teacher of a run; SystemExit with one line for a --teacher-ckpt that is missing or
    is not a checkpoint of --teacher."""
    path = config["teacher_ckpt"]
    if path is None:
        progress = config["progress"] and sys.stderr.isatty()  # no \r bars in redirected output
        teacher = digits_teacher(config["teacher"], info, device, progress, log=log)
    else:
        try:
            teacher = models.load_teacher(config["teacher"], path, info.num_classes,
                                          in_channels=info.in_channels).to(device)
        except FileNotFoundError:
            raise SystemExit(f"--teacher-ckpt {path}: no such file") from None
        except (ValueError, TypeError, models.CheckpointMismatchError) as exc:
            raise SystemExit(f"--teacher-ckpt {path}: not a checkpoint of --teacher {config['teacher']} "
                             f"({'; '.join(line.strip() for line in str(exc).splitlines() if line.strip())})") from None
    return models.freeze(teacher)
