"""Resize policies: paper (§2: shorter side 256, centre 256x256), short:N (aspect kept), none (original bytes)."""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import decode
from PIL import Image

from pipeline.synthetic import make_dataset
from pipeline.writer import images
from pipeline.writer.images import Resize, draft_request, geometry, parse_resize, prepare, resample
from pipeline.writer.tars import read_shard
from tools import profile_sharder
from tools.shard_imagenet import main


def save(path, rgb: np.ndarray, **kw):
    Image.fromarray(rgb).save(path, "JPEG", quality=95, **kw)
    return path


def ramp(h: int, w: int) -> np.ndarray:
    """Left-right and top-bottom ramps in different channels, so a misplaced crop or flip shows up."""
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return np.stack([x, y, 255 - x], -1).astype(np.uint8)


def test_parse_resize():
    assert parse_resize("paper") == Resize("paper", 256)
    assert parse_resize("short:160") == Resize("short", 160)
    assert parse_resize("none") == Resize("none", None)
    for bad in ("short:", "short:0", "256", "short:-3"):
        with pytest.raises(ValueError):
            parse_resize(bad)


def test_geometry():
    assert geometry(500, 375, Resize("paper", 256)) == ((256, 256), (62, 0, 437, 375))  # 0.5 px left of centre
    assert geometry(375, 500, Resize("paper", 256)) == ((256, 256), (0, 62, 375, 437))
    assert geometry(500, 375, Resize("short", 80)) == ((107, 80), (0, 0, 500, 375))
    assert geometry(120, 90, Resize("short", 256)) == ((341, 256), (0, 0, 120, 90))
    w, h = draft_request(1200, 900, 256)
    assert (w, h) == (342, 256) and min(1200 // w, 900 // h) == 3  # libjpeg then picks scale 1/2, shorter side 450


@pytest.mark.parametrize(
    "src,box,size",
    [
        ((1000, 750), (0, 0, 1000, 750), (341, 256)),  # downscale 2.9x
        ((478, 375), (51, 0, 426, 375), (256, 256)),  # paper's crop, 1.46x
        ((120, 90), (0, 0, 120, 90), (341, 256)),  # upscale
        ((8, 8), (0, 0, 8, 8), (256, 256)),
        ((4000, 8), (0, 0, 4000, 8), (256, 1)),
    ],
)
def test_resample_is_pillows_antialiased_bicubic(src, box, size):
    """The fast kernel against Pillow's own filter on noise, where rounding differences show most."""
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8))
    reference = np.asarray(im.crop(box).resize(size, Image.Resampling.BICUBIC)).astype(np.int64)
    diff = np.abs(resample(im, size, box).astype(np.int64) - reference)
    assert diff.max() <= 2 and diff.mean() < 0.01


@pytest.mark.parametrize(
    "src,box,size",
    [
        ((1000, 750), (0, 0, 1000, 750), (341, 256)),
        ((478, 375), (51, 0, 426, 375), (256, 256)),
        ((120, 90), (0, 0, 120, 90), (341, 256)),
    ],
)
def test_private_resize_op_gives_the_public_apis_pixels_and_falls_back_to_it(monkeypatch, src, box, size):
    """The private out= op stays for speed; F.interpolate(antialias=True) is the reference and the fallback."""
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (src[1], src[0], 3), dtype=np.uint8))
    crop = torch.from_numpy(np.asarray(im.crop(box))).permute(2, 0, 1)[None]
    public = F.interpolate(crop, size=(size[1], size[0]), mode="bicubic", antialias=True)[0].permute(1, 2, 0).numpy()
    assert images.AA_OUT is not None  # this torch has it: the fast path is what the sharder runs
    assert np.array_equal(resample(im, size, box), public)

    def changed_signature(*a, **k):
        raise RuntimeError("_upsample_bicubic2d_aa() got an unexpected keyword argument")

    for private in (None, changed_signature):  # a torch without the op, or with another signature
        monkeypatch.setattr(images, "AA_OUT", private)
        assert np.array_equal(resample(im, size, box), public)


