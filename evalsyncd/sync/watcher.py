"""Filesystem hints from watchdog, handed to the event loop and nothing more.

Events are hints; scans are the truth. The watchdog threads only record the
event's path in a batch and wake the loop with ``loop.call_soon_threadsafe``
when the batch was empty (style: watchdog's own emitter/dispatcher split). Two situations are reported to the service so it can
rescan or fall back:

- the kernel's inotify queue overflowed (events were lost): watchdog logs it on
  the ``watchdog.observers.inotify_c`` logger and rebuilds its watches; a
  logging handler on that logger turns the record into an ``on_overflow`` call;
- the watcher cannot watch (watch limit ``fs.inotify.max_user_watches`` reached,
  ``ENOSPC``) or its thread died: ``on_failure`` is called, and the service
  keeps working from periodic scans and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

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
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

__all__ = ["Watcher"]

_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]
"""The events that are hints. Left out, so the kernel never reports them (inotify's
mask): opens and closes (each of the daemon's own reads makes two, each line a writer
appends with open/write/close one more than its write) and directory modifications
(one per file created, deleted or moved in it). A write through ``mmap`` alone, which
inotify reports only at its close, is found by the next scan."""

_OVERFLOW_LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                self._watcher.enqueue(os.fsdecode(raw), event.is_directory, event.event_type)


class _OverflowLogHandler(logging.Handler):
    def __init__(self, watcher: Watcher) -> None:
        super().__init__(logging.WARNING)
        self._watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            with contextlib.suppress(RuntimeError):
                self._watcher.loop.call_soon_threadsafe(self._watcher.on_overflow)


class Watcher:
    """Watch ``root`` recursively and hand every event's path to ``on_hint``.

    Args:
        root: the directory to watch.
        loop: the event loop that receives hints.
        on_hint: called on the loop as ``on_hint(abs_path, is_directory, event_type)``.
        on_overflow: called on the loop when the kernel dropped events.
        on_failure: called on the loop with a message when watching failed; the
            caller must then rely on scans.
        observer: ``"auto"``/``"inotify"`` (native) or ``"polling"`` (for network
            filesystems without inotify).
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
        self._observer: BaseObserver | None = None
        self._log_handler = _OverflowLogHandler(self)
        self._hints: dict[tuple[str, bool], str] = {}
        self._hints_lock = threading.Lock()

    def enqueue(self, path: str, is_directory: bool, event_type: str) -> None:
        """Record a hint (watchdog thread); wake the loop once per batch.

        Hints for one path coalesce, so a burst of events costs the loop one
        wake-up instead of one per event: a flooded self-pipe would otherwise
        drop signals (SIGTERM) and slow writers. A directory keeps "created" if
        any of its events was a creation or a move; a file keeps "deleted" only
        if every event was a deletion.
        """
        key = (path, is_directory)
        with self._hints_lock:
            wake = not self._hints
            previous = self._hints.get(key)
            if previous is None or previous == "deleted" or event_type in ("created", "moved"):
                self._hints[key] = event_type
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
        observer: BaseObserver
        if self.kind == "polling":
            observer = PollingObserver(timeout=self.polling_interval_s)
        else:
            from watchdog.observers import Observer

            observer = Observer()
        observer.name = "evalsyncd-watcher"
        observer.daemon = True
        try:
            observer.schedule(_Handler(self), str(self.root), recursive=True, event_filter=_EVENTS)
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
        """Report (via ``on_failure``) an observer thread that died; call periodically."""
        observer = self._observer
        if observer is None:
            return
        dead = [e for e in observer.emitters if not e.is_alive()]
        if not observer.is_alive() or dead:
            self._observer = None
            self.on_failure("the filesystem watcher thread stopped")

    def stop(self) -> None:
        """Stop watching and join the observer thread."""
        for name in _OVERFLOW_LOGGERS:
            logging.getLogger(name).removeHandler(self._log_handler)
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(5.0)
