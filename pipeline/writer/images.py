"""One source file -> one RGB baseline JPEG (resized per policy), or the reason it was repaired or rejected."""
from __future__ import annotations

import io
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.writer.stats import moments, sample_pixels

PAPER_SIZE = 256  # §2: shorter side rescaled to 256, then the central 256x256 patch
JPEG_SUFFIXES = {".jpg", ".jpeg"}
JPEG_MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION: the encoder refuses anything longer


class Rejected(Exception):
    """An image that cannot be written, with the one-line reason for the manifest."""


@dataclass(frozen=True)
class Resize:
    policy: str  # "paper" | "short" | "none"
    size: int | None

    def __str__(self) -> str:
        return {"paper": "paper", "none": "none"}.get(self.policy, f"short:{self.size}")


def parse_resize(text: str) -> Resize:
    if text in ("paper", "none"):
        return Resize(text, PAPER_SIZE if text == "paper" else None)
    m = re.fullmatch(r"short:(\d+)", text)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"--resize {text!r}: use paper, short:N (N > 0) or none")
    return Resize("short", int(m.group(1)))


@dataclass(frozen=True)
class Prepared:
    jpeg: bytes | None  # None when rejected
    repaired: str | None
    rejected: str | None
    moments: dict | None  # pixel sums of a sample of the written pixels (before JPEG encoding), when asked for
    size: tuple[int, int] | None = None  # (width, height) written


def geometry(w: int, h: int, resize: Resize) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Output size and the source box it is resampled from: the centred square (paper) or the whole image (short).

    The paper's box starts on a whole pixel, up to half a source pixel left of or above the exact centre."""
    s = min(w, h)
    if resize.policy == "paper":
        x0, y0 = (w - s) // 2, (h - s) // 2
        return (resize.size, resize.size), (x0, y0, x0 + s, y0 + s)
    scale = resize.size / s
    return (max(1, round(w * scale)), max(1, round(h * scale))), (0, 0, w, h)


def draft_request(w: int, h: int, size: int) -> tuple[int, int]:
    """The smallest size the DCT-domain downscale may reach and still keep the shorter side >= size."""
    s = min(w, h)
    return math.ceil(w * size / s), math.ceil(h * size / s)


def repair_reason(fmt: str | None, mode: str, suffix: str) -> str | None:
    if fmt != "JPEG":
        saved_as = f" saved as {suffix}" if suffix.lower() in JPEG_SUFFIXES else ""
        return f"{fmt} file{saved_as} re-encoded as JPEG"
    if mode == "CMYK":
        return "CMYK JPEG converted to RGB"
    if mode in ("L", "LA", "1"):
        return "grayscale JPEG converted to RGB"
    return None if mode == "RGB" else f"{mode} JPEG converted to RGB"


def upright(im: Image.Image) -> tuple[Image.Image, str | None]:
    """The image as a viewer shows it (EXIF orientation applied), and the repair reason when it had to be turned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on a corrupt EXIF block; a viewer shows such a photo as stored
        orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation not in range(2, 9):  # 1 is upright; other values are invalid and viewers ignore them
        return im, None
    return ImageOps.exif_transpose(im), f"EXIF orientation {orientation} applied: written upright"


def to_8bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit images scaled to 0-255 by their mode's range, where Pillow's convert would clip them to white."""
    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
    if im.mode == "I":  # Pillow's 32-bit container; 16-bit PGM and TIFF arrive in it as 0-65535
        a = np.asarray(im)
        if a.min() < 0 or a.max() > 65535:
            raise Rejected(f"32-bit integer image with values {a.min()}..{a.max()}: no defined 8-bit scale")
        return Image.fromarray((a >> 8).astype(np.uint8))
    if im.mode == "F":  # floating-point samples are 0-1 by convention; anything else has no defined scale
        a = np.asarray(im)
        if not (a.min() >= 0 and a.max() <= 1):
            raise Rejected(f"floating-point image with values {a.min():g}..{a.max():g}: no defined 8-bit scale")
        return Image.fromarray(np.round(a * 255).astype(np.uint8))
    return im


def check_size(w: int, h: int, out: tuple[int, int], resize: Resize) -> None:
    if max(out) > JPEG_MAX_SIDE:
        resized = f" would be {out[0]}x{out[1]} with --resize {resize}," if out != (w, h) else " is"
        raise Rejected(f"{w}x{h}{resized} beyond JPEG's {JPEG_MAX_SIDE}-pixel limit")


