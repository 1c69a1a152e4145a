"""Just enough of the MATLAB Level-5 MAT-file format to read (and, for tests, write) the devkit's meta.mat synsets."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

# Data types (MAT-file format, table 1-1) and array classes (table 1-3).
MI_INT8, MI_UINT8, MI_INT32, MI_UINT32, MI_UINT16, MI_DOUBLE = 1, 2, 5, 6, 4, 9
MI_MATRIX, MI_COMPRESSED, MI_UTF8 = 14, 15, 16
NUMPY = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8", 16: "u1"}
MX_CELL, MX_STRUCT, MX_CHAR = 1, 2, 4


class MatError(ValueError):
    """A file this reader does not understand (not MAT v5, or a construct meta.mat does not use)."""


def read_mat(path: str | Path) -> dict:
    """Top-level variables of a MAT v5 file: structs as lists of dicts, char arrays as str, numbers as arrays."""
    data = Path(path).read_bytes()
    if len(data) < 128 or data[126:128] != b"IM":
        raise MatError(f"{path}: not a little-endian MAT v5 file (a v7.3 HDF5 file needs re-saving with -v7)")
    out, pos = {}, 128
    while pos + 8 <= len(data):
        mtype, body, pos = _element(data, pos)
        if mtype == MI_COMPRESSED:
            mtype, body, _ = _element(zlib.decompress(body), 0)
        if mtype == MI_MATRIX:
            name, value = _matrix(body)
            out[name] = value
    return out


def _element(buf: bytes, pos: int) -> tuple[int, bytes, int]:
    mtype, nbytes = struct.unpack_from("<II", buf, pos)
    if mtype >> 16:  # small element: type and size share the first word, data the second
        return mtype & 0xFFFF, buf[pos + 4: pos + 4 + (mtype >> 16)], pos + 8
    start = pos + 8
    pad = 0 if mtype == MI_COMPRESSED else -nbytes % 8  # compressed elements are not padded
    return mtype, buf[start:start + nbytes], start + nbytes + pad


def _matrix(body: bytes):
    if not body:
        return "", np.zeros((0, 0))
    _, flags, pos = _element(body, 0)
    cls = struct.unpack_from("<I", flags)[0] & 0xFF
    _, dims, pos = _element(body, pos)
    shape = tuple(np.frombuffer(dims, "<i4"))
    _, name, pos = _element(body, pos)
    n = int(np.prod(shape))
    if cls == MX_STRUCT:
        _, width, pos = _element(body, pos)
        _, names, pos = _element(body, pos)
        w = struct.unpack("<i", width)[0]
        fields = [names[i:i + w].split(b"\0")[0].decode() for i in range(0, len(names), w)]
        items = []
        for _ in range(n):
            item = {}
            for field in fields:
                _, sub, pos = _element(body, pos)
                item[field] = _matrix(sub)[1]
            items.append(item)
        return name.decode(), items
    if cls == MX_CELL:
        cells = []
        for _ in range(n):
            _, sub, pos = _element(body, pos)
            cells.append(_matrix(sub)[1])
        return name.decode(), cells
    mtype, real, pos = _element(body, pos)
    if mtype not in NUMPY:
        raise MatError(f"MAT data type {mtype} is not supported")
    values = np.frombuffer(real, "<" + NUMPY[mtype])
    if cls == MX_CHAR:
        text = real.decode("utf-8") if mtype == MI_UTF8 else "".join(map(chr, values))
        return name.decode(), text
    return name.decode(), values.reshape(shape, order="F")


def synsets(path: str | Path) -> dict[int, tuple[str, str]]:
    """The devkit's ILSVRC2012_ID -> (wnid, words) for the leaf synsets (the 1000 classes)."""
    table = read_mat(path).get("synsets")
    if not isinstance(table, list):
        raise MatError(f"{path}: no 'synsets' struct array (is this the ILSVRC2012 devkit's data/meta.mat?)")
    return {int(np.ravel(s["ILSVRC2012_ID"])[0]): (s["WNID"], s.get("words", "")) for s in table
            if int(np.ravel(s.get("num_children", [0]))[0]) == 0}


def _tag(mtype: int, body: bytes) -> bytes:
    pad = 0 if mtype == MI_COMPRESSED else -len(body) % 8
    return struct.pack("<II", mtype, len(body)) + body + b"\0" * pad


def _array(cls: int, shape: tuple[int, ...], name: bytes, payload: bytes) -> bytes:
    return _tag(MI_MATRIX, _tag(MI_UINT32, struct.pack("<II", cls, 0)) + _tag(MI_INT32, struct.pack(f"<{len(shape)}i", *shape))
                + _tag(MI_INT8, name) + payload)


def _char(text: str) -> bytes:
    return _array(MX_CHAR, (1, len(text)), b"", _tag(MI_UINT16, text.encode("utf-16-le")))


def _double(x: float) -> bytes:
    return _array(6, (1, 1), b"", _tag(MI_DOUBLE, struct.pack("<d", x)))


def write_synsets(path: str | Path, rows: list[tuple[int, str, str, int]]) -> None:
    """A compressed MAT v5 file with a devkit-style `synsets` struct array: (ID, wnid, words, num_children) rows."""
    fields = [b"ILSVRC2012_ID", b"WNID", b"words", b"num_children"]
    width = 32
    names = b"".join(f.ljust(width, b"\0") for f in fields)
    items = b"".join(_double(i) + _char(w) + _char(words) + _double(c) for i, w, words, c in rows)
    small = struct.pack("<HHi", MI_INT32, 4, width)  # MATLAB writes the name width as a small element
    payload = small + _tag(MI_INT8, names) + items
    body = _array(MX_STRUCT, (len(rows), 1), b"synsets", payload)
    header = b"MATLAB 5.0 MAT-file, written by pipeline/writer/mat5.py".ljust(116) + b"\0" * 8 + struct.pack("<H", 0x0100) + b"IM"
    Path(path).write_bytes(header + _tag(MI_COMPRESSED, zlib.compress(body)))
