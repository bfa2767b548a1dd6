"""The tail log: many files' small appends in one immutable object per flush.

Object stores bill per request and cannot append. A writer that keeps many
growing files (a host's eval runs) would pay at least one request per file per
flush. The tail log turns one flush of *all* files into one ``PUT``: the new
complete lines of every dirty file (and the new content of small
replace-on-write files) go into one immutable *tail object*, and the *main
objects* (``{prefix}/{path}``, what every other tool reads) catch up later, on
the writer's schedule. Readers of this package stitch "main object + pending
tail pieces", so they see every byte as soon as its tail object exists.

Layout, under the storage's prefix::

    .evalsyncd/tail/{inv}      one tail object; inv = 16 hex digits of
                               2**64 - 1 - seq, so the newest sorts first and a
                               LIST with MaxKeys=1 finds it

Format of one tail object (``seq`` N)::

    b"evalsyncd-tail 1 {H}\\n"   preamble: format version, header length H in bytes
    header                       H bytes: zlib-compressed JSON, see below
    body                         this flush's pieces, back to back

    header = {
      "writer": "...",           id of the writer (one per daemon state directory)
      "token": "...",            random id of this write attempt
      "seq": N, "created": unix seconds,
      "files": {                 THE INDEX: every file with bytes not yet in its main object
        path: {
          "k": "a" | "r",        append-only, or replace-on-write
          "size": S,             the file's size as the tail describes it, bytes
          "base": B,             "a": bytes [0, B) are in the main object, pieces cover [B, S)
                                 ("r": always 0: the one piece is the whole content)
          "mv": V | null,        the main object's version (ETag, generation) at B
          "mtime": unix seconds,
          "p": [[seq, pos, len], ...]   pieces in offset order; pos is within that
        }                               object's body
      },
      "bodies": {seq: offset},   where the body of each other referenced object starts
      "marks": {name: seq}       optional: per name the writer's user gave (TailWriter.mark),
                                 the seq of the newest object it marked; carried forward
    }

The index is *cumulative*: the newest tail object alone tells where every
pending byte of every file is, so a reader needs one LIST (the newest key),
one ranged GET (its header) and then the pieces of the one file it reads,
whatever the number of tail objects. The writer bounds the pieces per file
(it brings the main object up to date when a file has too many), which bounds
both the index and a cold read.

File epochs: an append entry builds on main bytes ``[0, base)`` at version
``mv``. A truncated or replaced local file starts a new entry with ``base`` 0,
whose pieces hold the whole content, so stale main bytes are never stitched
with new pieces. A reader that finds the main object at another version than
``mv`` reads the index again; if the index still says ``base`` > 0, the main
object was brought further up to date (within the same file, bytes never
change below its size) and stitching resumes from the main object's size.

Deletion: a tail object is deleted once no entry of the newest index refers
to it (its bytes are all in main objects); the newest one is never deleted.
A reader that races a deletion gets a 404 on a piece, reads the index again
and retries; it is never wrong.

Writers: each tail object is created conditionally (S3 ``If-None-Match: *``,
GCS ``ifGenerationMatch=0``). Two daemons on one prefix collide on a ``seq``;
the loser finds another writer's id in the newest header and stops with
:class:`TailConflictError` instead of interleaving.

Ideas taken from SlateDB's WAL (one immutable object per flush of many
writes, fenced by a conditional create), turbopuffer's WAL (readers stitch
the indexed state with the unindexed WAL tail) and WarpStream's agents (batch
many streams into one object per flush, with an index that says where each
stream's bytes are); see ``docs/design.md``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import sys
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol, TypeGuard

from evalsyncd.errors import (
    ConflictError,
    CorruptObjectError,
    ObjectNotFoundError,
    StorageError,
    TailConflictError,
    TailPieceMissingError,
)
from evalsyncd.storage._keys import check_key

__all__ = [
    "HEADER_PROBE_BYTES",
    "MAX_FILES",
    "MAX_HEADER_BYTES",
    "MAX_INDEX_BYTES",
    "MAX_MARKS",
    "MAX_OBJECT_BYTES",
    "MAX_PIECES",
    "TAIL_DIR",
    "FileTail",
    "Piece",
    "PieceCache",
    "TailBackend",
    "TailConflictError",
    "TailIndex",
    "TailPieceMissingError",
    "TailWriter",
    "boundaries",
    "decode_header",
    "encode_tail_object",
    "note_damage",
    "object_name",
    "own_tail_index",
    "read_header",
    "read_index",
    "read_pieces",
    "seq_of",
    "stitch",
    "tail_damage",
]

logger = logging.getLogger("evalsyncd.storage")

TAIL_DIR: Final = "tail"
"""Directory of the tail objects under the storage's ``.evalsyncd/`` area."""
_MAGIC: Final = b"evalsyncd-tail 1 "
MAX_MARKS: Final = 16
"""Most mark names a tail header carries (:attr:`TailIndex.marks`)."""
HEADER_PROBE_BYTES: Final = 64 * 1024
"""Bytes a reader fetches first: the preamble and, almost always, the whole header."""
_MAX_SEQ: Final = 2**64 - 1
_MAX_DIGITS: Final = 20

