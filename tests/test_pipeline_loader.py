"""DaliLoader's contract: labels, exactly-once epochs over 1-3 ranks, per-epoch reshuffles, resume, bad input, close."""

import gc
import json
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from itertools import islice
from pathlib import Path

import psutil
import pytest
import torch
from helpers import one_line

from pipeline import DaliLoader, ShardError, load_manifest
from pipeline.failure import sources
from pipeline.loader import HOLD
from pipeline.settings import LoaderSettings
from pipeline.sharding import rank_range
from pipeline.writer.tars import Sample, read_shard, write_shard

CROP = 48
SETTINGS = {f.name for f in fields(LoaderSettings)}


def loader(shards, split="train", batch=7, **kw):
    """A CPU loader with one thread; keyword arguments naming a LoaderSettings field go to its settings."""
    kw = {"augment": "paper", "device": "cpu", "crop_size": CROP, "threads": 1, **kw}
    settings = LoaderSettings(batch_size=batch, **{k: kw.pop(k) for k in SETTINGS & set(kw)})
    return DaliLoader(load_manifest(shards), split, settings, **kw)


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
@pytest.mark.parametrize(
    "world,batch",
    [(1, 7), (2, 7), pytest.param(3, 7, marks=pytest.mark.slow), pytest.param(5, 19, marks=pytest.mark.slow)],
)
def test_train_epochs_cover_the_split_once_over_the_ranks(demo_shards, world, batch):
    count, epochs = load_manifest(demo_shards).count("train"), 3
    everything, steps = [Counter() for _ in range(epochs)], set()
    for rank in range(world):
        with loader(demo_shards, batch=batch, rank=rank, world_size=world, seed=5) as ld:
            for epoch in range(epochs):  # one pipeline, epoch after epoch
                ld.set_epoch(epoch)
                keys = [k for b in epoch_keys(ld) for k in b]
                start, stop = rank_range(count, rank, world)
                own, padding = keys[: stop - start], keys[stop - start :]
                assert len(set(own)) == len(own)  # the rank's share, each once
                assert set(padding) <= set(own) and len(keys) == len(ld) * batch
                everything[epoch].update(own)
            steps.add(len(ld))
    assert len(steps) == 1  # the same number of steps on every rank
    for seen in everything:
        assert set(seen) == set(tar_labels(demo_shards, "train")) and set(seen.values()) == {1}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_sees_every_sample_exactly_once_every_pass(demo_shards, world):
    seen, steps = Counter(), set()
    for rank in range(world):
        with loader(demo_shards, "val", 5, augment="center", rank=rank, world_size=world) as ld:
            passes = []
            for _ in range(2):
                passes.append([])
                for images, labels in ld:
                    assert images.shape[0] == labels.shape[0] == len(ld.info["key"]) <= 5
                    passes[-1] += ld.info["key"]
            assert passes[0] == passes[1]  # each pass the rank's own share, in the same order
            seen.update(passes[0])
            steps.add(len(ld))
    assert len(steps) == 1 and seen == Counter(tar_labels(demo_shards, "val").keys())


def test_epochs_reshuffle_deterministically(demo_shards):
    with loader(demo_shards, seed=1) as a, loader(demo_shards, seed=1) as b, loader(demo_shards, seed=2) as c:
        first, again, other = epoch_keys(a), epoch_keys(b), epoch_keys(c)
        assert a.epoch == 1  # a full pass moves on to the next epoch
        second = epoch_keys(a)
        with pytest.raises(ValueError, match="in order"):
            a.set_epoch(3)
    assert first == again and first != second and first != other
    assert sorted([k for batch in first for k in batch][:96]) == sorted([k for batch in second for k in batch][:96])
    # Across epochs the file order changes too, so each rank reads other samples, in an order the seed draws.
    schedules = {}
    for seed in (1, 2):
        with loader(demo_shards, batch=8, rank=0, world_size=3, seed=seed) as ld:
            schedules[seed] = [frozenset(k for b in epoch_keys(ld) for k in b) for _ in range(4)]
    assert len(set(schedules[1])) > 1 and schedules[1] != schedules[2]


