"""The manifest's RGB mean/std and PCA eigen-pairs (paper §4.1) equal NumPy's on the pixels written, before encoding."""

import io
import json

import numpy as np
from PIL import Image

from pipeline.writer.images import decode, geometry, parse_resize, resample
from pipeline.writer.stats import PIXELS_PER_IMAGE, add, finish, moments, sample_image, sample_pixels
from pipeline.writer.tars import read_shard


def written_train_images(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        for s in read_shard(shards / shard["tar"]):
            yield s, np.asarray(Image.open(io.BytesIO(s.jpeg)).convert("RGB"))


def before_encoding(src, path: str, resize: str) -> np.ndarray:
    """The pixels the sharder encoded for a demo image (upright RGB JPEGs: decode, crop box, resample)."""
    resize = parse_resize(resize)
    im = decode((src / path).read_bytes(), resize)
    return resample(im, *geometry(*im.size, resize))


def numpy_stats(pixels: np.ndarray):
    x = pixels.astype(np.float64)
    eigval, eigvec = np.linalg.eigh(np.cov(x.T / 255.0, bias=True))
    return x.mean(0), x.std(0), eigval[::-1], eigvec[:, ::-1]


def test_stats_equal_numpy_reference_on_the_sampled_pixels_before_encoding(demo_src, demo_shards):
    stats = json.loads((demo_shards / "manifest.json").read_text())["stats"]
    pixels = np.concatenate(
        [
            sample_pixels(before_encoding(demo_src, s.path, "short:80"), s.key, seed=0)
            for s, _ in written_train_images(demo_shards)
        ]
    )
    mean, std, eigval, eigvec = numpy_stats(pixels)
    assert stats["pixels"] == len(pixels) == 96 * PIXELS_PER_IMAGE
    np.testing.assert_allclose(stats["rgb_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(stats["rgb_std"], std, rtol=1e-9)
    np.testing.assert_allclose(stats["eigval"], eigval, rtol=1e-9)
    v = np.asarray(stats["eigvec"])
    np.testing.assert_allclose(np.abs(np.sum(v * eigvec, axis=0)), 1.0, rtol=1e-9)  # same axes, up to sign
    cov = np.cov(pixels.T / 255.0, bias=True)
    np.testing.assert_allclose(v @ np.diag(stats["eigval"]) @ v.T, cov, atol=1e-12)  # columns are the eigenvectors


def test_stats_stay_close_to_the_decoded_jpegs(demo_shards):
    """The contract's price: q95 JPEG drops fine texture, so the decoded pixels' spread is a little smaller.

    Measured on these small texture-heavy images: mean within 0.08 level, std 1.5% and eigenvalues 3.6% lower."""
    stats = json.loads((demo_shards / "manifest.json").read_text())["stats"]
    mean, std, eigval, _ = numpy_stats(
        np.concatenate([sample_pixels(rgb, s.key, seed=0) for s, rgb in written_train_images(demo_shards)])
    )
    np.testing.assert_allclose(stats["rgb_mean"], mean, atol=0.25)
    np.testing.assert_allclose(stats["rgb_std"], std, rtol=0.03)
    np.testing.assert_allclose(stats["eigval"], eigval, rtol=0.08)


def test_sample_approximates_all_written_pixels(demo_shards):
    """Independent of the sampling code: the sampled mean is close to the mean over every written pixel."""
    stats = json.loads((demo_shards / "manifest.json").read_text())["stats"]
    total = sum(rgb.reshape(-1, 3).astype(np.float64).sum(0) for _, rgb in written_train_images(demo_shards))
    count = sum(rgb.shape[0] * rgb.shape[1] for _, rgb in written_train_images(demo_shards))
    np.testing.assert_allclose(stats["rgb_mean"], total / count, atol=2.0)


def test_sample_positions_depend_on_key_and_seed_only():
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    a = sample_pixels(rgb, "n01440764_1", 0)
    assert a.shape == (PIXELS_PER_IMAGE, 3)
    assert np.array_equal(a, sample_pixels(rgb.copy(), "n01440764_1", 0))
    assert not np.array_equal(a, sample_pixels(rgb, "n01440764_2", 0))
    assert not np.array_equal(a, sample_pixels(rgb, "n01440764_1", 1))


def test_sampling_an_image_without_its_array_gives_the_same_pixels():
    """--resize none samples the decoded image in place: a 200 MP photo's array would be another 600 MB."""
    rgb = np.random.default_rng(2).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert np.array_equal(sample_image(Image.fromarray(rgb), "k", 3), sample_pixels(rgb, "k", 3))


def test_integer_sums_make_the_result_independent_of_order():
    rng = np.random.default_rng(1)
    parts = [moments(rng.integers(0, 256, (50, 3), dtype=np.uint8)) for _ in range(6)]
    forward, backward = parts[0], parts[-1]
    for p in parts[1:]:
        forward = add(forward, p)
    for p in parts[-2::-1]:
        backward = add(backward, p)
    assert finish(forward) == finish(backward)


def test_eigvec_sign_convention_and_lighting_formula():
    """Contract: offset = 255 * eigvec @ (alpha * eigval); a pure-red alpha moves pixels along p_1."""
    rng = np.random.default_rng(2)
    base = rng.normal(0, 1, (4000, 1)) * np.array([[60, 40, 20]]) + rng.normal(0, 5, (4000, 3)) + 128
    stats = finish(moments(np.clip(base, 0, 255).astype(np.uint8)))
    v, lam = np.asarray(stats["eigvec"]), np.asarray(stats["eigval"])
    assert (v.sum(0) > 0).all() and lam[0] > 10 * lam[1]
    offset = 255 * v @ (np.array([0.1, 0, 0]) * lam)
    direction = np.array([60, 40, 20]) / np.linalg.norm([60, 40, 20])
    np.testing.assert_allclose(offset / np.linalg.norm(offset), direction, atol=0.02)
