"""The native inotify observer (``evalsyncd/sync/watcher.py``): hints in batches on the
event loop, no thread, watches that follow new, moved and lost directories.

Each test runs a real inotify instance on ``tmp_path`` (Linux only)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from evalsyncd.sync.watcher import Watcher

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")

Hint = tuple[str, bool, str]


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    """Yield to the loop until ``condition()`` holds (the hints arrive on the loop)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _append_lines(files: list[Path], n: int) -> None:
    """Append ``n`` lines to each file, one open/write/close per line (as EvalStore does)."""
    for i in range(n):
        for f in files:
            with open(f, "ab") as fh:
                fh.write(b'{"n": %d}\n' % i)


def _set(knob: Path, value: str) -> None:
    knob.write_text(value)


def _run(
    root: Path,
    scenario: Callable[[Watcher, list[Hint], list[str]], Awaitable[None]],
) -> None:
    """Run ``scenario(watcher, hints, failures)`` with a started native watcher on ``root``."""

    async def main() -> None:
        hints: list[Hint] = []
        failures: list[str] = []
        loop = asyncio.get_running_loop()
        watcher = Watcher(root, loop, lambda *h: hints.append(h), lambda: None, failures.append)
        assert watcher.start()
        assert watcher.native
        try:
            await scenario(watcher, hints, failures)
        finally:
            watcher.stop()
            watcher.stop()  # idempotent, as the service's stop and its cleanup both call it

    asyncio.run(main())


def test_appends_make_one_hint_per_path_per_batch_and_no_thread(tmp_path: Path) -> None:
    """1,200 appends (open, write, close each, as EvalStore does) to 4 files give each
    file a handful of "modified" hints, not one per write, and start no thread."""
    files = [tmp_path / f"f{i}.jsonl" for i in range(4)]
    for f in files:
        f.write_bytes(b"")
    threads_before = threading.active_count()

    async def scenario(_w: Watcher, hints: list[Hint], _f: list[str]) -> None:
        assert threading.active_count() == threads_before
        _append_lines(files, 300)
        await _until(lambda: {h[0] for h in hints} >= {str(f) for f in files}, "every file hinted")
        await asyncio.sleep(0.2)  # whatever was still queued
        per_file = {str(f): sum(1 for h in hints if h[0] == str(f)) for f in files}
        assert all(h[2] == "modified" and not h[1] for h in hints), hints
        # one per batch of HINT_BATCH_S: the writes above take far fewer batches than 300
        assert max(per_file.values()) < 100, per_file

    _run(tmp_path, scenario)


def test_new_nested_directories_are_watched(tmp_path: Path) -> None:
    """A directory tree created at once (``mkdir -p``) is watched to its leaves: a file
    written in the deepest one later is hinted, and so is the new directory itself."""

    async def scenario(_w: Watcher, hints: list[Hint], _f: list[str]) -> None:
        deep = tmp_path / "runs" / "r1" / "bench"
        deep.mkdir(parents=True)
        await _until(lambda: (str(tmp_path / "runs"), True, "created") in hints, "runs/ created")
        await asyncio.sleep(0.1)  # the watches of runs/r1 and runs/r1/bench are in place
        (deep / "trajectories.jsonl").write_bytes(b"{}\n")
        target = str(deep / "trajectories.jsonl")
        await _until(lambda: any(h[0] == target for h in hints), "the deep file's hint")

    _run(tmp_path, scenario)


