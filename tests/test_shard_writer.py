"""Shard bytes: DALI's own index tool agrees with ours, headers are deterministic, DALI reads the labels."""
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from wds2idx import IndexCreator

from pipeline.atomic import atomic_write
from pipeline.writer.tars import Sample, build_shard, read_shard, write_shard


def jpeg(h: int, w: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# Original paths as cameras and other operating systems name files: repeated stems, spaces, long UTF-8, not UTF-8.
PATHS = ["train/cat/IMG_0001.JPG", "train/dog/IMG_0001.JPG", "train/dog/holiday 2019/IMG 0001.jpg",
         "train/cat/" + "é" * 120 + ".jpg", os.fsdecode(b"train/cat/caf\xe9.jpg")]


def samples(n: int = 9) -> list[Sample]:
    # Sizes straddle the 512-byte block boundary so padding is exercised.
    return [Sample(f"{i:08d}", jpeg(8 + 5 * i, 16 + 3 * i, 20 * i) + b"\0" * (i * 57), i * 111, PATHS[i % len(PATHS)])
            for i in range(n)]


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
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) for i in infos} == {(0, 0, 0, "", "", 0o644, tarfile.REGTYPE)}
    assert read_shard(tmp_path / rec.tar) == samples()
    assert rec.tar_bytes == (tmp_path / rec.tar).stat().st_size and rec.tar_bytes % 10240 == 0
    assert build_shard(samples()) == build_shard(samples())


def test_tarfile_writes_the_same_bytes():
    """Python's own tarfile, given the same members and headers, produces exactly our archive."""
    tar, _ = build_shard(samples(4))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples(4):
            for name, data in ((f"{s.key}.jpg", s.jpeg), (f"{s.key}.cls", str(s.label).encode()),
                               (f"{s.key}.lbl", s.label.to_bytes(4, "little")), (f"{s.key}.path", os.fsencode(s.path))):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tf.addfile(info, io.BytesIO(data))
    assert buf.getvalue() == tar


@pytest.mark.parametrize("name,size", [("a", 0), ("x" * 100, 8 ** 11 - 1), ("train_00000000.path", 513)])
def test_headers_are_tarfiles_at_the_limits(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
    assert header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


@pytest.mark.parametrize("name,size", [("x" * 101, 1), ("a", 8 ** 11)])
def test_headers_refuse_what_ustar_cannot_hold(name, size):
    with pytest.raises(ValueError, match="does not fit a USTAR header"):
        header(name, size)


def test_dali_reads_images_and_int32_labels_through_our_index(tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    recs = [write_shard(tmp_path, f"train-{i:06d}", samples()[i::2]) for i in range(2)]

    @pipeline_def(batch_size=9, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(paths=[str(tmp_path / r.tar) for r in recs],
                                         index_paths=[str(tmp_path / r.index) for r in recs],
                                         ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT32])
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
