"""The CUDA paths end to end, each with a CPU variant that runs in CI: rank sharding, the decoders against the CPU
graph, run.py stopped, resumed and evaluated, and the loader's ordering on torch's stream (pytest -m gpu for CUDA)."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def

import run
from pipeline import DaliLoader, load_manifest
from pipeline.augment import crop_window
from pipeline.graphs import read_shards
from pipeline.settings import LoaderSettings
from pipeline.sharding import rank_range

CROP = 64
GPU = pytest.mark.gpu


def loader(shards, split, batch, device, hw_decoder_load=0.65, **kw) -> DaliLoader:
    settings = LoaderSettings(batch_size=batch, crop_size=CROP, threads=2, hw_decoder_load=hw_decoder_load)
    return DaliLoader(load_manifest(shards), split, settings, device=device, **kw)


def center_crops(shards, split, device, **kw) -> dict[str, tuple[np.ndarray, int]]:
    """Every image of a split through the project's centre-crop graph, keyed by sample key: (HWC pixels less the
    mean, label)."""
    out = {}
    with loader(shards, split, 8, device, augment="center", dtype=torch.float32, **kw) as ld:
        for images, labels in ld:
            for key, image, label in zip(ld.info["key"], images.permute(0, 2, 3, 1).cpu().numpy(), labels.tolist()):
                out.setdefault(key, (image, label))
    return out


@pytest.fixture(scope="module")
def cpu_train_crops(demo_shards):
    return center_crops(demo_shards, "train", "cpu")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_cover_the_split_once_each_image_under_its_key(demo_shards, cpu_train_crops, device, world):
    """Each rank's share, on `device`, holds the images and labels that one CPU process gives for those keys."""
    manifest, seen = load_manifest(demo_shards), Counter()
    count = manifest.count("train")
    for rank in range(world):
        with loader(demo_shards, "train", 8, device, augment="center", dtype=torch.float32, rank=rank,
                    world_size=world, seed=3) as ld:  # fmt: skip
            start, stop = rank_range(count, rank, world)
            keys = []
            for images, labels in ld:
                assert images.device.type == labels.device.type == device
                for key, image, label in zip(ld.info["key"], images.permute(0, 2, 3, 1).cpu().numpy(), labels):
                    want, want_label = cpu_train_crops[key]
                    assert int(label) == want_label, key
                    # the CUDA decoders round the IDCT otherwise: a fraction of a level on average, where another
                    # image's pixels would be tens of levels off
                    assert np.abs(image - want).mean() < (1e-6 if device == "cpu" else 1.0), key
                keys += ld.info["key"]
            assert len(keys) == len(ld) * 8 and set(keys[stop - start :]) <= set(keys[: stop - start])
            seen.update(keys[: stop - start])
    assert len(seen) == count and set(seen.values()) == {1}


def decode_whole(shards_dir, device, **decode) -> dict[str, np.ndarray]:
    """Every validation image decoded whole by a bare DALI pipeline with these decoder arguments, by key."""
    shards = load_manifest(shards_dir).shards("val")
    total = sum(s.count for s in shards)

    @pipeline_def(batch_size=total, num_threads=1, device_id=0 if device == "cuda" else None, seed=0)
    def whole():
        jpegs, _ = read_shards(
            [str(s.tar) for s in shards], [str(s.index) for s in shards], shard_id=0, num_shards=1, shuffle=False,
            seed=0,
        )  # fmt: skip
        images = fn.decoders.image(jpegs, device="mixed" if device == "cuda" else "cpu", **decode)
        return images, fn.get_property(jpegs, key="source_info")

    pipe = whole()
    pipe.build()
    images, source = pipe.run()
    images = images.as_cpu() if device == "cuda" else images
    keys = [bytes(np.asarray(source[i])).decode().rsplit(":", 1)[1].rsplit(".", 1)[0] for i in range(total)]
    return {k: np.asarray(images[i]).astype(np.float64) for i, k in enumerate(keys)}


