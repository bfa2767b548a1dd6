"""What to do with one file: a pure decision over what was observed of it and its journal row.

::

    observe(root, path, row)          reads: lstat, then 4 KiB (append-only) or the
        |                             whole file (replace-on-write), never more
        v
    FileFacts --plan(facts, row, now, policy)--> Action
                                                   SKIP      nothing to send
                                                   APPEND    new complete lines from .offset
                                                   REWRITE   from offset 0 (.reason says why)
                                                   UPLOAD    the content read, whole
                                                   RECORD    content already sent: new stat only
                                                   WAIT      not ready: again in .after_s
                                                   INVALID   unparseable .json: report, record
                                                   DELETED   gone locally: keep the remote
                                                   REMOVE    gone locally: remove the remote
                                                   UNREADABLE cannot be read: log, retry later

:func:`plan` reads no file and no clock: the table tests in
``tests/test_plan.py`` state every rule. The rules are those of
``docs/design.md`` ("The object model"): append-only files continue from the
journal's ``tail_offset`` while they are the file the row describes (same
inode, long enough, same fingerprint), else start again from offset 0;
replace-on-write files are sent whole once stable, a ``*.json`` only once it
parses (reported after ``invalid_json_grace_s``), any other file once quiet for
``flush_interval_s``.
"""

from __future__ import annotations

import enum
import errno
import json
import math
import os
import stat
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import crc32c

from evalsyncd.sync.files import FileKind, classify, open_beneath
from evalsyncd.sync.journal import Entry, EntryStatus
from evalsyncd.sync.lines import blocking, divergence, read_stable

__all__ = [
    "NEW_FILE",
    "Action",
    "Do",
    "FileFacts",
    "MainFacts",
    "Observation",
    "Observed",
    "Policy",
    "in_place_soon",
    "main_due",
    "observe",
    "other_fs",
    "plan",
]


class Do(enum.Enum):
    """The kinds of :class:`Action`; see the module docstring."""

    SKIP = "skip"
    APPEND = "append"
    REWRITE = "rewrite"
    UPLOAD = "upload"
    RECORD = "record"
    WAIT = "wait"
    INVALID = "invalid"
    DELETED = "deleted"
    REMOVE = "remove"
    UNREADABLE = "unreadable"


NEW_FILE = "new file"
""":attr:`Action.reason` of a REWRITE of a file the journal has no live row for."""


@dataclass(frozen=True, slots=True)
class Action:
    """What :func:`plan` decided for one file."""

    do: Do
    offset: int = 0
    """APPEND: the byte offset the new bytes start at."""
    reason: str | None = None
    """REWRITE: why (:data:`NEW_FILE` or a divergence); INVALID: the parse error;
    UNREADABLE: the error."""
    after_s: float = 0.0
    """WAIT: seconds until the file is worth another look."""


@dataclass(frozen=True, slots=True)
class FileFacts:
    """What :func:`observe` saw of one file."""

    path: str
    """Relative POSIX path under the root."""
    st: os.stat_result | None
    """Its stat (``fstat`` of the open file for append-only files), ``None``: no such file."""
    divergence: str | None = None
    """Append-only with a live row: why it cannot continue from the row's ``tail_offset``."""
    changed_while_read: bool = False
    """Replace-on-write: the file changed while it was read."""
    json_error: str | None = None
    """Replace-on-write ``*.json`` with content: why it does not parse (``None``: it does)."""
    blank: bool = False
    """Replace-on-write: the content is empty or white space only."""
    crc: int | None = None
    """Replace-on-write: CRC32C of the content read."""
    error: str | None = None
    """The file exists but could not be read (permissions, I/O): the error."""
    other_fs: bool = False
    """Gone, and its row names another file system (device) than the nearest directory
    above it now: a volume not mounted, or one mounted over where it lived. Not a
    deletion (see :func:`other_fs`)."""

    @property
    def kind(self) -> FileKind:
        """How the file is mirrored (from its path)."""
        return classify(self.path)