# Bounds on what a reader accepts from a tail header. A writer (a daemon) stays far
# below them: its index lists only files with bytes not yet in their main objects,
# each with at most ``tail_max_pieces`` (<= 1000, default 32) pieces. A header past
# one of them is treated as damaged (see ``read_index``): readers read the plain
# objects instead. Measured worst case of a hostile header at these limits: see
# docs/guarantees.md ("A hostile or damaged bucket").
MAX_HEADER_BYTES: Final = 16 * 1024 * 1024
"""Largest compressed header a reader fetches, bytes (the preamble's length): a
reader never downloads more than this (plus the preamble) of a tail object at once."""
MAX_INDEX_BYTES: Final = 8 * 1024 * 1024
"""Largest inflated header (JSON) a reader accepts, bytes: inflation stops here, so a
decompression bomb costs at most this much memory before it is refused."""
MAX_FILES: Final = 20_000
"""Most files one index may list (a host with this many files pending at once has
about 5 MiB of index; a daemon promotes idle files within ``compact_idle_s``)."""
MAX_PIECES: Final = 100_000
"""Most pieces one index may list, all files together."""
MAX_OBJECT_BYTES: Final = 5 * 1024**4
"""Largest size, piece position or piece length a header may state, bytes (5 TiB,
the largest S3 object)."""
_MAX_CONTAINERS: Final = 2 * MAX_FILES + MAX_PIECES + 16
"""JSON arrays and objects a real index of MAX_FILES files and MAX_PIECES pieces holds."""
_MAX_QUOTES: Final = 20 * MAX_FILES + 64
"""Double quotes a real index of MAX_FILES files holds (9 strings per entry)."""
_MAX_COMMAS: Final = 8 * MAX_FILES + 3 * MAX_PIECES + 64
"""Commas (so JSON values) a real index of MAX_FILES files and MAX_PIECES pieces holds."""


@dataclass(frozen=True, slots=True)
class Piece:
    """Bytes of one file held in one tail object's body.

    Attributes:
        seq: the tail object's sequence number.
        pos: offset of the bytes within that object's body, bytes.
        length: number of bytes.
    """

    seq: int
    pos: int
    length: int


@dataclass(frozen=True, slots=True)
class FileTail:
    """What the tail holds of one file; see the module docstring (``files`` entries).

    Attributes:
        kind: ``"a"`` (append-only: pieces continue the main object) or ``"r"``
            (replace-on-write: one piece, the whole content).
        size: the file's size as the tail describes it, bytes.
        base: bytes ``[0, base)`` are in the main object (``"r"``: 0).
        main_version: the main object's version token at ``base`` (``None`` when
            ``base`` is 0 or the backend has none).
        mtime: the local file's modification time, Unix seconds.
        pieces: in offset order, covering ``[base, size)``.
    """

    kind: str
    size: int
    base: int
    main_version: str | None
    mtime: float
    pieces: tuple[Piece, ...] = ()

    def spans(self) -> Iterable[tuple[int, int, Piece]]:
        """``(start, end, piece)`` for each piece: file offsets it covers, bytes."""
        pos = self.base
        for piece in self.pieces:
            yield pos, pos + piece.length, piece
            pos += piece.length

    @property
    def seqs(self) -> set[int]:
        """Sequence numbers of the tail objects this file's pieces live in."""
        return {p.seq for p in self.pieces}


@dataclass(frozen=True)
class TailIndex:
    """The newest tail object's header: the whole tail log's state.

    Attributes:
        writer: id of the writer that wrote it.
        seq: its sequence number (-1 for an empty log).
        created: Unix seconds.
        files: path -> :class:`FileTail`, for every file with pending bytes.
        token: the write attempt's random id.
        bodies: seq -> byte offset where that tail object's body starts (this
            object's own included once it is written or read).
        damage: for a reader's index (:func:`read_index`), the error of the newest
            tail object when its header was damaged or past a limit: the index is
            then empty and readers read the plain objects; ``None`` otherwise.
        damaged_pieces: errors of tail objects found shorter than a piece this
            index places in them (:func:`read_pieces` adds them, at most 16), and
            of main objects its pieces cannot build on (see :func:`boundaries`);
            the files concerned are read from their plain objects.
        marks: name -> seq of the newest tail object the writer marked with that
            name (:meth:`TailWriter.mark`), carried forward by every later object: at
            most :data:`MAX_MARKS` names. What a name means is its user's business
            (the daemon marks the objects that change a run's ``metadata.json``, so a
            reader knows whether the run catalog is newer: :mod:`evalsyncd.catalog`).
    """

    writer: str
    seq: int
    created: float
    files: Mapping[str, FileTail] = field(default_factory=dict)
    token: str = ""
    bodies: Mapping[int, int] = field(default_factory=dict)
    damage: CorruptObjectError | None = None
    damaged_pieces: list[CorruptObjectError] = field(default_factory=list, compare=False)
    marks: Mapping[str, int] = field(default_factory=dict)

    def live_seqs(self) -> set[int]:
        """Sequence numbers still referenced (plus this one: the newest is kept)."""
        out = {self.seq}
        for ft in self.files.values():
            out |= ft.seqs
        return out


EMPTY: Final = TailIndex(writer="", seq=-1, created=0.0)


def object_name(seq: int) -> str:
    """The tail object's name under ``.evalsyncd/tail/``: newest sorts first."""
    return f"{_MAX_SEQ - seq:016x}"


def seq_of(name: str) -> int | None:
    """The sequence number a tail object name encodes, or ``None`` for a stray name."""
    if len(name) != 16:
        return None
    try:
        return _MAX_SEQ - int(name, 16)
    except ValueError:
        return None


