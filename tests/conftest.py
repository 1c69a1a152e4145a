"""Shared fixtures: GPU tests skip cleanly without CUDA; a tiny synthetic ImageNet and its shards, built once; deny;
an S3 API on loopback (moto_endpoint), the AWS environment pointing at it (aws) and an empty bucket on it (bucket_url).
Helpers the test modules import are in helpers.py."""

import builtins
import errno
import os
import uuid
from pathlib import Path

import pytest
import torch
from helpers import start_moto

from pipeline.synthetic import make_dataset
from tools.shard_imagenet import main as shard_main

# Programs the tests start (python run.py, python tools/...) import this checkout's packages, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine with: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request) -> str:
    """Each GPU test's device: its CPU variant runs everywhere, so an API change cannot pass by it unseen."""
    return request.param


DEMO_CLASSES, DEMO_PER_CLASS, DEMO_VAL_PER_CLASS, DEMO_SHARD_SIZE = 4, 24, 6, 32


@pytest.fixture(scope="session")
def demo_src(tmp_path_factory) -> Path:
    """ImageNet layout: train/<wnid>/ (4 classes x 24), flat val/ (24) + LOC_val_solution.csv, 96-160 px images."""
    return make_dataset(
        tmp_path_factory.mktemp("demo") / "imagenet",
        DEMO_CLASSES,
        DEMO_PER_CLASS,
        DEMO_VAL_PER_CLASS,
        size_range=(96, 160),
        seed=0,
    )


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, demo_src) -> Path:
    """demo_src sharded with --resize short:80 --shard-size 32: 3 train shards (96 images), 1 val shard (24)."""
    out = tmp_path_factory.mktemp("demo") / "shards"
    argv = [
        "--src",
        str(demo_src),
        "--out",
        str(out),
        "--resize",
        "short:80",
        "--shard-size",
        str(DEMO_SHARD_SIZE),
        "--workers",
        "1",
    ]
    assert shard_main(argv) == 0
    return out


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """A source for the sharder's stop-and-rerun tests, which compare every rerun with one uninterrupted run."""
    return make_dataset(
        tmp_path_factory.mktemp("pristine"), classes=4, per_class=75, val_per_class=8, size_range=(48, 96), seed=11
    )


@pytest.fixture
def deny(monkeypatch):
    """deny(path): take every permission on path away, as chmod 0 does for anyone but root. Root reads and writes
    regardless, so as root the calls that would fail for another user on path are made to fail in the same way."""
    denied = []

    def inside(p) -> bool:
        return isinstance(p, (str, bytes, os.PathLike)) and any(
            Path(os.fsdecode(p)).resolve().is_relative_to(d) for d in denied
        )

    def guard(real):
        def call(*a, **k):
            if a and inside(a[0]):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(a[0]))
            return real(*a, **k)

        return call

    def _deny(path: Path) -> None:
        denied.append(path.resolve())
        path.chmod(0)
        if os.geteuid() == 0 and len(denied) == 1:
            for owner, name in ((os, "scandir"), (os, "open"), (builtins, "open")):
                monkeypatch.setattr(owner, name, guard(getattr(owner, name)))

    yield _deny
    for d in denied:
        d.chmod(0o755)


@pytest.fixture(scope="session")
def moto_endpoint():
    """moto_server on 127.0.0.1 for the whole session (it starts in ~1 s), killed at its end: its endpoint URL."""
    proc, endpoint = start_moto()
    yield endpoint
    proc.kill()
    proc.wait()


@pytest.fixture
def aws(monkeypatch, tmp_path, moto_endpoint):
    """boto3's standard chain from the environment alone (no ~/.aws, no instance metadata), at moto_endpoint, two
    attempts per request, the default cache folder in tmp_path: the monkeypatch, to change any of it."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI-test-secret",
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_MAX_ATTEMPTS": "2",
        "XDG_CACHE_HOME": str(tmp_path / "xdg"),
    }.items():
        monkeypatch.setenv(k, v)
    return monkeypatch


@pytest.fixture
def bucket_url(aws) -> str:
    """s3://<a new, empty bucket>/shards on moto_endpoint, for this process and the programs it starts (aws)."""
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/shards"
