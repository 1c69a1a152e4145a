"""Where a DALI failure happened: DALI names the operator, not the sample, so the loader's reader is replayed without
decoding up to the failed batch, and the JPEG that Pillow cannot decode either is named with its shard.

The replay starts where the loader last took DALI's checkpoint of its pipeline (an epoch's start, or a resumed
position). That checkpoint holds every operator's state; the reader-only pipeline takes the reader's alone.

Also where each sample of a batch came from: its shard file and key, from DALI's source_info.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import nvidia.dali
from PIL import Image

from pipeline.graphs import READER, reason
from pipeline.manifest import ShardError

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


# The DALI releases whose checkpoint format with_reader_state was tested on: the format is DALI's own, not an API.
TESTED_DALI = "2.4."


def locate(
    error: RuntimeError,
    reader: Callable,
    checkpoint: bytes | None,
    skip: int,
    ahead: int,
    tars,
    where: str,
    root,
    hint: str,
) -> ShardError:
    """Run `reader(restore)` (a DALI pipeline of (jpegs, source_info)) from `checkpoint` past `skip` batches.

    The failed batch is the next one or, with prefetching, one of the `ahead` after it: name its JPEG that Pillow
    cannot decode either, or else its shards.
    """
    suspects = []
    try:
        pipe = reader(with_reader_state(reader().checkpoint(), checkpoint) if checkpoint else None)
        pipe.build()
        for i in range(skip + ahead + 1):
            jpegs, sources = pipe.run()
            if i >= skip:
                suspects += [
                    (bytes(np.asarray(j)), split_source(bytes(np.asarray(s)).decode(), tars))
                    for j, s in zip(jpegs, sources)
                ]
    except Exception as e:  # the replay is a diagnosis: whatever stops it, the user still gets the original failure
        return ShardError(
            f"{root}: DALI cannot read {where} ({reason(error)}; replaying it to find the sample: {reason(e)}); {hint}"
        )
    for jpeg, (tar, member) in suspects:
        try:
            with Image.open(io.BytesIO(jpeg)) as im:
                im.load()
        except (OSError, ValueError, SyntaxError) as e:
            return ShardError(f"{tar}: {member} does not decode ({e}); {hint}")
    found = sorted({tar for _, (tar, _) in suspects})
    shown = ", ".join(found[:3]) + (f" (or one of {len(found) - 3} more)" if len(found) > 3 else "")
    return ShardError(f"{shown}: DALI failed on a sample of {where} ({reason(error)}); {hint}")


def with_reader_state(base: bytes, donor: bytes) -> bytes:
    """`base`, a checkpoint of the reader-only pipeline, with the reader's state and the iteration of `donor`, a
    checkpoint of the loader's pipeline.

    A DALI checkpoint is a protobuf message: field 1 repeated, one entry per operator whose field 1 is the operator's
    name; field 2, the pipeline's iteration. Restoring asks for an entry per operator of the pipeline and no other.
    That layout is DALI's private format, read here as DALI TESTED_DALI* writes it; another DALI is refused.
    """
    if not nvidia.dali.__version__.startswith(TESTED_DALI):
        raise ValueError(
            f"this replay reads DALI {TESTED_DALI}x's checkpoints, not DALI {nvidia.dali.__version__}'s; "
            f"install nvidia-dali {TESTED_DALI}x (requirements.txt) to have the sample named"
        )
    reader = [raw for field, body, raw in _fields(donor) if field == 1 and _name(body) == READER]
    context = [raw for field, _, raw in _fields(donor) if field == 2]
    out = []
    for field, body, raw in _fields(base):
        if field == 1 and _name(body) == READER:
            raw = reader[0]
        elif field == 2:
            raw = context[0]
        out.append(raw)
    return b"".join(out)


def _name(entry: bytes) -> str:
    return next(_fields(entry))[1].decode()


def _fields(message: bytes):
    """(number, payload, whole field) of each field of a protobuf message whose fields are all length-delimited."""
    i = 0
    while i < len(message):
        start = i
        key, i = _varint(message, i)
        if key & 7 != 2:
            raise ValueError(f"DALI checkpoint: field {key >> 3} has wire type {key & 7}, not a length-delimited one")
        size, i = _varint(message, i)
        yield key >> 3, message[i : i + size], message[start : i + size]
        i += size


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return value, i
