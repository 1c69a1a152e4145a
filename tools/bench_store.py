"""How fast is a bucket's shard folder copied into the node's cache? pipeline/cache.py's parallel fill against a
sequential one (one object at a time, the same code with one worker), each into a fresh folder, through a loopback
proxy that holds every request --delay-ms before passing it on (a far store's round trip).

    AWS_ENDPOINT_URL=http://127.0.0.1:PORT python tools/bench_store.py --shards s3://bucket/prefix [--upload DIR]

The endpoint must be plain http (moto_server, a local MinIO); credentials come from the standard chain.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from model.train.config import SAVED_SETTINGS
from pipeline.cache import WORKERS, fill
from pipeline.manifest import ShardError
from pipeline.settings import at_least, option, parse, show
from pipeline.store import Bucket


@dataclass(kw_only=True)
class StoreBenchConfig:
    """What is timed"""

    shards: str = option(help="s3:// or gs:// URL of a shard folder")
    upload: str = option("", "first upload this local shard folder there (the bucket is created if need be)")
    delay_ms: float = option(25.0, "added before each request reaches the store", check=at_least(0))
    workers: int = option(WORKERS, "objects in flight in the parallel fill", check=at_least(2))
    json: str = option("", "also write the figures to this file")


class DelayingProxy:
    """127.0.0.1 TCP proxy to `target` (host, port): each chunk from the client (one HTTP request, headers and all)
    waits `delay` seconds before it is forwarded; the responses flow back untouched."""

    def __init__(self, target: tuple[str, int], delay: float):
        self.target, self.delay = target, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self.requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self.responses, args=(server, client), daemon=True).start()

    def requests(self, client: socket.socket, server: socket.socket):
        with contextlib.suppress(OSError):
            while chunk := client.recv(1 << 16):
                time.sleep(self.delay)
                server.sendall(chunk)
        self.end(client, server)

    def responses(self, server: socket.socket, client: socket.socket):
        """Through a pipe with splice(2): the bytes never enter Python, so the proxy costs the cores little."""
        r, w = os.pipe()
        with contextlib.suppress(OSError):
            while n := os.splice(server.fileno(), w, 1 << 20):
                while n:
                    n -= os.splice(r, client.fileno(), n)
        os.close(r)
        os.close(w)
        self.end(server, client)

    @staticmethod
    def end(*sockets: socket.socket):
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self):
        self.listener.close()


def upload(url: str, folder: Path) -> None:
    bucket = Bucket(url)
    if bucket.head("manifest.json") is None:
        with contextlib.suppress(bucket.client.exceptions.BucketAlreadyOwnedByYou):
            bucket.client.create_bucket(Bucket=bucket.where.bucket)
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                bucket.upload(f, f.name)


def main(argv: list[str] | None = None) -> int:
    cfg, parser = parse(StoreBenchConfig, argv, prog="tools/bench_store.py", description=__doc__, others=SAVED_SETTINGS)
    endpoint = urlsplit(os.environ.get("AWS_ENDPOINT_URL", ""))
    if endpoint.scheme != "http" or not endpoint.port:
        parser.error("set AWS_ENDPOINT_URL to the store's http://HOST:PORT (moto_server, a local MinIO)")
    print(show(cfg), flush=True)
    try:
        if cfg.upload:
            upload(cfg.shards, Path(cfg.upload))
        proxy = DelayingProxy((endpoint.hostname, endpoint.port), cfg.delay_ms / 1000)
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        figures = {}
        with tempfile.TemporaryDirectory(prefix="bench_store-") as tmp:
            for name, workers in (("sequential", 1), ("parallel", cfg.workers)):
                filled = fill(Bucket(cfg.shards, workers=workers), Path(tmp) / name, workers=workers)
                figures[name] = {
                    "workers": workers,
                    "objects": filled.fetched,
                    "MB": round(filled.bytes / 1e6, 1),
                    "s": round(filled.seconds, 2),
                    "MB_per_s": round(filled.bytes / 1e6 / filled.seconds, 1),
                }
        proxy.close()
    except ShardError as e:
        print(f"bench_store: {e}", file=sys.stderr)
        return 2
    figures["ratio"] = round(figures["parallel"]["MB_per_s"] / figures["sequential"]["MB_per_s"], 1)
    figures["delay_ms"] = cfg.delay_ms
    for name in ("sequential", "parallel"):
        f = figures[name]
        print(f"{name:<10} {f['workers']:>3} workers  {f['objects']} objects  {f['MB']} MB  {f['s']} s", end="  ")
        print(f"{f['MB_per_s']} MB/s")
    print(f"parallel / sequential: {figures['ratio']}x with {cfg.delay_ms:g} ms per request")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
