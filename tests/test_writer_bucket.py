"""Sharding into a bucket, against a real S3 API (moto_server on 127.0.0.1): the objects are the bytes of a local run,
a stopped run continues from what was uploaded and checked, --verify names every missing, damaged or stray object, a
second writer is refused, and a URL is never taken for a local folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import psutil
import pytest
from helpers import STOPPING, objects, one_line, tree

import pipeline.writer.build as shard_build
from pipeline.lock import Busy
from pipeline.store import StoreError
from pipeline.writer import bucket
from pipeline.writer.output import open_output
from tools.shard_imagenet import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--resize", "short:40", "--shard-size", "16", "--seed", "3", "--workers", "1"]
pytestmark = pytest.mark.slow  # each test runs the sharder against moto_server


def shard(src: Path, out, *extra: str) -> int:
    return main(["--src", str(src), "--out", str(out), *ARGS, *extra])


@pytest.fixture(scope="module")
def reference(demo_src, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert shard(demo_src, out) == 0
    return tree(out)


def s3_object(url: str, name: str):
    bucket, prefix = url[len("s3://") :].split("/", 1)
    return boto3.client("s3"), bucket, f"{prefix}/{name}"


def test_the_bucket_holds_exactly_the_bytes_of_a_local_run_and_verifies(demo_src, reference, bucket_url, capsys):
    assert shard(demo_src, bucket_url) == 0
    assert objects(bucket_url) == reference  # no record, lock or staging object left beside them either
    assert main(["--verify", bucket_url]) == 0
    assert "all intact" in capsys.readouterr().out
    assert shard(demo_src, bucket_url) == 0
    assert "already complete" in capsys.readouterr().out


def test_verify_names_each_missing_damaged_and_stray_object(demo_src, reference, bucket_url, capsys):
    assert shard(demo_src, bucket_url) == 0
    client, bname, _ = s3_object(bucket_url, "")
    manifest = json.loads(reference["manifest.json"])
    train = manifest["splits"]["train"]["shards"]
    gone, damaged = train[0]["index"], train[1]["tar"]
    client.delete_object(Bucket=bname, Key=s3_object(bucket_url, gone)[2])
    flipped = bytearray(reference[damaged])
    flipped[len(flipped) // 2] ^= 1
    client.put_object(Bucket=bname, Key=s3_object(bucket_url, damaged)[2], Body=bytes(flipped))
    client.put_object(Bucket=bname, Key=s3_object(bucket_url, "copy-of-train.tar")[2], Body=reference[damaged])
    capsys.readouterr()
    assert main(["--verify", bucket_url]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("verifying")]
    named = {f"{bucket_url}/{n}" for n in (gone, damaged, "copy-of-train.tar")}
    assert len(err) == 3 and all(any(line.startswith(n + ":") for line in err) for n in named), err


def test_a_stopped_run_continues_from_the_checked_uploads_to_the_same_bytes(
    demo_src, reference, bucket_url, monkeypatch, capsys
):
    """Stopped after 3 shards; one uploaded shard is then replaced by other bytes of the same size: the rerun writes
    that one and the unfinished ones again, keeps the rest, and uploads the manifest last."""
    real, calls = shard_build.write_task, []

    def write_task(task):
        calls.append(task.stem)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(task)

    with monkeypatch.context() as m:
        m.setattr(shard_build, "write_task", write_task)
        assert shard(demo_src, bucket_url) == 130
    stopped = objects(bucket_url)
    assert "manifest.json" not in stopped and {f"{s}.tar" for s in calls[:3]} <= stopped.keys()
    client, bname, key = s3_object(bucket_url, f"{calls[1]}.tar")
    client.put_object(Bucket=bname, Key=key, Body=bytes(len(stopped[f"{calls[1]}.tar"])))
    capsys.readouterr()
    assert shard(demo_src, bucket_url) == 0
    assert "resuming: 2 of 8 shards already complete" in capsys.readouterr().out
    assert objects(bucket_url) == reference


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over_on_its_machine(
    demo_src, reference, bucket_url, tmp_path, capsys
):
    script = tmp_path / "stopping.py"
    script.write_text(STOPPING)
    proc = subprocess.Popen(
        [sys.executable, str(script), "--src", str(demo_src), "--out", bucket_url, *ARGS],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while psutil.Process(proc.pid).status() != psutil.STATUS_STOPPED:
            assert proc.poll() is None and time.monotonic() < deadline, "the run never reached its stop"
            time.sleep(0.02)
        assert shard(demo_src, bucket_url) == 2
        one_line(capsys.readouterr().err, f"--out {bucket_url} is being written by another run", f"pid {proc.pid}")
        assert main(["--verify", bucket_url]) == 2
        one_line(capsys.readouterr().err, "being written", f"pid {proc.pid}")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert ".lock" in objects(bucket_url)  # nothing could remove it: the holder was killed
    assert shard(demo_src, bucket_url) == 0
    assert "resuming: 1 of 8" in capsys.readouterr().out
    assert objects(bucket_url) == reference


def test_a_lock_held_on_another_machine_is_taken_over_only_once_its_lease_lapses(
    demo_src, reference, bucket_url, monkeypatch, capsys
):
    # Refused while the lock is younger than a lease however slowly this run reaches it; then a 2 s lease, outlived.
    monkeypatch.setattr(bucket, "LEASE", 60.0)
    client, name, key = s3_object(bucket_url, ".lock")
    holder = {"host": "node-17", "pid": 4242, "pid_started": 0, "started": "2026-01-01 00:00:00", "command": "x"}
    client.put_object(Bucket=name, Key=key, Body=json.dumps(holder).encode())
    assert shard(demo_src, bucket_url) == 2
    one_line(capsys.readouterr().err, f"--out {bucket_url} is being written by another run", "host node-17, pid 4242")
    assert objects(bucket_url).keys() == {".lock"}
    monkeypatch.setattr(bucket, "LEASE", 2.0)
    time.sleep(3.5)  # the holder renewed nothing for longer than a lease
    assert shard(demo_src, bucket_url) == 0
    assert objects(bucket_url) == reference


def test_a_live_holder_renews_its_lock_so_it_never_lapses(bucket_url, monkeypatch):
    monkeypatch.setattr(bucket, "LEASE", 2.0)
    b = bucket.parse_url(bucket_url)
    with bucket.hold(b, ".lock") as lease:
        time.sleep(5)  # two and a half leases
        with pytest.raises(Busy, match="pid"), bucket.hold(b, ".lock"):
            pass
        assert not lease.lost and bucket.writer(b, ".lock") is not None
    assert bucket.writer(b, ".lock") is None and objects(bucket_url) == {}


def test_a_run_whose_lock_was_taken_over_writes_no_further_record(bucket_url, monkeypatch):
    """Stopped for longer than a lease, its lock taken over by another run: its next record is refused, one line."""
    monkeypatch.setattr(bucket, "LEASE", 2.0)
    out = open_output(bucket_url, ".lock")
    with out.lock(".lock"):
        client, bname, key = s3_object(bucket_url, ".lock")
        client.put_object(Bucket=bname, Key=key, Body=b'{"host": "node-17", "pid": 4242}')  # the new holder
        deadline = time.monotonic() + 30
        while not out.lease.lost:
            assert time.monotonic() < deadline, "the renewal never noticed"
            time.sleep(0.1)
        with pytest.raises(StoreError, match="another run took this run's lock over"):
            out.write(".progress/train-000000.json", b"{}")
    assert objects(bucket_url) == {".lock": b'{"host": "node-17", "pid": 4242}'}  # its lock, not ours, stays


@pytest.mark.parametrize(
    "out,says",
    [
        ("gs://bucket/shards", "the sharder writes to s3:// only"),
        ("http://127.0.0.1:9/shards", "unsupported URL scheme 'http'"),
        ("file:///tmp/shards", "unsupported URL scheme 'file'"),
        ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/shards", "the URL carries credentials"),
        ("s3:///shards", "not a bucket URL"),
    ],
)
def test_other_urls_are_refused_in_one_line_and_never_become_a_local_folder(
    demo_src, tmp_path, monkeypatch, capsys, out, says
):
    monkeypatch.chdir(tmp_path)
    assert main(["--src", str(demo_src), "--out", out, *ARGS]) == 2
    line = one_line(capsys.readouterr().err, says)
    assert "wJalrXUtnFEMI" not in line and list(tmp_path.iterdir()) == []
    assert main(["--verify", out]) == 2
    one_line(capsys.readouterr().err, says)


def test_a_missing_bucket_is_one_line_naming_it(demo_src, bucket_url, capsys):
    missing = bucket_url.replace("s3://b-", "s3://nobucket-")
    assert shard(demo_src, missing) == 2
    one_line(capsys.readouterr().err, missing, "no such bucket")
    assert main(["--verify", missing]) == 2
    one_line(capsys.readouterr().err, missing, "no such bucket")
