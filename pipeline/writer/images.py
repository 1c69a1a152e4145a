"""One source file -> one RGB baseline JPEG (resized per policy), or the reason it was repaired or rejected."""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.writer.stats import moments, sample_pixels

PAPER_SIZE = 256  # §2: shorter side rescaled to 256, then the central 256x256 patch
RESAMPLE = Image.Resampling.BICUBIC  # Pillow's resize is antialiased, so downscaling does not alias
JPEG_SUFFIXES = {".jpg", ".jpeg"}


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
    moments: dict | None  # pixel sums of the sampled written pixels, when asked for


def geometry(w: int, h: int, resize: Resize) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """Output size and the source box it is resampled from: the centred square (paper) or the whole image (short)."""
    s = min(w, h)
    if resize.policy == "paper":
        x0, y0 = (w - s) / 2, (h - s) / 2
        return (resize.size, resize.size), (x0, y0, x0 + s, y0 + s)
    scale = resize.size / s
    return (max(1, round(w * scale)), max(1, round(h * scale))), (0.0, 0.0, float(w), float(h))


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


def encode(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)  # baseline, 4:2:0: what the GPU's hardware decoder takes
    return buf.getvalue()


def prepare(path: Path, key: str, resize: Resize, quality: int, stats_seed: int | None) -> Prepared:
    """Decode, repair, resize and encode one file; with stats_seed, also the moments of a pixel sample of the output."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return Prepared(None, None, f"unreadable ({e.strerror or e})", None)
    if not data:
        return Prepared(None, None, "empty file (0 bytes)", None)
    try:
        im = Image.open(io.BytesIO(data))
        fmt, mode = im.format, im.mode
        if resize.policy != "none" and fmt == "JPEG":
            im.draft("RGB", draft_request(*im.size, resize.size))
        im.load()
    except UnidentifiedImageError:
        return Prepared(None, None, "not an image", None)
    except Exception as e:  # Pillow raises many types on corrupt data; every one means "cannot decode"
        return Prepared(None, None, f"undecodable ({type(e).__name__}: {e})", None)
    repaired = repair_reason(fmt, mode, path.suffix)
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    if resize.policy == "none":
        baseline = not (im.info.get("progressive") or im.info.get("progression"))
        intact = data.rstrip(b"\0").endswith(b"\xff\xd9")
        if repaired is None and not baseline:
            repaired = "progressive JPEG re-encoded as baseline"
        elif repaired is None and not intact:
            repaired = "JPEG without an end-of-image marker re-encoded"
        out = data if repaired is None else encode(rgb, quality)
    else:
        size, box = geometry(*rgb.size, resize)
        out = encode(rgb.resize(size, RESAMPLE, box=box), quality)
    if stats_seed is None:
        return Prepared(out, repaired, None, None)
    written = rgb if out is data else Image.open(io.BytesIO(out)).convert("RGB")
    return Prepared(out, repaired, None, moments(sample_pixels(np.asarray(written), key, stats_seed)))