def crop_of(image: np.ndarray) -> np.ndarray:
    rows, cols = crop_window(0.5, 0.5, *image.shape[:2], CROP)
    return image[rows, cols]


@pytest.mark.parametrize(
    "device, hw", [("cpu", 0.0), pytest.param("cuda", 0.0, marks=GPU), pytest.param("cuda", 1.0, marks=GPU)]
)
def test_center_crops_match_the_cpu_decoder_with_interpolated_chroma(demo_shards, device, hw):
    """The project's centre crops against libjpeg-turbo's whole decode, cropped in NumPy: equal on the CPU. On a GPU
    they differ by IDCT rounding only, far less than nvJPEG's default replicated chroma gives on the same JPEGs, so a
    graph that loses jpeg_fancy_upsampling fails. Bounds provisional, to be set from the first measurement (printed)."""
    mean = load_manifest(demo_shards).rgb_mean
    cpu = {k: crop_of(v) for k, v in decode_whole(demo_shards, "cpu").items()}
    ours = {k: image + mean for k, (image, _) in center_crops(demo_shards, "val", device, hw_decoder_load=hw).items()}
    assert ours.keys() == cpu.keys()
    diff = np.stack([np.abs(ours[k] - cpu[k]) for k in cpu])
    print(f"{device} hw_decoder_load {hw}: |ours - libjpeg-turbo| mean {diff.mean():.3f}, max {diff.max():.1f}")
    if device == "cpu":
        assert diff.max() < 1e-3
        return
    replicated = decode_whole(demo_shards, "cuda", hw_decoder_load=hw)
    plain = np.mean([np.abs(crop_of(replicated[k]) - cpu[k]).mean() for k in cpu])
    print(f"nvJPEG with replicated chroma: mean {plain:.3f}")
    assert diff.mean() < min(0.5, plain / 2) and diff.max() <= 12


@GPU
def test_the_hardware_decoder_takes_part_at_load_one(demo_shards):
    """hw_decoder_load 1.0 hands the JPEGs to the hardware engine, whose IDCT rounds otherwise than the CUDA decoder
    at 0.0: some pixel differs. Identical outputs mean the engine never ran (a card or driver without it)."""
    engine, cuda = (
        {k: image for k, (image, _) in center_crops(demo_shards, "val", "cuda", hw_decoder_load=hw).items()}
        for hw in (1.0, 0.0)
    )
    assert any(not np.array_equal(engine[k], cuda[k]) for k in cuda)


@pytest.fixture
def run_py(capsys):
    """run.py's main in this process (seconds of start-up saved per run); its stdout."""

    def call(*args) -> str:
        capsys.readouterr()
        code = run.main([*map(str, args), "--threads", "1"] if "--eval" not in args else list(map(str, args)))
        out = capsys.readouterr()
        assert code == 0, out.err[-3000:]
        return out.out

    return call


def device_args(device: str) -> list:
    """The GPU's configuration (bf16, compiled); on the CPU fp32 eager, which a 2-core machine runs in seconds."""
    return ["--device", device] + (["--amp", "bf16", "--compile", "default"] if device == "cuda" else ["--amp", "off"])


