"""The augmentation maths as pure NumPy: DALI's crop-window convention, PCA lighting, ten-crop views, normalisation.

The DALI graphs in pipeline/graphs.py are built from these numbers, and the tests hold DALI's pixels to them.
"""

from __future__ import annotations

import numpy as np

LIGHTING_STD = 0.1  # §4.1: alpha_i ~ N(0, 0.1), drawn once per image per training pass
AUGMENTS = ("paper", "inception", "center", "tencrop")
TRAIN_AUGMENTS = ("paper", "inception")
# The augments that cut a crop x crop window out of the image as decoded, so need images at least that large;
# inception resizes its random crop to the crop size instead.
WINDOW_AUGMENTS = ("paper", "center", "tencrop")
INCEPTION_AREA = (0.08, 1.0)  # random-resized crop (Szegedy et al. 2015): share of the image's area
INCEPTION_ASPECT = (3 / 4, 4 / 3)
# §4.1 test time: the four corner patches and the centre patch, then the same five mirrored;
# each view is (crop_pos_x, crop_pos_y, mirror).
TENCROP_VIEWS = tuple(
    (x, y, mirror) for mirror in (0, 1) for x, y in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
)


def crop_anchor(pos: float, size: int, crop: int) -> int:
    """First pixel of a `crop`-wide window at normalised position `pos` in [0, 1], as DALI places it.

    DALI (CropAttr::CalculateAnchor) computes roundf(pos * (size - crop)) in float32, halves away from zero.
    """
    return int(np.floor(np.float64(np.float32(pos) * np.float32(size - crop)) + 0.5))


def crop_window(pos_x: float, pos_y: float, height: int, width: int, crop: int) -> tuple[slice, slice]:
    """(rows, cols) slices of the crop x crop window that DALI cuts from a height x width image."""
    y, x = crop_anchor(pos_y, height, crop), crop_anchor(pos_x, width, crop)
    return slice(y, y + crop), slice(x, x + crop)


def lighting_matrix(eigval: np.ndarray, eigvec: np.ndarray) -> np.ndarray:
    """M with M @ alpha = 255 * sum_i alpha_i * lambda_i * p_i (column i of eigvec is p_i), in 0-255 pixel units."""
    return 255.0 * np.asarray(eigvec, np.float64) * np.asarray(eigval, np.float64)[None, :]


def lighting_offset(alpha: np.ndarray, eigval: np.ndarray, eigvec: np.ndarray) -> np.ndarray:
    """The RGB offset that §4.1's PCA lighting adds to every pixel of one image, for its draw alpha (3,)."""
    return lighting_matrix(eigval, eigvec) @ np.asarray(alpha, np.float64)


def normalisation(rgb_mean: np.ndarray, rgb_std: np.ndarray, divide_std: bool) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) the pipeline applies as (pixel - mean) / std: §2's mean subtraction only, unless divide_std."""
    std = np.asarray(rgb_std, np.float64) if divide_std else np.ones(3)
    return np.asarray(rgb_mean, np.float64), std
