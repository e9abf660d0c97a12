"""stars_fast.images: labelled class grids (one row per class, names on the left), the real-data
reference grid, bad inputs, and atomic writes."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from stars_fast.data import DATASETS, normalize
from stars_fast.images import CELL_PADDING, save_class_grid, save_real_reference

CIFAR = DATASETS["cifar10"]


def _read(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


def _cell(picture, row, col, size, margin):
    """The pixels of grid cell (row, col): make_grid puts cell (r, c) at padding + index * (size + padding)."""
    y = CELL_PADDING + row * (size + CELL_PADDING)
    x = margin + CELL_PADDING + col * (size + CELL_PADDING)
    return picture[y:y + size, x:x + size]


def test_one_row_per_present_class_in_label_order(tmp_path):
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(7, 3, 32, 32, generator=gen)
    labels = torch.tensor([5, 2, 5, 2, 5, 5, 9])  # class 5 has 4 images, max_per_class=3 keeps the first 3
    path = tmp_path / "grid.png"
    save_class_grid(str(path), normalize(pixels, CIFAR), labels, CIFAR, max_per_class=3)
    picture = _read(path)
    size = 64  # 32 px enlarged x2 (nearest) to reach 48 px
    grid_width = CELL_PADDING + 3 * (size + CELL_PADDING)
    margin = picture.shape[1] - grid_width
    assert picture.shape[0] == CELL_PADDING + 3 * (size + CELL_PADDING) and margin > 0  # rows: 2, 5, 9
    expected_rows = [[1, 3], [0, 2, 4], [6]]
    for row, indices in enumerate(expected_rows):
        for col in range(3):
            cell = _cell(picture, row, col, size, margin).astype(np.int64)
            if col < len(indices):
                expected = (pixels[indices[col]].repeat_interleave(2, 1).repeat_interleave(2, 2) * 255).round()
                assert np.abs(cell - expected.permute(1, 2, 0).numpy()).max() <= 1
            else:
                assert (cell == 255).all()  # empty cells are background
        label_area = picture[CELL_PADDING + row * (size + CELL_PADDING):(row + 1) * (size + CELL_PADDING), :margin]
        assert (label_area < 128).any(), f"row {row} has no label drawn"
    assert not [f for f in os.listdir(tmp_path) if f != "grid.png"]  # no temporary file left


def test_small_images_are_enlarged_and_grayscale_works(tmp_path):
    digits = DATASETS["digits"]
    pixels = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "digits.png"
    save_class_grid(str(path), normalize(pixels, digits), torch.tensor([3, 3]), digits, max_per_class=2)
    picture = _read(path)
    size = 48  # 8 px x 6
    margin = picture.shape[1] - (CELL_PADDING + 2 * (size + CELL_PADDING))
    cell = _cell(picture, 0, 1, size, margin).astype(np.int64)
    expected = (pixels[1, 0].repeat_interleave(6, 0).repeat_interleave(6, 1) * 255).round().numpy()
    for channel in range(3):
        assert np.abs(cell[..., channel] - expected).max() <= 1


def test_unlabelled_images_fill_rows_without_labels(tmp_path):
    path = tmp_path / "plain.png"
    save_class_grid(str(path), torch.zeros(5, 3, 32, 32), None, CIFAR, max_per_class=4)
    picture = _read(path)
    assert picture.shape[:2] == (CELL_PADDING + 2 * 66, CELL_PADDING + 4 * 66)  # no label margin


def test_out_of_range_pixels_are_clamped(tmp_path):
    path = tmp_path / "clamped.png"
    save_class_grid(str(path), torch.full((1, 3, 32, 32), 1e6), torch.tensor([0]), CIFAR, max_per_class=1)
    picture = _read(path)
    margin = picture.shape[1] - (CELL_PADDING + 66)
    assert (_cell(picture, 0, 0, 64, margin) == 255).all()


def test_real_reference_uses_the_test_split(tmp_path):
    path = tmp_path / "real.png"
    save_real_reference(str(path), DATASETS["digits"], max_per_class=2)
    picture = _read(path)
    assert picture.shape[0] == CELL_PADDING + 10 * 50  # ten classes, 48 px cells


@pytest.mark.parametrize("images, labels, error, match", [
    (torch.zeros(2, 3, 32), None, ValueError, r"\[N, C, H, W\]"),
    (torch.zeros(2, 1, 32, 32), None, ValueError, "3 channels"),
    (torch.zeros(0, 3, 32, 32), None, ValueError, "no images"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), None, TypeError, "normalized floats"),
    (torch.full((2, 3, 32, 32), float("nan")), None, ValueError, "NaN"),
    (torch.zeros(2, 3, 32, 32), torch.tensor([0]), ValueError, "labels must be integers"),
    (torch.zeros(2, 3, 32, 32), torch.tensor([0, 10]), ValueError, r"\[0, 10\)"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, images, labels, error, match):
    path = tmp_path / "bad.png"
    with pytest.raises(error, match=match):
        save_class_grid(str(path), images, labels, CIFAR)
    assert not os.listdir(tmp_path)
