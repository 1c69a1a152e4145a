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
