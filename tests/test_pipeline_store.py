"""Shards in a bucket, against a real S3 API (moto_server on 127.0.0.1): a bucket run equals a local run, the verified
cache is reused, damaged or missing objects and every kind of store failure are refused in one line."""

import fcntl
import json
import shutil
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import helpers
import pytest
import torch
from helpers import free_port, one_line, start_moto

from pipeline.cache import MARKER, cache_root, fill, local_shards
from pipeline.manifest import MANIFEST, ShardError
from pipeline.store import GCS_ENDPOINT, Bucket, StoreError

SECRET = "wJalrXUtnFEMI-test-secret"  # conftest's aws fixture gives it as AWS_SECRET_ACCESS_KEY


@pytest.fixture
def s3(aws):
    """upload(folder) -> the s3:// URL of a fresh bucket holding the folder's files."""

    def upload(folder: Path, prefix: str = "imagenet/shards") -> str:
        url = f"s3://b-{uuid.uuid4().hex[:12]}/{prefix}"
        bucket = Bucket(url)
        bucket.client.create_bucket(Bucket=bucket.where.bucket)
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                bucket.upload(f, f.name)
        return url

    return upload


def train(shards, workdir, *extra) -> int:
    return helpers.train(shards, workdir, "--max-steps", "2", *extra)