def _file_json(ft: FileTail) -> dict[str, Any]:
    return {
        "k": ft.kind,
        "size": ft.size,
        "base": ft.base,
        "mv": ft.main_version,
        "mtime": ft.mtime,
        "p": [[p.seq, p.pos, p.length] for p in ft.pieces],
    }


def encode_tail_object(index: TailIndex, body: bytes | Sequence[bytes]) -> tuple[bytes, int]:
    """The bytes of one tail object: preamble, compressed header, body.

    Args:
        index: the cumulative index as of this object (``index.seq`` is its seq;
            ``index.bodies`` must hold every other referenced seq).
        body: the pieces of this flush, back to back (positions are in ``index``):
            one bytes object or the pieces themselves (joined once, with the header).

    Returns:
        ``(object bytes, offset of the body in them)``.
    """
    live = index.live_seqs() - {index.seq}
    header = {
        "writer": index.writer,
        "token": index.token,
        "seq": index.seq,
        "created": index.created,
        "files": {path: _file_json(ft) for path, ft in index.files.items()},
        "bodies": {str(s): index.bodies[s] for s in sorted(live)},
    }
    if index.marks:
        header["marks"] = {name: index.marks[name] for name in sorted(index.marks)}
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 6)
    head = b"".join((_MAGIC, str(len(packed)).encode(), b"\n", packed))
    parts = (body,) if isinstance(body, bytes) else body
    return b"".join((head, *parts)), len(head)


def _inflate(packed: bytes, url: str) -> bytes:
    """The inflated header, never more than :data:`MAX_INDEX_BYTES` of it (a bomb stops there)."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(packed, MAX_INDEX_BYTES + 1)
    except zlib.error as exc:
        raise CorruptObjectError(f"{url}: damaged tail header: {exc}", url=url) from exc
    if len(raw) > MAX_INDEX_BYTES or inflater.unconsumed_tail:
        raise CorruptObjectError(
            f"{url}: tail header inflates to more than the limit of {MAX_INDEX_BYTES} bytes "
            f"({len(packed)} compressed bytes; stopped at {len(raw)})",
            url=url,
        )
    if not inflater.eof:
        raise CorruptObjectError(f"{url}: damaged tail header: truncated zlib stream", url=url)
    # json.loads builds every value before we can count them: refuse a header that
    # holds more values than a real index of MAX_FILES files and MAX_PIECES pieces
    # could (counts of brackets, quotes and commas; inside strings they only
    # overestimate), so parsing costs a bounded multiple of the limits in memory
    containers = raw.count(b"[") + raw.count(b"{")
    quotes = raw.count(b'"')
    commas = raw.count(b",")
    if containers > _MAX_CONTAINERS or quotes > _MAX_QUOTES or commas > _MAX_COMMAS:
        raise CorruptObjectError(
            f"{url}: tail header holds {containers} JSON arrays/objects, {quotes} quotes and "
            f"{commas} commas, more than a header of {MAX_FILES} files and {MAX_PIECES} pieces "
            f"can (limits {_MAX_CONTAINERS}, {_MAX_QUOTES}, {_MAX_COMMAS})",
            url=url,
        )
    return raw


def _int(value: object, what: str, lo: int = 0, hi: int = _MAX_SEQ) -> int:
    """``value`` if it is an int in ``[lo, hi]`` (not a bool, not a float); else ``ValueError``."""
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{what} is {value!r}, not an integer in [{lo}, {hi}]")
    return value


_FLOAT_MAX_INT: Final = int(sys.float_info.max)
"""Largest integer a float holds (JSON integers have no bound: larger ones are refused)."""


def _finite(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a float that is finite, or an int a float holds (not a bool)."""
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is int and -_FLOAT_MAX_INT <= value <= _FLOAT_MAX_INT


def _num(value: object, what: str) -> float:
    """``value`` as a finite float if it is an int or float (not a bool); else ``ValueError``."""
    if not _finite(value):
        raise ValueError(f"{what} is {value!r:.80}, not a finite number")
    return float(value)


def _str(value: object, what: str, *, none: bool = False) -> str | None:
    if value is None and none:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{what} is {value!r}, not a string")
    return value