def batches(ld, n):
    return [(images.clone(), labels.clone()) for images, labels in islice(ld, n)]


@pytest.mark.slow
@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_resume_mid_epoch_and_at_the_boundary_gives_the_same_batches(demo_shards, world, rank):
    def run(ld, epochs):
        out = []
        for epoch in epochs:
            ld.set_epoch(epoch)
            out += [(x.clone(), y.clone()) for x, y in ld]
        return out

    def make(**kw):
        return loader(demo_shards, seed=3, world_size=world, rank=rank, **kw)

    with make() as ld:
        steps = len(ld)
        straight = run(ld, [0, 1, 2])
    with make() as ld:
        head = batches(ld, 5)
        mid = ld.state_dict()
    assert mid["epoch"] == 0 and mid["step"] == 5
    with make(threads=2, prefetch=3) as ld:  # threads and prefetch do not matter
        ld.load_state_dict(mid)
        assert ld.state_dict() == mid  # unchanged until it runs
        tail = run(ld, [0, 1, 2])
    with make() as ld:  # a state saved at an epoch's end resumes the next epoch
        run(ld, [0])
        boundary = ld.state_dict()
    assert boundary["epoch"] == 1 and boundary["step"] == 0
    with make() as ld:
        ld.load_state_dict(boundary)
        after = run(ld, [1, 2])
        with pytest.raises(ValueError, match="world_size"):
            ld.load_state_dict({**mid, "world_size": 3})
        with pytest.raises(ValueError, match="rank"):  # each rank resumes its own pipeline
            ld.load_state_dict({**mid, "rank": rank + 1})
    for resumed in (head + tail, straight[:steps] + after):
        assert len(resumed) == len(straight) == 3 * steps
        for (x, y), (x2, y2) in zip(straight, resumed):
            assert torch.equal(x, x2) and torch.equal(y, y2)


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
    return one_line(str(e.value))


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


def test_an_unreadable_index_is_one_line_naming_it(demo_shards, tmp_path, deny):
    folder = copy_shards(demo_shards, tmp_path / "locked")
    deny(folder / "train-000001.idx")
    one_line_error(folder, r"train-000001.idx: cannot read \(Permission denied\); make the shard folder readable")


def test_info_names_shards_and_keys_that_hold_colons(demo_shards, tmp_path):
    # source_info is "TAR:OFFSET:MEMBER"; here TAR's folder and MEMBER both hold ":digits:" as well.
    folder = copy_shards(demo_shards, tmp_path / "e:12:x")
    records = []
    for shard in load_manifest(folder).shards("val"):
        samples = [Sample(f"12:34:{s.key}", s.jpeg, s.label, s.path) for s in read_shard(shard.tar)]
        records.append(asdict(write_shard(folder, shard.tar.stem, samples)))
    edit_manifest(folder, lambda m: m["splits"]["val"].update(shards=records))
    want, seen = tar_labels(folder, "val"), []
    with loader(folder, "val", 5, augment="center") as ld:
        for _, labels in ld:
            assert ld.info["tar"] == ["val-000000.tar"] * len(labels)
            assert labels.tolist() == [want[k] for k in ld.info["key"]]
            seen += ld.info["key"]
    assert sorted(seen) == sorted(want) and len(seen) == 24 and all(k.startswith("12:34:") for k in seen)


def test_a_crop_larger_than_the_smallest_image_is_refused_up_front(demo_shards, tmp_path):
    small = copy_shards(demo_shards, tmp_path / "small")
    edit_manifest(small, lambda m: m["splits"]["val"].update(min_side=40))  # as the sharder records it
    message = one_line_error(
        small,
        "the smallest 'val' image has a short side of 40, smaller than crop_size 48; "
        "pass a smaller --crop-size, or re-shard .*--resize short:48",
        split="val",
        augment="center",
    )
    assert str(small / "manifest.json") in message
    with loader(small, "val", augment="center", crop_size=40) as ld:  # a crop that fits the split passes
        assert sum(len(y) for _, y in ld) == 24
    with loader(small, "train", augment="inception", crop_size=96) as ld:  # resizes its crop: any image serves
        assert next(iter(ld))[0].shape[-2:] == (96, 96)


