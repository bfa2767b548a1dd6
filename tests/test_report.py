"""``evalsyncd runs report``: a self-contained page, rendered in real headless Chromium.

Chromium comes from the system (Debian package ``chromium``; ``.ci/run`` installs
it); without ``/usr/bin/chromium`` the browser tests are skipped, saying so.
"""

from __future__ import annotations

import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from bench.report_demo import CHROMIUM, PALETTE_CHECK, chromium, make_demo_fleet
from evalsyncd.report import checkpoint_sort_key, render_report
from tests.opshelpers import evalsyncd as run_cli

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
)


class _Collect(HTMLParser):
    """Elements with data-* attributes, by tag."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))


def _elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Collect()
    p.feed(html)
    return p.elements


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Decode an 8-bit RGB/RGBA non-interlaced PNG: (width, height, rows of pixel bytes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and color in (2, 6)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, channels, rows


def test_checkpoints_sort_naturally() -> None:
    """step20 sorts before step100, and the base model (None) first."""
    names = ["step100", None, "step20", "final", "step3"]
    assert sorted(names, key=checkpoint_sort_key) == [None, "final", "step3", "step20", "step100"]


def test_page_is_self_contained() -> None:
    """The page loads nothing: no script, stylesheet link, image or URL other than the SVG namespace."""
    rows = [
        {
            "host": "h<1>",
            "run_id": "r1",
            "model_name": "m & co",
            "checkpoint_name": "step1",
            "timestamp": "t",
            "benchmarks": ["b"],
            "scores": {"b": 0.5},
        }
    ]
    page = render_report(rows)
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"]
    assert "h&lt;1&gt;" in page and "m &amp; co" in page


@needs_chromium
def test_report_renders_in_chromium_with_the_stores_numbers(tmp_path: Path) -> None:
    """In headless Chromium the report renders one plot per benchmark with one line per model,
    table and plot numbers equal the stores', and the screenshot shows the plotted colours."""
    fleet = tmp_path / "fleet"
    expected = make_demo_fleet(fleet)
    html = tmp_path / "report.html"
    out = run_cli("runs", "report", str(fleet), "-o", str(html))
    assert out.returncode == 0, out.stderr

    dom = chromium("--dump-dom", html.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    elements = _elements(dom.stdout)
    plots = [a for t, a in elements if t == "svg" and a.get("class") == "plot"]
    assert sorted(a["data-benchmark"] or "" for a in plots) == ["gsm8k", "math", "mmlu"]
    series = [a for t, a in elements if t == "g" and a.get("class") == "series"]
    assert len(series) == 3 * 2  # per benchmark, one line per model

    rows = [a for t, a in elements if t == "tr" and "data-run-id" in a]
    assert {(a["data-host"], a["data-run-id"]) for a in rows} == set(expected)
    cells = [a for t, a in elements if t == "td" and "data-score" in a]
    assert len(cells) == 3 * len(expected)
    table_scores = sorted(float(a["data-score"] or "nan") for a in cells)
    assert table_scores == sorted(s for scores in expected.values() for s in scores.values())
    points = {
        (a["data-model"], a["data-checkpoint"], float(a["data-score"] or "nan"))
        for t, a in elements
        if t == "circle"
    }
    assert len(points) == 3 * len(expected)  # each (benchmark, model, checkpoint) once
    assert {s for _, _, s in points} == {s for v in expected.values() for s in v.values()}

    png = tmp_path / "shot.png"
    shot = chromium(f"--screenshot={png}", "--window-size=1400,900", html.as_uri())
    assert shot.returncode == 0 and png.exists(), shot.stderr[-2000:]
    width, channels, pixels = _png_pixels(png.read_bytes())
    assert width == 1400
    seen = set()
    for row in pixels:
        for x in range(0, len(row), channels):
            seen.add(row[x : x + 3])
    for color in PALETTE_CHECK:
        assert bytes.fromhex(color.lstrip("#")) in seen, f"no {color} pixel: plots not drawn"