@pytest.mark.parametrize("w,h", [(1200, 900), (700, 1000), (300, 200)])
def test_paper_matches_full_decode_resize_then_centre_crop(tmp_path, w, h):
    """Draft (DCT-domain) decoding + one box resize equals the paper's two steps on the full decode, up to JPEG loss."""
    src = save(tmp_path / "a.JPEG", ramp(h, w))
    out = prepare(src, "a", Resize("paper", 256), 95, None)
    full = Image.open(src).convert("RGB")
    s = 256 / min(w, h)
    scaled = np.asarray(full.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)).astype(np.float64)
    y0, x0 = (scaled.shape[0] - 256) // 2, (scaled.shape[1] - 256) // 2
    reference = scaled[y0 : y0 + 256, x0 : x0 + 256]
    got = decode(out.jpeg)
    assert got.shape == (256, 256, 3) and out.repaired is None and out.rejected is None
    assert np.abs(got - reference).mean() < 2.0
    assert np.abs(got - np.asarray(full.resize((256, 256)))).mean() > 5 or w == h  # a plain squash would differ


def test_short_side_keeps_aspect(tmp_path):
    src = save(tmp_path / "a.JPEG", ramp(600, 900))
    got = decode(prepare(src, "a", Resize("short", 160), 95, None).jpeg)
    assert got.shape == (160, 240, 3)
    reference = np.asarray(Image.open(src).convert("RGB").resize((240, 160), Image.Resampling.BICUBIC))
    assert np.abs(got - reference).mean() < 2.0


def test_none_keeps_rgb_baseline_bytes_and_re_encodes_the_rest(tmp_path):
    rgb = ramp(90, 120)
    plain = save(tmp_path / "plain.JPEG", rgb)
    progressive = save(tmp_path / "prog.JPEG", rgb, progressive=True)
    out = prepare(plain, "plain", Resize("none", None), 95, None)
    assert out.jpeg == plain.read_bytes() and out.repaired is None
    out = prepare(progressive, "prog", Resize("none", None), 95, None)
    assert out.repaired == "progressive JPEG re-encoded as baseline"
    im = Image.open(io.BytesIO(out.jpeg))
    assert not im.info.get("progressive") and im.size == (120, 90)


@pytest.fixture(scope="module")
def mid_src(tmp_path_factory):
    """ImageNet-like sizes so draft decoding actually engages."""
    return make_dataset(
        tmp_path_factory.mktemp("mid"), classes=2, per_class=3, val_per_class=1, size_range=(300, 640), seed=3
    )


@pytest.mark.parametrize("resize", ["paper", "short:100", "none"])
def test_every_policy_end_to_end(mid_src, tmp_path, resize):
    assert main(["--src", str(mid_src), "--out", str(tmp_path), "--resize", resize, "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["preprocessing"]["resize"] == resize
    for split, n in (("train", 6), ("val", 2)):
        samples = [s for sh in manifest["splits"][split]["shards"] for s in read_shard(tmp_path / sh["tar"])]
        assert len(samples) == n
        sizes = [Image.open(io.BytesIO(s.jpeg)).size for s in samples]
        assert manifest["splits"][split]["min_side"] == min(
            min(size) for size in sizes
        )  # run.py refuses crops above it
        for s, size in zip(samples, sizes):
            source = mid_src / s.path
            if resize == "paper":
                assert size == (256, 256)
            elif resize == "short:100":
                assert min(size) == 100 and abs(size[0] / size[1] - np.divide(*Image.open(source).size)) < 0.02
            else:
                assert s.jpeg == source.read_bytes()


def test_profile_sharder_times_every_stage(demo_src, tmp_path, capsys):
    assert profile_sharder.main(["--src", str(demo_src), "--resize", "short:80", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    stages = {
        line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines() if line.startswith("|")
    }
    assert set(stages) == {
        "decode (draft)",
        "depth + orientation",
        "crop + resize",
        "encode",
        "statistics",
        "other",
        "tar + sha256",
        "total",
    }
    assert stages["decode (draft)"] > 0 and stages["total"] > stages["decode (draft)"] + stages["encode"]
    assert "120 files" in out and "img/s per core" in out
    assert profile_sharder.main(["--src", str(tmp_path)]) == 2
    assert "no .jpg or .jpeg files" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--rounds", "0"], "--rounds 0: must be at least 1"),
        (["--resize", "bogus"], "--resize bogus: must be paper, short:N"),
        (["--quality", "101"], "--quality 101: must be between 1 and 100"),
        (["--workers", "0"], "--workers 0: must be at least 1"),
        (["--src", ""], "argument --src: an empty path"),
        (["--src", "/nonexistent/jpegs"], "--src /nonexistent/jpegs: no such folder"),
    ],
)
def test_profile_sharder_refuses_bad_values_before_any_work_in_one_line(argv, says, capsys):
    assert profile_sharder.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err, err
