"""The daemon's engine: scanner, watcher and destinations wired on one event loop.

::

    watchdog thread --hint--> event loop <--- scanner (startup, every rescan_interval_s,
                                   |            at once after an inotify overflow or a new directory)
                                   v  mark(path) on every destination
                       Destination 1 ... Destination n   (own dirty set, passes, backoff, state)
                                   |  on acknowledgement only
                                 Journal (SQLite)

This module never imports the eval store; the CLI wires it to settings,
logging, signals and systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

import structlog

from evalsyncd.config import DestinationSettings, Settings, ensure_state_dir
from evalsyncd.errors import ConfigError
from evalsyncd.evicted import MARKER_NAME
from evalsyncd.sync.destination import Destination
from evalsyncd.sync.files import (
    FileKind,
    classify,
    dir_identity,
    display_path,
    is_run_metadata,
    key_problem,
    scan_tree,
)
from evalsyncd.sync.journal import Journal, JournalError
from evalsyncd.sync.offline import (
    JOURNAL_NAME,
    Backlog,
    open_destination_storage,
    root_replaced,
    unacked_bytes,
)
from evalsyncd.sync.owner import Owner
from evalsyncd.sync.retention import KEPT_NAMES, Mirror, Retention, evicted_runs, recover
from evalsyncd.sync.watcher import Watcher
from evalsyncd.sync.watchlimit import WatchProbe

__all__ = [
    "JOURNAL_NAME",
    "STATUS_INTERVAL_S",
    "Backlog",
    "Service",
    "open_destination_storage",
    "unacked_bytes",
]

log = structlog.get_logger("evalsyncd.sync")

STATUS_INTERVAL_S = 2.0
"""Period of systemd ``STATUS=`` lines, seconds."""


class Service:
    """Mirror ``settings.root`` to every destination until stopped.

    Args:
        settings: the validated configuration.
        notify: called with systemd notification lines (``"READY=1"``,
            ``"STATUS=..."``, ``"WATCHDOG=1"``, ``"STOPPING=1"``); optional.
        watchdog_interval_s: period of ``WATCHDOG=1`` pings, seconds (the CLI passes
            half of systemd's ``WatchdogSec=``); ``STATUS=`` lines follow every
            ``STATUS_INTERVAL_S`` or faster.
        on_upload: called on the loop after each acknowledged write as
            ``on_upload(destination, op, bytes, duration_s)`` (metrics); optional.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        notify: Callable[[str], None] | None = None,
        watchdog_interval_s: float | None = None,
        on_upload: Callable[[str, str, int, float], None] | None = None,
        adopt_root: bool = False,
    ) -> None:
        self.settings = settings
        self._adopt_root = adopt_root
        self.deletes_held = False
        """Whether this run leaves files missing from the root as the journal knows them:
        set by :meth:`open` (see :meth:`_hold_deletes`)."""
        self.root = settings.root
        self._notify = notify or (lambda line: None)
        self._status_wanted = notify is not None  # STATUS= costs a journal read per dirty file
        self._watchdog_interval_s = watchdog_interval_s or STATUS_INTERVAL_S
        self._on_upload = on_upload
        self.first_scan_started = asyncio.Event()
        self.destinations: dict[str, Destination] = {}
        self.journal: Journal | None = None
        self.rescans = 0
        self.not_mirrorable: dict[str, str] = {}
        """Files of the last full scan that cannot be mirrored (their path is not a valid
        key), printable path -> why (see :func:`~evalsyncd.sync.files.key_problem`)."""
        self.overflows = 0
        self._scan_now = asyncio.Event()
        self._scan_interval_s = settings.rescan_interval_s
        self._subtrees: set[Path] = set()
        self._watcher: Watcher | None = None
        self._probe: WatchProbe | None = None
        self._watch_degraded = False
        self._exclude: tuple[Path, ...] = (settings.state_dir,)
        self._stack = AsyncExitStack()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.retention: Retention | None = None
        """Retention (``[retention]``): set by :meth:`open`, rounds only when enabled."""

    # -- setup ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the state directory, open the journal and every destination's storage client.

        Raises:
            ConfigError: the state directory cannot be created, or the journal
                cannot be created in it (the message names ``state_dir``).
            JournalError: the journal exists but is refused (damaged, another root,
                an unknown schema version).
        """
        state_dir = ensure_state_dir(self.settings)
        path = state_dir / JOURNAL_NAME
        try:
            self.journal = Journal(path, self.root)
        except JournalError as exc:
            if path.exists():
                raise
            # Nothing to open: the directory itself is unusable (/sys, a read-only mount).
            raise ConfigError(
                f"state_dir: cannot create the journal in {state_dir}: {exc.__cause__ or exc}"
            ) from exc
        self._stack.callback(self.journal.close)
        self.deletes_held = self._hold_deletes(self.journal)
        for dest in self.settings.destinations:
            await self._add_destination(dest)
        # -- retention (evalsyncd.sync.retention): finish evictions a crash interrupted
        self.retention = Retention(self.root, self.settings.retention, self.journal, self.mirrors)
        await asyncio.to_thread(recover, self.root, self.journal, self.retention.urls())

    def _hold_deletes(self, journal: Journal) -> bool:
        """Whether this run must act on no file missing from the root.

        The journal keeps the root's device and inode from its first run. A root
        that is another directory now (the empty mount point of a volume not
        mounted yet, a root moved or restored from a backup) makes every file the
        journal knows look deleted: with ``mirror_deletes`` every object would go,
        and without it every row would be marked deleted, to be uploaded again when
        the volume is back. Such a run mirrors what the root holds and leaves the
        missing files as they were (objects and rows); each start warns
        (``root_replaced``) until the journal's root is back (a running daemon adopts
        it then, ``Context.root_changed``) or ``adopt_root`` (``--adopt-root``)
        records the new one. What counts as another directory is
        :func:`~evalsyncd.sync.offline.root_replaced`, as ``status`` shows it.
        """
        if not root_replaced(self.root, journal) or self._adopt_root:
            now, known = dir_identity(self.root), journal.root_identity()
            if now is not None and now != known:
                if known is not None:
                    log.info("root_adopted", root=str(self.root))
                journal.record_root_identity(now)
            return False
        log.warning(
            "root_replaced",
            root=str(self.root),
            hint=(
                "the root is another directory than the one this journal mirrored (device "
                "and inode differ: a volume not mounted, a moved or restored root); files "
                "missing from it are left as they were at the destinations. If it is the "
                "root now, run once with --adopt-root"
            ),
        )
        return True

    async def _add_destination(self, dest: DestinationSettings) -> Destination:
        assert self.journal is not None
        storage = open_destination_storage(dest)
        await self._stack.enter_async_context(storage)
        mirror_root = storage.local_root
        if mirror_root is not None and mirror_root.is_relative_to(self.root):
            self._exclude = (*self._exclude, mirror_root)
        d = Destination(
            dest,
            storage,
            self.journal,
            self.root,
            flush_interval_s=self.settings.flush_interval_s,
            mirror_deletes=self.settings.mirror_deletes,
            hold_deletes=self.deletes_held,
            invalid_json_grace_s=self.settings.invalid_json_grace_s,
            owner=Owner(
                storage, self.journal.writer_id(), dest.name, state_dir=self.settings.state_dir
            ),
        )
        d.on_upload = self._on_upload
        self.destinations[dest.name] = d
        log.info("destination_added", destination=dest.name, url=storage.url())
        return d

    async def close(self) -> None:
        """Close storage clients and the journal."""
        await self._stack.aclose()

    # -- retention: a step after the passes (evalsyncd.sync.retention) ----------------------

    def mirrors(self) -> list[Mirror]:
        """The destinations as retention sees them: state and the paths they hold work on."""

        def held(d: Destination) -> set[str]:
            tail = set(d.tail.writer.index.files) if d.tail is not None else set()
            return set(d.pending_paths()) | tail

        return [
            Mirror(d.name, d.storage, d.state.value, held=lambda d=d: held(d))  # type: ignore[misc]
            for d in self.destinations.values()
        ]

    def _in_evicted_run(self, rel: str, evicted: set[str] | None = None) -> bool:
        """Whether ``rel`` is a file of a run evicted from the disk (not mirrored again
        until ``evalsyncd restore`` removes the marker; its kept files are). ``evicted``:
        the evicted run ids if known (else one ``stat`` of the run's marker)."""
        parts = rel.split("/")
        if len(parts) < 3 or parts[0] != "runs" or (len(parts) == 3 and parts[2] in KEPT_NAMES):
            return False
        if evicted is not None:
            return parts[1] in evicted
        return (self.root / "runs" / parts[1] / MARKER_NAME).exists()

    async def _retention_loop(self) -> None:
        """Retention rounds every ``retention.interval_s`` (only when enabled)."""
        assert self.retention is not None
        while self.settings.retention.enabled:
            await asyncio.sleep(self.settings.retention.interval_s)
            try:
                await self.retention.round()
            except Exception as exc:  # never kills the daemon; the next round tries again
                log.exception("retention_failed", error=f"{type(exc).__name__}: {exc}")

    # -- intake -------------------------------------------------------------------------------

    def _relative(self, abs_path: str) -> str | None:
        try:
            p = Path(abs_path)
            rel = p.relative_to(self.root)
        except ValueError:
            return None
        if any(p.is_relative_to(x) for x in self._exclude):
            return None
        return rel.as_posix() if rel.parts else None

    def on_hint(self, abs_path: str, is_directory: bool, event_type: str) -> None:
        """A watchdog event (on the loop thread): mark the file, or scan a new directory."""
        rel = self._relative(abs_path)
        if rel is None:
            return
        if rel.endswith("/" + MARKER_NAME) and event_type == "deleted":  # a restored run
            self._subtrees.add((self.root / rel).parent)
            self._scan_now.set()
            return
        if self._in_evicted_run(rel):
            return
        if is_directory:
            if event_type in ("created", "moved"):
                self._subtrees.add(self.root / rel)
                self._scan_now.set()
                self._probe_watch_limit(self.root / rel)
            return
        if classify(rel) is FileKind.IGNORED:
            return
        urgent = is_run_metadata(rel) and event_type != "deleted"
        for d in self.destinations.values():
            d.mark(rel, urgent=urgent)

    def _probe_watch_limit(self, directory: Path) -> None:
        """Report an exhausted watch limit (watchdog ignores it for subdirectories)."""
        if self._probe is None or self._watch_degraded:
            return
        message = self._probe.exhausted(directory)
        if message is not None:
            self.on_watch_failure(message)

    def on_overflow(self) -> None:
        """The kernel dropped events: rescan everything now."""
        self.overflows += 1
        log.warning("inotify_overflow", action="full rescan", overflows=self.overflows)
        self._subtrees.clear()
        self._scan_now.set()

    def on_watch_failure(self, message: str) -> None:
        """Watching failed: rely on frequent scans instead, loudly."""
        self._watch_degraded = True
        self._scan_interval_s = min(
            self.settings.rescan_interval_s, max(2.0, self.settings.flush_interval_s)
        )
        log.error(
            "watch_failed",
            error=message,
            fallback="periodic scans",
            scan_interval_s=self._scan_interval_s,
        )
        self._scan_now.set()

    async def rescan(self, subtree: Path | None = None) -> int:
        """Compare the files under ``subtree`` (default: the root) with the journal and mark
        every file a destination is behind on, and every journaled file under it that is
        gone. Returns the number of files seen."""
        if subtree is None:
            self.first_scan_started.set()
        base = subtree or self.root
        prefix = "" if base == self.root else base.relative_to(self.root).as_posix() + "/"
        started = time.monotonic()
        evicted = await asyncio.to_thread(evicted_runs, self.root)
        files = await asyncio.to_thread(
            lambda: [
                (prefix + rel, st)
                for rel, st in scan_tree(base, self._exclude)
                if not self._in_evicted_run(prefix + rel, evicted)
            ]
        )
        seen = {rel for rel, _ in files}
        if subtree is None:
            self.not_mirrorable = await asyncio.to_thread(
                lambda: {
                    display_path(rel): why for rel in seen if (why := key_problem(rel)) is not None
                }
            )
        assert self.journal is not None
        for d in self.destinations.values():
            entries = await asyncio.to_thread(self.journal.entries, d.name)
            for rel, st in files:
                e = entries.get(rel)
                if e is None or not e.unchanged(st):
                    d.mark(rel)
            # journaled files of the subtree that are gone: a directory moved out of the
            # root, or replaced, is one event for the directory, none for its files
            for rel, e in entries.items():
                if (
                    rel.startswith(prefix)
                    and rel not in seen
                    and e.status != "deleted"
                    and not self._in_evicted_run(rel, evicted)
                ):
                    d.mark(rel)
        if subtree is None:
            self.rescans += 1
        log.debug(
            "scan_finished",
            subtree=prefix or "/",
            files=len(files),
            duration_s=round(time.monotonic() - started, 3),
        )
        return len(files)

    def backlog(self, name: str) -> Backlog:
        """Scan-free backlog estimate of a destination from its dirty set and the journal."""
        d = self.destinations[name]
        assert self.journal is not None
        total = 0
        for path in d.pending_paths():
            full = self.root / path
            try:
                st = os.stat(full)
            except OSError:
                continue
            total += unacked_bytes(full, classify(path), st, self.journal.get(name, path))
        return Backlog(files=d.pending_files, bytes=max(0, total), oldest_s=d.oldest_pending_s)

    def status_line(self) -> str:
        """One line for systemd's STATUS=: state and backlog per destination."""
        parts = []
        for name, d in self.destinations.items():
            b = self.backlog(name)
            parts.append(
                f"{name}: {d.state.value}, {b.files} files/{b.bytes} B behind, oldest {b.oldest_s:.0f}s"
            )
        return "; ".join(parts)

    # -- running ---------------------------------------------------------------------------------

    async def _scanner(self) -> None:
        last_full = time.monotonic()
        while True:
            timeout = max(0.0, last_full + self._scan_interval_s - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._scan_now.wait(), min(timeout, 5.0))
            if self._watcher is not None:
                self._watcher.check()
            if self._scan_now.is_set():
                self._scan_now.clear()
                subtrees, self._subtrees = self._subtrees, set()
                if subtrees:
                    for sub in sorted(subtrees):
                        await self.rescan(sub)  # gone too: its journaled files are marked
                    continue
                await self.rescan()
                last_full = time.monotonic()
            elif time.monotonic() - last_full >= self._scan_interval_s:
                await self.rescan()
                last_full = time.monotonic()

    async def _heartbeat(self) -> None:
        """Watchdog pings and STATUS lines, from the event loop itself (a hung loop
        stops pinging, and systemd restarts the daemon)."""
        next_ping = 0.0
        while True:
            if time.monotonic() >= next_ping:
                self._notify("WATCHDOG=1")
                next_ping = time.monotonic() + self._watchdog_interval_s
            if self._status_wanted:
                self._notify(f"STATUS={self.status_line()}")
            await asyncio.sleep(max(0.01, min(STATUS_INTERVAL_S, next_ping - time.monotonic())))

    def _start_destination(self, d: Destination) -> None:
        self._tasks[d.name] = asyncio.create_task(d.run(), name=f"destination-{d.name}")

    async def run(
        self,
        stop: asyncio.Event,
        reload: Callable[[], Settings] | None = None,
        reload_event: asyncio.Event | None = None,
    ) -> None:
        """Run until ``stop`` is set; then drain within ``stop_timeout_s`` and close.

        Args:
            stop: set it to stop the service (SIGTERM).
            reload: returns fresh settings; called when ``reload_event`` is set (SIGHUP).
            reload_event: see ``reload``.
        """
        loop = asyncio.get_running_loop()
        await self.open()
        try:
            self._watcher = Watcher(
                self.root,
                loop,
                self.on_hint,
                self.on_overflow,
                self.on_watch_failure,
                observer=self.settings.observer,
                polling_interval_s=self.settings.polling_interval_s,
            )
            if (
                self._watcher.start()
                and not self._watcher.native  # the native observer reports ENOSPC itself
                and self.settings.observer != "polling"
            ):
                self._probe = WatchProbe()
                self._probe_watch_limit(self.root)
            for d in self.destinations.values():
                self._start_destination(d)
            scanner = asyncio.create_task(self._scanner(), name="scanner")
            self._scan_now.set()  # the startup scan
            heartbeat = asyncio.create_task(self._heartbeat(), name="heartbeat")
            retention = asyncio.create_task(self._retention_loop(), name="retention")
            # READY=1 once watching and the startup scan has begun (or a stop came first).
            started = asyncio.ensure_future(self.first_scan_started.wait())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait([started, stopped, scanner], return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            stopped.cancel()
            log.info("daemon_started", root=str(self.root), destinations=list(self.destinations))
            self._notify("READY=1")
            while not stop.is_set():
                waiters = [asyncio.ensure_future(stop.wait())]
                if reload_event is not None:
                    waiters.append(asyncio.ensure_future(reload_event.wait()))
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                if reload_event is not None and reload_event.is_set() and not stop.is_set():
                    reload_event.clear()
                    if reload is not None:
                        await self._reload(reload)
            self._notify("STOPPING=1")
            log.info("daemon_stopping", timeout_s=self.settings.stop_timeout_s)
            self._watcher.stop()
            scanner.cancel()
            heartbeat.cancel()
            retention.cancel()
            await self._drain(list(self.destinations))
        finally:
            if self._watcher is not None:
                self._watcher.stop()
            if self._probe is not None:
                self._probe.close()
            for t in self._tasks.values():
                t.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            await self.close()
            log.info("daemon_stopped")

    async def _drain(self, names: list[str]) -> None:
        """Stop destinations, letting passes in flight finish within ``stop_timeout_s``."""
        for name in names:
            self.destinations[name].stop()
        tasks = [self._tasks[n] for n in names if n in self._tasks]
        if not tasks:
            return
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.stop_timeout_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning("uploads_abandoned", destinations=[t.get_name() for t in pending])

    async def _reload(self, reload: Callable[[], Settings]) -> None:
        try:
            fresh = reload()
        except Exception as exc:
            log.error("reload_failed", error=str(exc), action="keeping the current configuration")
            return
        if fresh.root != self.settings.root or fresh.state_dir != self.settings.state_dir:
            log.error("reload_refused", reason="root and state_dir cannot change without a restart")
            return
        old = {d.name: d for d in self.settings.destinations}
        new = {d.name: d for d in fresh.destinations}
        removed = [n for n in old if n not in new or new[n] != old[n]]
        added = [n for n in new if n not in old or new[n] != old[n]]
        await self._drain(removed)
        for name in removed:
            self.destinations.pop(name, None)
            self._tasks.pop(name, None)
            log.info("destination_removed", destination=name)
        self.settings = fresh
        for name in added:
            self._start_destination(await self._add_destination(new[name]))
        if added:
            self._scan_now.set()
        log.info("config_reloaded", added=added, removed=removed)

    async def sync_once(
        self, timeout_s: float = 600.0, progress: Callable[[int, int], None] | None = None
    ) -> bool:
        """One full catch-up pass: scan, upload everything due, return.

        Args:
            timeout_s: give up (return False) after this many seconds.
            progress: called as ``progress(done_files, total_files)``.

        Returns:
            True when every destination is caught up; False when a destination
            failed, the time ran out or a file cannot be mirrored (its path is not a
            valid key: :attr:`not_mirrorable`).
        """
        await self.open()
        try:
            await self.rescan()
            total = sum(d.pending_files for d in self.destinations.values())
            deadline = time.monotonic() + timeout_s
            ok = True

            def report() -> None:
                if progress is not None:
                    pending = sum(x.pending_files for x in self.destinations.values())
                    progress(total - pending, total)

            for d in self.destinations.values():
                if not d.caught_up and time.monotonic() < deadline:
                    # sync --once ends with exact main objects: the drain of a clean stop
                    await d.drain(d.clock() + max(0.0, deadline - time.monotonic()), report)
                if not d.caught_up:
                    ok = False
                    log.error(
                        "sync_incomplete",
                        destination=d.name,
                        pending_files=d.pending_files,
                        last_error=d.last_error,
                    )
            if self.not_mirrorable:
                ok = False  # README: exit 1 when not everything was mirrored
                log.error(
                    "sync_incomplete_not_mirrorable",
                    files=len(self.not_mirrorable),
                    not_mirrorable=dict(sorted(self.not_mirrorable.items())[:100]),
                )
            return ok
        finally:
            await self.close()
