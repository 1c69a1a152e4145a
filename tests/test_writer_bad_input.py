"""Bad input: the real set's quirks are repaired, broken files rejected, all listed; usage errors one line, exit 2."""

import io
import json
from pathlib import PurePath

import pytest
from PIL import Image

from pipeline.synthetic import QUIRKS, make_dataset, wnid
from pipeline.writer.tars import read_shard
from tools.shard_imagenet import main

ARGS = ["--resize", "short:32", "--workers", "1", "--shard-size", "8"]


@pytest.fixture(scope="module")
def quirky(tmp_path_factory):
    return make_dataset(
        tmp_path_factory.mktemp("quirky"),
        classes=2,
        per_class=5,
        val_per_class=2,
        quirks=True,
        size_range=(40, 64),
        seed=5,
    )


@pytest.fixture(scope="module")
def quirky_run(quirky, tmp_path_factory):
    out = tmp_path_factory.mktemp("quirky_shards") / "out"
    capture = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(capture):
        rc = main(["--src", str(quirky), "--out", str(out), *ARGS])
    return rc, out, json.loads((out / "manifest.json").read_text()), capture.getvalue()


def expected(outcome: str) -> set[str]:
    name = {"notes": "notes.txt"}
    return {f"train/{wnid(0)}/" + name.get(q, f"{wnid(0)}_{q}.JPEG") for q, o in QUIRKS.items() if o == outcome}


def test_quirks_are_repaired_and_broken_files_rejected_each_with_a_reason(quirky_run):
    rc, _, manifest, _ = quirky_run
    assert rc == 0
    assert {r["file"] for r in manifest["repaired"]} == expected("repaired")
    assert {r["file"] for r in manifest["rejected"]} == expected("rejected")
    reasons = {r["file"]: r["reason"] for r in manifest["repaired"] + manifest["rejected"]}
    why = {q: reasons[f"train/{wnid(0)}/{wnid(0)}_{q}.JPEG"] for q in QUIRKS if q != "notes"}
    assert why["cmyk"] == "CMYK JPEG converted to RGB"
    assert why["png"] == "PNG file saved as .JPEG re-encoded as JPEG"
    assert why["gray"] == "grayscale JPEG converted to RGB"
    assert why["truncated"].startswith("undecodable") and "truncated" in why["truncated"]
    assert why["corrupt"].startswith("undecodable")
    assert why["empty"] == "empty file (0 bytes)"
    assert why["unreadable"].startswith("unreadable")
    assert manifest["skipped"] == [{"file": f"train/{wnid(0)}/notes.txt", "reason": "not an image file (.txt)"}]
    assert manifest["empty_classes"] == [f"train/{wnid(2)}"]


def test_everything_written_decodes_as_rgb_baseline_jpeg_and_repaired_files_are_kept(quirky_run):
    _, out, manifest, _ = quirky_run
    samples = {
        PurePath(s.path).stem: s for sh in manifest["splits"]["train"]["shards"] for s in read_shard(out / sh["tar"])
    }
    assert len(samples) == 2 * 5 + 3 and manifest["splits"]["train"]["count"] == 13
    for q in ("cmyk", "png", "gray"):
        assert f"{wnid(0)}_{q}" in samples
    for s in samples.values():
        im = Image.open(io.BytesIO(s.jpeg))
        im.load()
        assert (im.format, im.mode, bool(im.info.get("progressive"))) == ("JPEG", "RGB", False)
    assert main(["--verify", str(out)]) == 0


def test_summary_lists_every_repaired_and_rejected_file(quirky_run):
    _, _, manifest, stdout = quirky_run
    for r in manifest["repaired"]:
        assert f"repaired: {r['file']}: {r['reason']}" in stdout
    for r in manifest["rejected"]:
        assert f"rejected: {r['file']}: {r['reason']}" in stdout
    assert "17 images written (train 13 in 2 shards, val 4 in 1 shards)" in stdout
    assert "3 repaired, 4 rejected" in stdout
    assert "skipped, not images: 1 (1 .txt), listed in manifest.json" in stdout


