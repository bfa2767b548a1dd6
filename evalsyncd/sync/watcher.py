"""Filesystem hints, handed to the event loop and nothing more.

Events are hints; scans are the truth. Two observers:

- **native inotify** (Linux; ``observer = "auto"`` or ``"inotify"``): no thread. The
  inotify descriptor is a reader of the event loop (``inotify_simple`` for the system
  calls); while events keep coming they are read in batches, at most one read per
  :data:`HINT_BATCH_S`, coalesced per path, and each path is handed to ``on_hint``
  once per batch. A writer appending a line at a time makes one ``IN_MODIFY`` per
  line: read one by one through watchdog's four threads, that was about 60 % of the
  daemon's CPU under a busy writer (``bench/writer.py``); in batches it is a few
  percent. Watches are added for every
  directory (symlinks never followed), for new and moved-in ones as they appear, and
  for the whole tree again after an overflow.
- **watchdog** (``observer = "polling"`` for network filesystems, and ``"auto"`` where
  there is no inotify): its threads only record the event's path in a batch and wake
  the loop with ``loop.call_soon_threadsafe`` when the batch was empty (style:
  watchdog's own emitter/dispatcher split).

Two situations are reported to the service so it can rescan or fall back:

- the kernel's inotify queue overflowed (events were lost): ``on_overflow`` (the
  native observer re-watches the tree first; watchdog logs it on the
  ``watchdog.observers.inotify_c`` logger, which a logging handler turns into the call);
- the watcher cannot watch (watch limit ``fs.inotify.max_user_watches`` reached,
  ``ENOSPC``) or its thread died: ``on_failure`` is called, and the service
  keeps working from periodic scans and says so.

The inotify mask asks for creations, modifications (``IN_MODIFY``, ``IN_ATTRIB``),
moves and deletions. Left out, so the kernel never reports them: opens and closes
(each of the daemon's own reads makes two, each line a writer appends with
open/write/close one more than its write) and directory modifications (one per file
created, deleted or moved in it). A write through ``mmap`` alone, which inotify
reports only at its close, is found by the next scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

try:
    from inotify_simple import INotify, flags
except ImportError:  # not Linux: watchdog's observers only
    INotify = None

__all__ = ["HINT_BATCH_S", "Watcher"]

HINT_BATCH_S = 0.025
"""After each read, how long the native observer lets events gather before it reads
again, seconds: the most latency a hint gains, against one read and one hint per path
per batch while events keep coming."""

_MOVES_REMEMBERED = 64
"""Directories moved out whose move-in (same cookie) may still come in a later batch."""

_OVERFLOW_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")

Event = Any  # inotify_simple.Event: (wd, mask, cookie, name)

if INotify is not None:
    _MASK = (
        flags.CREATE
        | flags.MODIFY
        | flags.ATTRIB
        | flags.MOVED_FROM
        | flags.MOVED_TO
        | flags.DELETE
        | flags.DELETE_SELF
        | flags.DONT_FOLLOW
        | flags.EXCL_UNLINK
        | flags.ONLYDIR
    )


def _coalesce(hints: dict[tuple[str, bool], str], path: str, is_directory: bool, kind: str) -> None:
    """Record one event in a batch of hints: a directory keeps "created" if any of its
    events was a creation or a move; a file keeps "deleted" only if every event was a
    deletion."""
    key = (path, is_directory)
    previous = hints.get(key)
    if previous is None or previous == "deleted" or kind in ("created", "moved"):
        hints[key] = kind


def _files_below(top: str) -> Iterator[str]:
    """Relative paths of the regular files below ``top`` (symlinks not followed)."""
    stack = [("", top)]
    while stack:
        rel_dir, directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            rel = os.path.join(rel_dir, e.name)
            if e.is_dir(follow_symlinks=False):
                stack.append((rel, e.path))
            elif e.is_file(follow_symlinks=False):
                yield rel


class _InotifyTree:
    """A recursive inotify watch of ``root``, read on the event loop in batches.

    No thread: the inotify file descriptor is a reader of the loop. Events that come
    after a quiet spell are read at once; then the reader is set aside for
    :data:`HINT_BATCH_S`, so what comes meanwhile is read in one go (one ``read``),
    parsed, coalesced per path and handed to ``emit`` once per path. A file appended
    line by line costs one hint per batch instead of one per ``write``, and a lone
    event (a new directory, whose watch must be added quickly) waits for nothing.

    Watches: every directory under ``root`` (symlinks are never followed), added at
    start, for each directory created or moved in (and everything below it), and
    again for the whole tree after the kernel's queue overflowed (events were lost,
    new directories among them). A directory moved out loses its watches; one moved
    within the tree is re-watched at its new path, and every file below it is hinted
    at its old path too (so the old keys are seen gone).

    Args:
        root: the watched directory.
        loop: the running event loop.
        emit: called on the loop as ``emit(abs_path, is_directory, event_type)``,
            ``event_type`` one of ``created``, ``modified``, ``moved``, ``deleted``.
        on_overflow: called on the loop when the kernel dropped events.
        on_failure: called on the loop with a message when a watch could not be added
            (``fs.inotify.max_user_watches`` reached) or reading failed; events of the
            directories concerned are then not seen.
        batch_s: see :data:`HINT_BATCH_S`, seconds.

    Raises:
        OSError: (``start``) inotify is not available or ``root`` cannot be watched.
    """

    def __init__(
        self,
        root: Path,
        loop: asyncio.AbstractEventLoop,
        emit: Callable[[str, bool, str], None],
        on_overflow: Callable[[], None],
        on_failure: Callable[[str], None],
        batch_s: float = HINT_BATCH_S,
    ) -> None:
        self.root = os.fspath(root)
        self.loop = loop
        self.emit = emit
        self.on_overflow = on_overflow
        self.on_failure = on_failure
        self.batch_s = batch_s
        self._ino: INotify | None = None
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory path
        self._moved_from: dict[int, str] = {}  # cookie -> old path of a directory moved
        self._timer: asyncio.TimerHandle | None = None
        self._failed = False

    def start(self) -> None:
        """Watch the tree and start reading (on the loop thread)."""
        self._ino = INotify(nonblocking=True)
        try:
            # the root itself may be reached through a symlink; nothing below it is
            self._dirs[self._ino.add_watch(self.root, _MASK & ~flags.DONT_FOLLOW)] = self.root
        except OSError:
            self._ino.close()
            self._ino = None
            raise
        self._watch_below(self.root)
        self.loop.add_reader(self._ino.fileno(), self._readable)

    def stop(self) -> None:
        """Stop reading and close the inotify instance (idempotent; on the loop thread)."""
        ino, self._ino = self._ino, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if ino is not None:
            with contextlib.suppress(Exception):  # the loop may be closed already
                self.loop.remove_reader(ino.fileno())
            ino.close()
        self._dirs.clear()

    def _watch(self, path: str) -> bool:
        """Add a watch for the directory ``path``; False when it cannot be watched."""
        assert self._ino is not None
        try:
            wd = self._ino.add_watch(path, _MASK)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not self._failed:
                self._failed = True
                self.on_failure(
                    f"inotify watch limit reached at {path} (raise fs.inotify.max_user_watches)"
                )
            return False
        self._dirs[wd] = path
        return True

    def _watch_below(self, top: str) -> None:
        """Watch every directory below ``top`` (not following symlinks)."""
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as it:
                    subdirs = [e.path for e in it if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue  # gone, or unreadable: the next scan tries again
            for sub in subdirs:
                if self._watch(sub):
                    stack.append(sub)

    def _unwatch_below(self, top: str) -> None:
        """Remove the watches of ``top`` and every directory below it (moved away)."""
        assert self._ino is not None
        below = top + os.sep
        for wd, path in list(self._dirs.items()):
            if path == top or path.startswith(below):
                del self._dirs[wd]
                with contextlib.suppress(OSError):
                    self._ino.rm_watch(wd)

    def _readable(self) -> None:
        """The descriptor has events: read them now, then stop listening for
        :attr:`batch_s` (what comes meanwhile is read in one go after it)."""
        ino = self._ino
        if ino is None:
            return
        self.loop.remove_reader(ino.fileno())
        self._read(ino)
        if self._ino is not None:
            self._timer = self.loop.call_later(self.batch_s, self._listen)

    def _listen(self) -> None:
        self._timer = None
        if self._ino is not None:
            self.loop.add_reader(self._ino.fileno(), self._readable)

    def _read(self, ino: INotify) -> None:
        """Read every pending event and hand the hints over."""
        try:
            events = ino.read(timeout=0)
        except OSError as exc:
            self.stop()
            self.on_failure(f"reading inotify events failed: {exc}")
            return
        hints: dict[tuple[str, bool], str] = {}
        overflow = self._handle(events, hints)
        for (path, is_directory), event_type in hints.items():
            self.emit(path, is_directory, event_type)
        if overflow:
            self.on_overflow()

    def _handle(self, events: list[Event], hints: dict[tuple[str, bool], str]) -> bool:
        """Turn a batch of events into hints (coalesced per path, see :func:`_coalesce`)
        and keep the watches in step; returns whether the queue overflowed."""
        overflow = False
        for wd, mask, cookie, name in events:
            if mask & flags.Q_OVERFLOW:
                overflow = True
                continue
            if mask & flags.IGNORED:
                self._dirs.pop(wd, None)
                continue
            base = self._dirs.get(wd)
            if base is None or not name:
                continue  # an event of the watched directory itself: its parent reports it
            path = os.path.join(base, name)
            if mask & flags.ISDIR:
                if mask & flags.CREATE:
                    self._watch_tree(path)
                    _coalesce(hints, path, True, "created")
                elif mask & flags.MOVED_TO:
                    self._watch_tree(path)
                    _coalesce(hints, path, True, "moved")
                    old = self._moved_from.pop(cookie, None)
                    if old is not None:
                        for rel in _files_below(path):
                            _coalesce(hints, os.path.join(old, rel), False, "moved")
                elif mask & flags.MOVED_FROM:
                    self._unwatch_below(path)
                    self._moved_from[cookie] = path
                    while len(self._moved_from) > _MOVES_REMEMBERED:
                        del self._moved_from[next(iter(self._moved_from))]
                    _coalesce(hints, path, True, "moved")
                elif mask & flags.DELETE:
                    _coalesce(hints, path, True, "deleted")
                continue
            if mask & flags.CREATE:
                _coalesce(hints, path, False, "created")
            elif mask & (flags.MOVED_FROM | flags.MOVED_TO):
                _coalesce(hints, path, False, "moved")
            elif mask & flags.DELETE:
                _coalesce(hints, path, False, "deleted")
            else:
                _coalesce(hints, path, False, "modified")
        if overflow and self._ino is not None:
            self._watch_below(self.root)  # directories created meanwhile may lack a watch
        return overflow

    def _watch_tree(self, path: str) -> None:
        if self._watch(path):
            self._watch_below(path)


class Watcher:
    """Watch ``root`` recursively and hand every event's path to ``on_hint``.

    Args:
        root: the directory to watch.
        loop: the event loop that receives hints (``start`` and ``stop`` run on it).
        on_hint: called on the loop as ``on_hint(abs_path, is_directory, event_type)``.
        on_overflow: called on the loop when the kernel dropped events.
        on_failure: called on the loop with a message when watching failed; the
            caller must then rely on scans.
        observer: ``"auto"``/``"inotify"`` (native: the loop reads inotify itself on
            Linux, watchdog's native observer elsewhere) or ``"polling"`` (watchdog's
            polling observer, for network filesystems without inotify).
        polling_interval_s: the polling observer's period, seconds.
    """

    def __init__(
        self,
        root: Path,
        loop: asyncio.AbstractEventLoop,
        on_hint: Callable[[str, bool, str], None],
        on_overflow: Callable[[], None],
        on_failure: Callable[[str], None],
        *,
        observer: str = "auto",
        polling_interval_s: float = 2.0,
    ) -> None:
        self.root = root
        self.loop = loop
        self.on_hint = on_hint
        self.on_overflow = on_overflow
        self.on_failure = on_failure
        self.kind = observer
        self.polling_interval_s = polling_interval_s
        self._native: _InotifyTree | None = None
        self._observer: BaseObserver | None = None
        self._log_handler = _OverflowLogHandler(self)
        self._hints: dict[tuple[str, bool], str] = {}
        self._hints_lock = threading.Lock()

    @property
    def native(self) -> bool:
        """Whether the loop reads inotify itself (no watchdog thread)."""
        return self._native is not None

    def enqueue(self, path: str, is_directory: bool, event_type: str) -> None:
        """Record a hint (watchdog thread); wake the loop once per batch.

        Hints for one path coalesce, so a burst of events costs the loop one
        wake-up instead of one per event: a flooded self-pipe would otherwise
        drop signals (SIGTERM) and slow writers. A directory keeps "created" if
        any of its events was a creation or a move; a file keeps "deleted" only
        if every event was a deletion.
        """
        with self._hints_lock:
            wake = not self._hints
            _coalesce(self._hints, path, is_directory, event_type)
        if wake:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is stopping
                self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """Hand the batched hints to ``on_hint`` (on the loop)."""
        with self._hints_lock:
            hints, self._hints = self._hints, {}
        for (path, is_directory), event_type in hints.items():
            self.on_hint(path, is_directory, event_type)

    def start(self) -> bool:
        """Start watching. Returns False (after calling ``on_failure``) if it cannot."""
        if self.kind != "polling" and INotify is not None and sys.platform.startswith("linux"):
            native = _InotifyTree(
                self.root, self.loop, self.on_hint, self.on_overflow, self.on_failure
            )
            try:
                native.start()
            except OSError as exc:
                native.stop()
                self.on_failure(f"cannot watch {self.root}: {exc}")
                return False
            self._native = native
            return True
        return self._start_watchdog()

    def _start_watchdog(self) -> bool:
        from watchdog.events import (
            DirCreatedEvent,
            DirDeletedEvent,
            DirMovedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers.polling import PollingObserver

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                for raw in (event.src_path, getattr(event, "dest_path", "")):
                    if raw:
                        watcher.enqueue(os.fsdecode(raw), event.is_directory, event.event_type)

        events = [
            FileCreatedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileDeletedEvent,
            DirCreatedEvent,
            DirMovedEvent,
            DirDeletedEvent,
        ]
        observer: BaseObserver
        if self.kind == "polling":
            observer = PollingObserver(timeout=self.polling_interval_s)
        else:
            from watchdog.observers import Observer

            observer = Observer()
        observer.name = "evalsyncd-watcher"
        observer.daemon = True
        try:
            observer.schedule(Handler(), str(self.root), recursive=True, event_filter=events)
            observer.start()
        except OSError as exc:
            self.on_failure(f"cannot watch {self.root}: {exc}")
            with contextlib.suppress(Exception):
                observer.stop()
            return False
        for name in _OVERFLOW_LOGGERS:
            logging.getLogger(name).addHandler(self._log_handler)
        self._observer = observer
        return True

    def check(self) -> None:
        """Report (via ``on_failure``) a watchdog observer thread that died; call
        periodically (the native observer has no thread)."""
        observer = self._observer
        if observer is None:
            return
        dead = [e for e in observer.emitters if not e.is_alive()]
        if not observer.is_alive() or dead:
            self._observer = None
            self.on_failure("the filesystem watcher thread stopped")

    def stop(self) -> None:
        """Stop watching (and join the watchdog observer's thread); idempotent."""
        native, self._native = self._native, None
        if native is not None:
            native.stop()
        for name in _OVERFLOW_LOGGERS:
            logging.getLogger(name).removeHandler(self._log_handler)
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(5.0)


class _OverflowLogHandler(logging.Handler):
    def __init__(self, watcher: Watcher) -> None:
        super().__init__(logging.WARNING)
        self._watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            with contextlib.suppress(RuntimeError):
                self._watcher.loop.call_soon_threadsafe(self._watcher.on_overflow)
