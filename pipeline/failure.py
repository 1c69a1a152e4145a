"""Where a DALI failure happened, in one line: DALI names the failing operator, not the sample.

First the shards are checked against the manifest: a tar whose size changed while the run read it is named.
Else the reader is replayed alone, reading only the labels, from the pipeline's very start to the failed batch, and
the JPEG of that batch that Pillow cannot decode either is named with its shard. A resumed loader yields the batches
an uninterrupted one would, so the replay from the start serves it too; the batch the loader yielded last checks that
the replay agrees. Why from the start: DALI restores a checkpoint only into a pipeline of the very same operators, and
the reader's state inside the loader's checkpoint is DALI's private format. Reading labels alone from mapped tars, the
replay ran at ~370,000 samples/s on a loaded 2-core VM: a failure in epoch 90 of ImageNet on 8 ranks takes ~40 s.

Also where each sample of a batch came from: its shard file and key, from DALI's source_info.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.graphs import PipelineSpec, reason
from pipeline.manifest import IMAGE_EXT, ShardError, check_shard

OFFSET = re.compile(r":(\d+):")


def split_source(source: str, tars) -> tuple[str, str]:
    """(tar, key) of a webdataset sample's source_info "TAR:OFFSET:KEY.EXT", TAR being one of `tars`.

    Paths and keys may hold ':' themselves, so the split is where what comes before is a tar that was read.
    """
    for m in OFFSET.finditer(source):
        if source[: m.start()] in tars:
            return source[: m.start()], source[m.end() :].rsplit(".", 1)[0]
    raise ValueError(f"source_info {source!r} names none of the shards read")


def sources(batch, tars, n: int | None = None) -> list[tuple[str, str]]:
    """(tar, key) of the first `n` samples of a DALI batch of source_info strings (all of them by default)."""
    return [split_source(bytes(np.asarray(batch[i])).decode(), tars) for i in range(len(batch) if n is None else n)]


def batch_info(source, draws, names, n: int, tars) -> dict:
    """The first `n` samples' shard file names and keys, and the draws (DALI batches, named by `names`) as NumPy."""
    where = sources(source, tars, n)
    return {
        "tar": [Path(tar).name for tar, _ in where],
        "key": [key for _, key in where],
        **{name: np.array(t.as_tensor())[:n] for name, t in zip(names, draws)},
    }


def locate(error: RuntimeError, spec: PipelineSpec, batch: int, ahead: int, last: list | None, where: str):
    """The ShardError for `error`, raised while DALI prepared batch `batch` (counted from the pipeline's start) or,
    with prefetching, one of the `ahead` after it; `last`, the (tar, key) of the batch before it, if one was yielded."""
    try:
        for shard in spec.shards:
            check_shard(shard, checksums=False, hint=spec.hint)
    except ShardError as e:
        return ShardError(f"{e} (found after DALI failed on {where}: {reason(error)})")
    try:
        suspects = replay(spec, batch, ahead, last)
        bad = undecodable(suspects)
    except Exception as e:  # the replay is a diagnosis: whatever stops it, the user still gets the original failure
        return ShardError(
            f"{spec.root}: DALI cannot read {where} ({reason(error)}; replaying it to find the sample: {reason(e)}); "
            f"{spec.hint}"
        )
    if bad:
        return ShardError(f"{bad}; {spec.hint}")
    found = sorted({tar for tar, _ in suspects})
    shown = ", ".join(found[:3]) + (f" (or one of {len(found) - 3} more)" if len(found) > 3 else "")
    return ShardError(f"{shown}: DALI failed on a sample of {where} ({reason(error)}); {spec.hint}")


def replay(spec: PipelineSpec, batch: int, ahead: int, last: list | None) -> list[tuple[str, str]]:
    """(tar, key) of batches `batch` to `batch + ahead` of the reader, replayed from its start reading labels only."""
    pipe, suspects = spec.labels(), []
    for i in range(batch + ahead + 1):
        (source,) = pipe.run()
        if i == batch - 1 and last is not None and sources(source, spec.tars, len(last)) != last:
            raise ValueError(f"the replay's batch {i} is not the one the loader yielded")
        if i >= batch:
            suspects += sources(source, spec.tars)
    return suspects


def undecodable(suspects: list[tuple[str, str]]) -> str | None:
    """ "TAR: KEY.jpg does not decode (why)" for the first of the samples whose JPEG Pillow cannot decode either."""
    by_tar = {}
    for tar, key in suspects:
        by_tar.setdefault(tar, []).append(f"{key}.{IMAGE_EXT}")
    for tar, names in by_tar.items():
        with tarfile.open(tar) as t:  # its member list is read once, then each JPEG found in it
            for name in names:
                try:
                    with Image.open(io.BytesIO(t.extractfile(name).read())) as im:
                        im.load()
                except UnidentifiedImageError:  # its message names a BytesIO object, not the file
                    return f"{tar}: {name} does not decode (not in any image format Pillow knows)"
                except (OSError, ValueError, SyntaxError) as e:
                    return f"{tar}: {name} does not decode ({e})"
    return None
