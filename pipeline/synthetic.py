"""Synthetic ImageNet-layout data: learnable classes (shape + colour over 1/f noise), optionally with real quirks."""

from __future__ import annotations

import colorsys
import csv
import io
import signal
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.writer.devkit import write_synsets

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond", "bar", "frame")
BANK = 6  # distinct noise textures per dataset; each image crops, flips and tints one
# File name suffix -> how shard_imagenet must treat it. The first three are the real train set's quirks
# (22 CMYK JPEGs, n02105855_2933 is a PNG saved as .JPEG, grayscale JPEGs); the rest are broken files.
QUIRKS = {
    "cmyk": "repaired",
    "png": "repaired",
    "gray": "repaired",
    "truncated": "rejected",
    "corrupt": "rejected",
    "empty": "rejected",
    "notes": "skipped",
    "unreadable": "rejected",
}


def wnid(k: int) -> str:
    return f"n{k:08d}"


def class_look(k: int) -> tuple[str, tuple[int, int, int], str]:
    """Class k's shape, RGB colour and human-readable name; hues spread by the golden ratio."""
    hue = (k * 0.618034) % 1.0
    rgb = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))
    shape = SHAPES[k % len(SHAPES)]
    return shape, rgb, f"{shape} of hue {int(hue * 360)}"


