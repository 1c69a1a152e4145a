"""RGB mean, std and PCA eigen-pairs (paper §4.1) from exact integer sums over a fixed pixel sample per image."""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

PIXELS_PER_IMAGE = 256  # x 1.28M training images = 330M pixels, plenty for 3 means and a 3x3 covariance


def positions(width: int, height: int, key: str, seed: int, n: int) -> np.ndarray:
    """n pixel indices (row-major, with replacement), fixed by (seed, key)."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())]).integers(0, width * height, n)


def sample_pixels(rgb: np.ndarray, key: str, seed: int, n: int = PIXELS_PER_IMAGE) -> np.ndarray:
    """n pixels (with replacement) of an HxWx3 uint8 image, at positions fixed by (seed, key): (n, 3) uint8."""
    return rgb.reshape(-1, 3)[positions(rgb.shape[1], rgb.shape[0], key, seed, n)]


def sample_image(im: Image.Image, key: str, seed: int, n: int = PIXELS_PER_IMAGE) -> np.ndarray:
    """sample_pixels of an RGB image without copying it into an array first (600 MB for a 200 MP photo)."""
    return np.array(
        [im.getpixel((int(p % im.width), int(p // im.width))) for p in positions(im.width, im.height, key, seed, n)],
        np.uint8,
    ).reshape(-1, 3)


def moments(pixels: np.ndarray) -> dict:
    """Count, per-channel sum and 3x3 sum of products, in int64 so any summation order gives the same bits."""
    p = pixels.astype(np.int64)
    return {"n": len(p), "sum": p.sum(0).tolist(), "outer": (p.T @ p).tolist()}


def add(a: dict, b: dict) -> dict:
    return {
        "n": a["n"] + b["n"],
        "sum": (np.add(a["sum"], b["sum"])).tolist(),
        "outer": (np.add(a["outer"], b["outer"])).tolist(),
    }


ZERO = {"n": 0, "sum": [0, 0, 0], "outer": [[0] * 3 for _ in range(3)]}


def finish(m: dict) -> dict:
    """Manifest stats: mean/std in 0-255 units; eigval (descending), eigvec (columns) of the [0,1]-scaled covariance."""
    n = max(m["n"], 1)
    mean = np.asarray(m["sum"], np.float64) / n
    cov = np.asarray(m["outer"], np.float64) / n - np.outer(mean, mean)  # population covariance, 0-255 units
    eigval, eigvec = np.linalg.eigh(cov / 255.0**2)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    eigvec = eigvec * np.where(eigvec.sum(0) < 0, -1.0, 1.0)  # eigh's signs are arbitrary; fix them for reproducibility
    return {
        "rgb_mean": mean.tolist(),
        "rgb_std": np.sqrt(np.clip(np.diag(cov), 0, None)).tolist(),
        "eigval": np.clip(eigval, 0, None).tolist(),
        "eigvec": eigvec.tolist(),
        "pixels": int(m["n"]),
    }
