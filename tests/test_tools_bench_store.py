"""tools/bench_store.py: both fills fetch every object through the delaying proxy, which delays every request."""

import json

import pytest

from tools import bench_store


@pytest.mark.slow
def test_both_fills_fetch_every_object_and_the_delay_is_paid_per_request(aws, demo_shards, tmp_path):
    out = tmp_path / "figures.json"
    argv = ["--shards", "s3://bench-store/shards", "--upload", str(demo_shards), "--delay-ms", "200"]
    assert bench_store.main([*argv, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    sequential, parallel = figures["sequential"], figures["parallel"]
    assert sequential["objects"] == parallel["objects"] == 8 and sequential["MB"] == parallel["MB"]
    assert sequential["s"] > 10 * 0.2  # a manifest GET, a listing and 8 downloads one after another, 0.2 s each
    assert parallel["s"] < sequential["s"] / 2 and figures["ratio"] > 2


def test_an_endpoint_that_is_not_plain_http_is_refused(aws, capsys):
    aws.setenv("AWS_ENDPOINT_URL", "https://s3.example.com")
    with pytest.raises(SystemExit) as e:
        bench_store.main(["--shards", "s3://bucket/shards"])
    assert e.value.code == 2 and "set AWS_ENDPOINT_URL to the store's http://HOST:PORT" in capsys.readouterr().err
