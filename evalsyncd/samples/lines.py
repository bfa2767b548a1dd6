"""The lines of a ``trajectories.jsonl``, with their byte ranges, as samples.

A *sample* is one line of ``runs/{run_id}/{benchmark}/trajectories.jsonl``
(the format is in :mod:`evalsyncd.store.layout`). This module turns bytes into
:class:`SampleEntry` values (where the line is, and the few fields the filters
and the comparison use) and :class:`BadLine` reports, with the policies of
:class:`~evalsyncd.store.layout.LineSplitter`: a line is split on ``\\n``, a
trailing ``\\r``, surrounding whitespace and a leading BOM on the first line
are ignored, blank lines are skipped, and a last line without its ``\\n`` is a
write in progress (not a sample yet). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from evalsyncd.store.layout import MAX_LINE_BYTES, loads_bounded
from evalsyncd.store.models import StoredTrajectory

__all__ = [
    "ERROR_TEXT_MAX",
    "BadLine",
    "LineScanner",
    "ParsedLine",
    "SampleEntry",
    "SampleFilter",
    "parse_line",
]

ERROR_TEXT_MAX = 500
"""At most this many characters of a sample's ``error`` are kept in a :class:`SampleEntry`."""


class SampleFilter(StrEnum):
    """Which samples a read keeps: the reference's filters (``read_trajectories``).

    ``correct``: ``reward > 0``; ``incorrect``: ``reward <= 0`` and no error;
    ``errors``: an ``error`` is set; ``all``: every sample.
    """

    ALL = "all"
    CORRECT = "correct"
    INCORRECT = "incorrect"
    ERRORS = "errors"

    def keep(self, entry: SampleEntry) -> bool:
        """Whether ``entry`` passes this filter."""
        if self is SampleFilter.CORRECT:
            return entry.correct
        if self is SampleFilter.INCORRECT:
            return not entry.correct and entry.error is None
        if self is SampleFilter.ERRORS:
            return entry.error is not None
        return True


@dataclass(frozen=True, slots=True)
class SampleEntry:
    """Where one sample is in its file, and the fields the filters use.

    Attributes:
        line: 0-based line number in the file (blank and bad lines count).
        start: byte offset of the line's first byte.
        length: bytes of the line, without its ``\\n``.
        idx: the trajectory's ``idx``.
        example_id: its ``example_id`` (``""`` when absent).
        reward: its ``reward``.
        correct: ``reward > 0`` (the reference's "correct" filter).
        error: its ``error``, cut to :data:`ERROR_TEXT_MAX` characters, or ``None``.
    """

    line: int
    start: int
    length: int
    idx: int
    example_id: str
    reward: float
    correct: bool
    error: str | None

    @property
    def end(self) -> int:
        """Byte offset just past the line (before its ``\\n``)."""
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that is not a sample, or a sample with a defect (invalid UTF-8).

    Attributes:
        line: 0-based line number.
        start: byte offset of the line.
        length: bytes of the line, without its ``\\n``.
        reason: what is wrong, e.g. ``"malformed JSON (...)"``.
        url: the file's URL (``""`` when not known where the report was made).
    """

    line: int
    start: int
    length: int
    reason: str
    url: str = ""

    def __str__(self) -> str:
        where = f"{self.url} " if self.url else ""
        return f"{where}line {self.line + 1}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ParsedLine:
    """A line that is a sample: its entry and record, and a defect note if any."""

    entry: SampleEntry
    trajectory: StoredTrajectory
    note: BadLine | None = None


_BAD_SHAPE = (KeyError, TypeError, ValueError, AttributeError)


def _record(d: dict[str, Any]) -> StoredTrajectory:
    t = StoredTrajectory.from_dict(d)
    if not isinstance(t.idx, int) or isinstance(t.idx, bool):
        raise TypeError(f"idx is a {type(t.idx).__name__}, not an integer")
    if not isinstance(t.reward, int | float) or isinstance(t.reward, bool):
        raise TypeError(f"reward is a {type(t.reward).__name__}, not a number")
    if not isinstance(t.example_id, str):
        raise TypeError(f"example_id is a {type(t.example_id).__name__}, not a string")
    return t


def _storable(text: str) -> str:
    """``text`` with lone surrogates (JSON ``"\\udc80"``) replaced by U+FFFD: valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def parse_line(raw: bytes, line: int, start: int) -> ParsedLine | BadLine | None:
    """One line's sample, or why it is not one, or ``None`` for a blank line.

    Args:
        raw: the line's bytes, without its ``\\n``.
        line: its 0-based line number (line 0 may start with a UTF-8 BOM).
        start: its byte offset in the file.

    A line with invalid UTF-8 is decoded with U+FFFD replacements (as the
    reference does) and, if it then parses, is a sample with a :class:`BadLine`
    note; the same rules as :class:`~evalsyncd.store.layout.TrajectoryParser`
    otherwise, plus ``idx`` must be an integer and ``reward`` a number. In the
    entry, lone surrogates of ``example_id`` and ``error`` become U+FFFD (the
    index stores valid UTF-8); the trajectory keeps them as parsed.
    """
    text_bytes = raw.strip()
    if line == 0 and text_bytes.startswith(b"\xef\xbb\xbf"):
        text_bytes = text_bytes[3:].lstrip()
    if not text_bytes:
        return None
    note: BadLine | None = None
    try:
        text = text_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = text_bytes.decode("utf-8", errors="replace")
        note = BadLine(line, start, len(raw), f"invalid UTF-8 (replaced with U+FFFD): {exc.reason}")
    try:
        obj = loads_bounded(text)
    except ValueError as exc:  # nested too deeply included
        utf8 = "invalid UTF-8 and " if note is not None else ""
        return BadLine(line, start, len(raw), f"{utf8}malformed JSON ({exc})")
    if not isinstance(obj, dict):
        return BadLine(line, start, len(raw), f"a JSON {type(obj).__name__}, not an object")
    try:
        t = _record(obj)
    except _BAD_SHAPE as exc:
        return BadLine(line, start, len(raw), f"not a trajectory ({type(exc).__name__}: {exc})")
    error = None if t.error is None else _storable(str(t.error)[:ERROR_TEXT_MAX])
    reward = float(t.reward)
    example_id = _storable(t.example_id)
    entry = SampleEntry(line, start, len(raw), t.idx, example_id, reward, reward > 0, error)
    return ParsedLine(entry, t, note)