@pytest.mark.parametrize(
    "bad",
    [
        {"augment": "random"},
        {"device": "tpu"},
        {"dtype": torch.int8},
        {"rank": 2},
        {"batch": 0},
        {"hw_decoder_load": 1.5},
        {"prefetch": 0},
    ],
)
def test_bad_arguments_raise_value_error(demo_shards, bad):
    with pytest.raises(ValueError, match="|".join(bad)):
        loader(demo_shards, **{"world_size": 2, **bad})


def test_the_loader_keeps_a_checked_copy_of_any_config_composed_with_loader_settings(demo_shards):
    @dataclass
    class RunConfig(LoaderSettings):
        workdir: str = "runs/x"

    cfg = RunConfig(batch_size=5, crop_size=CROP, threads=1)
    with DaliLoader(load_manifest(demo_shards), "val", cfg, augment="center", device="cpu") as ld:
        cfg.batch_size = 0  # the caller's object changes; the loader's copy does not
        assert [len(labels) for _, labels in ld] == [5, 5, 5, 5, 4]
    assert type(ld.settings) is LoaderSettings and ld.settings.batch_size == 5
    with pytest.raises(ValueError, match="LoaderSettings batch_size=0: must be at least 1"):
        DaliLoader(load_manifest(demo_shards), "val", cfg, device="cpu")


@pytest.mark.parametrize("split,augment,world,rank", [("train", "paper", 3, 1), ("val", "center", 2, 1)])
def test_the_label_replay_yields_the_loaders_batches_epoch_after_epoch(demo_shards, split, augment, world, rank):
    """What the failure diagnosis stands on: the reader alone, reading labels only, draws the loader's samples."""
    with loader(demo_shards, split, 5, augment=augment, world_size=world, rank=rank, seed=2) as ld:
        batches = [[(ld.info["tar"][i], key) for i, key in enumerate(ld.info["key"])] for _ in range(3) for _ in ld]
        replay = ld.spec.labels()
        replayed = [[(Path(tar).name, key) for tar, key in sources(replay.run()[0], ld.spec.tars)] for _ in batches]
    if split == "train":  # each epoch reshuffled: no batch comes twice, so an order merely alike would not pass
        assert len({tuple(b) for b in batches}) == len(batches)
    assert [r[: len(b)] for r, b in zip(replayed, batches)] == batches


def break_a_jpeg(demo_shards, folder) -> tuple[Path, str, dict]:
    """A copy of the shards with a JPEG zeroed past its header, its name, and a position in epoch 1 saved before."""
    with loader(demo_shards, batch=4) as ld:  # a position in epoch 1, saved by a run on intact shards
        for _ in ld:
            pass
        batches(ld, 1)
        in_epoch_1 = ld.state_dict()
    broken = copy_shards(demo_shards, folder)
    line = (broken / "train-000002.idx").read_text().splitlines()[5].split()  # the 5th sample: jpg offset size name
    offset, size, name = int(line[1]), int(line[2]), line[3]
    with open(broken / "train-000002.tar", "r+b") as f:  # same size, so only decoding can notice
        f.seek(offset + 2)
        f.write(bytes(size - 2))
    return broken, name, in_epoch_1


def read_on(folder, state, epochs=3):
    with loader(folder, batch=4) as ld:
        ld.load_state_dict(state)
        for _ in range(epochs):
            for _ in ld:
                pass


@pytest.mark.slow
def test_a_broken_jpeg_mid_epoch_names_its_shard(demo_shards, tmp_path):
    broken, name, in_epoch_1 = break_a_jpeg(demo_shards, tmp_path / "broken")
    gc.collect()
    threads = psutil.Process().num_threads()
    message = one_line_error(broken, f"train-000002.tar: {name} does not decode" + VERIFY, batch=4)
    assert str(broken) in message
    # Resumed from a DALI checkpoint, the replay that finds the JPEG starts there (or at a later epoch's start).
    with pytest.raises(ShardError, match=f"train-000002.tar: {name} does not decode" + VERIFY):
        read_on(broken, in_epoch_1)
    gc.collect()
    assert psutil.Process().num_threads() == threads  # the failed pipelines and the ones that found the JPEG are gone


