"""`python -m stars_fast.train`: data-free ANN-to-SNN distillation with DeepInversion, CMI or NAYER + STARS.

With no arguments it runs the offline default: a small CNN teacher trained (once, then cached)
on scikit-learn's bundled digits, distilled into a small spiking student without touching the
training images, then both evaluated on the held-out digits. `--preset NAME` loads the
hyperparameters of the paper's Appendix A (presets.py; `--list-presets` prints them); explicit
flags override the preset.

This module starts a run: the command line and configuration (cli.py), the checks that need
torch (device, teacher/student pair, teacher checkpoint), the run folder (run_folder.py: its files,
resuming its checkpoint), then the loop (loop.py). Several processes: `torchrun --nproc_per_node N
-m stars_fast.train ...` trains with DistributedDataParallel (distributed.py).
`--resume` continues the run in `--out` from its checkpoint up to `--epochs`; a run killed
mid-epoch loses that epoch only. A resume is the same run: it may change only RESUMABLE_FLAGS
(each change is recorded in the configuration, so in summary.json); any other flag given with a
value other than the run's is refused with one line listing them. Errors a user can fix end the
run with one line (SystemExit), and an error before the first checkpoint leaves no run folder behind.

Imports are lazy, so that `--help` and `--list-presets` answer without importing torch.
"""
from __future__ import annotations

import datetime
import errno
import os
import sys
from typing import Dict, List, Optional

from .cli import METHODS, build_parser, make_config, parse_args  # noqa: F401  (the CLI, re-exported)
from .presets import PRESETS, format_presets

# names that lived here before the split, re-exported lazily (they import torch)
_MOVED = {"digits_teacher": "teacher_cache", "DIGITS_TEACHER_RECIPE": "teacher_cache", "cache_dir": "teacher_cache",
          "load_run_teacher": "teacher_cache", "CHECKPOINT_FORMAT": "run_folder"}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'stars_fast.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_MOVED[name]}", __package__), name)


def _default_out() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = os.path.join("runs", stamp), 1
    while os.path.exists(out):
        n += 1
        out = os.path.join("runs", f"{stamp}-{n}")
    return out


def resolve_device(name: str):
    """--device -> torch.device, or SystemExit with one line for a name or a GPU that is not there."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        raise SystemExit(f"--device {name!r}: only cpu and cuda devices are supported")
    return device


def check_pair(config: Dict[str, object]) -> None:
    """With STARS on, the teacher and the student must tap as many stages (STARS pairs the taps in
    order). A student taps what the ANN it mirrors taps; both ANNs are run on the meta device, so
    nothing is computed. SystemExit with the paper's pairs."""
    if not config["stars"]:
        return
    import torch

    from . import models
    from .data import DATASETS
    from .models.students import STUDENT_ARCHITECTURES

    info = DATASETS[config["dataset"]]
    x = torch.empty(2, info.in_channels, info.image_size, info.image_size, device="meta")
    with torch.device("meta"), torch.no_grad():
        taps = [len(models.build_teacher(name, info.num_classes, info.in_channels)(x, return_taps=True)[1])
                for name in (config["teacher"], STUDENT_ARCHITECTURES[config["student"]])]
    if taps[0] != taps[1]:
        pairs = ", ".join(f"{teacher} -> {student}" for student, teacher in models.PAIRS.items())
        raise SystemExit(f"--teacher {config['teacher']} taps {taps[0]} stages but --student {config['student']} "
                         f"taps {taps[1]}: STARS pairs them stage by stage (pairs that fit: {pairs}; or --no-stars)")
    layers, weights = config["stars_layers"], config["stars_weights"]
    if layers is not None and (len(set(layers)) != len(layers) or min(layers) < 0 or max(layers) >= taps[0]):
        raise SystemExit(f"--stars-layers {' '.join(map(str, layers))}: distinct tap indices of the pair's "
                         f"{taps[0]} stages, 0..{taps[0] - 1}")
    selected = taps[0] if layers is None else len(layers)
    if weights is not None and (len(weights) != selected or min(weights) < 0 or sum(weights) <= 0):
        raise SystemExit(f"--stars-weights {' '.join(map(str, weights))}: one weight >= 0 for each of the {selected} "
                         f"STARS layers, of positive sum")


def preflight(config: Dict[str, object]):
    """Every configuration error found before any work starts (the teacher is loaded after this),
    SystemExit with one line naming the flag or environment variable. Returns the run's device."""
    from . import _backend
    from .teacher_cache import cache_dir

    device = resolve_device(config["device"])
    try:
        _backend.resolve(config["backend"], device)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"--backend {config['backend']}: {exc}") from None
    cache = cache_dir()
    if os.path.exists(cache) and not os.path.isdir(cache):
        raise SystemExit(f"the teacher cache {cache} (STARS_FAST_CACHE, or the default) is a file, not a folder")
    stars_on = config["stars"] and (config["lambda_rca"] > 0 or config["lambda_tar"] > 0)
    if stars_on and config["synthesis_batch_size"] < 2:
        raise SystemExit("--synthesis-batch-size must be >= 2 with STARS: RCA compares pairs of images "
                         "(or --no-stars)")
    export = config.get("export_synthetic")
    if export is not None and os.path.exists(export) and not os.path.isdir(export):
        raise SystemExit(f"--export-synthetic {export}: a file, not a folder")
    check_pair(config)
    return device