class LineScanner:
    """Splits a file's bytes, fed in chunks from ``offset``, into complete lines.

    A line longer than ``max_line_bytes`` is dropped as it arrives (memory stays
    bounded whatever a hostile file holds) and yields ``raw=None``.

    Args:
        offset: byte offset of the first byte fed (the start of a line).
        line: the 0-based number of the line starting there.
        tail: the :attr:`TAIL_BYTES` bytes before ``offset`` (to go on checking them).
        max_line_bytes: the longest line kept
            (:data:`~evalsyncd.store.layout.MAX_LINE_BYTES`, as the store's reads).

    Attributes:
        offset: byte offset just past the last complete line (its ``\\n``).
        line: number of the next line.
        tail: the last :attr:`TAIL_BYTES` bytes before :attr:`offset`.
    """

    TAIL_BYTES = 4096
    """Bytes before :attr:`offset` that :attr:`tail` keeps (to check a file is unchanged)."""

    def __init__(
        self,
        offset: int = 0,
        line: int = 0,
        tail: bytes = b"",
        *,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.offset = offset
        self.line = line
        self.max_line_bytes = max_line_bytes
        self._partial = bytearray()
        self._dropping = False  # the current line is too long: _partial keeps only its end
        self._dropped = 0  # bytes of it seen so far (those in _partial included)
        self.tail = tail[-self.TAIL_BYTES :]

    @property
    def pending(self) -> int:
        """Bytes of an unfinished last line seen so far."""
        return self._dropped if self._dropping else len(self._partial)

    def feed(self, chunk: bytes) -> Iterator[tuple[int, int, bytes | None]]:
        """``(line, start, raw)`` of each line ``chunk`` completes (``raw`` without its
        ``\\n``; ``None`` for a line longer than ``max_line_bytes``)."""
        pos = 0
        keep = self.TAIL_BYTES
        last_nl = chunk.rfind(b"\n")
        if last_nl >= 0:
            seg = chunk[max(0, last_nl + 1 - keep) : last_nl + 1]
            if len(seg) < keep:
                seg = self.tail + bytes(self._partial[-keep:]) + seg
            self.tail = seg[-keep:]
        while True:
            end = chunk.find(b"\n", pos)
            piece = len(chunk) - pos if end < 0 else end - pos
            if not self._dropping and len(self._partial) + piece > self.max_line_bytes:
                self._dropping, self._dropped = True, len(self._partial)
                del self._partial[:-keep]
            if end < 0:
                if self._dropping:
                    self._dropped += piece
                    self._partial += chunk[max(pos, len(chunk) - keep) :]
                    del self._partial[:-keep]
                else:
                    self._partial += chunk[pos:]
                return
            raw: bytes | None
            if self._dropping:
                length = self._dropped + piece
                raw = None
                self._dropping, self._dropped = False, 0
                self._partial.clear()
            elif self._partial:
                self._partial += chunk[pos:end]
                raw = bytes(self._partial)
                length = len(raw)
                self._partial.clear()
            else:
                raw = chunk[pos:end]
                length = len(raw)
            pos = end + 1
            start = self.offset
            self.offset += length + 1
            number = self.line
            self.line += 1
            yield number, start, raw

    def lines(self, chunk: bytes, url: str = "") -> Iterator[ParsedLine | BadLine]:
        """The samples and bad lines ``chunk`` completes (:func:`parse_line` of each line)."""
        for line, start, raw in self.feed(chunk):
            if raw is None:
                length = self.offset - start - 1
                reason = f"longer than {self.max_line_bytes} bytes ({length} bytes), skipped"
                yield BadLine(line, start, length, reason, url)
                continue
            parsed = parse_line(raw, line, start)
            if isinstance(parsed, BadLine) and url:
                parsed = replace(parsed, url=url)
            if parsed is not None:
                yield parsed
