"""`python -m stars_fast.train_teacher`: train an ANN teacher on real data (the paper's VGG-16 and ResNet-19
teachers have no public Fast-Datafree weights).

The standard recipe (stars_fast.distill.train_supervised): cross-entropy, SGD with momentum 0.9 and
weight decay 5e-4, lr 0.1 with per-step cosine decay to 0, random crop (padding 4; 1 for 8x8 digits)
and horizontal flip -- except for digits, where a mirrored digit is another glyph (DatasetInfo.flip).
After every epoch the test top-1 is printed, and the best epoch's model is written to --out with
models.save_student in Fast-Datafree's format ({'state_dict', 'arch', 'best_acc1', 'epoch', ...}),
which `python -m stars_fast.train --teacher ARCH --teacher-ckpt PATH` loads.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

from .cli import DATASET_NAMES, TEACHER_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stars_fast.train_teacher", allow_abbrev=False,
        description="Train an ANN teacher with the standard recipe (SGD momentum 0.9, lr 0.1, cosine, weight decay "
                    "5e-4, random crop + horizontal flip; no flip for digits), evaluating on the test split after "
                    "every epoch and keeping the best epoch in --out (a checkpoint train --teacher-ckpt accepts).")
    parser.add_argument("--teacher", required=True, choices=TEACHER_NAMES, help="architecture")
    parser.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="training and test data")
    parser.add_argument("--data-root", metavar="DIR", help="folder holding CIFAR / Tiny-ImageNet (not for digits)")
    parser.add_argument("--epochs", required=True, type=int, metavar="N", help="training epochs (the paper's "
                        "teachers: 200 is usual for CIFAR)")
    parser.add_argument("--out", required=True, metavar="PATH", help="checkpoint file of the best epoch (.pth)")
    parser.add_argument("--lr", type=float, default=0.1, help="initial learning rate (default: 0.1)")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batch order")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _check_args(args) -> None:
    if args.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise SystemExit(f"--lr must be a finite number > 0, got {args.lr}")
    if os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out} is a folder; give the checkpoint's file name, e.g. {args.out}/teacher.pth")
    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"--out {args.out}: cannot create {folder} ({exc.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"--out {args.out}: {folder} is not writable")


def main(argv: Optional[Sequence[str]] = None) -> float:
    """Train, evaluate each epoch, keep the best; returns the best test top-1 (a fraction)."""
    args = build_parser().parse_args(argv)
    _check_args(args)

    import torch

    from . import models
    from .data import DATASETS, DatasetFormatError, DatasetNotFoundError, load_dataset
    from .distill import evaluate, train_supervised
    from .train import resolve_device

    info = DATASETS[args.dataset]
    device = resolve_device(args.device)
    if args.dataset == "digits":
        torch.set_num_threads(1)  # 8x8 images: one thread beats several on a shared CPU (as train does)
    try:
        train_set = load_dataset(args.dataset, "train", args.data_root)
        test_set = load_dataset(args.dataset, "test", args.data_root)
    except (DatasetNotFoundError, DatasetFormatError) as exc:
        raise SystemExit(str(exc)) from None
    torch.manual_seed(args.seed)
    teacher = models.build_teacher(args.teacher, info.num_classes, in_channels=info.in_channels)
    best = {"acc": -1.0, "epoch": 0}
    started = time.time()

    def after_epoch(epoch: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise SystemExit(f"epoch {epoch}: the training loss is {loss}; lower --lr (now {args.lr})")
        acc = evaluate(teacher, test_set, device=device)
        if acc > best["acc"]:
            best.update(acc=acc, epoch=epoch)
            models.save_student(args.out, teacher, arch=args.teacher, num_classes=info.num_classes,
                                in_channels=info.in_channels, T=None, neuron=None, acc=acc, epoch=epoch,
                                best_acc1=acc, dataset=args.dataset)
        print(f"epoch {epoch}/{args.epochs}  loss {loss:.4f}  top-1 {100 * acc:.2f}%  best {100 * best['acc']:.2f}%  "
              f"{time.time() - started:.1f} s", flush=True)

    try:
        train_supervised(teacher, train_set, info, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         device=device, generator=torch.Generator().manual_seed(args.seed),
                         progress=not args.no_progress and sys.stderr.isatty(), on_epoch=after_epoch)
    except RuntimeError as exc:
        raise SystemExit(f"training failed on {device}: {str(exc).splitlines()[0]}") from None
    print(f"best top-1 {100 * best['acc']:.2f}% at epoch {best['epoch']} -> {args.out}")
    return best["acc"]


if __name__ == "__main__":
    main()