@pytest.mark.slow
def test_run_py_stops_resumes_and_evaluates(demo_shards, tmp_path, device, run_py):
    work = tmp_path / "run"
    common = [
        "--shards", demo_shards, "--workdir", work, *device_args(device), "--batch-size", "16", "--crop-size", CROP,
        "--epochs", "2", "--ten-crop", "--lr", "0.02", "--lr-scaling", "none", "--init", "kaiming", "--divide-std",
        "--log-interval", "2",
    ]  # fmt: skip
    run_py(*common, "--max-steps", "8")  # 6 steps per epoch: stops inside epoch 2
    assert "epoch 2, step 8" in run_py(*common, "--resume")
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    summary = json.loads((work / "summary.json").read_text())
    assert summary["val_samples"] == 24
    last = sorted((work / "checkpoints").glob("step-*.pt"))[-1]  # the weights the summary's errors are of
    evaluate = ["--eval", last, "--crop-size", CROP, "--ten-crop", "--device"]
    results = {on: json.loads(run_py(*evaluate, on).splitlines()[-1]) for on in {device, "cpu"}}
    here, cpu = results[device], results["cpu"]
    # The same weights on the same images: the device's errors are the CPU's in fp32, one close call apart in bf16;
    # and they are the errors the run itself reported.
    close = 0 if device == "cpu" else 1 / 24 + 1e-9
    for crop in ("center", "tencrop"):
        assert abs(here[crop]["top1_err"] - cpu[crop]["top1_err"]) <= close, crop
    assert abs(here["center"]["top1_err"] - rows[-1]["val_top1_err"]) <= close
    assert abs(here["tencrop"]["top1_err"] - summary["val_top1_err_10crop"]) <= close


def test_loader_orders_batches_on_torchs_stream_and_never_syncs(demo_shards, device, monkeypatch):
    """The real loader, two epochs (the boundary too). DALI's pipe.run is handed torch's current stream (without one
    the host would wait for each batch: a call-through spy records it), and on a GPU, under CUDA's sync debug mode,
    torch makes no host synchronisation either."""
    from nvidia.dali import Pipeline

    streams, real_run = [], Pipeline.run

    def spy(pipe, *args, **kw):
        streams.append(args[0] if args else kw.get("cuda_stream"))
        return real_run(pipe, *args, **kw)

    monkeypatch.setattr(Pipeline, "run", spy)
    with loader(demo_shards, "train", 8, device, seed=4, dtype=torch.bfloat16) as ld:
        sums = []
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for epoch in range(2):
                ld.set_epoch(epoch)
                for images, labels in ld:
                    sums.append(images.float().sum() + labels.sum())  # queued only, as a training step would
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        assert len(sums) == 2 * len(ld) and torch.isfinite(torch.stack(sums)).all()
    want = torch.cuda.current_stream(0) if device == "cuda" else None
    assert streams and all(s == want for s in streams)


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_one(demo_shards, tmp_path, device, run_py):
    """Stopped inside epoch 2 and resumed: the same batches, dropout draws and updates as one run, so the same
    losses and errors. fp32 eager: equal on the CPU; on a GPU cuDNN's and cuBLAS's atomics leave only rounding-level
    noise (a wrong batch order or RNG state moves an epoch's loss by percent); the bound 1e-3 is provisional."""
    common = [
        "--shards", demo_shards, "--device", device, "--amp", "off", "--batch-size", "16", "--crop-size", CROP,
        "--epochs", "2", "--lr", "0.02", "--lr-scaling", "none", "--init", "kaiming", "--divide-std",
        "--warmup-epochs", "0.5", "--log-interval", "2",
    ]  # fmt: skip
    run_py(*common, "--workdir", tmp_path / "whole")
    run_py(*common, "--workdir", tmp_path / "cut", "--max-steps", "8")  # 6 steps per epoch
    assert "epoch 2, step 8" in run_py(*common, "--workdir", tmp_path / "cut", "--resume")
    whole, cut = (
        [json.loads(line) for line in (tmp_path / w / "metrics.jsonl").read_text().splitlines()]
        for w in ("whole", "cut")
    )
    assert [r["epoch"] for r in whole] == [r["epoch"] for r in cut] == [1, 2]
    for a, b in zip(whole, cut):
        print(f"epoch {a['epoch']}: train loss {a['train_loss']:.6f} vs {b['train_loss']:.6f}")
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3 if device == "cuda" else 1e-6)
        assert (b["val_top1_err"], b["val_top5_err"]) == (a["val_top1_err"], a["val_top5_err"])
