"""Photos as people have them: 200 MP phone photos (but not decompression bombs), colour profiles, JPEG kinds that
not every decoder reads, bytes after the end of the image, sidecar and system files, empty and look-alike classes."""

import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from pipeline.writer.jpeg import structure
from pipeline.writer.tars import read_shard
from tools.shard_imagenet import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--workers", "1", "--shard-size", "50", "--splits", "train"]
# 32x24, written by libjpeg-turbo's cjpeg -arithmetic (Pillow cannot write arithmetic coding): SOF9.
ARITHMETIC = base64.b64decode(
    "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAAMCAgMCAgMDAwMEAwMEBQgFBQQEBQoHBwYIDAoMDAsKCwsNDhIQDQ4RDgsLEBYQERMUFRUVDA8XGBYU"
    "GBIUFRT/2wBDAQMEBAUEBQkFBQkUDQsNFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBT/yQARCAAYACAD"
    "ASIAAhEBAxEB/8wACgAQEAUBEBEF/9oADAMBAAIRAxEAPwD/ALeIMm12+5wmr0QWr5tDfoc0qy4LStjgpe+1OwD2Scw3FerdDnfHdy4cBJFX8QdF"
    "2wRlmWta4dOvSvdUgMD/2Q=="
)


def gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 1, width)[None, :, None]
    return (np.array([40, 90, 200]) + x * np.array([180, 120, -150])).astype(np.uint8).repeat(height, 0)