@dataclass(frozen=True, slots=True)
class Policy:
    """The destination's settings that :func:`plan` and :func:`main_due` follow.

    Attributes:
        flush_interval_s: quiet time before a non-JSON replace-on-write file is
            sent, seconds.
        invalid_json_grace_s: how long a ``*.json`` may stay unparseable (or
            empty) before it is reported, seconds.
        mirror_deletes: remove remote objects of files deleted locally.
        hold_deletes: a file missing locally is left as the journal knows it (its
            object kept, its row live): the root is another directory than the one
            the journal mirrored, such as a volume's empty mount point, and the files
            may come back with it.
        max_main_lag_s, compact_idle_s, tail_max_pieces: the tail log's
            settings (see ``DestinationSettings``).
        promote_bytes: pending bytes from which a main object is due.
        in_place_min_bytes: the backend's ``append_in_place_min_bytes`` (S3
            5 MiB, else 0).
    """

    flush_interval_s: float
    invalid_json_grace_s: float
    mirror_deletes: bool = False
    hold_deletes: bool = False
    max_main_lag_s: float = 60.0
    compact_idle_s: float = 10.0
    tail_max_pieces: int = 32
    promote_bytes: int = 1024 * 1024
    in_place_min_bytes: int = 0


def _live(row: Entry | None) -> bool:
    return row is not None and row.status is not EntryStatus.DELETED


def plan(facts: FileFacts, row: Entry | None, now: float, policy: Policy) -> Action:
    """Decide what to do with one file.

    Args:
        facts: what :func:`observe` saw.
        row: the file's journal row at this destination, if any.
        now: the current Unix time, seconds (compared with the file's mtime).
        policy: the destination's settings.

    Returns:
        The action; see the module docstring for each kind.
    """
    kind, st = facts.kind, facts.st
    if kind is FileKind.IGNORED:
        return Action(Do.SKIP)
    if facts.error is not None:
        return Action(Do.UNREADABLE, reason=facts.error)
    if st is None or not stat.S_ISREG(st.st_mode):
        # gone, or no longer a regular file (a symlink is never followed; sockets, FIFOs):
        # what the remote holds is no longer the file
        if not _live(row) or policy.hold_deletes or facts.other_fs:
            return Action(Do.SKIP)
        return Action(Do.REMOVE if policy.mirror_deletes else Do.DELETED)
    if row is not None and row.unchanged(st):
        return Action(Do.SKIP)
    if kind is FileKind.APPEND:
        if row is None or not _live(row):
            return Action(Do.REWRITE, reason=NEW_FILE)
        if facts.divergence is not None:
            return Action(Do.REWRITE, reason=facts.divergence)
        return Action(Do.APPEND, offset=row.tail_offset)
    return _plan_replace(facts, st, row, now, policy)


def _plan_replace(
    facts: FileFacts, st: os.stat_result, row: Entry | None, now: float, policy: Policy
) -> Action:
    if facts.changed_while_read:
        return Action(Do.WAIT, after_s=policy.flush_interval_s)
    # a file dated in the future (the writer's clock is ahead) cannot be judged quiet by
    # its age: it is taken as quiet, and a later change is caught by its stat
    age_s = now - st.st_mtime if st.st_mtime <= now else math.inf
    is_json = facts.path.endswith(".json")
    if is_json and not facts.blank:
        if facts.json_error is not None:
            if age_s < policy.invalid_json_grace_s:
                return Action(Do.WAIT, after_s=policy.flush_interval_s)
            return Action(Do.INVALID, reason=facts.json_error)
    else:
        # Not JSON: upload once it has been quiet for a flush interval. An empty .json is
        # what a non-atomic writer leaves between truncating and writing (open(path, "w")):
        # upload it only once it stayed empty for the grace period.
        quiet_s = policy.flush_interval_s
        if is_json:
            quiet_s = max(quiet_s, policy.invalid_json_grace_s)
        if age_s < quiet_s:
            return Action(Do.WAIT, after_s=quiet_s - age_s + 0.05)
    if row is not None and row.status is EntryStatus.OK and row.content_crc == facts.crc:
        return Action(Do.RECORD)
    return Action(Do.UPLOAD)


@dataclass(frozen=True, slots=True)
class MainFacts:
    """What the tail mode knows of a file whose main object is behind the tail log."""

    idle_s: float
    """Seconds since the file's last piece was written to the tail."""
    pieces: int
    """Its pieces in the tail log."""
    finalized: bool = False
    """Its run is finalized (the run's ``summary.json`` was flushed)."""
    drain: bool = False
    """Every main object is due (a clean stop, the end of ``sync --once``)."""


