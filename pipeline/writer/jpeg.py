"""A JPEG's structure from its markers: the frame type (SOF) and where the image ends (EOI), without decoding."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Start-of-frame markers (ITU T.81, table B.1); 0xC4, 0xC8 and 0xCC share the range but are not frames.
FRAMES = {
    0xC0: "baseline",
    0xC1: "extended sequential",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "hierarchical sequential",
    0xC6: "hierarchical progressive",
    0xC7: "hierarchical lossless",
    0xC9: "arithmetic-coded sequential",
    0xCA: "arithmetic-coded progressive",
    0xCB: "arithmetic-coded lossless",
    0xCD: "arithmetic-coded hierarchical sequential",
    0xCE: "arithmetic-coded hierarchical progressive",
    0xCF: "arithmetic-coded hierarchical lossless",
}
BASELINE, PROGRESSIVE, SOS, EOI = 0xC0, 0xC2, 0xDA, 0xD9
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length
# In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker; anything else is a marker.
NEXT_MARKER = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


@dataclass(frozen=True)
class Structure:
    frame: int | None  # the SOF marker's second byte, None if no frame header was found
    precision: int | None  # bits per sample: 8, or 12 (and 2-16 for lossless)
    end: int | None  # offset just past the EOI marker; None when the data ends first

    @property
    def kind(self) -> str:
        return FRAMES.get(self.frame, "unknown")

    def kept_by_every_decoder(self) -> bool:
        """8-bit Huffman baseline: what libjpeg, nvJPEG and the GPU's hardware decoder all take."""
        return self.frame == BASELINE and self.precision == 8


def structure(data: bytes) -> Structure:
    """Walk the markers from SOI: the frame header, and the EOI that ends the last scan (bytes after it are extra)."""
    frame = precision = None
    pos = 2 if data[:2] == b"\xff\xd8" else len(data)
    while pos + 1 < len(data):
        if data[pos] != 0xFF:  # stray bytes where a marker belongs: libjpeg skips to the next marker, and so do we
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill bytes before a marker
            pos += 1
            continue
        if marker == EOI:
            return Structure(frame, precision, pos + 2)
        if marker in STANDALONE:
            pos += 2
            continue
        if pos + 4 > len(data):
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in FRAMES and pos + 4 < len(data):
            frame, precision = marker, data[pos + 4]
        pos += 2 + length
        if marker == SOS:  # entropy-coded data runs to the next marker
            m = NEXT_MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start()
    return Structure(frame, precision, None)