def tall_jpeg(width: int, height: int) -> bytes:
    """A real baseline JPEG of width x height (a multiple of 16) built in milliseconds: with a restart marker after
    every MCU row, each row of a picture that varies only across codes the same, so one row's bytes repeat."""
    buf = io.BytesIO()
    Image.fromarray(gradient(width, 32)).save(buf, "JPEG", quality=90, restart_marker_rows=1)
    data = buf.getvalue()
    sof, sos = data.index(b"\xff\xc0"), data.index(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")
    row = data[scan : data.index(b"\xff\xd0", scan)]
    assert height % 16 == 0 and data[scan + len(row) + 2 : -2] == row
    head = data[: sof + 5] + height.to_bytes(2, "big") + data[sof + 7 : scan]
    return head + row + b"".join(bytes([0xFF, 0xD0 + k % 8]) + row for k in range(height // 16 - 1)) + b"\xff\xd9"


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header then declares width x height: a few dozen bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def jpeg(rgb: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def shard(src: Path, out: Path, *extra: str) -> tuple[int, dict, dict[str, bytes]]:
    rc = main(["--src", str(src), "--out", str(out), *ARGS, *extra])
    manifest = json.loads((out / "manifest.json").read_text())
    samples = {s.path: s.jpeg for sh in manifest["splits"]["train"]["shards"] for s in read_shard(out / sh["tar"])}
    return rc, manifest, samples


def reasons(manifest: dict, kind: str) -> dict[str, str]:
    return {r["file"]: r["reason"] for r in manifest[kind]}


def peak_mib(stdout: str) -> int:
    return int(re.search(r"peak memory per worker (\d+) MiB", stdout).group(1))


@pytest.mark.slow
def test_phone_photos_of_96_and_200_megapixels_are_kept_in_little_memory_and_a_png_bomb_is_refused(tmp_path):
    """As a user runs it: the real command, its terminal output, its own memory. A 200 MP decode would take 600 MB
    as RGB; JPEG's draft decoding needs 1/64 of that under paper."""
    small, big = tmp_path / "small", tmp_path / "big"
    put(small / "train" / "phone" / "IMG_0001.jpg", jpeg(gradient(640, 480)))
    put(big / "train" / "phone" / "IMG_0001.jpg", jpeg(gradient(640, 480)))
    put(big / "train" / "phone" / "IMG_0002.jpg", tall_jpeg(16320, 12240))  # 200 MP, as a Samsung phone writes
    put(big / "train" / "phone" / "IMG_0003.jpg", tall_jpeg(11328, 8496))  # 96 MP: warned by Pillow before
    put(big / "train" / "phone" / "bomb.png", png_bomb(40000, 40000))  # 1.6 G pixels declared in 69 bytes

    def run(src):
        cmd = [
            sys.executable,
            "tools/shard_imagenet.py",
            "--src",
            str(src),
            "--out",
            str(tmp_path / f"{src.name}-out"),
            *ARGS,
        ]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)

    baseline, r = run(small), run(big)
    assert baseline.returncode == 0 and r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "big-out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 3
    assert list(reasons(manifest, "rejected")) == ["train/phone/bomb.png"]
    why = manifest["rejected"][0]["reason"]
    assert "40000x40000" in why and "decompression bomb" in why
    terminal = r.stdout + r.stderr
    assert "Warning" not in terminal and "DOS attack" not in terminal
    assert peak_mib(r.stdout) - peak_mib(baseline.stdout) < 600 / 4


def test_a_bomb_is_refused_under_every_resize_and_fails_strict(tmp_path):
    put(tmp_path / "src" / "train" / "a" / "photo.jpg", jpeg(gradient(64, 48)))
    put(tmp_path / "src" / "train" / "a" / "bomb.png", png_bomb(40000, 40000))
    for resize in ("paper", "short:32", "none"):
        rc, manifest, samples = shard(tmp_path / "src", tmp_path / resize, "--resize", resize, "--strict")
        assert rc == 1 and list(samples) == ["train/a/photo.jpg"]
        assert "decompression bomb" in reasons(manifest, "rejected")["train/a/bomb.png"]


# Adobe RGB (1998) as Adobe's profile states it: D50-adapted colorants (columns) and a gamma of 563/256; sRGB's.
ADOBE_D50 = np.array([[0.60974, 0.20528, 0.14919], [0.31111, 0.62567, 0.06322], [0.01947, 0.06087, 0.74457]])
SRGB_D50 = np.array([[0.43607, 0.38515, 0.14307], [0.22249, 0.71687, 0.06061], [0.01392, 0.09708, 0.71410]])


def matrix_profile(colorants: np.ndarray, gamma: float, name: bytes) -> bytes:
    """An ICC v2 RGB display profile (matrix + tone curve), as cameras embed for Adobe RGB."""

    def s15(v):
        return struct.pack(">i", round(v * 65536))

    def xyz(v):
        return b"XYZ \0\0\0\0" + b"".join(s15(c) for c in v)

    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(name) + 1) + name + b"\0" + b"\0" * 78
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz((0.9642, 1.0, 0.8249))),
        (b"rXYZ", xyz(colorants[:, 0])),
        (b"gXYZ", xyz(colorants[:, 1])),
        (b"bXYZ", xyz(colorants[:, 2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (
        struct.pack(">I", offset + len(body))
        + b"lcms"
        + struct.pack(">I", 0x02100000)
        + b"mntrRGB XYZ "
        + b"\0" * 12
        + b"acsp"
        + b"\0" * 28
        + s15(0.9642)
        + s15(1.0)
        + s15(0.8249)
        + b"\0" * 48
    )
    return header + struct.pack(">I", len(tags)) + table + body


def adobe_to_srgb(rgb) -> np.ndarray:
    """The colour maths itself (not LittleCMS): Adobe RGB -> linear -> XYZ (D50) -> linear sRGB -> sRGB's curve."""
    linear = np.clip(np.linalg.solve(SRGB_D50, ADOBE_D50 @ ((np.asarray(rgb) / 255) ** (563 / 256))), 0, 1)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055) * 255


@pytest.mark.parametrize("resize", ["paper", "short:32", "none"])
def test_an_adobe_rgb_photo_is_converted_to_srgb_under_every_resize(tmp_path, resize):
    colour = (200, 60, 40)
    flat = np.full((48, 64, 3), colour, np.uint8)
    adobe = matrix_profile(ADOBE_D50, 563 / 256, b"Adobe RGB (1998)")
    put(tmp_path / "src" / "train" / "a" / "adobe.jpg", jpeg(flat, icc_profile=adobe))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    put(tmp_path / "src" / "train" / "a" / "srgb.jpg", original := jpeg(flat, icc_profile=srgb))
    rc, manifest, samples = shard(tmp_path / "src", tmp_path / "out", "--resize", resize)
    assert rc == 0
    written = np.asarray(Image.open(io.BytesIO(samples["train/a/adobe.jpg"])).convert("RGB")).reshape(-1, 3)
    assert np.abs(written.mean(0) - adobe_to_srgb(colour)).max() < 2.5  # 231, 57, 34: not the raw 200, 60, 40
    assert reasons(manifest, "repaired")["train/a/adobe.jpg"] == "Adobe RGB (1998) ICC profile converted to sRGB"
    assert "train/a/srgb.jpg" not in reasons(manifest, "repaired")  # already sRGB: nothing to do
    if resize == "none":
        assert samples["train/a/srgb.jpg"] == original


def test_a_damaged_colour_profile_is_ignored_as_viewers_do(tmp_path):
    flat = np.full((48, 64, 3), (200, 60, 40), np.uint8)
    no_curves = bytearray(matrix_profile(ADOBE_D50, 563 / 256, b"no tone curves"))
    no_curves[128:132] = struct.pack(">I", 5)  # the three TRC tags dropped: LittleCMS reads it, cannot transform
    put(tmp_path / "src" / "train" / "a" / "no-curves.jpg", jpeg(flat, icc_profile=bytes(no_curves)))
    put(tmp_path / "src" / "train" / "a" / "garbage.jpg", jpeg(flat, icc_profile=b"not a profile" * 20))
    rc, manifest, samples = shard(tmp_path / "src", tmp_path / "out", "--resize", "short:32")
    assert rc == 0 and manifest["rejected"] == manifest["repaired"] == [] and len(samples) == 2
    for data in samples.values():
        assert np.abs(np.asarray(Image.open(io.BytesIO(data))).reshape(-1, 3).mean(0) - (200, 60, 40)).max() < 2.5


def test_none_keeps_only_8_bit_huffman_baseline_jpegs(tmp_path):
    base = jpeg(gradient(32, 24))
    twelve = bytearray(base)
    twelve[twelve.index(b"\xff\xc0") + 4] = 12  # the frame header's sample precision: 12 bits
    put(tmp_path / "src" / "train" / "a" / "baseline.jpg", base)
    put(tmp_path / "src" / "train" / "a" / "arithmetic.jpg", ARITHMETIC)
    put(tmp_path / "src" / "train" / "a" / "twelve.jpg", bytes(twelve))
    rc, manifest, samples = shard(tmp_path / "src", tmp_path / "out", "--resize", "none")
    assert rc == 0 and samples["train/a/baseline.jpg"] == base
    assert reasons(manifest, "repaired") == {
        "train/a/arithmetic.jpg": "8-bit arithmetic-coded sequential JPEG re-encoded as 8-bit baseline"
    }
    assert structure(ARITHMETIC).frame == 0xC9 and structure(samples["train/a/arithmetic.jpg"]).frame == 0xC0
    assert reasons(manifest, "rejected")["train/a/twelve.jpg"].startswith("12-bit baseline JPEG: not decodable")
    assert main(["--verify", str(tmp_path / "out")]) == 0


def test_bytes_after_the_end_of_image_are_dropped_without_a_re_encode(tmp_path):
    photo = jpeg(gradient(32, 24))
    put(tmp_path / "src" / "train" / "a" / "trailer.jpg", photo + b"\0\0SAMSUNG motion photo trailer" * 10)
    put(tmp_path / "src" / "train" / "a" / "padded.jpg", photo + b"\0" * 64)
    rc, manifest, samples = shard(tmp_path / "src", tmp_path / "none", "--resize", "none")
    assert rc == 0 and samples["train/a/trailer.jpg"] == photo  # the same bytes up to the marker: not re-encoded
    assert reasons(manifest, "repaired") == {
        "train/a/trailer.jpg": "300 bytes after the end-of-image marker dropped (not re-encoded)"
    }
    assert samples["train/a/padded.jpg"] == photo + b"\0" * 64
    gap = photo.index(b"\xff\xdb")  # junk between two segments, which libjpeg skips: not a reason to re-encode
    put(tmp_path / "src" / "train" / "a" / "junk.jpg", junk := photo[:gap] + b"junk" + photo[gap:])
    rc, manifest, samples = shard(tmp_path / "src", tmp_path / "junk", "--resize", "none")
    assert samples["train/a/junk.jpg"] == junk and "train/a/junk.jpg" not in reasons(manifest, "repaired")
    assert shard(tmp_path / "src", tmp_path / "paper")[1]["repaired"] == []


def test_a_photo_folder_with_sidecars_and_system_files_passes_strict(tmp_path, capsys):
    """A camera card copied from a Mac and opened on Windows: every photo has an .xmp, and the system leaves its own."""
    folder = tmp_path / "src" / "train" / "holiday"
    for i in range(3):
        put(folder / f"IMG_{i:04d}.JPG", jpeg(gradient(48, 32)))
        put(folder / f"IMG_{i:04d}.xmp", b"<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
        put(folder / f"._IMG_{i:04d}.JPG", b"\0\5\26\7\0\2\0\0Mac OS X")  # AppleDouble: a .JPG that is no image
    for name, data in {
        ".DS_Store": b"\0\0\0\1Bud1",
        "Thumbs.db": b"\xd0\xcf\x11\xe0",
        "desktop.ini": b"[.Shell]",
        "notes": b"day one",
        "album.json": b"{}",
    }.items():
        put(folder / name, data)
    put(folder / "scan0001", jpeg(gradient(48, 32)))  # no extension, but a JPEG: kept, by its content
    rc, manifest, samples = shard(tmp_path / "src", tmp_path / "out", "--strict")
    out = capsys.readouterr().out
    assert rc == 0 and manifest["rejected"] == [] and "rejected:" not in out
    assert sorted(samples) == [f"train/holiday/IMG_{i:04d}.JPG" for i in range(3)] + ["train/holiday/scan0001"]
    assert len(manifest["skipped"]) == 11
    assert [line for line in out.splitlines() if "skipped" in line] == [
        "skipped, not images: 11 (4 hidden, 3 .xmp, 1 .db, 1 .ini, 1 .json, 1 notes), listed in manifest.json"
    ]
    assert main(["--verify", str(tmp_path / "out")]) == 0
    put(folder / "IMG_0004.HEIC", b"\0\0\0\x18ftypheic\0\0\0\0mif1heic")  # a photo: never skipped unseen
    rc, manifest, _ = shard(tmp_path / "src", tmp_path / "heic", "--strict")
    assert rc == 1 and list(reasons(manifest, "rejected")) == ["train/holiday/IMG_0004.HEIC"]
    assert "pillow-heif" in manifest["rejected"][0]["reason"]


def test_a_class_folder_without_a_usable_image_is_warned_and_fails_strict(tmp_path, capsys):
    put(tmp_path / "src" / "train" / "cats" / "a.jpg", jpeg(gradient(48, 32)))
    put(tmp_path / "src" / "train" / "dogs" / "a.xmp", b"<x/>")  # only a sidecar
    put(tmp_path / "src" / "train" / "owls" / "a.jpg", b"")  # only a broken image
    rc, manifest, _ = shard(tmp_path / "src", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 0 and manifest["empty_classes"] == ["train/dogs", "train/owls"]
    assert [line for line in err.splitlines() if line.startswith("warning")] == [
        f"warning: class folder train/{c} has no usable image: its class keeps its index with 0 samples; add images "
        f"or remove the folder"
        for c in ("dogs", "owls")
    ]
    assert main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "strict"), *ARGS, "--strict"]) == 1
    assert main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "strict"), *ARGS, "--strict"]) == 1  # rerun


def test_class_names_that_differ_only_in_unicode_normalisation_are_warned(tmp_path, capsys):
    for name in (unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"), "tea"):
        put(tmp_path / "src" / "train" / name / "a.jpg", jpeg(gradient(48, 32)))
    if len(os.listdir(tmp_path / "src" / "train")) < 3:
        pytest.skip("this file system normalises names itself (one café folder)")
    rc, manifest, _ = shard(tmp_path / "src", tmp_path / "out")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert rc == 0 and len(manifest["classes"]) == 3
    assert len(warnings) == 1 and "'caf\\xe9'" in warnings[0] and "'cafe\\u0301'" in warnings[0]
    assert "NFC vs NFD" in warnings[0]
