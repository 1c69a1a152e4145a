"""DaliLoader's contract: labels, exactly-once epochs over 1-3 ranks, per-epoch reshuffles, resume, bad input, close."""
import gc
import json
import shutil
import tarfile
from collections import Counter
from itertools import islice

import psutil
import pytest
import torch

from pipeline import DaliLoader, ShardError, load_manifest
from pipeline.sharding import rank_range

CROP = 48


def loader(shards, split="train", batch=7, **kw):
    kw = {"augment": "paper", "crop_size": CROP, "device": "cpu", "num_threads": 1, **kw}
    return DaliLoader(shards, split, batch, **kw)


def epoch_keys(ld) -> list[list[str]]:
    """The sample keys of each batch of one pass over the loader's current epoch."""
    return [ld.info["key"] for _ in ld]


def tar_labels(shards, split) -> dict:
    """key -> label, read from the .cls members (ASCII) of the tars, independently of the .lbl DALI reads."""
    labels = {}
    for shard in load_manifest(shards).shards(split):
        with tarfile.open(shard.tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".cls"):
                    labels[m.name[:-4]] = int(tf.extractfile(m).read())
    return labels


@pytest.mark.parametrize("split,augment", [("train", "paper"), ("val", "center")])
def test_labels_match_the_shards(demo_shards, split, augment):
    want = tar_labels(demo_shards, split)
    with loader(demo_shards, split, augment=augment) as ld:
        for _, labels in ld:
            assert labels.tolist() == [want[k] for k in ld.info["key"]]


# (5, 19): ranks of 19 samples take a whole batch of padding to keep step with the rank of 20.
@pytest.mark.parametrize("world,batch", [(1, 7), (2, 7), (3, 7), (5, 19)])
def test_train_epoch_covers_the_split_once_over_the_ranks(demo_shards, world, batch):
    count = load_manifest(demo_shards).count("train")
    everything, steps = Counter(), set()
    for rank in range(world):
        with loader(demo_shards, batch=batch, rank=rank, world_size=world, seed=5) as ld:
            ld.set_epoch(1)
            keys = [k for b in epoch_keys(ld) for k in b]
            steps.add(len(ld))
        start, stop = rank_range(count, rank, world)
        own, padding = keys[:stop - start], keys[stop - start:]
        assert len(set(own)) == len(own)  # the rank's share, each once
        assert set(padding) <= set(own) and len(keys) == len(ld) * batch
        everything.update(own)
    assert len(steps) == 1  # the same number of steps on every rank
    assert set(everything) == set(tar_labels(demo_shards, "train")) and set(everything.values()) == {1}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_sees_every_sample_exactly_once(demo_shards, world):
    seen, steps = Counter(), set()
    for rank in range(world):
        with loader(demo_shards, "val", 5, augment="center", rank=rank, world_size=world) as ld:
            for images, labels in ld:
                assert images.shape[0] == labels.shape[0] == len(ld.info["key"]) <= 5
                seen.update(ld.info["key"])
            steps.add(len(ld))
    assert len(steps) == 1 and seen == Counter(tar_labels(demo_shards, "val").keys())


def test_epochs_reshuffle_deterministically(demo_shards):
    with loader(demo_shards, seed=1) as a, loader(demo_shards, seed=1) as b, loader(demo_shards, seed=2) as c:
        first, again, other = epoch_keys(a), epoch_keys(b), epoch_keys(c)
        assert a.epoch == 1  # a full pass moves on to the next epoch
        second = epoch_keys(a)
    assert first == again and first != second and first != other
    assert sorted(sum(first, [])[:96]) == sorted(sum(second, [])[:96])
    # Across epochs the file order changes too, so each rank reads other samples.
    shares = []
    for epoch in range(4):
        with loader(demo_shards, batch=8, rank=0, world_size=3, seed=1) as ld:
            ld.set_epoch(epoch)
            shares.append(frozenset(k for b in epoch_keys(ld) for k in b))
    assert len(set(shares)) > 1


def batches(ld, n):
    return [(images.clone(), labels.clone()) for images, labels in islice(ld, n)]


