"""--verify sees the whole folder: a stray file is named, and so is every damaged shard, not just the first."""

import json
import shutil

import webdataset as wds

from tools.shard_imagenet import main


def copy(demo_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(demo_shards, out)
    return out, json.loads((out / "manifest.json").read_text())


def problems(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_stray_copy_of_a_shard_makes_the_folder_not_intact_and_is_named(demo_shards, tmp_path, capsys):
    out, manifest = copy(demo_shards, tmp_path)
    listed = manifest["splits"]["train"]["count"]
    shutil.copy(out / "train-000001.tar", out / "train-000012.tar")  # what a user's copy or an old run leaves
    (out / "notes.txt").write_text("shards of the demo\n")
    # What the stray costs a reader that globs the folder, as webdataset and Hugging Face do: samples counted twice.
    globbed = sum(1 for _ in wds.WebDataset(sorted(map(str, out.glob("train-*.tar"))), shardshuffle=False))
    assert globbed > listed
    assert main(["--verify", str(out)]) == 1
    err = problems(capsys)
    assert len(err) == 2, err
    assert any(str(out / "train-000012.tar") in line and "not listed in manifest.json" in line for line in err)
    assert any(str(out / "notes.txt") in line for line in err)


def test_every_damaged_shard_is_named(demo_shards, tmp_path, capsys):
    out, manifest = copy(demo_shards, tmp_path)
    shards = [s for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    assert len(shards) == 4
    for victim in (shards[0]["tar"], shards[2]["tar"], shards[3]["index"]):
        data = bytearray((out / victim).read_bytes())
        data[len(data) // 2] ^= 0x01
        (out / victim).write_bytes(bytes(data))
    (out / shards[1]["index"]).unlink()
    for workers in ("1", "2"):
        assert main(["--verify", str(out), "--workers", workers]) == 1
        err = problems(capsys)
        assert len(err) == 4, err
        for name in (shards[0]["tar"], shards[1]["index"], shards[2]["tar"], shards[3]["index"]):
            assert sum(name in line for line in err) == 1, (name, err)


def test_hidden_files_are_not_strays(demo_shards, tmp_path, capsys):
    """Globs skip hidden files, and a run keeps its own records in them."""
    out, _ = copy(demo_shards, tmp_path)
    (out / ".lock").write_text("")
    assert main(["--verify", str(out)]) == 0


def test_a_hand_edited_manifest_is_caught_by_its_own_checksum(demo_shards, tmp_path, capsys):
    """The statistics every loader normalises with are in the manifest alone: no shard checksum covers them."""
    out, manifest = copy(demo_shards, tmp_path)
    manifest["stats"]["rgb_mean"][0] += 1.0
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert main(["--verify", str(out)]) == 1
    err = problems(capsys)
    assert len(err) == 1 and "manifest.json: its content does not match its own checksum" in err[0], err
    assert "--verify" not in err[0]


def test_a_manifest_without_a_checksum_is_read_and_verify_says_so(demo_shards, tmp_path, capsys):
    """Shard folders written before the manifest had a checksum stay usable."""
    from pipeline.manifest import CHECKSUM, load_manifest

    out, manifest = copy(demo_shards, tmp_path)
    del manifest[CHECKSUM]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    assert load_manifest(out).count("train") == manifest["splits"]["train"]["count"]
    assert main(["--verify", str(out)]) == 0
    assert "has no checksum of its own" in capsys.readouterr().out


def test_verify_refuses_what_is_no_shard_folder_in_one_line(demo_shards, tmp_path, capsys):
    out, _ = copy(demo_shards, tmp_path)
    assert main(["--verify", str(out / "manifest.json")]) == 2  # a file, not the folder
    assert problems(capsys) == [
        f"--verify {out / 'manifest.json'}: a file; pass the shard folder (the one holding manifest.json)"
    ]
    (out / "manifest.json").write_text("[1, 2]")  # valid JSON, not an object
    assert main(["--verify", str(out)]) == 1
    err = problems(capsys)
    assert len(err) == 1 and "manifest.json: holds a JSON list, not a manifest" in err[0] and "--verify" not in err[0]
    for beside in (["--src", str(tmp_path)], ["--out", str(tmp_path / "o")]):
        assert main(["--verify", str(out), *beside]) == 2  # not silently ignored
        assert "--verify checks a shard folder alone" in capsys.readouterr().err


def test_a_damaged_shard_found_by_verify_is_not_told_to_run_verify(demo_shards, tmp_path, capsys):
    out, manifest = copy(demo_shards, tmp_path)
    victim = out / manifest["splits"]["val"]["shards"][0]["tar"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    assert main(["--verify", str(out)]) == 1
    err = problems(capsys)
    assert len(err) == 1 and str(victim) in err[0] and "--verify" not in err[0] and "re-shard" in err[0], err
