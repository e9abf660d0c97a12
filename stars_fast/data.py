"""Evaluation data: scikit-learn's bundled digits (offline default), CIFAR-10/100, Tiny-ImageNet.

Nothing is ever downloaded. CIFAR and Tiny-ImageNet are read from a local folder in their
standard layouts (see `EXPECTED_LAYOUT`; Fast-Datafree's `<data-root>/torchdata/` is searched too);
a missing folder raises `DatasetNotFoundError` naming the layout that was expected, a file that is
not what the layout says (a garbage CIFAR batch, an unknown Tiny-ImageNet wnid) `DatasetFormatError`.
The CIFAR pickles are read with `safe_pickle.restricted_load`: numpy arrays and builtins only, so a
batch file cannot run code. Every dataset yields `(image, label)` with the image a
float tensor `[C, H, W]` normalized with the dataset's mean and std (`DatasetInfo`), which is
also the input space the synthesizers optimize in.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .safe_pickle import restricted_load


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: shapes, normalization and the augmentations that suit it."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    flip: bool  # horizontal flips keep the class (not for digits)
    crop_padding: int  # random-crop padding of the KD-phase augmentation


DATASETS = {
    # digits in [0, 1] (pixel / 16); mean and std of all 1797 images
    "digits": DatasetInfo("digits", 10, 1, 8, (0.3053,), (0.3760,), flip=False, crop_padding=1),
    # Fast-Datafree's NORMALIZE_DICT values, so that its pretrained teachers see the inputs they expect
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
                           flip=True, crop_padding=4),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
                            flip=True, crop_padding=4),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 200, 3, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                                 flip=True, crop_padding=4),
}

EXPECTED_LAYOUT = {
    "cifar10": "<data-root>/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch} "
               "(the python-pickle version of CIFAR-10; <data-root>/torchdata/cifar-10-batches-py too)",
    "cifar100": "<data-root>/cifar-100-python/{train, test} (the python-pickle version of CIFAR-100; "
                "<data-root>/torchdata/cifar-100-python too)",
    "tiny-imagenet": "<data-root>/tiny-imagenet-200/ with train/<wnid>/images/*.JPEG, "
                     "val/images/*.JPEG and val/val_annotations.txt (wnids.txt optional)",
}

# label order of the datasets' own meta files (batches.meta label_names; meta fine_label_names)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can
    castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
    elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
    man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck
    pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
    skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger
    tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0


# Fast-Datafree's registry keeps torchvision datasets under <data_root>/torchdata/
FAST_DATAFREE_SUBFOLDER = "torchdata"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder is missing or incomplete; the message names the expected layout."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the format its layout promises; the message says which file."""


def normalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """[N, C, H, W] pixels in [0, 1] -> the normalized input space of the models."""
    mean = torch.tensor(info.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def denormalize(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Inverse of `normalize`: normalized inputs -> pixels (not clamped)."""
    mean = torch.tensor(info.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * std + mean


class PixelDataset(Dataset):
    """In-memory images (uint8 in [0, 255] or float in [0, 1]), [N, C, H, W], with integer labels."""

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        if pixels.shape[0] != labels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {labels.shape[0]} labels")
        self.pixels, self.labels, self.info = pixels, labels.long(), info

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def __getitem__(self, index: int):
        x = self.pixels[index : index + 1]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return normalize(x, self.info)[0], self.labels[index]


class ImageFileDataset(Dataset):
    """Images decoded from files on demand (Tiny-ImageNet), converted to RGB."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], info: DatasetInfo):
        self.paths, self.labels, self.info = list(paths), torch.tensor(list(labels), dtype=torch.long), info

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except (OSError, SyntaxError, ValueError) as exc:  # missing, truncated or not an image (Pillow's errors)
            raise DatasetFormatError(f"{self.paths[index]}: cannot read the image ({exc})") from None
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255.0
        return normalize(x, self.info)[0], self.labels[index]


def load_dataset(name: str, split: str, root: Optional[str] = None) -> Dataset:
    """The `split` ("train" or "test") of dataset `name`; `root` is the local folder (not for digits).

    For Tiny-ImageNet, "test" is the labelled `val` split.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    info = DATASETS[name]
    if name == "digits":
        return _load_digits(split, info)
    if root is None:
        raise DatasetNotFoundError(f"dataset {name!r} needs --data-root; expected layout: {EXPECTED_LAYOUT[name]}")
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, split, root, info)
    return _load_tiny_imagenet(split, root, info)


def class_names(name: str, root: Optional[str] = None) -> List[str]:
    """Human-readable class names in label order. Tiny-ImageNet's come from words.txt (first synonym of
    each wnid) when `root` holds the dataset, else the wnids, else "class <i>"."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if name == "digits":
        return [str(d) for d in range(10)]
    if name == "cifar10":
        return list(CIFAR10_CLASSES)
    if name == "cifar100":
        return list(CIFAR100_CLASSES)
    fallback = [f"class {i}" for i in range(DATASETS[name].num_classes)]
    if root is None:
        return fallback
    try:
        folder = _find_folder(root, "tiny-imagenet-200", name)
        wnids = _tiny_imagenet_wnids(folder)
    except DatasetNotFoundError:
        return fallback
    words = {}
    listing = os.path.join(folder, "words.txt")
    if os.path.isfile(listing):
        with open(listing, encoding="utf-8", errors="replace") as f:
            for line in f:
                wnid, _, synonyms = line.rstrip("\n").partition("\t")
                words[wnid.strip()] = synonyms.split(",")[0].strip()
    return [words.get(wnid) or wnid for wnid in wnids]


def _load_digits(split: str, info: DatasetInfo) -> PixelDataset:
    """scikit-learn's 1797 8x8 digits, pixels / 16, split 75/25 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(indices, test_size=DIGITS_TEST_FRACTION, stratify=digits.target,
                                           random_state=DIGITS_SPLIT_SEED)
    idx = np.sort(train_idx if split == "train" else test_idx)
    pixels = torch.from_numpy(digits.images[idx] / 16.0).float().unsqueeze(1)
    return PixelDataset(pixels, torch.from_numpy(digits.target[idx]), info)


def _find_folder(root: str, folder: str, name: str) -> str:
    """`root/folder`, Fast-Datafree's `root/torchdata/folder`, or `root` itself when it already is that folder."""
    root = os.path.expanduser(root)
    for candidate in (os.path.join(root, folder), os.path.join(root, FAST_DATAFREE_SUBFOLDER, folder), root):
        if os.path.basename(os.path.normpath(candidate)) == folder and os.path.isdir(candidate):
            return candidate
    raise DatasetNotFoundError(f"no {folder}/ folder under {root!r}; expected layout: {EXPECTED_LAYOUT[name]}")


def _read_cifar_batch(path: str, name: str, label_key: str, num_classes: int) -> Tuple[np.ndarray, np.ndarray]:
    """One python-pickle CIFAR batch -> (data uint8 [N, 3072], labels int64 [N]), checked."""
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"missing file {path!r}; expected layout: {EXPECTED_LAYOUT[name]}")
    try:
        batch = restricted_load(path)
    except pickle.UnpicklingError as error:
        raise DatasetFormatError(f"{path} is not a python-pickle CIFAR batch: {error}") from None
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        found = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetFormatError(f"{path} is not a CIFAR batch: expected a dict with 'data' and {label_key!r}, "
                                 f"found {found}")
    data, labels = batch["data"], np.asarray(batch[label_key])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise DatasetFormatError(f"{path}: 'data' must be a uint8 array [N, 3072], got "
                                 f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if data.shape[0] == 0:  # nothing to train or evaluate on (an accuracy over no images is no number)
        raise DatasetFormatError(f"{path} holds no images")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer) or (
            labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
        raise DatasetFormatError(f"{path}: {label_key!r} must hold {data.shape[0]} integer labels in "
                                 f"[0, {num_classes}), got {labels.dtype} {labels.shape}")
    return data, labels.astype(np.int64)


def _load_cifar(name: str, split: str, root: str, info: DatasetInfo) -> PixelDataset:
    """CIFAR from the python-pickle batches: `data` uint8 [N, 3072] (RGB planes), labels list."""
    if name == "cifar10":
        folder = _find_folder(root, "cifar-10-batches-py", name)
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
    else:
        folder = _find_folder(root, "cifar-100-python", name)
        files = [split]
        label_key = "fine_labels"
    batches = [_read_cifar_batch(os.path.join(folder, f), name, label_key, info.num_classes) for f in files]
    data = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([labels for _, labels in batches])
    return PixelDataset(torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)), torch.from_numpy(labels), info)