def test_resume_mid_epoch_and_at_the_boundary_gives_the_same_batches(demo_shards):
    def run(ld, epochs):
        out = []
        for epoch in epochs:
            ld.set_epoch(epoch)
            out += [(x.clone(), y.clone()) for x, y in ld]
        return out

    with loader(demo_shards, seed=3) as ld:
        steps = len(ld)
        straight = run(ld, [0, 1])
    with loader(demo_shards, seed=3) as ld:
        head = batches(ld, 5)
        mid = ld.state_dict()
    assert mid["epoch"] == 0 and mid["step"] == 5
    with loader(demo_shards, seed=3, num_threads=2, prefetch=3) as ld:  # threads and prefetch do not matter
        ld.load_state_dict(mid)
        tail = run(ld, [0, 1])
        boundary = ld.state_dict()
    assert boundary["epoch"] == 2 and boundary["step"] == 0
    resumed = head + tail
    assert len(resumed) == len(straight) == 2 * steps
    for (x, y), (x2, y2) in zip(straight, resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with loader(demo_shards, seed=3) as ld:
        ld.load_state_dict({**mid, "epoch": 1, "step": 0})
        assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(run(ld, [1]), straight[steps:]))
        with pytest.raises(ValueError, match="world_size"):
            ld.load_state_dict({**mid, "world_size": 2})


def copy_shards(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_manifest(folder, change):
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def one_line_error(folder, match, **kw):
    with pytest.raises(ShardError, match=match) as e:
        with loader(folder, **kw) as ld:
            for _ in ld:
                pass
    assert "\n" not in str(e.value)
    return str(e.value)


VERIFY = r".*; run tools/shard_imagenet.py --verify"


def test_bad_shard_folders_raise_one_line_naming_the_fix(demo_shards, tmp_path):
    one_line_error(tmp_path / "nowhere", "nowhere: no such shard folder; run tools/shard_imagenet.py")
    (tmp_path / "empty").mkdir()
    one_line_error(tmp_path / "empty", "manifest.json: missing; run tools/shard_imagenet.py")

    version = copy_shards(demo_shards, tmp_path / "version")
    edit_manifest(version, lambda m: m.update(format_version=99))
    one_line_error(version, "format version 99.*re-shard with tools/shard_imagenet.py")

    count = copy_shards(demo_shards, tmp_path / "count")
    def add_one(m):
        m["splits"]["train"]["count"] += 1
        m["splits"]["train"]["shards"][0]["count"] += 1
    edit_manifest(count, add_one)
    one_line_error(count, "97 'train' samples listed, the index files hold 96" + VERIFY)

    checksum = copy_shards(demo_shards, tmp_path / "checksum")
    index = checksum / "train-000001.idx"
    index.write_text(index.read_text().replace("\n", " \n", 1))
    one_line_error(checksum, "train-000001.idx: checksum does not match" + VERIFY)

    malformed = copy_shards(demo_shards, tmp_path / "malformed")
    edit_manifest(malformed, lambda m: m["splits"]["train"]["shards"][0].pop("index"))
    one_line_error(malformed, "manifest.json: malformed \\(KeyError: 'index'\\)" + VERIFY)

    no_index = copy_shards(demo_shards, tmp_path / "no_index")
    (no_index / "train-000002.idx").unlink()
    one_line_error(no_index, "train-000002.idx: missing" + VERIFY)

    one_line_error(demo_shards, "short side of 80, smaller than crop_size 96.*--resize short:96", crop_size=96)
    one_line_error(demo_shards, "no 'test' shards; re-shard", split="test")


@pytest.mark.parametrize("bad", [{"augment": "random"}, {"device": "tpu"}, {"dtype": torch.int8}, {"rank": 2},
                                 {"batch": 0}, {"hw_decoder_load": 1.5}, {"prefetch": 0}])
def test_bad_arguments_raise_value_error(demo_shards, bad):
    with pytest.raises(ValueError, match="|".join(bad)):
        loader(demo_shards, **{"world_size": 2, **bad})


def test_a_broken_jpeg_mid_epoch_names_its_shard(demo_shards, tmp_path):
    broken = copy_shards(demo_shards, tmp_path / "broken")
    line = (broken / "train-000002.idx").read_text().splitlines()[5].split()  # the 5th sample: jpg offset size name
    offset, size, name = int(line[1]), int(line[2]), line[3]
    with open(broken / "train-000002.tar", "r+b") as f:  # same size, so only decoding can notice
        f.seek(offset + 2)
        f.write(bytes(size - 2))
    gc.collect()
    threads = psutil.Process().num_threads()
    message = one_line_error(broken, f"train-000002.tar: {name} does not decode" + VERIFY, batch=4)
    assert str(broken) in message
    gc.collect()
    assert psutil.Process().num_threads() == threads  # the failed pipeline and the one that found the JPEG are gone


def test_close_is_idempotent_and_leaves_no_threads(demo_shards):
    gc.collect()
    before = psutil.Process().num_threads()
    ld = loader(demo_shards, num_threads=2)
    it = iter(ld)
    next(it)
    assert psutil.Process().num_threads() > before  # DALI's workers are running
    assert ld.images_per_s > 0
    ld.close()
    ld.close()
    gc.collect()
    assert psutil.Process().num_threads() == before
    with pytest.raises(ValueError, match="closed"):
        next(iter(ld))
