"""stars_fast.data: the digits split, CIFAR / Tiny-ImageNet from small fake folders in the real
formats (ours and Fast-Datafree's torchdata/ layout), the errors for missing folders and malformed
files, and CIFAR batches that would run code when unpickled."""
import os
import pickle

import numpy as np
import pytest
import torch

from stars_fast.data import (DATASETS, DatasetFormatError, DatasetNotFoundError, class_names, denormalize, load_dataset,
                             normalize)


def test_digits_split_is_deterministic_disjoint_and_normalized():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    assert torch.equal(load_dataset("digits", "test").pixels, test.pixels)
    train_rows = {tuple(x.flatten().tolist()) for x in train.pixels}
    assert sum(tuple(x.flatten().tolist()) in train_rows for x in test.pixels) < 10  # a few true duplicates at most
    image, label = test[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and 0 <= int(label) < 10
    assert torch.bincount(test.labels, minlength=10).min() >= 40  # stratified
    pixels = denormalize(torch.stack([test[i][0] for i in range(len(test))]), DATASETS["digits"])
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def _cifar_batch(n, rng, labels_key, num_classes):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return {"batch_label": "fake", labels_key: rng.integers(0, num_classes, n).tolist(), "data": data,
            "filenames": [f"img{i}.png" for i in range(n)]}


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_cifar10_from_python_pickle_layout(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(4, rng, "labels", 10) for _ in range(5)]
    for i, batch in enumerate(batches, 1):
        _write_pickle(folder / f"data_batch_{i}", batch)
    test_batch = _cifar_batch(3, rng, "labels", 10)
    _write_pickle(folder / "test_batch", test_batch)

    train = load_dataset("cifar10", "train", str(tmp_path))
    test = load_dataset("cifar10", "test", str(folder))  # the folder itself works too
    assert (len(train), len(test)) == (20, 3)
    image, label = test[1]
    assert image.shape == (3, 32, 32) and int(label) == test_batch["labels"][1]
    # rows are R, G, B planes of 1024 row-major pixels each
    expected = torch.from_numpy(test_batch["data"][1].reshape(3, 32, 32).astype(np.float32) / 255.0)
    info = DATASETS["cifar10"]
    assert torch.allclose(image, normalize(expected[None], info)[0], atol=1e-6)
    assert int(train[5][1]) == batches[1]["labels"][1]


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 6), ("test", 2)):
        batch = _cifar_batch(n, rng, "fine_labels", 100)
        batch["coarse_labels"] = [0] * n
        _write_pickle(folder / split, batch)
    test = load_dataset("cifar100", "test", str(tmp_path))
    assert len(test) == 2 and len(load_dataset("cifar100", "train", str(tmp_path))) == 6
    with open(folder / "test", "rb") as f:
        assert int(test[1][1]) == pickle.load(f)["fine_labels"][1]


TINY_WNIDS = [f"n{i:03d}" for i in range(200)]


def _tiny_imagenet_root(tmp_path, wnids=TINY_WNIDS):
    root = tmp_path / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    return root


def test_tiny_imagenet_folder_layout(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = _tiny_imagenet_root(tmp_path, TINY_WNIDS[::-1])  # class index follows sorted order: n000 -> 0
    for wnid in TINY_WNIDS:
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        if wnid in ("n001", "n002"):
            for i in range(2):
                Image.new("RGB", (64, 64), (10, 20, 30)).save(images / f"{wnid}_{i}.JPEG")
    Image.new("L", (64, 64), 128).save(root / "val" / "images" / "val_0.JPEG")  # grayscale files exist
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn002\t0\t0\t63\t63\n")

    train = load_dataset("tiny-imagenet", "train", str(tmp_path))
    val = load_dataset("tiny-imagenet", "test", str(tmp_path))
    assert len(train) == 4 and sorted(train.labels.tolist()) == [1, 1, 2, 2]
    image, label = val[0]
    assert image.shape == (3, 64, 64) and int(label) == 2
    assert torch.allclose(denormalize(image[None], DATASETS["tiny-imagenet"]), torch.full((1, 3, 64, 64), 128 / 255),
                          atol=2 / 255)


@pytest.mark.parametrize("name, needle", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                          ("tiny-imagenet", "val_annotations.txt")])
def test_missing_folder_names_the_expected_layout(tmp_path, name, needle):
    with pytest.raises(DatasetNotFoundError, match=needle):
        load_dataset(name, "test", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="--data-root"):
        load_dataset(name, "test", None)


def test_incomplete_cifar_folder_names_the_missing_file(tmp_path):
    os.makedirs(tmp_path / "cifar-10-batches-py")
    with pytest.raises(DatasetNotFoundError, match="test_batch"):
        load_dataset("cifar10", "test", str(tmp_path))