def main_due(row: Entry, facts: MainFacts, now: float, policy: Policy) -> str | None:
    """Why the main object of ``row``'s file should be brought up to date now, or ``None``.

    ``None`` for a row whose main object is up to date (``tail_since`` unset).
    Else the reasons, in order: ``drain``, ``max_main_lag_s`` (it fell behind that
    long ago, or the wall clock now reads earlier than when it did), ``idle`` (quiet for ``compact_idle_s``; a main object that must
    be rewritten whole, S3 below 5 MiB, only once the pending bytes reach its
    size, so that its wire bytes stay near the appended bytes),
    ``tail_max_pieces`` (deferred, up to twice that many pieces, for an append-only
    file below the in-place size that reaches it within ``tail_max_pieces`` more
    pieces at the pace of its pending ones: the whole rewrite it would cost is
    superseded by the one at that size, see :func:`in_place_soon`),
    ``pending_bytes``, ``in_place_size`` (it crossed the size from which later
    deltas can go straight to it), ``run_finalized``.

    Args:
        row: the file's journal row (``tail_since`` set: behind the tail).
        facts: the tail mode's view of the file.
        now: the current Unix time, seconds.
        policy: the destination's settings.
    """
    if row.tail_since is None:
        return None
    if facts.drain:
        return "drain"
    if not 0 <= now - row.tail_since < policy.max_main_lag_s:  # a clock stepped back: due too
        return "max_main_lag_s"
    pending = row.tail_offset - row.acked_offset
    in_place = policy.in_place_min_bytes
    kind = classify(row.path)
    if facts.idle_s >= policy.compact_idle_s and (
        row.acked_offset >= in_place or kind is FileKind.REPLACE or pending >= row.acked_offset
    ):
        return "idle"
    if facts.pieces >= policy.tail_max_pieces and not in_place_soon(row, facts, policy):
        return "tail_max_pieces"
    if pending >= policy.promote_bytes:
        return "pending_bytes"
    if row.acked_offset < in_place <= row.tail_offset and kind is FileKind.APPEND:
        return "in_place_size"
    if facts.finalized:
        return "run_finalized"
    return None


def in_place_soon(row: Entry, facts: MainFacts, policy: Policy) -> bool:
    """Whether an append-only file's main object, below the in-place size (S3: 5 MiB,
    rewritten whole), reaches that size within ``tail_max_pieces`` more pieces of the
    average size of its pending ones, while it has fewer than twice ``tail_max_pieces``.

    A rewrite then would be superseded by the one at the in-place size (``in_place_size``),
    so skipping it saves up to that size in wire bytes; the index and a cold read stay
    bounded by twice ``tail_max_pieces`` pieces.
    """
    in_place = policy.in_place_min_bytes
    if (
        classify(row.path) is not FileKind.APPEND
        or row.acked_offset >= in_place
        or facts.pieces >= 2 * policy.tail_max_pieces
    ):
        return False
    pace = (row.tail_offset - row.acked_offset) / max(facts.pieces, 1)
    return in_place - row.tail_offset <= pace * policy.tail_max_pieces


@dataclass(slots=True)
class Observed:
    """The facts of one file, and what was read to learn them (valid inside :func:`observe`)."""

    facts: FileFacts
    fd: int | None = None
    """Append-only: the file, open for reading."""
    data: bytes | None = None
    """Replace-on-write: the content read."""


Hold = Callable[[int], AbstractAsyncContextManager[None]]


def observe(
    root: Path, path: str, row: Entry | None, hold: Hold, st: os.stat_result | None = None
) -> Observation:
    """Look at ``root / path`` as :func:`plan` needs it, reading no more than it must
    (``async with observe(...) as seen:``, ``seen`` an :class:`Observed`).

    A file that is gone, not regular, or unchanged since ``row`` is only
    stat'ed. An append-only file is opened (``O_NOFOLLOW``) and, with a live
    row, its fingerprint checked (one read of at most 4 KiB). A
    replace-on-write file is read whole, holding ``hold(size)`` of the byte
    budget while the context is open. Local errors become facts (a missing
    file, :attr:`FileFacts.error`), never exceptions. ``st``: the file's ``lstat`` the
    caller just took, if it took one (not taken again).
    """
    return Observation(root, path, row, hold, st)