def noise_bank(size: int, seed: int) -> np.ndarray:
    """BANK colour textures of 1/f amplitude spectrum (natural-image statistics), float32 in [0, 1]."""
    rng = np.random.default_rng([seed, 1])
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None, :] ** 2)
    f[0, 0] = 1.0
    spectrum = (
        rng.standard_normal((BANK, 3, size, size // 2 + 1)) + 1j * rng.standard_normal((BANK, 3, size, size // 2 + 1))
    ) / f
    tex = np.fft.irfft2(spectrum, s=(size, size)).astype(np.float32)
    mix = rng.uniform(0.3, 1.0, (BANK, 3, 3)).astype(np.float32)  # correlate channels like real colour
    tex = np.einsum("bcd,bdhw->bhwc", mix, tex)
    tex -= tex.min(axis=(1, 2, 3), keepdims=True)
    tex /= tex.max(axis=(1, 2, 3), keepdims=True)
    return tex


def render(bank: np.ndarray, k: int, size_range: tuple[int, int], rng: np.random.Generator):
    """One RGB image of class k and the shape's bounding box (x0, y0, x1, y1)."""
    lo, hi = size_range
    long = int(rng.integers((lo + hi) // 2, hi + 1))
    short = max(lo, round(long / rng.choice([4 / 3, 3 / 2, 5 / 4, 1.0])))
    w, h = (long, short) if rng.random() < 0.75 else (short, long)
    tex = bank[rng.integers(BANK)]
    y, x = rng.integers(0, tex.shape[0] - h + 1), rng.integers(0, tex.shape[1] - w + 1)
    crop = tex[y : y + h, x : x + w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    tint = rng.uniform(0.4, 1.0, 3).astype(np.float32) * 255
    img = Image.fromarray((crop * tint).astype(np.uint8))
    shape, rgb, _ = class_look(k)
    colour = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in rgb)
    r = int(min(w, h) * rng.uniform(0.2, 0.35))
    cx, cy = int(rng.integers(r, w - r + 1)), int(rng.integers(r, h - r + 1))
    box = (cx - r, cy - r, cx + r, cy + r)
    draw_shape(ImageDraw.Draw(img), shape, box, colour, max(2, r // 4))
    return img, box


def draw_shape(d: ImageDraw.ImageDraw, shape: str, box, colour, t: int) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    if shape == "disc":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=t)
    elif shape == "cross":
        d.rectangle((cx - t, y0, cx + t, y1), fill=colour)
        d.rectangle((x0, cy - t, x1, cy + t), fill=colour)
    elif shape == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == "bar":
        d.rectangle((x0, cy - t, x1, cy + t), fill=colour)
    else:
        d.rectangle(box, outline=colour, width=t)


_BANK: np.ndarray | None = None


def _init(bank: np.ndarray) -> None:
    global _BANK
    _BANK = bank
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate's SIGTERM ends the worker, whatever its parent set


def _write(job):
    path, k, size_range, quality, seed = job
    img, box = render(_BANK, k, size_range, np.random.default_rng(seed))
    img.save(path, "JPEG", quality=quality)
    return box


def make_dataset(
    out,
    classes: int,
    per_class: int,
    val_per_class: int,
    quirks: bool = False,
    size_range: tuple[int, int] = (300, 640),
    seed: int = 0,
    val_layout: str = "kaggle",
    quality: int = 94,
    workers: int = 1,
) -> Path:
    """Write an ImageNet-layout folder (train/<wnid>/, val/, LOC_* files) at `out`; same arguments, same bytes."""
    out = Path(out)
    bank = noise_bank(max(size_range), seed)
    jobs, val = [], []
    for k in range(classes):
        (out / "train" / wnid(k)).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            jobs.append((out / "train" / wnid(k) / f"{wnid(k)}_{i}.JPEG", k, size_range, quality, [seed, 2, k, i]))
    val_order = np.random.default_rng([seed, 3]).permutation(classes * val_per_class)
    for n, j in enumerate(val_order, start=1):
        k = int(j) // val_per_class
        name = f"ILSVRC2012_val_{n:08d}"
        folder = out / "val" / (wnid(k) if val_layout == "folders" else "")
        folder.mkdir(parents=True, exist_ok=True)
        val.append((name, k))
        jobs.append((folder / f"{name}.JPEG", k, size_range, quality, [seed, 4, n]))
    if workers > 1:
        with Pool(workers, initializer=_init, initargs=(bank,)) as pool:
            boxes = list(pool.imap(_write, jobs, chunksize=16))
    else:
        _init(bank)
        boxes = [_write(job) for job in jobs]
    val_rows = [(name, k, box) for (name, k), box in zip(val, boxes[len(jobs) - len(val) :])]
    if val_layout != "devkit":  # the devkit names classes in meta.mat instead
        (out / "LOC_synset_mapping.txt").write_text("".join(f"{wnid(k)} {class_look(k)[2]}\n" for k in range(classes)))
    write_val_labels(out, val_rows, classes, val_layout, seed)
    if quirks:
        add_quirks(out, bank, classes, size_range, seed)
    return out


def write_val_labels(out: Path, rows, classes: int, val_layout: str, seed: int) -> None:
    if val_layout == "kaggle":
        with open(out / "LOC_val_solution.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            for name, k, box in rows:
                w.writerow([name, f"{wnid(k)} {' '.join(map(str, box))}"])
    elif val_layout == "devkit":
        # The devkit numbers classes by ILSVRC2012_ID, an order unrelated to the sorted wnids: shuffle it here too.
        ids = np.random.default_rng([seed, 5]).permutation(classes) + 1
        data = out / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[k]}\n" for _, k, _ in rows))
        leaves = [(int(ids[k]), wnid(k), class_look(k)[2], 0) for k in range(classes)]
        root = (classes + 1, "n99999999", "entity", classes)  # like the real meta.mat: inner synsets follow the leaves
        write_synsets(data / "meta.mat", leaves + [root])


def add_quirks(out: Path, bank: np.ndarray, classes: int, size_range, seed: int) -> None:
    """The real train set's quirks plus every kind of broken file, in class 0, and one empty class folder."""
    folder = out / "train" / wnid(0)
    img, _ = render(bank, 0, size_range, np.random.default_rng([seed, 6]))

    def jpeg(im, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, "JPEG", **kw)
        return buf.getvalue()

    good = jpeg(img, quality=90)
    png = io.BytesIO()
    img.save(png, "PNG")
    corrupt = bytearray(good)
    dht = good.find(b"\xff\xc4")
    corrupt[dht + 5 : dht + 21] = b"\xff" * 16  # a bogus Huffman table: the headers parse, decoding fails
    files = {
        "cmyk": jpeg(img.convert("CMYK"), quality=90),
        "png": png.getvalue(),
        "gray": jpeg(img.convert("L")),
        "truncated": good[: len(good) // 2],
        "corrupt": bytes(corrupt),
        "empty": b"",
    }
    for name, data in files.items():
        (folder / f"{wnid(0)}_{name}.JPEG").write_bytes(data)
    (folder / "notes.txt").write_text("downloaded from the ImageNet site\n")
    (folder / f"{wnid(0)}_unreadable.JPEG").symlink_to(folder / "missing-target.JPEG")
    (out / "train" / wnid(classes)).mkdir(exist_ok=True)
