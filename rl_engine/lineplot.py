"""Line plots written as PNG files in pure Python (zlib + struct), for machines without matplotlib.

`MetricsLogger` draws its reward and response-length curves with matplotlib when it is importable
and falls back to `render_panels` here, so plotting never becomes a hard dependency. The design
choice is a tiny raster canvas (an RGB `bytearray`) with Bresenham lines and a 3x5 bitmap font for
titles and axis labels; the output has no timestamp, so the same data gives the same bytes.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
AXIS: Color = (90, 90, 90)
GRID: Color = (225, 225, 225)
TEXT: Color = (30, 30, 30)
RAW: Color = (160, 190, 235)  # each step's value
SMOOTH: Color = (20, 70, 170)  # exponential moving average over ~n/10 steps
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# 3x5 glyphs, rows top to bottom; letters are drawn as capitals.
_FONT_ROWS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", "+": "000010111010000", "/": "001001010100100",
    "_": "000000000000111", ":": "000010000010000", "(": "010100100100010", ")": "010001001001010",
    " ": "000000000000000",
}


@dataclass(kw_only=True)
class Panel:
    """One plot: a title and (step, value) points; non-finite values leave a gap in the line."""

    title: str
    steps: Sequence[int] = field(default_factory=list)
    values: Sequence[float] = field(default_factory=list)


class Canvas:
    """An RGB raster; (0, 0) is the top-left pixel."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"canvas size must be positive, got {width}x{height}")
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def get(self, x: int, y: int) -> Color:
        i = 3 * (y * self.width + x)
        return (self.pixels[i], self.pixels[i + 1], self.pixels[i + 2])

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, *, thickness: int = 1) -> None:
        """Bresenham's line; thickness paints a thickness x thickness square per point."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(thickness):
                for oy in range(thickness):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        self.line(x0, y0, x1, y0, color)
        self.line(x1, y0, x1, y1, color)
        self.line(x1, y1, x0, y1, color)
        self.line(x0, y1, x0, y0, color)

    def text(self, x: int, y: int, s: str, color: Color = TEXT, *, scale: int = 2) -> int:
        """Draw `s` with its top-left corner at (x, y); returns the width drawn in pixels.
        Characters outside the font are drawn as spaces."""
        for k, ch in enumerate(s.upper()):
            rows = _FONT_ROWS.get(ch, _FONT_ROWS[" "])
            for r in range(5):
                for c in range(3):
                    if rows[3 * r + c] == "1":
                        for oy in range(scale):
                            for ox in range(scale):
                                self.set(x + (4 * k + c) * scale + ox, y + r * scale + oy, color)
        return text_width(s, scale=scale)

    def to_png(self) -> bytes:
        return encode_png(self.pixels, self.width, self.height)


def text_width(s: str, *, scale: int = 2) -> int:
    return max(0, 4 * len(s) - 1) * scale


def encode_png(rgb: bytes | bytearray, width: int, height: int) -> bytes:
    """8-bit RGB PNG: signature, IHDR, one IDAT (filter 0 on every row), IEND."""
    stride = 3 * width
    if len(rgb) != stride * height:
        raise ValueError(f"expected {stride * height} bytes for {width}x{height} RGB, got {len(rgb)}")
    raw = b"".join(b"\x00" + bytes(rgb[y * stride : (y + 1) * stride]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, RGB, deflate, no interlace
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _ema(values: Sequence[float], alpha: float) -> list[float]:
    out, acc = [], math.nan
    for v in values:
        if math.isfinite(v):
            acc = v if not math.isfinite(acc) else alpha * v + (1 - alpha) * acc
        out.append(acc if math.isfinite(v) else math.nan)
    return out


def _draw_series(canvas: Canvas, points: list[tuple[int, int] | None], color: Color, thickness: int) -> None:
    prev = None
    for p in points:
        if p is not None:
            if prev is not None:
                canvas.line(*prev, *p, color, thickness=thickness)
            else:
                canvas.line(*p, *p, color, thickness=thickness + 1)  # isolated point: a dot
        prev = p


def _draw_panel(canvas: Canvas, panel: Panel, top: int, height: int) -> None:
    left, right, title_h, bottom_h = 70, 20, 24, 26
    x0, x1 = left, canvas.width - right - 1
    y0, y1 = top + title_h, top + height - bottom_h
    canvas.text(left, top + 6, panel.title)
    pts = [(s, float(v)) for s, v in zip(panel.steps, panel.values)]
    finite = [v for _, v in pts if math.isfinite(v)]
    if not finite:
        canvas.rect(x0, y0, x1, y1, AXIS)
        canvas.text(x0 + 10, y0 + 10, "no data")
        return
    vmin, vmax = min(finite), max(finite)
    if vmax == vmin:  # flat curve: give it a visible band to sit in
        pad = abs(vmin) * 0.1 or 1.0
        vmin, vmax = vmin - pad, vmax + pad
    smin, smax = min(s for s, _ in pts), max(s for s, _ in pts)
    for k in range(1, 4):  # horizontal grid lines at quarters
        gy = y0 + (y1 - y0) * k // 4
        canvas.line(x0, gy, x1, gy, GRID)
    canvas.rect(x0, y0, x1, y1, AXIS)
    canvas.text(x0 - 6 - text_width(_fmt(vmax)), y0, _fmt(vmax))
    canvas.text(x0 - 6 - text_width(_fmt(vmin)), y1 - 10, _fmt(vmin))
    canvas.text(x0, y1 + 8, _fmt(smin))
    canvas.text(x1 - text_width(_fmt(smax)), y1 + 8, _fmt(smax))
    canvas.text((x0 + x1 - text_width("step")) // 2, y1 + 8, "step")

    def to_xy(s: int, v: float) -> tuple[int, int] | None:
        if not math.isfinite(v):
            return None
        fx = 0.5 if smax == smin else (s - smin) / (smax - smin)
        fy = (v - vmin) / (vmax - vmin)
        # Inset by 2 pixels so thick lines stay inside the axis box.
        return x0 + 2 + round(fx * (x1 - x0 - 5)), y1 - 2 - round(fy * (y1 - y0 - 5))

    values = [v for _, v in pts]
    window = max(1, len(values) // 10)
    _draw_series(canvas, [to_xy(s, v) for s, v in pts], RAW, 1 if window > 1 else 2)
    if window > 1:
        smooth = _ema(values, 2.0 / (window + 1))
        _draw_series(canvas, [to_xy(s, v) for (s, _), v in zip(pts, smooth)], SMOOTH, 2)


def render_panels(panels: Sequence[Panel], *, width: int = 720, panel_height: int = 260) -> Canvas:
    """Panels stacked vertically on one canvas."""
    canvas = Canvas(width, panel_height * max(1, len(panels)))
    for i, panel in enumerate(panels):
        _draw_panel(canvas, panel, i * panel_height, panel_height)
    return canvas


def write_panels_png(path: str | Path, panels: Sequence[Panel], *, width: int = 720,
                     panel_height: int = 260) -> None:
    """Render `panels` and write the PNG atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(render_panels(panels, width=width, panel_height=panel_height).to_png())
    tmp.replace(path)
