"""Render a page in headless Chromium: a screenshot and the console's messages.

Uses Debian's ``chromium`` (``.ci/services.sh`` installs it). Console messages are read from
Chromium's log on stderr (``--enable-logging=stderr``), where each one is a ``CONSOLE``
line: a page without scripts writes none, so any such line is an error of the page.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Rendered", "chromium", "decode_png", "render"]

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
)


@dataclass
class Rendered:
    """What the browser made of a page."""

    width: int
    height: int
    #: Rows of (r, g, b) pixels.
    pixels: list[list[tuple[int, int, int]]]
    console: list[str]


def chromium() -> str | None:
    """The browser's path, or ``None``."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(page: Path, width: int = 1000, height: int = 1600, timeout: float = 120.0) -> Rendered:
    """Load ``page`` from disk and take a screenshot of its first ``height`` pixels."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("chromium is not installed (.ci/services.sh installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        shot = Path(tmp) / "shot.png"
        result = subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={tmp}/profile",
                f"--window-size={width},{height}",
                f"--screenshot={shot}",
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if not shot.exists():
            raise RuntimeError(f"chromium wrote no screenshot: {result.stderr[-2000:]}")
        w, h, pixels = decode_png(shot.read_bytes())
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return Rendered(w, h, pixels, console)


def decode_png(data: bytes) -> tuple[int, int, list[list[tuple[int, int, int]]]]:
    """Decode an 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat = 8, b""
    width = height = colour_type = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or colour_type not in (2, 6) or interlace:
                raise ValueError(f"unsupported PNG: depth {depth}, colour type {colour_type}")
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    bpp = 3 if colour_type == 2 else 4
    stride = width * bpp
    rows: list[list[tuple[int, int, int]]] = []
    previous = bytearray(stride)
    for y in range(height):
        offset = y * (stride + 1)
        kind, line = raw[offset], bytearray(raw[offset + 1 : offset + 1 + stride])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = previous[i]
            up_left = previous[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else up_left
                line[i] = (line[i] + pred) & 0xFF
        rows.append([tuple(line[x * bpp : x * bpp + 3]) for x in range(width)])  # type: ignore[misc]
        previous = line
    return width, height, rows
