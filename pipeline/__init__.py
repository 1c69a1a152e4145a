"""The input pipeline: shards written by pipeline.writer, read by
`DaliLoader(load_manifest(shards_dir), split, settings, ...)`, settings being a LoaderSettings."""

from pipeline.manifest import ShardError, load_manifest

__all__ = ["DaliLoader", "ShardError", "load_manifest"]


def __getattr__(name):
    # DaliLoader pulls in DALI and torch (seconds); tools that only read manifests, like the sharder, skip that.
    if name == "DaliLoader":
        from pipeline.loader import DaliLoader

        return DaliLoader
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