def saved(workdir: Path) -> dict:
    return torch.load(workdir / "checkpoints" / "step-000000002.pt", map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def local_run(demo_shards, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("local") / "run"
    assert train(demo_shards, workdir) == 0
    return workdir


@pytest.mark.slow
def test_a_bucket_run_equals_the_local_run_records_the_url_and_reuses_its_cache(s3, demo_shards, local_run, tmp_path):
    url = s3(demo_shards)
    assert train(url, tmp_path / "run") == 0
    got, want = saved(tmp_path / "run"), saved(local_run)
    assert got["step"] == want["step"] == 2 and got["data"] == want["data"]
    assert all(torch.equal(got["model"][k], want["model"][k]) for k in want["model"])
    cache = cache_root(url, "")
    assert cache.is_relative_to(tmp_path / "xdg" / "alexnet-dali")  # the documented default
    for text in [(tmp_path / "run" / "config.json").read_text(), json.dumps(got["config"])]:
        assert json.loads(text)["shards"] == url and "cache_dir" not in json.loads(text)
        assert str(cache) not in text and SECRET not in text
    # With every tar gone from the bucket, the next run's cache is the verified local copy, untouched.
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")}
    bucket = Bucket(url)
    for name in bucket.list():
        if name.endswith(".tar"):
            bucket.client.delete_object(Bucket=bucket.where.bucket, Key=bucket.where.key(name))
    assert local_shards(url, "") == str(cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.tar")} == stamps and len(stamps) == 4


def refused(capsys, url: str, tmp_path: Path, *says: str) -> str:
    """run.py on `url`: exit 2, one line on stderr saying `says`, and nothing trained."""
    assert train(url, tmp_path / "run", "--cache-dir", str(tmp_path / "cache")) == 2
    line = one_line(capsys.readouterr().err, *says, progress="fetching")
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "checkpoints").exists()
    return line


@pytest.mark.slow
def test_a_tampered_object_is_refused_and_never_used(s3, demo_shards, tmp_path, capsys):
    url = s3(demo_shards)
    bucket, name = Bucket(url), "train-000001.tar"
    data = bytearray((demo_shards / name).read_bytes())
    data[len(data) // 2] ^= 0xFF  # the same size: only the checksum tells
    bucket.client.put_object(Bucket=bucket.where.bucket, Key=bucket.where.key(name), Body=bytes(data))
    refused(capsys, url, tmp_path, f"{url}/{name}: its sha256 differs")
    assert not (cache_root(url, str(tmp_path / "cache")) / name).exists()
    assert not (cache_root(url, str(tmp_path / "cache")) / MARKER).exists()


@pytest.mark.slow
def test_a_missing_or_resized_object_is_refused_before_any_download(s3, demo_shards, tmp_path, capsys):
    url = s3(demo_shards)
    bucket = Bucket(url)
    bucket.client.delete_object(Bucket=bucket.where.bucket, Key=bucket.where.key("val-000000.idx"))
    refused(capsys, url, tmp_path, f"{url}/val-000000.idx: missing from the bucket")
    bucket.upload(demo_shards / "val-000000.idx", "val-000000.idx")
    bucket.client.put_object(Bucket=bucket.where.bucket, Key=bucket.where.key("train-000000.tar"), Body=b"short")
    refused(capsys, url, tmp_path, f"{url}/train-000000.tar: 5 bytes")
    assert not list(cache_root(url, str(tmp_path / "cache")).glob("*.tar"))


@pytest.mark.slow
def test_a_download_stopped_part_way_continues_from_where_it_stopped(s3, demo_shards, tmp_path):
    url = s3(demo_shards)
    name = "train-000000.tar"
    data = (demo_shards / name).read_bytes()
    half = len(data) // 2
    root = cache_root(url, str(tmp_path))
    root.mkdir(parents=True)
    (root / f"{name}.part").write_bytes(data[:half])
    # The bucket's first half is now wrong: only a download that continues at byte `half` ends with the right bytes.
    bucket = Bucket(url)
    bucket.client.put_object(Bucket=bucket.where.bucket, Key=bucket.where.key(name), Body=bytes(half) + data[half:])
    stale = "train-000001.tar"  # a part of an object rewritten since: its continuation fails the check, so it restarts
    (root / f"{stale}.part").write_bytes(bytes(1000))
    filled = fill(bucket, root, bar=False)
    assert filled.fetched == 8 and (root / name).read_bytes() == data and not list(root.glob("*.part"))
    assert (root / stale).read_bytes() == (demo_shards / stale).read_bytes()
    assert fill(bucket, root, bar=False).fetched == 0


def test_a_stream_broken_midway_is_retried_from_where_it_broke(s3, aws, demo_shards, tmp_path, moto_endpoint):
    """A proxy that cuts the first response after 100 kB: the download retries, continuing at that byte."""
    host, port = moto_endpoint.rsplit("//", 1)[1].split(":")
    listener = socket.create_server(("127.0.0.1", 0))
    cuts = []

    def pipe(src, dst, limit=None):
        sent = 0
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk[: None if limit is None else limit - sent])
                sent += len(chunk)
                if limit is not None and sent >= limit:
                    break
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the other direction's recv
            except OSError:
                pass
            s.close()

    def serve():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection((host, int(port)))
            limit = 100_000 if not cuts else None
            cuts.append(limit)
            threading.Thread(target=pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=pipe, args=(server, client, limit), daemon=True).start()

    url = s3(demo_shards)
    name = "train-000000.tar"
    threading.Thread(target=serve, daemon=True).start()
    try:
        aws.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        proxied = Bucket(url)
        dest = tmp_path / name
        proxied.download(name, dest, (demo_shards / name).stat().st_size)
    finally:
        listener.close()
    assert dest.read_bytes() == (demo_shards / name).read_bytes() and cuts == [100_000, None]


@pytest.mark.parametrize(
    "url, says",
    [
        ("ftp://host/shards", "ftp://host/shards: unsupported URL scheme 'ftp'"),
        ("http://host/shards", "unsupported URL scheme 'http'"),
        ("s3://", "s3://: not a bucket URL"),
        ("s3://bucket/../up", "not a bucket URL"),
        ("s3://127.0.0.1:9000/bucket", "a bucket name has no port; give the store's address in AWS_ENDPOINT_URL"),
        (f"s3://AKIDEXAMPLE:{SECRET}@bucket/shards", "s3://bucket/shards: the URL carries credentials"),
        (f"s3://bucket/shards?X-Amz-Credential={SECRET}", "s3://bucket/shards: the URL carries credentials"),
    ],
)
def test_a_bad_url_is_refused_in_one_line_without_echoing_secrets(url, says, tmp_path, capsys):
    line = refused(capsys, url, tmp_path, says)
    assert SECRET not in line and not (tmp_path / "cache").exists()
    assert not any(p.name.startswith(("s3:", "ftp:", "http:")) for p in Path.cwd().iterdir())


@pytest.mark.slow
def test_store_failures_are_one_line_naming_the_url(s3, aws, demo_shards, tmp_path, capsys):
    url = s3(demo_shards)
    other = "s3://no-such-bucket-here/shards"
    refused(capsys, other, tmp_path, f"{other}/{MANIFEST}: no such bucket 'no-such-bucket-here'")
    refused(capsys, url + "-elsewhere", tmp_path, f"{url}-elsewhere/{MANIFEST}: missing", f"--out {url}-elsewhere")
    aws.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    refused(capsys, url, tmp_path, f"{url}/{MANIFEST}: cannot connect to http://127.0.0.1:", "(2 attempts)")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        aws.delenv(k)
    refused(capsys, url, tmp_path, f"{url}/{MANIFEST}: no credentials found")


@pytest.mark.slow
def test_access_denied_is_one_line_naming_the_url(aws, demo_shards, tmp_path, capsys):
    proc, endpoint = start_moto(INITIAL_NO_AUTH_ACTION_COUNT="0")  # moto checks credentials from the first request
    try:
        aws.setenv("AWS_ENDPOINT_URL", endpoint)
        refused(capsys, "s3://bucket/shards", tmp_path, "s3://bucket/shards/manifest.json: access denied")
    finally:
        proc.kill()
        proc.wait()


def test_a_silent_endpoint_times_out_in_one_line(aws):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        aws.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        aws.setenv("AWS_MAX_ATTEMPTS", "1")
        with pytest.raises(StoreError, match=r"^s3://bucket/shards/manifest\.json: timed out talking to http://127"):
            Bucket("s3://bucket/shards", timeout=0.5).read(MANIFEST)


def test_gs_urls_go_to_the_gcs_xml_endpoint(aws):
    bucket = Bucket("gs://bucket/imagenet/shards")
    assert bucket.client.meta.endpoint_url == GCS_ENDPOINT and bucket.where.key("a.tar") == "imagenet/shards/a.tar"


def test_shard_error_names_a_manifest_escaping_its_folder(s3, tmp_path, demo_shards):
    folder = tmp_path / "evil"
    shutil.copytree(demo_shards, folder)
    raw = json.loads((folder / MANIFEST).read_text())
    raw["splits"]["val"]["shards"][0]["index"] = "../../outside.idx"
    (folder / MANIFEST).write_text(json.dumps(raw))
    url = s3(folder)
    with pytest.raises(ShardError, match=r"names '\.\./\.\./outside\.idx', outside the folder"):
        fill(Bucket(url), tmp_path / "cache", bar=False)


@pytest.mark.slow
def test_processes_on_one_node_fill_the_cache_once(s3, demo_shards, tmp_path):
    """torchrun's local ranks each ask for the cache: one downloads, the others wait for it and reuse its copy."""
    url = s3(demo_shards)
    root = cache_root(url, str(tmp_path))
    root.mkdir(parents=True)
    code = (
        "import sys; from pipeline.cache import fill, cache_root; from pipeline.store import Bucket; "
        f"f = fill(Bucket('{url}'), cache_root('{url}', '{tmp_path}'), bar=False, say=lambda m: print(m, "
        "file=sys.stderr, flush=True)); print(f.fetched)"
    )
    with open(root / ".lock", "w") as held:  # both start while the lock is taken: both must wait on it
        fcntl.flock(held, fcntl.LOCK_EX)
        ranks = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for r in ranks:  # released only once both have found it taken, however slowly they start
            assert "is filling this cache; waiting for it" in r.stderr.readline()
    fetched = sorted(int(r.communicate(timeout=60)[0]) for r in ranks)
    assert fetched == [0, 8] and all(r.returncode == 0 for r in ranks)


@pytest.mark.slow
def test_upload_head_list_read_and_a_missing_bucket(s3, tmp_path):
    (tmp_path / "empty").mkdir()
    url = s3(tmp_path / "empty")
    bucket, f = Bucket(url), tmp_path / "a.tar"
    f.write_bytes(b"x" * 1000)
    bucket.upload(f, "a.tar")
    assert bucket.head("a.tar")["size"] == 1000 and bucket.head("b.tar") is None and bucket.list() == {"a.tar": 1000}
    assert bucket.read("a.tar") == b"x" * 1000
    with pytest.raises(StoreError, match=r"^s3://no-such-bucket-here/p/a\.tar: no such bucket"):
        Bucket("s3://no-such-bucket-here/p").upload(f, "a.tar")


@pytest.mark.slow
def test_an_unwritable_cache_is_one_line(s3, demo_shards, tmp_path, capsys):
    url = s3(demo_shards)
    (tmp_path / "cache").write_text("a file, not a folder")
    assert train(url, tmp_path / "run", "--cache-dir", str(tmp_path / "cache")) == 2
    one_line(capsys.readouterr().err, "cannot write the cache", "pass another --cache-dir", progress="fetching")