# What a --resume may change: how far the run goes, how it is watched, where its data now lives. Every
# other flag defines the run, and changing one mid-run would credit one run with two runs' epochs.
RESUMABLE_FLAGS = ("epochs", "out", "resume", "progress", "tensorboard", "threads", "data_root", "grad_shares",
                   "dist_timeout")


def resume_config(explicit: Dict[str, object], checkpoint: Dict[str, object]) -> Dict[str, object]:
    """The resumed run's configuration with the flags given now; SystemExit naming every run-defining
    flag whose value differs from the run's. Changes of RESUMABLE_FLAGS are appended to
    config["resume_changes"]."""
    saved = checkpoint["config"]
    config = make_config(explicit, base=saved)
    changed = [key for key in explicit if config[key] != saved.get(key)]
    refused = [key for key in changed if key not in RESUMABLE_FLAGS]
    if refused:
        listed = ", ".join(f"--{key.replace('_', '-')} {saved.get(key)!r} (run) vs {config[key]!r} (given)"
                           for key in refused)
        allowed = ", ".join(f"--{key.replace('_', '-')}" for key in RESUMABLE_FLAGS if key not in ("out", "resume"))
        raise SystemExit(f"cannot resume {saved['out']} with other settings: {listed}; a resume may change only "
                         f"{allowed}")
    config["resume_changes"] = list(saved.get("resume_changes", [])) + [
        {"after_epoch": checkpoint["epoch"], "flag": f"--{key.replace('_', '-')}", "from": saved.get(key),
         "to": config[key]} for key in changed if key not in ("out", "resume", "progress")]
    return config


def main(argv: Optional[List[str]] = None) -> Optional[Dict[str, object]]:
    """Run the CLI; returns the final summary (what summary.json holds), or None for --list-presets."""
    explicit = parse_args(argv)
    if explicit.pop("list_presets", False):
        print(format_presets(PRESETS))
        return None
    export_dir = explicit.pop("export_synthetic", None)  # what this invocation does, not the run's configuration
    from . import distributed
    from .data import DatasetFormatError, DatasetNotFoundError
    from .loop import NonFiniteError, train
    from .run_folder import RunFolder

    out = explicit.get("out")  # without --out, rank 0 names a new folder below
    checkpoint = None
    if out is not None and os.path.isfile(os.path.join(out, "checkpoint.pt")):
        if not explicit.get("resume"):
            raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or another --out")
        checkpoint = RunFolder(out).load_checkpoint()
    config = make_config(explicit) if checkpoint is None else resume_config(explicit, checkpoint)
    config["resume"], config["export_synthetic"] = False, export_dir
    if config["teacher_ckpt"] is not None and not os.path.isfile(config["teacher_ckpt"]):
        raise SystemExit(f"--teacher-ckpt {config['teacher_ckpt']}: no such file")
    device = preflight(config)
    with distributed.setup(device, timeout_s=config.get("dist_timeout", 300)) as ctx:
        if checkpoint is not None and len(checkpoint["rng"]) != ctx.world_size:
            raise SystemExit(f"{out} was written by {len(checkpoint['rng'])} processes; resume it with as many "
                             f"(torchrun --nproc_per_node {len(checkpoint['rng'])}), not {ctx.world_size}")
        config["out"] = out or ctx.broadcast(_default_out())  # one folder, named by rank 0
        folder = RunFolder(config["out"], writer=ctx.is_main)
        folder.create()
        try:
            return train(config, checkpoint, ctx, folder)
        except BaseException as exc:
            folder.close()
            folder.remove_if_unfinished()
            if isinstance(exc, (NonFiniteError, DatasetNotFoundError, DatasetFormatError)):  # one-line errors
                raise SystemExit(str(exc)) from None
            raise
        finally:
            folder.release()


# Failures of the machine rather than of the configuration: the run folder keeps its last finished epoch.
STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES)


def cli(argv: List[str]) -> None:
    """The command line: an interrupt or a storage failure ends as one line saying what is kept and how
    to go on (STARS_FAST_DEBUG=1 shows the traceback instead); configuration errors are SystemExit lines."""
    debug = os.environ.get("STARS_FAST_DEBUG", "0") == "1"
    try:
        main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: the run folder keeps its last finished epoch; continue with --resume", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if debug or exc.errno not in STORAGE_ERRORS:
            raise
        sys.exit(f"{exc.strerror}: {exc.filename or ''}; the run folder keeps its last finished epoch "
                 f"(checkpoint.pt): fix the storage, then continue with --resume (STARS_FAST_DEBUG=1: traceback)")


if __name__ == "__main__":
    cli(sys.argv[1:])
