"""One source file -> one RGB baseline JPEG (resized per policy), or the reason it was repaired or rejected."""

from __future__ import annotations

import io
import math
import multiprocessing
import re
import resource
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline.writer.colour import to_srgb
from pipeline.writer.jpeg import PROGRESSIVE, structure
from pipeline.writer.stats import moments, sample_image, sample_pixels

PAPER_SIZE = 256  # §2: shorter side rescaled to 256, then the central 256x256 patch
JPEG_SUFFIXES = {".jpg", ".jpeg"}
JPEG_MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION: the encoder refuses anything longer
# The bomb rule: refuse an image when the pixels its decoder would produce exceed this (805 MB as RGB). Pillow's own
# check counts the declared pixels, but a JPEG decodes at the scale the resize needs (down to 1/8 a side), so a
# 200 MP photo decodes to 3 MP under paper; other formats decode whole, so a PNG declaring 40000x40000 is refused.
MAX_DECODED_PIXELS = 1 << 28
Image.MAX_IMAGE_PIXELS = None  # the rule above, applied in decode(), replaces Pillow's


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
    peak_rss: int = 0  # bytes: resident_peak() once the image's buffers were all made


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
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)  # a corrupt EXIF block warns: prepare() hushes it
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
    """The decoded image; a JPEG only as large as the policy needs (DCT-domain downscale). Raises on corrupt data,
    and Rejected when the decoded pixels would exceed MAX_DECODED_PIXELS."""
    im = Image.open(io.BytesIO(data))
    declared = im.size
    if resize.policy != "none" and im.format == "JPEG":
        im.draft("RGB", draft_request(*im.size, resize.size))
    if im.width * im.height > MAX_DECODED_PIXELS:
        at = "" if im.size == declared else f", {im.width}x{im.height} at the smallest scale --resize {resize} allows"
        raise Rejected(
            f"{declared[0]}x{declared[1]} {im.format} would decode to {im.width * im.height / 1e6:.0f} MP"
            f"{at}: over the {MAX_DECODED_PIXELS / 1e6:.0f} MP limit for one image (a decompression bomb?)"
        )
    im.load()
    return im


def prepare(path: Path, key: str, resize: Resize, quality: int, stats_seed: int | None) -> Prepared:
    """Decode, repair, resize and encode one file; with stats_seed, also the moments of a pixel sample of the output."""
    with warnings.catch_warnings():
        # Library warnings (corrupt EXIF, odd palettes) would break the progress bar; what matters is in the reason.
        warnings.simplefilter("ignore")
        return prepare_quietly(path, key, resize, quality, stats_seed)


def resident_peak() -> int:
    """Bytes: the peak resident memory of the process preparing images, as far as it is this run's. A pool's worker
    lives for the run alone: its own peak (Linux counts KiB). The calling process, which prepares the images itself
    with one worker, may have peaked before the run (a notebook, a test session): its resident memory now."""
    if multiprocessing.parent_process() is not None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return psutil.Process().memory_info().rss


def prepare_quietly(path: Path, key: str, resize: Resize, quality: int, stats_seed: int | None) -> Prepared:
    try:
        data = path.read_bytes()
    except OSError as e:
        return Prepared(None, None, f"unreadable ({e.strerror or e})", None)
    if not data:
        return Prepared(None, None, "empty file (0 bytes)", None)
    try:
        im = decode(data, resize)
    except Rejected as e:
        return Prepared(None, None, str(e), None)
    except UnidentifiedImageError:
        jpeg = structure(data)
        if jpeg.frame is not None and jpeg.precision != 8:  # libjpeg as Pillow builds it reads 8-bit samples only
            return Prepared(
                None, None, f"{jpeg.precision}-bit {jpeg.kind} JPEG: not decodable here; convert it to 8 bits", None
            )
        if path.suffix.lower() in (".heic", ".heif"):  # an iPhone's photos; Pillow reads them through a plugin
            return Prepared(
                None,
                None,
                "HEIC photo that Pillow cannot decode here: pip install pillow-heif, or convert it to JPEG",
                None,
            )
        return Prepared(None, None, "not an image", None)
    except Exception as e:  # Pillow raises many types on corrupt data; every one means "cannot decode"
        return Prepared(None, None, f"undecodable ({type(e).__name__}: {e})", None)
    try:
        return write(data, im, path.suffix, key, resize, quality, stats_seed)
    except Rejected as e:
        return Prepared(None, None, str(e), None)


def jpeg_repairs(data: bytes) -> tuple[list[str], bytes | None]:
    """--resize none: why a JPEG must be re-encoded (none when it is 8-bit Huffman baseline with an end-of-image
    marker), and the bytes to keep otherwise: the file, less any bytes after the end-of-image marker."""
    jpeg = structure(data)
    if jpeg.frame == PROGRESSIVE and jpeg.precision == 8:
        return ["progressive JPEG re-encoded as baseline"], None
    if not jpeg.kept_by_every_decoder():
        return [f"{jpeg.precision}-bit {jpeg.kind} JPEG re-encoded as 8-bit baseline"], None
    if jpeg.end is None:
        return ["JPEG without an end-of-image marker re-encoded"], None
    return [], data[: jpeg.end] if data[jpeg.end :].strip(b"\0") else data  # zero padding is harmless and kept


def write(
    data: bytes, im: Image.Image, suffix: str, key: str, resize: Resize, quality: int, stats_seed: int | None
) -> Prepared:
    """The decoded image upright, in 8-bit sRGB, resized and encoded; raises Rejected."""
    reasons, kept = [repair_reason(im.format, im.mode, suffix)], None
    if resize.policy == "none" and im.format == "JPEG":
        found, kept = jpeg_repairs(data)
        reasons += found
    icc = im.info.get("icc_profile")
    im, turned = upright(im)
    im = to_8bit(im)  # after upright: the 8-bit copy has no EXIF
    rgb, converted = to_srgb(im, icc)
    reasons = [r for r in reasons + [turned, converted] if r]
    if resize.policy == "none":
        check_size(*rgb.size, rgb.size, resize)
        written = rgb
        if kept is not None and len(kept) < len(data) and not reasons:
            reasons.append(f"{len(data) - len(kept)} bytes after the end-of-image marker dropped (not re-encoded)")
            out = kept
        else:
            out = encode(rgb, quality) if reasons else data
    else:
        size, box = geometry(*rgb.size, resize)
        check_size(*rgb.size, size, resize)
        written = Image.fromarray(pixels := resample(rgb, size, box))
        out = encode(written, quality)
    repaired = "; ".join(reasons) or None
    peak = resident_peak()  # the decoded, converted and resized pixels and the JPEG all still held
    if stats_seed is None:
        return Prepared(out, repaired, None, None, written.size, peak)
    # Sampled before encoding: decoding the JPEG again would cost a fifth of the time per image, and the JPEG's loss
    # moves the mean < 0.1 level and the spread ~1% (tests/test_writer_stats.py)
    if resize.policy == "none":
        sample = sample_image(written, key, stats_seed)  # in place: a 200 MP photo's array would be another 600 MB
    else:
        sample = sample_pixels(pixels, key, stats_seed)
    return Prepared(out, repaired, None, moments(sample), written.size, peak)
