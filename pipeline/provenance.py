"""Where each sample of a batch came from: its shard file and key, from DALI's source_info."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

OFFSET = re.compile(r":(\d+):")


def split_source(source: str, tars) -> tuple[str, str]:
    """(tar, member) of a webdataset sample's source_info "TAR:OFFSET:MEMBER", TAR being one of `tars`.

    Paths and member names may hold ':' themselves, so the split is where what comes before is a tar that was read.
    """
    for m in OFFSET.finditer(source):
        if source[: m.start()] in tars:
            return source[: m.start()], source[m.end() :]
    raise ValueError(f"source_info {source!r} names none of the shards read")


def batch_info(sources, draws, names, n: int, tars) -> dict:
    """The first `n` samples' shard file names and keys, and the draws (DALI batches, named by `names`) as NumPy."""
    tar_names, keys = [], []
    for i in range(n):
        tar, member = split_source(bytes(np.asarray(sources[i])).decode(), tars)
        tar_names.append(Path(tar).name)
        keys.append(member.rsplit(".", 1)[0])
    return {"tar": tar_names, "key": keys, **{name: np.array(t.as_tensor())[:n] for name, t in zip(names, draws)}}
