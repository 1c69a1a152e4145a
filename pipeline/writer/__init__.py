"""The writer side of the shard contract (pipeline/manifest.py): source folder in, verified shards and manifest out."""
