"""The ILSVRC2012 devkit's meta.mat: read its leaf synsets, and write one (for synthetic data), with scipy.io."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io as sio


class DevkitError(ValueError):
    """A meta.mat that scipy cannot read, or one without the devkit's `synsets` struct array."""


def synsets(path: str | Path) -> dict[int, tuple[str, str]]:
    """ILSVRC2012_ID -> (wnid, words) for the leaf synsets (the 1000 classes), as torchvision's ImageNet reads them."""
    try:
        table = sio.loadmat(path, squeeze_me=True).get("synsets")
    except OSError:
        raise
    except Exception as e:  # scipy raises many types on malformed files (and NotImplementedError on v7.3 HDF5 ones)
        raise DevkitError(f"not a MAT file scipy reads ({type(e).__name__}: {e})") from None
    if (
        not isinstance(table, np.ndarray)
        or table.dtype.names is None
        or not {"ILSVRC2012_ID", "WNID"} <= set(table.dtype.names)
    ):
        raise DevkitError("no 'synsets' struct array (is this the ILSVRC2012 devkit's data/meta.mat?)")
    names = table.dtype.names
    return {
        int(s["ILSVRC2012_ID"]): (str(s["WNID"]), str(s["words"]) if "words" in names else "")
        for s in np.atleast_1d(table)
        if "num_children" not in names or int(s["num_children"]) == 0
    }


def write_synsets(path: str | Path, rows: list[tuple[int, str, str, int]]) -> None:
    """A compressed MAT v5 file with a devkit-style `synsets` struct array: (ID, wnid, words, num_children) rows."""
    table = np.array(
        [(float(i), w, words, float(c)) for i, w, words, c in rows],
        dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")],
    )
    sio.savemat(path, {"synsets": table.reshape(-1, 1)}, do_compression=True)