def _dict(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{what} is a {type(value).__name__}, not an object")
    return value


def _file_tail(path: str, f: object, seq: int) -> FileTail:
    """One ``files`` entry, every field checked (shape, type, range).

    The checks of :func:`_file_tail_checked` in one pass over a well-formed entry (an
    index of thousands of files is read on every listing); an entry that fails any of
    them is checked again there, which names what is wrong.
    """
    if type(f) is dict:
        kind, size, base, raw_pieces = f.get("k"), f.get("size"), f.get("base"), f.get("p")
        mv, mtime = f.get("mv"), f.get("mtime")
        if (
            (kind == "a" or kind == "r")
            and type(size) is int
            and type(base) is int
            and 0 <= base <= size <= MAX_OBJECT_BYTES
            and type(raw_pieces) is list
            and (mv is None or isinstance(mv, str))
            and _finite(mtime)
        ):
            pieces = []
            for raw in raw_pieces:
                if type(raw) is not list or len(raw) != 3:
                    break
                at, pos, length = raw
                if not (
                    type(at) is int
                    and type(pos) is int
                    and type(length) is int
                    and 0 <= at <= seq
                    and 0 <= pos <= MAX_OBJECT_BYTES
                    and 0 <= length <= MAX_OBJECT_BYTES
                ):
                    break
                pieces.append(Piece(at, pos, length))
            else:
                return FileTail(str(kind), size, base, mv, float(mtime), tuple(pieces))
    return _file_tail_checked(path, f, seq)


def _file_tail_checked(path: str, f: object, seq: int) -> FileTail:
    """:func:`_file_tail`, one check at a time: the ``ValueError`` names the field."""
    f = _dict(f, "the entry")
    kind = f.get("k")
    if kind not in ("a", "r"):
        raise ValueError(f"kind is {kind!r}, not 'a' or 'r'")
    size = _int(f.get("size"), "size", 0, MAX_OBJECT_BYTES)
    base = _int(f.get("base"), "base", 0, size)
    raw_pieces = f.get("p")
    if not isinstance(raw_pieces, list):
        raise ValueError(f"pieces are a {type(raw_pieces).__name__}, not a list")
    pieces = []
    for raw in raw_pieces:
        if not isinstance(raw, list) or len(raw) != 3:
            raise ValueError(f"piece {raw!r} is not [seq, pos, len]")
        pieces.append(
            Piece(
                _int(raw[0], "a piece's seq", 0, seq),
                _int(raw[1], "a piece's position", 0, MAX_OBJECT_BYTES),
                _int(raw[2], "a piece's length", 0, MAX_OBJECT_BYTES),
            )
        )
    return FileTail(
        kind=kind,
        size=size,
        base=base,
        main_version=_str(f.get("mv"), "mv", none=True),
        mtime=_num(f.get("mtime"), "mtime"),
        pieces=tuple(pieces),
    )


def decode_header(data: bytes, url: str) -> tuple[TailIndex, int] | int:
    """Parse the header at the start of a tail object, checking every bound.

    Every number is checked against its limit (:data:`MAX_HEADER_BYTES`,
    :data:`MAX_INDEX_BYTES`, :data:`MAX_FILES`, :data:`MAX_PIECES`,
    :data:`MAX_OBJECT_BYTES`) and every field against its type before anything
    is built from it, so a damaged or hostile header costs at most about
    :data:`MAX_INDEX_BYTES` times a small constant of memory, and ends in
    :class:`CorruptObjectError`, never another exception.

    Args:
        data: the object's first bytes (at least :data:`HEADER_PROBE_BYTES`, or all).
        url: the object's URL, for error messages.

    Returns:
        ``(index, body_offset)``, or, when ``data`` is too short to hold the whole
        header, the number of bytes needed (at most ``MAX_HEADER_BYTES`` plus the
        preamble).

    Raises:
        CorruptObjectError: not a tail object, a damaged header, or one past a
            limit (the message names ``url``, the limit and the size seen).
    """
    if not data.startswith(_MAGIC):
        if len(data) < len(_MAGIC) and _MAGIC.startswith(data) and data:
            return len(_MAGIC) + _MAX_DIGITS + 1
        raise CorruptObjectError(f"{url}: not an evalsyncd tail object (bad preamble)", url=url)
    nl = data.find(b"\n", len(_MAGIC), len(_MAGIC) + _MAX_DIGITS + 1)
    digits = data[len(_MAGIC) : nl]
    if nl < 0 or not digits.isdigit() or not digits.isascii():
        if nl < 0 and len(data) < len(_MAGIC) + _MAX_DIGITS + 1:
            return len(_MAGIC) + _MAX_DIGITS + 1
        raise CorruptObjectError(f"{url}: damaged tail preamble", url=url)
    length = int(digits)
    if length > MAX_HEADER_BYTES:
        raise CorruptObjectError(
            f"{url}: tail header of {length} bytes is larger than the limit of "
            f"{MAX_HEADER_BYTES} bytes",
            url=url,
        )
    end = nl + 1 + length
    if len(data) < end:
        return end
    try:
        raw = json.loads(_inflate(data[nl + 1 : end], url))
        raw = _dict(raw, "the header")
        seq = _int(raw.get("seq"), "seq")
        raw_files = _dict(raw.get("files"), "files")
        if len(raw_files) > MAX_FILES:
            raise ValueError(f"{len(raw_files)} files, more than the limit of {MAX_FILES}")
        files: dict[str, FileTail] = {}
        n_pieces = 0
        for path, f in raw_files.items():
            try:
                check_key(path)
                files[path] = ft = _file_tail(path, f, seq)
            except ValueError as exc:
                raise ValueError(f"entry {path!r}: {exc}") from None
            n_pieces += len(ft.pieces)
            if n_pieces > MAX_PIECES:
                raise ValueError(f"more than the limit of {MAX_PIECES} pieces")
        bodies = {}
        for k, v in _dict(raw.get("bodies", {}), "bodies").items():
            if not k.isdigit() or not k.isascii() or len(k) > _MAX_DIGITS:
                raise ValueError(f"bodies key {k!r} is not a seq")
            bodies[_int(int(k), "a bodies seq", 0, seq)] = _int(
                v, "a body offset", 0, MAX_HEADER_BYTES + len(_MAGIC) + _MAX_DIGITS + 1
            )
        bodies[seq] = end
        raw_marks = _dict(raw.get("marks", {}), "marks")
        if len(raw_marks) > MAX_MARKS:
            raise ValueError(f"{len(raw_marks)} marks, more than the limit of {MAX_MARKS}")
        marks = {}
        for name, at in raw_marks.items():
            if not name or len(name) > 64:
                raise ValueError(f"mark name {name[:80]!r} is empty or longer than 64 characters")
            marks[name] = _int(at, f"mark {name!r}", 0, seq)
        index = TailIndex(
            writer=str(_str(raw.get("writer"), "writer")),
            seq=seq,
            created=_num(raw.get("created"), "created"),
            files=files,
            token=str(_str(raw.get("token", ""), "token")),
            bodies=bodies,
            marks=marks,
        )
    except (ValueError, RecursionError, OverflowError) as exc:
        # ValueError: the checks above, JSONDecodeError, UnicodeDecodeError;
        # RecursionError: JSON nested deeper than the interpreter's stack;
        # OverflowError: a number no float holds (none reaches a float unchecked)
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CorruptObjectError(f"{url}: damaged tail header: {why}", url=url) from exc
    for path, ft in files.items():
        if (
            (ft.kind == "r" and ft.base != 0)
            or sum(p.length for p in ft.pieces) != ft.size - ft.base
            or any(p.seq not in bodies for p in ft.pieces)
        ):
            raise CorruptObjectError(f"{url}: inconsistent tail entry for {path!r}", url=url)
    return index, end


class TailBackend(Protocol):
    """What a backend provides for the tail log (object names are under ``.evalsyncd/tail/``)."""

    def _tail_url(self, name: str = "") -> str:
        """The URL of a tail object (or of the tail directory)."""
        ...

    async def _tail_list(self, limit: int | None = None) -> list[str]:
        """Names of the tail objects, newest first; at most ``limit`` of them."""
        ...

    async def _tail_get(self, name: str, start: int, end: int | None) -> bytes:
        """Bytes ``[start, end)`` of a tail object. Missing: ``ObjectNotFoundError``."""
        ...

    async def _tail_create(self, name: str, data: bytes) -> None:
        """Create a tail object only if absent; ``ConflictError`` if it exists."""
        ...

    async def _tail_delete(self, names: list[str]) -> None:
        """Delete tail objects (missing ones are fine)."""
        ...


_warned: OrderedDict[str, None] = OrderedDict()
_WARNED_MAX: Final = 256


def _warn_once(exc: CorruptObjectError) -> None:
    """One warning per damaged tail object per process (readers re-read the index often);
    the record's ``tail_damage`` attribute is ``exc``, for a caller that reports the damage
    its own way (the CLI's readers, through :func:`tail_damage`) to filter it."""
    key = str(exc)
    if key in _warned:
        return
    _warned[key] = None
    while len(_warned) > _WARNED_MAX:
        _warned.popitem(last=False)
    logger.warning(
        "reading the plain objects, the tail log is damaged: %s", exc, extra={"tail_damage": exc}
    )


def note_damage(index: TailIndex, exc: CorruptObjectError) -> None:
    """Record ``exc`` in ``index.damaged_pieces`` (at most 16) and warn once per process:
    a reader read a file around the damage it names (see :func:`tail_damage`)."""
    _warn_once(exc)
    if len(index.damaged_pieces) < 16:
        index.damaged_pieces.append(exc)


def boundaries(ft: FileTail) -> set[int]:
    """The sizes, in bytes, a main object may have while ``ft`` is pending: ``base`` and
    the end of each piece (the writer promotes a main object to the end of its pieces).

    A main object of another size, or above :attr:`FileTail.size`, was changed by
    something other than the writer: stitching pieces onto it would give a wrong view.
    """
    return {ft.base} | {end for _start, end, _piece in ft.spans()}


async def read_index(backend: TailBackend, *, strict: bool = False) -> TailIndex:
    """The newest tail object's index, or an empty one: one LIST and one or two GETs.

    A reader's policy for a damaged tail (``strict=False``): when the newest tail
    object's header is damaged or past a limit (see :func:`decode_header`), the
    index is empty and carries the error in :attr:`TailIndex.damage`, so reads
    fall back to the plain (main) objects, which every other tool reads and which
    are exact prefixes of the files, at most ``max_main_lag_s`` behind; a warning
    names the object (once per process). A writer (``strict=True``) must not
    build on it, and gets the error.

    Raises:
        CorruptObjectError: ``strict`` and the newest tail object is damaged.
        StorageError: the backend failed.
    """
    for _attempt in range(3):
        names = await backend._tail_list(limit=1)
        if not names:
            return EMPTY
        try:
            index = await read_header(backend, names[0])
        except CorruptObjectError as exc:
            if strict:
                raise
            _warn_once(exc)
            return replace(EMPTY, damage=exc)
        if index is not None:
            return index[0]
    return EMPTY


async def tail_damage(storage: object) -> CorruptObjectError | None:
    """The error of a damaged tail object that a reader of ``storage`` read around.

    The newest tail object's header (:attr:`TailIndex.damage`), else the first
    tail object found shorter than its index says (:attr:`TailIndex.damaged_pieces`),
    else a main object below ``storage``'s prefix changed by something other than the
    writer under pending pieces (its URL; kept until that file stitches again; a
    storage and its children share what they found, so each answers for its own).

    ``None`` when ``storage`` keeps no tail log, does not read it, or its newest
    tail object is sound. Uses the storage's cached index (no request when a read
    was made within its ``tail_refresh_s``; else one LIST and one GET).
    """
    index_of = getattr(storage, "_tail_index", None)
    if index_of is None or not getattr(storage, "read_tail", False):
        return None
    index = await index_of()
    if not isinstance(index, TailIndex):
        return None
    mains: dict[str, CorruptObjectError] = getattr(storage, "_damaged", None) or {}
    url_of = getattr(storage, "url", None)
    below = url_of("").rstrip("/") + "/" if callable(url_of) else ""
    return (
        index.damage
        or (index.damaged_pieces[0] if index.damaged_pieces else None)
        or next((exc for url, exc in mains.items() if url.startswith(below)), None)
    )


async def own_tail_index(storage: object) -> TailIndex | None:
    """The tail index at ``storage``'s own prefix, as its reads see it, or ``None`` when
    ``storage`` keeps no tail log or does not read it (then no request).

    Uses the storage's cached index (no request when read within its
    ``tail_refresh_s``; else one LIST and, when the log has an object, one GET).

    Raises:
        StorageError: the backend failed.
    """
    if getattr(type(storage), "_tail_index", None) is None:
        return None  # not an evalsyncd cloud backend (wrappers are not asked for more)
    index_of = getattr(storage, "_tail_index", None)
    if index_of is None or not getattr(storage, "read_tail", False):
        return None
    index = await index_of()
    return index if isinstance(index, TailIndex) else None


async def read_header(backend: TailBackend, name: str) -> tuple[TailIndex, int] | None:
    """The header of one tail object, or ``None`` if it was deleted meanwhile.

    At most two ranged GETs, of at most :data:`HEADER_PROBE_BYTES` and then of
    the header's stated length (at most :data:`MAX_HEADER_BYTES`).

    Raises:
        CorruptObjectError: a damaged header, one past a limit, or one whose seq
            is not the one its name encodes.
    """
    url = backend._tail_url(name)
    try:
        data = await backend._tail_get(name, 0, HEADER_PROBE_BYTES)
        parsed = decode_header(data, url)
        if isinstance(parsed, int):
            data = await backend._tail_get(name, 0, parsed)
            parsed = decode_header(data, url)
            if isinstance(parsed, int):
                raise CorruptObjectError(
                    f"{url}: truncated tail header ({len(data)} bytes, the preamble says {parsed})",
                    url=url,
                )
    except ObjectNotFoundError:
        return None
    named = seq_of(name)
    if named is not None and named != parsed[0].seq:
        raise CorruptObjectError(
            f"{url}: the header says seq {parsed[0].seq}, its name says {named}", url=url
        )
    return parsed


def _repoint(files: dict[str, FileTail], old: int, new: int) -> dict[str, FileTail]:
    """``files`` with every piece in tail object ``old`` moved to ``new`` (same positions)."""
    out = {}
    for path, ft in files.items():
        if any(p.seq == old for p in ft.pieces):
            pieces = tuple(replace(p, seq=new) if p.seq == old else p for p in ft.pieces)
            ft = replace(ft, pieces=pieces)
        out[path] = ft
    return out


class PieceCache:
    """The bytes of whole tail pieces a reader fetched, least recently used first.

    Tail objects are immutable, so a piece, once read, never changes: a reader
    that tails a file fetches only the pieces it has not seen. Thread-safe.

    Args:
        max_bytes: memory bound, bytes.
        max_piece_bytes: pieces larger than this are read by range, not cached.
    """

    def __init__(self, max_bytes: int = 16 * 1024 * 1024, max_piece_bytes: int = 1024 * 1024):
        self.max_bytes = max_bytes
        self.max_piece_bytes = max_piece_bytes
        self._items: OrderedDict[Piece, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, piece: Piece) -> bytes | None:
        with self._lock:
            data = self._items.get(piece)
            if data is not None:
                self._items.move_to_end(piece)
            return data

    def put(self, piece: Piece, data: bytes) -> None:
        with self._lock:
            if piece in self._items or len(data) > self.max_bytes:
                return
            self._items[piece] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _piece, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


async def read_pieces(
    backend: TailBackend,
    index: TailIndex,
    ft: FileTail,
    start: int,
    end: int,
    cache: PieceCache | None = None,
) -> bytes:
    """Bytes ``[start, end)`` of a file from its tail pieces (``base <= start``).

    One ranged GET per piece involved that ``cache`` does not hold, concurrently
    (small pieces are fetched whole and cached).

    Raises:
        ObjectNotFoundError: a tail object was deleted meanwhile (read the index again).
        TailPieceMissingError: a tail object is shorter than a piece the index places
            in it (the message names the object, the piece's range and the bytes
            it holds; also recorded in ``index.damaged_pieces`` and warned once):
            readers then read that file's plain object.
    """

    async def one(piece: Piece, lo: int, hi: int) -> bytes:
        at = index.bodies[piece.seq] + piece.pos
        name = object_name(piece.seq)
        whole = cache is not None and piece.length <= cache.max_piece_bytes
        if whole and cache is not None and (cached := cache.get(piece)) is not None:
            return cached[lo:hi]
        first, last = (at, at + piece.length) if whole else (at + lo, at + hi)
        data = await backend._tail_get(name, first, last)
        if len(data) != last - first:
            url = backend._tail_url(name)
            exc = TailPieceMissingError(
                f"{url}: the tail index places bytes [{first}, {last}) in this object, "
                f"it holds {len(data)} of them",
                url=url,
            )
            note_damage(index, exc)
            raise exc
        if not whole:
            return data
        if cache is not None:
            cache.put(piece, data)
        return data[lo:hi]

    jobs = []
    for lo_file, hi_file, piece in ft.spans():
        lo, hi = max(start, lo_file), min(end, hi_file)
        if lo < hi:
            jobs.append(one(piece, lo - lo_file, hi - lo_file))
    # one piece (most reads): awaited as is, not wrapped in a task
    parts = [await jobs[0]] if len(jobs) == 1 else await asyncio.gather(*jobs)
    data = b"".join(parts)
    if len(data) != max(0, min(end, ft.size) - start):
        raise ObjectNotFoundError(
            f"{backend._tail_url()}: a tail object is shorter than its index says"
        )
    return data


async def stitch(
    backend: TailBackend,
    index: TailIndex,
    ft: FileTail,
    start: int,
    stop: int,
    main_size: int,
    read_main: Callable[[int, int], Awaitable[bytes]],
    cache: PieceCache | None = None,
) -> bytes:
    """Bytes ``[start, stop)`` of a file as readers see it: the main object's below
    ``main_size``, the tail pieces of ``ft`` above it, fetched concurrently.

    The one stitching of main object and tail pieces, for readers (which learn
    ``main_size`` from a HEAD) and the daemon (which knows it from its index).

    Args:
        backend: the tail log's storage.
        index: the index ``ft`` comes from.
        ft: the file's entry.
        start, stop: the byte range wanted.
        main_size: bytes taken from the main object, through ``read_main(offset, length)``.
        cache: pieces already fetched.

    Raises:
        ObjectNotFoundError: a tail object was deleted meanwhile (read the index again).
    """
    jobs = []
    if start < min(stop, main_size):
        jobs.append(read_main(start, min(stop, main_size) - start))
    if stop > main_size:
        jobs.append(read_pieces(backend, index, ft, max(start, main_size), stop, cache))
    return b"".join(await asyncio.gather(*jobs))


class TailWriter:
    """The writing side of a tail log: stage pieces, commit one object per flush.

    Not thread-safe; one per destination, used from one event loop. Changes are
    staged (:meth:`stage_append`, :meth:`stage_replace`, :meth:`promoted`,
    :meth:`forget`) and become visible to readers together, in one object, on
    :meth:`commit`. A failed commit discards what was staged (the caller
    stages it again from its journal).

    Args:
        backend: the storage backend (see :class:`TailBackend`).
        writer: a stable id of this writer (kept in the daemon's journal).
        clock: wall clock, Unix seconds (injected for tests).
    """

    def __init__(self, backend: TailBackend, writer: str, *, clock: Any = time.time) -> None:
        self.backend = backend
        self.writer = writer
        self._clock = clock
        self.index: TailIndex = EMPTY
        self._staged: dict[str, FileTail | None] = {}
        self._body: list[bytes] = []
        self._body_len = 0
        self._marks: set[str] = set()
        self._unsure = False  # a commit failed without a definite answer

    async def open(self) -> TailIndex:
        """Read the newest index (the log's state after a restart). One LIST, one GET.

        Returns:
            The recovered index (possibly another writer's: a host's state moved;
            a *live* second writer is detected on the next commit).
        """
        self.index = await read_index(self.backend, strict=True)
        return self.index

    @property
    def staged_bytes(self) -> int:
        """Body bytes staged for the next commit."""
        return self._body_len

    @property
    def dirty(self) -> bool:
        """Whether a commit would write anything (staged changes, or a mark)."""
        return bool(self._staged or self._marks)

    def mark(self, name: str) -> None:
        """Mark the next committed object with ``name``: its header, and every later one,
        says ``marks[name] = `` its seq (see :attr:`TailIndex.marks`). A pending mark
        alone makes :meth:`commit` write an object (index only). A failed commit
        discards it with the rest (the caller marks again when it stages again).

        Raises:
            ValueError: an empty name, one longer than 64 characters, or one more name
                than :data:`MAX_MARKS`.
        """
        if not name or len(name) > 64:
            raise ValueError(f"mark name {name!r} is empty or longer than 64 characters")
        if name not in self.index.marks and len(set(self.index.marks) | self._marks) >= MAX_MARKS:
            raise ValueError(f"more than {MAX_MARKS} mark names")
        self._marks.add(name)

    def current(self, path: str) -> FileTail | None:
        """The entry of ``path`` including staged changes, or ``None``."""
        if path in self._staged:
            return self._staged[path]
        return self.index.files.get(path)

    def _add_body(self, data: bytes) -> Piece:
        piece = Piece(self.index.seq + 1, self._body_len, len(data))
        self._body.append(data)
        self._body_len += len(data)
        return piece

    def stage_append(
        self,
        path: str,
        start: int,
        data: bytes,
        *,
        base: int,
        main_version: str | None,
        mtime: float,
    ) -> None:
        """Stage bytes ``[start, start+len(data))`` of an append-only file.

        Args:
            path: the file's path.
            start: file offset of ``data``, bytes; must equal the entry's size, or
                ``base`` for a new entry (``base`` 0: a new or rewritten file).
            data: complete lines.
            base: bytes ``[0, base)`` already in the main object.
            main_version: the main object's version at ``base``.
            mtime: the local file's mtime, Unix seconds.

        Raises:
            ValueError: ``start`` does not continue the entry.
        """
        old = self.current(path)
        if old is None or old.kind != "a" or old.base != base or start == base:
            if start != base:
                raise ValueError(f"{path}: tail append at {start} does not start at base {base}")
            old = FileTail("a", base, base, main_version, mtime)
        elif start != old.size:
            raise ValueError(f"{path}: tail append at {start}, the tail holds {old.size} bytes")
        piece = self._add_body(data)
        self._staged[path] = replace(
            old, size=start + len(data), mtime=mtime, pieces=(*old.pieces, piece)
        )

    def stage_replace(self, path: str, data: bytes, *, mtime: float) -> None:
        """Stage the whole new content of a replace-on-write file."""
        self._staged[path] = FileTail("r", len(data), 0, None, mtime, (self._add_body(data),))

    def promoted(self, path: str, main_size: int, main_version: str | None) -> None:
        """The main object of ``path`` now holds ``main_size`` bytes at ``main_version``.

        Pieces below ``main_size`` are dropped from the index at the next commit
        (the whole entry when nothing is left, or for a replace-on-write file).
        """
        old = self.current(path)
        if old is None:
            return
        if old.kind == "r" or main_size >= old.size:
            self._staged[path] = None
            return
        kept = [(s, e, p) for s, e, p in old.spans() if e > main_size]
        if kept and kept[0][0] != main_size:
            # the main object ends inside a piece: keep the entry as it is
            return
        self._staged[path] = replace(
            old, base=main_size, main_version=main_version, pieces=tuple(p for _s, _e, p in kept)
        )

    def forget(self, path: str) -> None:
        """Drop ``path`` from the index (deleted, or handed to the main object whole)."""
        if self.current(path) is not None:
            self._staged[path] = None

    def discard(self) -> None:
        """Forget everything staged (and pending marks)."""
        self._marks.clear()
        self._staged.clear()
        self._body.clear()
        self._body_len = 0

    async def commit(self) -> TailIndex:
        """Write the staged changes as one tail object (nothing to do: no request).

        Returns:
            The new index (also :attr:`index`).

        A seq found taken by this writer's own earlier attempt (a create whose
        answer was lost) is skipped: the same body goes out as the next seq, its
        pieces re-pointed there, and the orphan is deleted later (:meth:`collect`).

        Raises:
            TailConflictError: another writer holds this tail log.
            StorageError: the write failed; the staged changes are discarded and
                the index is unchanged (the object may exist: the next commit
                takes the following seq, and the orphan is deleted later).
        """
        if not self._staged and not self._marks:
            return self.index
        files = dict(self.index.files)
        for path, ft in self._staged.items():
            if ft is None:
                files.pop(path, None)
            else:
                files[path] = ft
        body: list[bytes] = list(self._body)
        self._body.clear()  # the object will hold them: one copy in memory, not two
        try:
            for _attempt in range(3):
                seq = self.index.seq + 1
                new = TailIndex(
                    writer=self.writer,
                    seq=seq,
                    created=self._clock(),
                    files=files,
                    token=secrets.token_hex(8),
                    bodies=self.index.bodies,
                    marks={**self.index.marks, **dict.fromkeys(self._marks, seq)},
                )
                data, body_at = encode_tail_object(new, body)
                body = []
                try:
                    await self.backend._tail_create(object_name(seq), data)
                except ConflictError:
                    found = await read_header(self.backend, object_name(seq))
                    if found is not None and found[0].writer != self.writer:
                        raise TailConflictError(
                            f"{self.backend._tail_url(object_name(seq))}: another evalsyncd "
                            f"(writer {found[0].writer}) writes this prefix; give each host "
                            "its own prefix",
                            url=self.backend._tail_url(),
                        ) from None
                    # our own earlier write whose answer was lost: skip its seq, and send
                    # the same body as the next one (its pieces re-pointed at that seq)
                    self.index = replace(self.index, seq=seq)
                    files = _repoint(files, seq, seq + 1)
                    body = [data[body_at:]]
                    continue
                except StorageError:
                    self._unsure = True  # the object may exist: see settle()
                    raise
                live = new.live_seqs()
                bodies = {s: o for s, o in self.index.bodies.items() if s in live}
                bodies[seq] = body_at
                self.index = replace(new, bodies=bodies)
                return self.index
            raise ConflictError("tail commit kept colliding with earlier attempts")
        finally:
            self.discard()

    async def settle(self) -> set[str]:
        """After a commit that failed without a definite answer: if its object exists
        (the answer was lost on the way back), readers see it, so its index becomes
        this writer's. One GET of the header, and only after such a failure.

        Returns:
            The files whose entries that object changed (their journal does not know
            it: the caller stages them again before anything else touches them).

        Raises:
            StorageError: the backend failed (settled at the next call).
        """
        if not self._unsure:
            return set()
        found = await read_header(self.backend, object_name(self.index.seq + 1))
        self._unsure = False
        if found is None or found[0].writer != self.writer:
            return set()  # never written (or another writer's: the next commit says so)
        new = found[0]
        old = self.index.files
        changed = {p for p in {*old, *new.files} if old.get(p) != new.files.get(p)}
        live = new.live_seqs()
        self.index = replace(
            new, bodies={s: o for s, o in new.bodies.items() if s in live or s == new.seq}
        )
        return changed

    async def collect(self) -> int:
        """Delete tail objects that no entry of the index refers to (never the newest).

        Returns:
            How many objects were deleted. One LIST plus the deletes.
        """
        live = self.index.live_seqs()
        names = await self.backend._tail_list()
        dead = [
            n
            for n in names
            if (s := seq_of(n)) is not None and s not in live and s < self.index.seq
        ]
        if dead:
            await self.backend._tail_delete(dead)
        return len(dead)

    def pieces_of(self, path: str) -> int:
        """How many pieces ``path`` has in the tail (0 when none)."""
        ft = self.current(path)
        return len(ft.pieces) if ft is not None else 0