class Observation:
    """The context of :func:`observe` (a class, not a generator: one per file of a pass):
    the file stays open, or its bytes held, until the context exits."""

    __slots__ = ("_held", "_hold", "_path", "_root", "_row", "_seen", "_st")

    def __init__(
        self, root: Path, path: str, row: Entry | None, hold: Hold, st: os.stat_result | None
    ) -> None:
        self._root, self._path, self._row, self._hold, self._st = root, path, row, hold, st
        self._seen: Observed | None = None
        self._held: AbstractAsyncContextManager[None] | None = None

    async def __aenter__(self) -> Observed:
        path, row = self._path, self._row
        try:
            seen = self._seen = _look(self._root, path, row, self._st)
        except OSError as exc:
            if _gone(exc):
                moved = row is not None and other_fs(self._root, path, row.dev)
                return Observed(FileFacts(path, None, other_fs=moved))
            return Observed(FileFacts(path, None, error=str(exc)))
        st = seen.facts.st
        if (
            seen.fd is not None
            or st is None
            or seen.facts.kind is not FileKind.REPLACE
            or not stat.S_ISREG(st.st_mode)
            or (row is not None and row.unchanged(st))
        ):
            return seen
        held = self._hold(st.st_size)
        await held.__aenter__()
        self._held = held
        try:
            return await _read_whole(self._root, path, st)
        except BaseException:
            self._held = None
            await held.__aexit__(None, None, None)
            raise

    async def __aexit__(self, *exc: object) -> None:
        if self._seen is not None and self._seen.fd is not None:
            os.close(self._seen.fd)
        if self._held is not None:
            await self._held.__aexit__(None, None, None)


def other_fs(root: Path, path: str, dev: int) -> bool:
    """Whether the nearest directory above the missing file ``path`` (up to ``root``;
    symlinks are not directories here) is on another device than ``dev``, the one the
    file was seen on: the file did not go, its file system did (a volume unmounted
    from under the root, or the root's empty mount point; or a volume mounted over the
    directory it was written in). Such a file is never taken for deleted."""
    parts = path.split("/")[:-1]
    while True:
        try:
            st = os.stat(os.path.join(root, *parts), follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                return st.st_dev != dev
        except OSError:
            pass
        if not parts:
            return False  # the root itself is gone: Context.root_changed handles it
        parts.pop()


def _gone(exc: OSError) -> bool:
    """Whether an error reading a file means it is gone: missing; a directory on its path
    replaced by a file or a symlink (never followed, :func:`open_beneath`); the file
    itself swapped for a symlink since its ``lstat`` (``ELOOP``)."""
    return isinstance(exc, (FileNotFoundError, NotADirectoryError)) or exc.errno == errno.ELOOP


def _look(root: Path, path: str, row: Entry | None, st: os.stat_result | None) -> Observed:
    """lstat (unless ``st`` is the one just taken), and for an append-only file that needs a
    look, open it and check its row."""
    full = os.path.join(root, path)  # not root / path: a Path per file costs more than the stat
    if st is None:
        st = os.stat(full, follow_symlinks=False)
    kind = classify(path)
    if (
        kind is not FileKind.APPEND
        or not stat.S_ISREG(st.st_mode)
        or (row is not None and row.unchanged(st))
    ):
        return Observed(FileFacts(path, st))
    fd = open_beneath(root, path)
    try:
        st = os.fstat(fd)
        reason = divergence(fd, st, row) if row is not None and _live(row) else None
    except BaseException:
        os.close(fd)
        raise
    return Observed(FileFacts(path, st, divergence=reason), fd=fd)


async def _read_whole(root: Path, path: str, st: os.stat_result) -> Observed:
    """The facts of a replace-on-write file, from its whole content."""
    try:
        data = await blocking(st.st_size, read_stable, root, path, st)
    except OSError as exc:
        if _gone(exc):
            return Observed(FileFacts(path, None))
        return Observed(FileFacts(path, st, error=str(exc)))
    if data is None:
        return Observed(FileFacts(path, st, changed_while_read=True))
    blank = not data.strip()
    error = None
    if path.endswith(".json") and not blank:
        try:
            json.loads(data)
        except ValueError as exc:
            error = str(exc)
    facts = FileFacts(path, st, json_error=error, blank=blank, crc=crc32c.crc32c(data))
    return Observed(facts, data=data)
