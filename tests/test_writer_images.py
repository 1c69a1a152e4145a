"""Per-image repairs: EXIF orientation written upright, high bit depths scaled, sizes JPEG cannot hold rejected; the
memory preparing them took."""

import io
import json
import re
import resource

import numpy as np
import psutil
import pytest
from helpers import decode
from PIL import ExifTags, Image

from pipeline.synthetic import make_dataset
from pipeline.writer.images import Resize, prepare
from tools.shard_imagenet import main

POLICIES = [Resize("paper", 256), Resize("short", 200), Resize("none", None)]
# EXIF orientation -> how the stored pixels are laid out, given the upright ones (inverse of what a viewer does)
STORED = {
    2: lambda u: u[:, ::-1],
    3: lambda u: u[::-1, ::-1],
    4: lambda u: u[::-1],
    5: lambda u: u.transpose(1, 0, 2),
    6: lambda u: np.rot90(u, 1),
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),
    8: lambda u: np.rot90(u, -1),
}


def upright_photo() -> np.ndarray:
    """Ramps in different channels plus an off-centre block, so any flip or rotation shows; 1024x768 engages draft."""
    h, w = 768, 1024
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, 255 - x], -1)
    rgb[100:300, 150:450] = (255, 255, 0)
    return rgb.astype(np.uint8)


@pytest.fixture(scope="module")
def oriented(tmp_path_factory):
    """The upright photo without EXIF, and stored as each orientation 2..8 would store it, tagged accordingly."""
    folder = tmp_path_factory.mktemp("exif")
    u = upright_photo()
    Image.fromarray(u).save(folder / "upright.jpg", quality=95)
    for o, store in STORED.items():
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = o
        Image.fromarray(np.ascontiguousarray(store(u))).save(folder / f"o{o}.jpg", quality=95, exif=exif.tobytes())
    return folder


def test_stored_layouts_are_what_exif_defines():
    """The fixture's own check: 6 is 'rotate 90 CW to view': the top row shown is the stored left column, bottom up."""
    u = upright_photo()
    s = STORED[6](u)
    assert s.shape == (1024, 768, 3) and np.array_equal(u[0], s[::-1, 0])


@pytest.mark.parametrize("resize", POLICIES, ids=str)
@pytest.mark.parametrize("orientation", sorted(STORED))
def test_every_orientation_is_written_as_a_viewer_shows_it(oriented, resize, orientation):
    reference = prepare(oriented / "upright.jpg", "u", resize, 95, None)
    got = prepare(oriented / f"o{orientation}.jpg", "o", resize, 95, None)
    assert got.repaired == f"EXIF orientation {orientation} applied: written upright"
    a, b = decode(got.jpeg), decode(reference.jpeg)
    assert a.shape == b.shape and got.size == reference.size
    assert np.abs(a - b).mean() < 2.0  # JPEG noise; a flip or turn of these ramps differs by ~100
    assert Image.open(io.BytesIO(got.jpeg)).getexif().get(ExifTags.Base.Orientation) is None


def test_dali_decodes_the_written_photos_as_pillow_does(oriented):
    """DALI applies EXIF orientation, Pillow does not: with the tag gone and the pixels upright, both agree."""
    from nvidia.dali import fn, pipeline_def, types

    jpegs = [prepare(oriented / f"o{o}.jpg", "o", Resize("none", None), 95, None).jpeg for o in sorted(STORED)]

    @pipeline_def(batch_size=len(jpegs), num_threads=1, device_id=None)
    def pipe():
        data = fn.external_source(source=lambda: [np.frombuffer(j, np.uint8) for j in jpegs], batch=True)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (images,) = p.run()
    upright = upright_photo().astype(np.float64)
    for i, jpeg in enumerate(jpegs):
        dali = np.asarray(images.at(i)).astype(np.float64)
        assert dali.shape == upright.shape and np.abs(dali - decode(jpeg)).mean() < 0.5
        assert np.abs(dali - upright).mean() < 2.0