def _load_tiny_imagenet(split: str, root: str, info: DatasetInfo) -> ImageFileDataset:
    """Tiny-ImageNet's standard folders; class index = position of the wnid in sorted order
    (what torchvision's ImageFolder on train/ gives, so ImageFolder-trained teachers agree)."""
    name = "tiny-imagenet"
    folder = _find_folder(root, "tiny-imagenet-200", name)
    wnids = _tiny_imagenet_wnids(folder)
    if len(set(wnids)) != len(wnids) or len(wnids) != info.num_classes:
        # a wnid missing, extra or repeated would shift every later class index: all labels wrong
        raise DatasetFormatError(f"{_wnid_source(folder)} lists {len(wnids)} wnids ({len(set(wnids))} distinct); "
                                 f"Tiny-ImageNet has {info.num_classes} distinct classes")
    index = {w: i for i, w in enumerate(wnids)}
    paths: List[str] = []
    labels: List[int] = []
    if split == "train":
        for wnid in wnids:
            image_dir = os.path.join(folder, "train", wnid, "images")
            if not os.path.isdir(image_dir):
                raise DatasetNotFoundError(f"missing {image_dir!r}; expected layout: {EXPECTED_LAYOUT[name]}")
            for f in sorted(os.listdir(image_dir)):
                paths.append(os.path.join(image_dir, f))
                labels.append(index[wnid])
    else:
        annotations = os.path.join(folder, "val", "val_annotations.txt")
        if not os.path.isfile(annotations):
            raise DatasetNotFoundError(f"missing {annotations!r}; expected layout: {EXPECTED_LAYOUT[name]}")
        with open(annotations) as f:
            for line_number, line in enumerate(f, 1):
                fields = line.split("\t")
                if len(fields) >= 2:
                    wnid = fields[1].strip()
                    if wnid not in index:
                        raise DatasetFormatError(
                            f"{annotations}, line {line_number}: unknown wnid {wnid!r} (not among the "
                            f"{len(wnids)} classes of {_wnid_source(folder)})")
                    paths.append(os.path.join(folder, "val", "images", os.path.basename(fields[0])))
                    labels.append(index[wnid])
    return ImageFileDataset(paths, labels, info)


def _wnid_source(folder: str) -> str:
    listing = os.path.join(folder, "wnids.txt")
    return listing if os.path.isfile(listing) else os.path.join(folder, "train") + os.sep


def _tiny_imagenet_wnids(folder: str) -> List[str]:
    listing = os.path.join(folder, "wnids.txt")
    if os.path.isfile(listing):
        with open(listing) as f:
            return sorted(line.strip() for line in f if line.strip())
    train = os.path.join(folder, "train")
    if not os.path.isdir(train):
        raise DatasetNotFoundError(f"neither wnids.txt nor train/ in {folder!r}; "
                                   f"expected layout: {EXPECTED_LAYOUT['tiny-imagenet']}")
    return sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))
