"""Shard bytes: DALI's own index tool agrees with ours, the bytes are those of the release before (hand-built
headers), webdataset and DALI read back every sample and label."""

import hashlib
import io
import os
import tarfile

import numpy as np
import webdataset as wds
from PIL import Image
from wds2idx import IndexCreator

from pipeline.atomic import atomic_write
from pipeline.writer.tars import Sample, build_shard, read_shard, write_shard


def jpeg(h: int, w: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# Original paths as cameras and other operating systems name files: repeated stems, spaces, long UTF-8, not UTF-8.
PATHS = [
    "train/cat/IMG_0001.JPG",
    "train/dog/IMG_0001.JPG",
    "train/dog/holiday 2019/IMG 0001.jpg",
    "train/cat/" + "é" * 120 + ".jpg",
    os.fsdecode(b"train/cat/caf\xe9.jpg"),
]


def samples(n: int = 9) -> list[Sample]:
    # Sizes straddle the 512-byte block boundary so padding is exercised.
    return [
        Sample(f"{i:08d}", jpeg(8 + 5 * i, 16 + 3 * i, 20 * i) + b"\0" * (i * 57), i * 111, PATHS[i % len(PATHS)])
        for i in range(n)
    ]


def test_index_is_byte_identical_to_dalis_wds2idx(tmp_path):
    rec = write_shard(tmp_path, "train-000000", samples())
    with IndexCreator(str(tmp_path / rec.tar), str(tmp_path / "ref.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "ref.idx").read_bytes() == (tmp_path / rec.index).read_bytes()
    assert (tmp_path / rec.index).read_text().startswith("v1.2 9\n")


def test_tar_headers_are_deterministic_and_round_trip(tmp_path):
    rec = write_shard(tmp_path, "val-000000", samples())
    with tarfile.open(tmp_path / rec.tar) as tf:
        infos = tf.getmembers()
    assert [i.name for i in infos[:4]] == ["00000000.jpg", "00000000.cls", "00000000.lbl", "00000000.path"]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) for i in infos} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    }
    assert read_shard(tmp_path / rec.tar) == samples()
    assert rec.tar_bytes == (tmp_path / rec.tar).stat().st_size and rec.tar_bytes % 10240 == 0


def test_bytes_are_those_the_hand_built_headers_wrote():
    """Shards written before this version resume into the same folder: the sha256 of a shard of fixed members, as
    the previous release's hand-built USTAR headers wrote it, is the contract (images are fixed bytes here, so no
    JPEG encoder version enters the digest)."""
    fixed = [
        Sample(f"train_{i:08d}", bytes(range(256)) * i + b"\xff" * (i * 57), i * 111 - 1, PATHS[i % len(PATHS)])
        for i in range(9)
    ]
    tar, index = build_shard(fixed)
    assert hashlib.sha256(tar).hexdigest() == "2fad59940ecf94e495f346591d1c5148bdd8027b8d857ce8d8d538fee476faaa"
    assert hashlib.sha256(index).hexdigest() == "c422e9f4a13a58c6eacb436f15ff14ca270c0e50462db8d7fb7758ac7cbc254b"


def test_webdataset_reads_every_sample_as_written(tmp_path):
    rec = write_shard(tmp_path, "train-000000", samples())
    got = [
        (d["__key__"], d["jpg"], int(d["cls"]), int.from_bytes(d["lbl"], "little"), d["path"])
        for d in wds.WebDataset(str(tmp_path / rec.tar), shardshuffle=False)
    ]
    assert got == [(s.key, s.jpeg, s.label, s.label, s.path.encode("utf-8", "surrogateescape")) for s in samples()]


def test_a_shard_of_only_rejected_images_writes_no_files(tmp_path):
    assert write_shard(tmp_path, "train-000000", iter([])) is None
    assert not list(tmp_path.iterdir())


def test_dali_reads_images_and_int32_labels_through_our_index(tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    recs = [write_shard(tmp_path, f"train-{i:06d}", samples()[i::2]) for i in range(2)]

    @pipeline_def(batch_size=9, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(
            paths=[str(tmp_path / r.tar) for r in recs],
            index_paths=[str(tmp_path / r.index) for r in recs],
            ext=["jpg", "lbl"],
            dtypes=[types.UINT8, types.INT32],
        )
        return fn.decoders.image(jpg, device="cpu"), lbl

    p = pipe()
    p.build()
    images, labels = p.run()
    got = sorted((int(np.array(labels[i])[0]), np.array(images[i]).shape) for i in range(9))
    assert got == sorted((s.label, (8 + 5 * i, 16 + 3 * i, 3)) for i, s in enumerate(samples()))


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write(tmp_path / "manifest.json", b"{}")
    atomic_write(tmp_path / "manifest.json", b"{1}")
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert (tmp_path / "manifest.json").read_bytes() == b"{1}"