def _write_cifar10(folder, rng, n=3):
    folder.mkdir(parents=True)
    for i in range(1, 6):
        _write_pickle(folder / f"data_batch_{i}", _cifar_batch(n, rng, "labels", 10))
    test_batch = _cifar_batch(n, rng, "labels", 10)
    _write_pickle(folder / "test_batch", test_batch)
    return test_batch


def test_fast_datafree_torchdata_layout_is_found(tmp_path):
    rng = np.random.default_rng(2)
    test_batch = _write_cifar10(tmp_path / "torchdata" / "cifar-10-batches-py", rng)
    test = load_dataset("cifar10", "test", str(tmp_path))
    assert len(test) == 3 and test.labels.tolist() == test_batch["labels"]
    assert len(load_dataset("cifar10", "train", str(tmp_path))) == 15
    folder = tmp_path / "torchdata" / "cifar-100-python"
    folder.mkdir()
    for split in ("train", "test"):
        _write_pickle(folder / split, _cifar_batch(2, rng, "fine_labels", 100))
    assert len(load_dataset("cifar100", "test", str(tmp_path))) == 2


class _RunsCommand:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_cifar_batch_that_would_run_a_command_is_refused(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, rng)
    marker = tmp_path / "ran"
    batch = _cifar_batch(3, rng, "labels", 10)
    batch["filenames"] = _RunsCommand(marker)
    _write_pickle(folder / "test_batch", batch)
    with pytest.raises(DatasetFormatError, match="system"):
        load_dataset("cifar10", "test", str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("content, needle", [
    (b"not a pickle at all", "not a python-pickle CIFAR batch"),
    (pickle.dumps([1, 2, 3]), "expected a dict"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}), "uint8"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}), "2 integer labels"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), r"\[0, 10\)"),
])
def test_garbage_cifar_file_is_a_one_line_error(tmp_path, content, needle):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(4))
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DatasetFormatError, match=needle) as caught:
        load_dataset("cifar10", "test", str(tmp_path))
    message = str(caught.value)
    assert "\n" not in message and "test_batch" in message


def test_unknown_tiny_imagenet_wnid_is_a_one_line_error(tmp_path):
    root = _tiny_imagenet_root(tmp_path)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn001\t0\t0\t63\t63\n"
                                                      "val_1.JPEG\tn999\t0\t0\t63\t63\n")
    with pytest.raises(DatasetFormatError, match=r"line 2: unknown wnid 'n999'.*wnids\.txt") as caught:
        load_dataset("tiny-imagenet", "test", str(tmp_path))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("wnids", [TINY_WNIDS[:199], TINY_WNIDS + ["n200"], TINY_WNIDS[:199] + ["n000"]],
                         ids=["199", "201", "a repeated one"])
def test_a_tiny_imagenet_wnid_list_of_other_than_200_distinct_ids_is_refused(tmp_path, wnids):
    """One wnid missing, extra or repeated would shift every later label: refused, not evaluated wrongly."""
    root = _tiny_imagenet_root(tmp_path, wnids)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn001\t0\t0\t63\t63\n")
    with pytest.raises(DatasetFormatError, match=r"wnids\.txt lists .* wnids .*200 distinct classes"):
        load_dataset("tiny-imagenet", "test", str(tmp_path))


def test_class_names_in_label_order(tmp_path):
    assert class_names("digits") == [str(d) for d in range(10)]
    assert class_names("cifar10")[0] == "airplane" and class_names("cifar10")[9] == "truck"
    names = class_names("cifar100")
    assert len(names) == 100 == len(set(names)) and names == sorted(names)  # CIFAR-100's meta order is alphabetical
    assert names[0] == "apple" and names[99] == "worm"
    assert class_names("tiny-imagenet")[:2] == ["class 0", "class 1"]  # no data folder
    root = tmp_path / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("n02\nn01\nn03\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\tEuropean fire salamander\nn99\tother\n")
    assert class_names("tiny-imagenet", str(tmp_path)) == ["goldfish", "European fire salamander", "n03"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_tiny_imagenet_image_is_a_one_line_error(tmp_path, damage):
    Image = pytest.importorskip("PIL.Image")
    root = _tiny_imagenet_root(tmp_path)
    image = root / "val" / "images" / "val_0.JPEG"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(image)
    if damage == "truncated":
        image.write_bytes(image.read_bytes()[:200])
    elif damage == "garbage":
        image.write_bytes(b"not a jpeg at all")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn002\t0\t0\t63\t63\n")
    val = load_dataset("tiny-imagenet", "test", str(tmp_path))
    if damage == "missing":
        image.unlink()
    with pytest.raises(DatasetFormatError, match="val_0.JPEG: cannot read the image") as caught:
        val[0]
    assert "\n" not in str(caught.value)


def test_an_empty_cifar_batch_is_a_one_line_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": np.zeros((0, 3072), np.uint8), "labels": []}, f)
    with pytest.raises(DatasetFormatError, match="test_batch holds no images"):
        load_dataset("cifar10", "test", str(tmp_path))
