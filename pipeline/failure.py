"""Where a DALI failure happened: DALI names the operator, not the sample, so the loader's reader is replayed without
decoding up to the failed batch, and the JPEG that Pillow cannot decode either is named with its shard."""
from __future__ import annotations

import io
import re
from typing import Callable

import numpy as np
from PIL import Image

from pipeline.manifest import ShardError

OFFSET = re.compile(r":(\d+):")


def split_source(source: str, tars) -> tuple[str, str]:
    """(tar, member) of a webdataset sample's source_info "TAR:OFFSET:MEMBER", TAR being one of `tars`.

    Paths and member names may hold ':' themselves, so the split is where what comes before is a tar that was read.
    """
    for m in OFFSET.finditer(source):
        if source[:m.start()] in tars:
            return source[:m.start()], source[m.end():]
    raise ValueError(f"source_info {source!r} names none of the shards read")


def reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong (DALI puts it after "encountered:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    after = [b for a, b in zip(lines, lines[1:]) if a.endswith("encountered:")]
    return (after or lines or [type(error).__name__])[0]


def locate(error: RuntimeError, reader: Callable, skip: int, ahead: int, tars, where: str, root, hint: str) -> ShardError:
    """Run `reader()` (a DALI pipeline of (jpegs, source_info)) past `skip` batches; the failed batch is the next one or,
    with prefetching, one of the `ahead` after it: name the first of their JPEGs that Pillow cannot decode."""
    suspects = []
    try:
        pipe = reader()
        pipe.build()
        for i in range(skip + ahead + 1):
            jpegs, sources = pipe.run()
            if i >= skip:
                suspects += [(bytes(np.asarray(j)), bytes(np.asarray(s)).decode()) for j, s in zip(jpegs, sources)]
    except RuntimeError as e:
        return ShardError(f"{root}: DALI cannot read {where} ({reason(e)}); {hint}")
    for jpeg, source in suspects:
        tar, member = split_source(source, tars)
        try:
            with Image.open(io.BytesIO(jpeg)) as im:
                im.load()
        except (OSError, ValueError, SyntaxError) as e:
            return ShardError(f"{tar}: {member} does not decode ({e}); {hint}")
    found = sorted({split_source(s, tars)[0] for _, s in suspects})
    shown = ", ".join(found[:3]) + (f" (or one of {len(found) - 3} more)" if len(found) > 3 else "")
    return ShardError(f"{shown}: DALI failed on a sample of {where} ({reason(error)}); {hint}")