# Cuts a shard in half while a loader reads the folder: DALI read the tars through mmap once, and a read past the new
# end of a mapped file is SIGBUS, which kills the process; so this runs in a process of its own.
TRUNCATE = """
import os, sys
from pathlib import Path
from pipeline import DaliLoader, ShardError, load_manifest
from pipeline.settings import LoaderSettings

folder = Path(sys.argv[1])
settings = LoaderSettings(batch_size=4, crop_size=48, threads=1)
with DaliLoader(load_manifest(folder), "train", settings, device="cpu") as ld:
    next(iter(ld))
    os.truncate(folder / "train-000001.tar", (folder / "train-000001.tar").stat().st_size // 2)
    try:
        for _ in range(4):
            for _ in ld:
                pass
    except ShardError as e:
        sys.exit(f"ShardError: {e}")
"""


@pytest.mark.slow
def test_a_shard_truncated_mid_epoch_is_one_line_naming_it(demo_shards, tmp_path):
    folder = copy_shards(demo_shards, tmp_path / "cut")
    out = subprocess.run([sys.executable, "-c", TRUNCATE, str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]  # not -7: SIGBUS
    line = one_line(out.stderr)
    assert line.startswith(f"ShardError: {folder / 'train-000001.tar'}: 143360 bytes, manifest says 286720; run ")


def test_close_is_idempotent_and_leaves_no_threads(demo_shards):
    gc.collect()
    before = psutil.Process().num_threads()
    ld = loader(demo_shards, threads=2)
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


def hold_back(device: str, seconds: float) -> None:
    """Keep the device busy about `seconds` without the host waiting: queued GPU time, or the host's own on a CPU."""
    if device == "cuda":
        torch.cuda._sleep(int(seconds * 1.7e9))  # cycles at about 1.7 GHz
    else:
        time.sleep(seconds)


def synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batches_outlive_a_late_consumer(demo_shards, dtype, device):
    """DALI must not reuse a batch's memory before the work queued on it has run. The device is held back before
    each batch is asked for, so on a GPU the loader's bfloat16 cast and the reads queue behind: the sums are a
    synchronised run's."""

    def checksums(late: bool) -> torch.Tensor:
        sums = []
        with loader(demo_shards, batch=8, device=device, dtype=dtype, seed=4) as ld:
            for _ in range(2):  # two epochs: the boundary too
                batches = iter(ld)
                while True:
                    if late:
                        hold_back(device, 0.03 if device == "cuda" else 0.001)  # queued ahead of everything below
                    batch = next(batches, None)
                    if batch is None:
                        break
                    if not late:
                        synchronise(device)
                    x = batch[0].double()
                    where = torch.arange(x.numel(), dtype=x.dtype, device=x.device).view(x.shape)
                    sums.append(torch.stack([x.sum(), (x * where).sum(), batch[1].double().sum()]))
                    del batch, x  # as a training step drops its batch
                    if not late:
                        synchronise(device)
        synchronise(device)
        return torch.stack(sums).cpu()

    synchronised = checksums(late=False)
    assert len(synchronised) == 24 and torch.equal(checksums(late=True), synchronised)


def test_back_pressure_is_counted_apart_from_data_wait(demo_shards, device):
    """A host HOLD batches ahead of a busy GPU is held in next(): gpu_wait_s takes that time, the trainer's timed() the
    rest. On the CPU the host does the step itself: nothing is held back, and no step waits for data either."""
    from model.train.loop import timed

    with loader(demo_shards, batch=8, device=device, seed=4) as ld:
        waits = []
        for wait, _ in timed(ld):
            hold_back(device, 0.06)  # a step the host does not wait for on a GPU
            waits.append(wait)
        synchronise(device)
    if device == "cuda":
        assert ld.gpu_wait_s > 0.5 * 0.05 * (len(waits) - HOLD)  # held about one step's GPU time per batch past HOLD
    else:
        assert ld.gpu_wait_s == 0
    assert sorted(waits)[len(waits) // 2] < 0.02  # the median step waited for no data