def test_none_keeps_bytes_of_an_upright_tagged_jpeg(tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 1
    Image.fromarray(upright_photo()[:64, :96]).save(tmp_path / "a.jpg", quality=95, exif=exif.tobytes())
    out = prepare(tmp_path / "a.jpg", "a", Resize("none", None), 95, None)
    assert out.jpeg == (tmp_path / "a.jpg").read_bytes() and out.repaired is None and out.size == (96, 64)


def gray_ramp16() -> np.ndarray:
    """Columns 0..255 at 16 bits (j * 257 + row noise below 256), so the 8-bit result is exactly column j."""
    j = np.arange(256, dtype=np.uint32)[None, :].repeat(32, 0)
    low = (np.arange(32, dtype=np.uint32)[:, None] * 8) % 256
    return (j * 256 + low).astype(np.uint16)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("TIFF", ".tif"), ("PPM", ".pgm")])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, fmt, suffix):
    path = tmp_path / f"a{suffix}"
    Image.fromarray(gray_ramp16()).save(path, fmt)
    assert Image.open(path).mode in ("I;16", "I")  # PGM comes back in Pillow's 32-bit container
    out = prepare(path, "a", Resize("none", None), 95, None)
    got = decode(out.jpeg)[..., 0]
    expected = np.arange(256)[None, :].repeat(32, 0)
    assert out.repaired == f"{fmt} file re-encoded as JPEG" and out.size == (256, 32)
    assert np.abs(got - expected).mean() < 1.0 and np.abs(got - expected).max() <= 4  # JPEG noise on a smooth ramp


def test_16_bit_photo_is_turned_upright_too(tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(np.ascontiguousarray(STORED[6](gray_ramp16()[..., None])[..., 0])).save(
        tmp_path / "a.png", exif=exif.tobytes()
    )
    out = prepare(tmp_path / "a.png", "a", Resize("none", None), 95, None)
    assert out.repaired == "PNG file re-encoded as JPEG; EXIF orientation 6 applied: written upright"
    assert np.abs(decode(out.jpeg)[..., 0] - np.arange(256)[None, :]).mean() < 1.0


def test_float_image_in_0_1_is_scaled_and_other_ranges_rejected(tmp_path):
    ramp = np.linspace(0, 1, 256, dtype=np.float32)[None, :].repeat(32, 0)
    Image.fromarray(ramp).save(tmp_path / "unit.tif")
    Image.fromarray(ramp * 1000).save(tmp_path / "wide.tif")
    got = decode(prepare(tmp_path / "unit.tif", "u", Resize("none", None), 95, None).jpeg)[..., 0]
    assert np.abs(got - np.arange(256)[None, :]).mean() < 1.0
    out = prepare(tmp_path / "wide.tif", "w", Resize("none", None), 95, None)
    assert out.jpeg is None and out.rejected == "floating-point image with values 0..1000: no defined 8-bit scale"


def test_32_bit_integer_beyond_16_bits_is_rejected(tmp_path):
    Image.fromarray(np.arange(64, dtype=np.int32).reshape(8, 8) * 100000).save(tmp_path / "a.tif")
    out = prepare(tmp_path / "a.tif", "a", Resize("short", 16), 95, None)
    assert out.rejected == "32-bit integer image with values 0..6300000: no defined 8-bit scale"


def test_panorama_beyond_jpeg_limits_is_rejected_with_its_reason(tmp_path):
    src = tmp_path / "src" / "train" / "n01"
    src.mkdir(parents=True)
    Image.new("RGB", (4000, 8), "red").save(src / "pano.JPEG")
    Image.new("RGB", (40, 30), "blue").save(src / "ok.JPEG")
    out = prepare(src / "pano.JPEG", "pano", Resize("short", 256), 95, None)
    assert out.rejected == "4000x8 would be 128000x256 with --resize short:256, beyond JPEG's 65500-pixel limit"
    assert prepare(src / "pano.JPEG", "pano", Resize("paper", 256), 95, None).size == (256, 256)
    argv = ["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--splits", "train", "--workers", "1"]
    assert main([*argv, "--resize", "short:256"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rejected"] == [{"file": "train/n01/pano.JPEG", "reason": out.rejected}]
    assert manifest["splits"]["train"]["count"] == 1


@pytest.mark.slow
def test_the_peak_memory_of_a_run_in_this_process_is_not_the_processs_earlier_peak(tmp_path, capsys):
    """With one worker the images are prepared in the calling process, which may have peaked long before the run (a
    notebook, a test session): the summary's figure is that process's memory during the run, not its lifetime peak."""
    src = make_dataset(tmp_path / "src", classes=2, per_class=4, val_per_class=1, size_range=(48, 64), seed=0)
    np.ones(2**27).sum()  # 1 GiB written and freed: a peak that the run never comes near
    before, peak = psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert peak - before > 2**29
    assert main(["--src", str(src), "--out", str(tmp_path / "out"), "--resize", "short:32", "--workers", "1"]) == 0
    reported = int(re.search(r"peak memory per worker (\d+) MiB", capsys.readouterr().out)[1]) * 2**20
    assert before - 2**26 < reported < peak - 2**29, (before, reported, peak)