def test_moved_directories_are_followed(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A directory renamed within the root is watched at its new path and its files are
    hinted at their old paths too (gone there); one moved out of the root is no longer
    watched (no hint names a path it does not have)."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jsonl").write_bytes(b"1\n")
    outside = tmp_path_factory.mktemp("outside")

    async def scenario(_w: Watcher, hints: list[Hint], _f: list[str]) -> None:
        (tmp_path / "a").rename(tmp_path / "z")
        old = str(tmp_path / "a" / "b" / "x.jsonl")
        await _until(lambda: any(h[0] == old for h in hints), "the old path of the moved file")
        assert (str(tmp_path / "z"), True, "moved") in hints
        (tmp_path / "z" / "b" / "y.jsonl").write_bytes(b"2\n")
        new = str(tmp_path / "z" / "b" / "y.jsonl")
        await _until(lambda: any(h[0] == new for h in hints), "a file in the moved directory")

        (tmp_path / "z").rename(outside / "z")
        await _until(lambda: (str(tmp_path / "z"), True, "moved") in hints[-3:], "moved out")
        hints.clear()
        (outside / "z" / "b" / "late.jsonl").write_bytes(b"3\n")
        (tmp_path / "marker.json").write_bytes(b"{}")  # events come in order
        await _until(lambda: any(h[0] == str(tmp_path / "marker.json") for h in hints), "marker")
        assert not any("late.jsonl" in h[0] for h in hints), hints

    _run(tmp_path, scenario)


def test_watch_limit_is_reported_and_watching_goes_on(tmp_path: Path) -> None:
    """When the kernel refuses a watch (``ENOSPC``: ``fs.inotify.max_user_watches``),
    ``on_failure`` names the directory and the limit, once; the watches in place keep
    hinting."""
    knob = Path("/proc/sys/fs/inotify/max_user_watches")
    if not os.access(knob, os.W_OK):
        pytest.skip(f"{knob} is not writable here")
    saved = knob.read_text()

    async def scenario(_w: Watcher, hints: list[Hint], failures: list[str]) -> None:
        try:
            _set(knob, "1\n")  # below what is in use: every new watch fails
            for i in range(3):
                (tmp_path / f"d{i}").mkdir()
            await _until(lambda: bool(failures), "on_failure")
        finally:
            _set(knob, saved)
        assert len(failures) == 1, failures
        assert "max_user_watches" in failures[0] and str(tmp_path / "d") in failures[0]
        (tmp_path / "still.jsonl").write_bytes(b"1\n")
        await _until(lambda: any(h[0] == str(tmp_path / "still.jsonl") for h in hints), "hint")

    _run(tmp_path, scenario)


def test_overflow_is_reported_and_the_tree_watched_again(tmp_path: Path) -> None:
    """An overflowed queue (``max_queued_events``) calls ``on_overflow`` and re-adds the
    watches the lost events would have added: a directory created in the burst is
    watched afterwards."""
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    if not os.access(knob, os.W_OK):
        pytest.skip(f"{knob} is not writable here")
    saved = knob.read_text()

    async def main() -> None:
        hints: list[Hint] = []
        overflows: list[int] = []
        failures: list[str] = []
        loop = asyncio.get_running_loop()
        watcher = Watcher(
            tmp_path, loop, lambda *h: hints.append(h), lambda: overflows.append(1), failures.append
        )
        try:
            _set(knob, "16\n")  # read when the inotify instance is created
            assert watcher.start()
        finally:
            _set(knob, saved)
        try:
            for i in range(100):  # no await: the loop reads nothing meanwhile
                (tmp_path / f"f{i}.json").write_bytes(b"{}")
            (tmp_path / "late").mkdir()
            await _until(lambda: bool(overflows), "on_overflow")
            (tmp_path / "late" / "x.jsonl").write_bytes(b"1\n")
            target = str(tmp_path / "late" / "x.jsonl")
            await _until(lambda: any(h[0] == target for h in hints), "a hint from late/")
            assert not failures, failures
        finally:
            watcher.stop()

    asyncio.run(main())


def test_a_root_reached_through_a_symlink_is_watched(tmp_path: Path) -> None:
    """The root may be a symlink to the directory (the root itself is followed, nothing
    below it is): writes under it are hinted under the path the watcher was given."""
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)

    async def scenario(_w: Watcher, hints: list[Hint], _f: list[str]) -> None:
        (real / "a.jsonl").write_bytes(b"1\n")
        await _until(lambda: (str(link / "a.jsonl"), False, "created") in hints, "a hint")

    _run(link, scenario)
