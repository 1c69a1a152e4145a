"""Embedded ICC profiles: pixels in any other colour space converted to sRGB (LittleCMS through Pillow's ImageCms)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# A profile whose primaries (D50 colorants) lie this close to sRGB's is sRGB: camera, browser and OS builds of the
# profile differ in their tone curves' encoding by less than one level, and converting would only add rounding.
SAME_PRIMARIES = 0.002
MODES = {"RGB": "RGB", "CMYK": "CMYK", "GRAY": "L"}  # ICC colour space -> the Pillow mode LittleCMS reads it in
DESCRIBES = {"RGB": ("RGB", "RGBA", "RGBX", "P", "PA"), "CMYK": ("CMYK",), "L": ("L", "LA")}  # pixels it applies to


def primaries(profile: ImageCms.ImageCmsProfile) -> np.ndarray | None:
    p = profile.profile
    colorants = (p.red_colorant, p.green_colorant, p.blue_colorant)
    return None if None in colorants else np.array([c[0] for c in colorants])


def is_srgb(profile: ImageCms.ImageCmsProfile) -> bool:
    if profile.profile.xcolor_space.strip() != "RGB":
        return False
    ours, theirs = primaries(SRGB), primaries(profile)
    return theirs is not None and bool(np.abs(ours - theirs).max() <= SAME_PRIMARIES)


def to_srgb(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, str | None]:
    """im as 8-bit RGB in sRGB; converted through its embedded profile unless that is sRGB (or unreadable, or of
    another colour space than the pixels: viewers then ignore it too), with the repair reason when converted."""
    profile = None
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        except (OSError, ImageCms.PyCMSError):
            profile = None
    mode = MODES.get(profile.profile.xcolor_space.strip()) if profile else None
    if mode is None or im.mode not in DESCRIBES[mode] or is_srgb(profile):
        return (im if im.mode == "RGB" else im.convert("RGB")), None
    src = im if im.mode == mode else im.convert(mode)
    try:
        converted = ImageCms.profileToProfile(src, profile, SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):  # a profile LittleCMS reads but cannot build a transform from
        return (im if im.mode == "RGB" else im.convert("RGB")), None
    name = (ImageCms.getProfileDescription(profile) or "unnamed").strip()
    return converted, f"{name} ICC profile converted to sRGB"
