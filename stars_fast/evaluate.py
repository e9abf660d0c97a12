"""`python -m stars_fast.evaluate --ckpt PATH`: top-1 and top-5 of a saved student or teacher on a test split.

Reads model files written by `stars_fast.models.save_student` (a run's student.pth / best.pth, a
`train_teacher` checkpoint) with weights_only=True. Prints one line per checkpoint, e.g.

    runs/x/best.pth: s_resnet18 (T=4, lif) on cifar10 test, 10000 images: top-1 95.11%  top-5 99.82%
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional, Sequence

from .cli import DATASET_NAMES

# (num_classes, in_channels) -> dataset, for model files that do not name theirs
DATASET_BY_SHAPE = {(10, 1): "digits", (10, 3): "cifar10", (100, 3): "cifar100", (200, 3): "tiny-imagenet"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stars_fast.evaluate", allow_abbrev=False,
        description="Top-1 and top-5 accuracy of a saved student (student.pth, best.pth) or teacher "
                    "(train_teacher's --out) on the test split of its dataset.")
    parser.add_argument("--ckpt", required=True, metavar="PATH", help="model file written by save_student")
    parser.add_argument("--dataset", choices=DATASET_NAMES,
                        help="test set (default: the one the file names, else the one its num_classes and "
                             "in_channels imply: 10x1 digits, 10x3 cifar10, 100 cifar100, 200 tiny-imagenet)")
    parser.add_argument("--data-root", metavar="DIR", help="folder holding CIFAR / Tiny-ImageNet (not for digits)")
    parser.add_argument("--T", type=int, metavar="N",
                        help="simulation time steps of a spiking student (default: the T it was trained with); "
                             "not Fast-Datafree's KD temperature")
    parser.add_argument("--batch-size", type=int, default=256, help="test batch size (default: 256)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    return parser


def infer_dataset(meta: Dict[str, object]) -> str:
    """The dataset a model file was trained on: its 'dataset' entry, else the one its shape implies."""
    named = meta.get("dataset")
    if isinstance(named, str) and named in DATASET_NAMES:
        return named
    key = (meta.get("num_classes"), meta.get("in_channels"))
    if key not in DATASET_BY_SHAPE:
        raise ValueError(f"cannot tell the dataset of a model with {key[0]} classes and {key[1]} input channels: "
                         f"pass --dataset")
    return DATASET_BY_SHAPE[key]


def topk_accuracy(model, dataset, *, ks: Sequence[int] = (1, 5), batch_size: int = 256, device="cpu") -> Dict[int, float]:
    """{k: fraction of test images whose label is among the model's k largest logits} (k capped at the class count)."""
    import torch
    from torch.utils.data import DataLoader

    device = torch.device(device)
    model = model.to(device).eval()
    hits = {k: 0 for k in ks}
    total = 0
    with torch.no_grad():
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            logits = model(images.to(device)).float()
            if not torch.isfinite(logits).all():
                raise ValueError("the model produced NaN or infinite logits")
            ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices.cpu()
            for k in ks:
                hits[k] += int((ranked[:, :k] == labels[:, None]).any(dim=1).sum())
            total += labels.numel()
    if total == 0:
        raise ValueError("the test split is empty")
    return {k: hits[k] / total for k in ks}


def describe(meta: Dict[str, object]) -> str:
    if meta.get("T") is None:
        return f"{meta['arch']} (ANN)"
    return f"{meta['arch']} (T={meta['T']}, {meta['neuron']})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.T is not None and args.T < 1:
        raise SystemExit(f"--T must be >= 1, got {args.T}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {args.batch_size}")

    from .data import DATASETS, DatasetFormatError, DatasetNotFoundError, load_dataset
    from .models import load_student
    from .train import resolve_device

    device = resolve_device(args.device)
    try:
        model, meta = load_student(args.ckpt, map_location="cpu")
    except FileNotFoundError:
        raise SystemExit(f"--ckpt {args.ckpt}: no such file") from None
    except ValueError as exc:
        raise SystemExit(str(exc).splitlines()[0]) from None  # load_student's messages name the file
    if args.T is not None:
        if meta.get("T") is None:
            raise SystemExit(f"--T applies to spiking students; {args.ckpt} holds the ANN {meta['arch']}")
        model.T = meta["T"] = args.T
    try:
        name = args.dataset or infer_dataset(meta)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    info = DATASETS[name]
    if (info.num_classes, info.in_channels) != (meta["num_classes"], meta["in_channels"]):
        raise SystemExit(f"{args.ckpt} has {meta['num_classes']} classes and {meta['in_channels']} input channels; "
                         f"{name} has {info.num_classes} and {info.in_channels}")
    try:
        test_set = load_dataset(name, "test", args.data_root)
        accuracy = topk_accuracy(model, test_set, batch_size=args.batch_size, device=device)
    except (DatasetNotFoundError, DatasetFormatError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    except RuntimeError as exc:  # e.g. --device cuda without a GPU
        raise SystemExit(f"evaluation failed on {device}: {str(exc).splitlines()[0]}") from None
    print(f"{args.ckpt}: {describe(meta)} on {name} test, {len(test_set)} images: "
          f"top-1 {100 * accuracy[1]:.2f}%  top-5 {100 * accuracy[5]:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