def nchw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(hwc).permute(2, 0, 1)[None]


def private_aa_out():
    """ATen's out= form of the antialiased bicubic resize, or None where this torch build lacks it."""
    try:
        return torch.ops.aten._upsample_bicubic2d_aa.out
    except (AttributeError, RuntimeError):
        return None


AA_OUT = private_aa_out()


def interpolate(src: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The public API's result (the same pixels): planar NCHW, re-packed to HxWx3."""
    out = F.interpolate(nchw(src), size=(size[1], size[0]), mode="bicubic", antialias=True, align_corners=False)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


def resample(rgb: Image.Image, size: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """rgb's box resized to size (w, h) with Pillow's antialiased bicubic filter: HxWx3 uint8.

    ATen's AVX2 port of that filter runs ~5x faster than Pillow's own and agrees with it to 1-2 levels. Its private
    out= form writes straight into the HWC array: F.interpolate gives the same pixels but costs ~1.3 ms more per
    256x256 image (planar output, then re-packed), 15% of the per-image time; it is the fallback."""
    src = np.asarray(rgb if box == (0, 0, *rgb.size) else rgb.crop(box))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that np.asarray's buffer is read-only; the kernel only reads it
        if AA_OUT is not None:
            out = np.empty((size[1], size[0], 3), np.uint8)
            try:
                AA_OUT(nchw(src), [size[1], size[0]], False, None, None, out=nchw(out))
                return out
            except (RuntimeError, TypeError):  # the private op's signature changed in this torch: use the public one
                pass
        return interpolate(src, size)


def encode(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)  # baseline, 4:2:0: what the GPU's hardware decoder takes
    return buf.getvalue()


def decode(data: bytes, resize: Resize) -> Image.Image:
    """The decoded image; a JPEG only as large as the policy needs (DCT-domain downscale). Raises on corrupt data."""
    im = Image.open(io.BytesIO(data))
    if resize.policy != "none" and im.format == "JPEG":
        im.draft("RGB", draft_request(*im.size, resize.size))
    im.load()
    return im


def prepare(path: Path, key: str, resize: Resize, quality: int, stats_seed: int | None) -> Prepared:
    """Decode, repair, resize and encode one file; with stats_seed, also the moments of a pixel sample of the output."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return Prepared(None, None, f"unreadable ({e.strerror or e})", None)
    if not data:
        return Prepared(None, None, "empty file (0 bytes)", None)
    try:
        im = decode(data, resize)
    except UnidentifiedImageError:
        return Prepared(None, None, "not an image", None)
    except Exception as e:  # Pillow raises many types on corrupt data; every one means "cannot decode"
        return Prepared(None, None, f"undecodable ({type(e).__name__}: {e})", None)
    try:
        return write(data, im, path.suffix, key, resize, quality, stats_seed)
    except Rejected as e:
        return Prepared(None, None, str(e), None)


def write(data: bytes, im: Image.Image, suffix: str, key: str, resize: Resize, quality: int,
          stats_seed: int | None) -> Prepared:
    """The decoded image upright, in 8-bit RGB, resized and encoded; raises Rejected."""
    reasons = [repair_reason(im.format, im.mode, suffix)]
    if resize.policy == "none" and im.format == "JPEG":
        if im.info.get("progressive") or im.info.get("progression"):
            reasons.append("progressive JPEG re-encoded as baseline")
        if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
            reasons.append("JPEG without an end-of-image marker re-encoded")
    im, turned = upright(im)
    im = to_8bit(im)  # after upright: the 8-bit copy has no EXIF
    reasons = [r for r in reasons + [turned] if r]
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    if resize.policy == "none":
        check_size(*rgb.size, rgb.size, resize)
        written = rgb
        out = encode(rgb, quality) if reasons else data
    else:
        size, box = geometry(*rgb.size, resize)
        check_size(*rgb.size, size, resize)
        written = Image.fromarray(pixels := resample(rgb, size, box))
        out = encode(written, quality)
    repaired = "; ".join(reasons) or None
    if stats_seed is None:
        return Prepared(out, repaired, None, None, written.size)
    # Sampled before encoding: decoding the JPEG again would cost a fifth of the time per image, and the JPEG's loss
    # moves the mean < 0.1 level and the spread ~1% (tests/test_shard_stats.py)
    pixels = np.asarray(written) if resize.policy == "none" else pixels
    return Prepared(out, repaired, None, moments(sample_pixels(pixels, key, stats_seed)), written.size)