def test_none_policy_repairs_too(quirky, tmp_path):
    assert main(["--src", str(quirky), "--out", str(tmp_path), "--resize", "none", "--workers", "1"]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert {r["file"] for r in manifest["repaired"]} == expected("repaired")
    assert main(["--verify", str(tmp_path)]) == 0


def test_strict_turns_rejections_into_a_failure(quirky, tmp_path, capsys):
    assert main(["--src", str(quirky), "--out", str(tmp_path), *ARGS, "--strict"]) == 1
    assert "--strict: 4 files rejected, 1 class folders without a usable image" in capsys.readouterr().err


def test_files_with_the_same_stem_are_both_kept(tmp_path):
    folder = tmp_path / "src" / "train" / "n01"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(folder / "a.JPEG")
    Image.new("RGB", (40, 30), "blue").save(folder / "a.png")
    assert main(["--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--splits", "train", *ARGS]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 2 and manifest["rejected"] == []
    written = read_shard(tmp_path / "out" / manifest["splits"]["train"]["shards"][0]["tar"])
    assert sorted(s.path for s in written) == ["train/n01/a.JPEG", "train/n01/a.png"]


@pytest.fixture
def existing(quirky_run):
    return quirky_run[1]


@pytest.mark.parametrize(
    "argv,says",
    [
        ([], "--src and --out are both required"),
        (["--src", "/nonexistent/imagenet", "--out", "{tmp}/o"], "no such folder"),
        (["--src", "{src}", "--out", "{src}/shards"], "inside --src"),
        (["--src", "{src}", "--out", "{existing}", "--quality", "80"], "different arguments"),
        (["--src", "{src}", "--out", "{tmp}/junk"], "not empty and not a shard folder"),
        (["--src", "{src}", "--out", "{tmp}/o", "--resize", "short"], "--resize"),
        (["--src", "{src}", "--out", "{tmp}/o", "--splits", "train", "my val"], "--splits"),
        (["--src", "{src}", "--out", "{tmp}/o", "--bogus"], "unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(quirky, existing, tmp_path, capsys, argv, says):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "holiday.jpg").write_bytes(b"x")
    argv = [a.format(src=quirky, tmp=tmp_path, existing=existing) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err


@pytest.mark.parametrize(
    "bad", [["--seed", "-1"], ["--seed", str(2**64)], ["--src", ""], ["--out", ""], ["--quality", "0"]]
)
def test_a_bad_value_writes_nothing_so_the_corrected_run_is_not_refused(quirky, tmp_path, capsys, bad):
    out = tmp_path / "o"
    assert main(["--src", str(quirky), "--out", str(out), *ARGS, *bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and bad[0] in err and "Traceback" not in err
    assert not out.exists()
    assert main(["--src", str(quirky), "--out", str(out), *ARGS, "--splits", "val"]) == 0


def test_decoder_takes_every_written_image_including_repaired_ones(quirky_run, device):
    """DALI dies on one undecodable JPEG: its decoder (nvJPEG on a GPU) must decode every sample we wrote."""
    from nvidia.dali import fn, pipeline_def, types

    _, out, manifest, _ = quirky_run
    shards = [sh for split in ("train", "val") for sh in manifest["splits"][split]["shards"]]
    total = sum(sh["count"] for sh in shards)

    @pipeline_def(batch_size=total, num_threads=2, device_id=0 if device == "cuda" else None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(
            paths=[str(out / sh["tar"]) for sh in shards],
            index_paths=[str(out / sh["index"]) for sh in shards],
            ext=["jpg", "lbl"],
            dtypes=[types.UINT8, types.INT32],
        )
        return fn.decoders.image(jpg, device="mixed" if device == "cuda" else "cpu", output_type=types.RGB), lbl

    p = pipe()
    p.build()
    images, _labels = p.run()
    images = images.as_cpu() if device == "cuda" else images
    assert len(images) == total and all(images.at(i).shape[2] == 3 for i in range(total))
