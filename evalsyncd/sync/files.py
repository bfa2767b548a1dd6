"""What the daemon mirrors, how, and in which order: classification and scanning.

Rules (``docs/design.md``, "The object model"):

- ``*.jsonl`` files are **append-only**: only complete lines are mirrored.
- every other regular file is **replace-on-write**: uploaded whole once stable;
  a ``*.json`` only once it parses.
- **ignored**: names starting with ``.`` (atomic-write temporaries such as
  ``.metadata.json.1234.tmp``, editor swap files), names ending in ``.tmp``,
  ``~`` or ``.swp``, the daemon's state directory, symlinks (never followed),
  sockets, FIFOs and devices.

Ordering for readers of the bucket is expressed as a *phase* per path; within
one upload pass a destination finishes every task of a phase before it starts
the next: a run's results and trajectories (phase 0) are caught up before its
``metadata.json`` and ``summary.json`` (phase 1), and ``runs.jsonl`` (phase 2)
comes after every ``metadata.json``.
"""

from __future__ import annotations

import enum
import functools
import os
import stat as stat_mod
from collections.abc import Iterator
from pathlib import Path

from evalsyncd.errors import InvalidKeyError
from evalsyncd.storage import check_key

__all__ = [
    "FileKind",
    "classify",
    "dir_identity",
    "display_path",
    "has_entries",
    "is_run_metadata",
    "key_problem",
    "open_beneath",
    "open_dir_beneath",
    "phase_of",
    "scan_tree",
]


class FileKind(enum.Enum):
    """How a file is mirrored."""

    APPEND = "append"
    """``*.jsonl``: delta upload of complete lines."""
    REPLACE = "replace"
    """everything else: whole-file upload once stable."""
    IGNORED = "ignored"
    """never uploaded."""


@functools.lru_cache(maxsize=1 << 16)
def classify(relpath: str) -> FileKind:
    """The kind of a file, from its relative POSIX path alone (cached: a pass asks
    for each file's kind several times)."""
    parts = relpath.split("/")
    if any(p.startswith(".") for p in parts):
        return FileKind.IGNORED
    name = parts[-1]
    if name.endswith((".tmp", "~", ".swp", ".swx", ".part")):
        return FileKind.IGNORED
    if name.endswith(".jsonl"):
        return FileKind.APPEND
    return FileKind.REPLACE


def is_run_metadata(relpath: str) -> bool:
    """Whether ``relpath`` is ``runs/{run_id}/metadata.json``."""
    parts = relpath.split("/")
    return len(parts) == 3 and parts[0] == "runs" and parts[2] == "metadata.json"


_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
_DIR = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_DIRECTORY
_ROOT = os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY


def open_dir_beneath(root: str | Path, path: str) -> int:
    """Open the directory at ``path`` (relative to ``root``, ``/``-separated; ``""``: the
    root), following no symlink below ``root`` (see :func:`open_beneath`).

    Returns:
        A directory file descriptor (``O_CLOEXEC``), for ``dir_fd=``; the caller closes it.

    Raises:
        NotADirectoryError: a directory on the path is a symlink (Linux; ``ELOOP``
            elsewhere) or not a directory.
        FileNotFoundError: a part of the path is missing.
    """
    fd = os.open(root, _ROOT)
    try:
        for part in path.split("/") if path else ():
            inner = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(root: str | Path, path: str) -> int:
    """Open the file at ``path`` (relative to ``root``, ``/``-separated) for reading,
    following no symlink below ``root``: each directory is opened from its parent with
    ``O_NOFOLLOW`` (``openat``), so a run directory swapped for a symlink between a
    scan and a read never makes the daemon read (and upload) a file outside the root.
    ``root`` itself, as configured, may be or go through a symlink. The file is opened
    with ``O_NONBLOCK``: a FIFO swapped in never blocks the open (a regular file reads
    as usual); callers check what they opened (``fstat``) before reading it.

    Returns:
        A file descriptor (``O_CLOEXEC``); the caller closes it.

    Raises:
        NotADirectoryError: a directory on the path is a symlink (Linux; ``ELOOP``
            elsewhere) or not a directory.
        FileNotFoundError: a part of the path is missing.
        OSError: ``ELOOP`` when the file itself is a symlink; any other open error.
    """
    parent, _, name = path.rpartition("/")
    fd = open_dir_beneath(root, parent)
    try:
        return os.open(name, _READ, dir_fd=fd)
    finally:
        os.close(fd)


def has_entries(path: Path) -> bool:
    """Whether the directory at ``path`` holds any entry (``False`` if it cannot be read)."""
    try:
        with os.scandir(path) as it:
            return next(it, None) is not None
    except OSError:
        return False


def dir_identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory at ``path``, or ``None`` if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat_mod.S_ISDIR(st.st_mode) else None


def phase_of(relpath: str) -> int:
    """Upload phase of a path: 0 data files, 1 run metadata and summary, 2 the index."""
    if relpath == "runs.jsonl":
        return 2
    parts = relpath.split("/")
    if len(parts) == 3 and parts[0] == "runs" and parts[2] in ("metadata.json", "summary.json"):
        return 1
    return 0


def scan_tree(root: Path, exclude: tuple[Path, ...] = ()) -> Iterator[tuple[str, os.stat_result]]:
    """Walk ``root`` and yield ``(relative POSIX path, lstat)`` of every file to mirror.

    Symlinks are neither followed nor yielded; directories in ``exclude`` (the
    state directory, if it lies under the root) and ignored names are skipped.
    Files that vanish during the walk are skipped silently; unreadable
    directories are skipped (the next scan tries again).
    """
    excluded = {str(p) for p in exclude}
    stack = [(str(root), "")]
    while stack:
        directory, rel_dir = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            rel = f"{rel_dir}{entry.name}"
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat_mod.S_ISDIR(st.st_mode):
                if entry.path not in excluded:
                    stack.append((entry.path, f"{rel}/"))
            elif stat_mod.S_ISREG(st.st_mode) and classify(rel) is not FileKind.IGNORED:
                yield rel, st


def key_problem(relpath: str) -> str | None:
    """Why the file at ``relpath`` cannot be mirrored under any prefix (its path is not
    a valid key: invalid UTF-8 bytes in its name, a NUL, ...), or ``None``.

    Such a file is never uploaded: the daemon reports it (``file_not_mirrorable``),
    ``sync --once`` exits 1 naming it, ``status`` lists it apart from the backlog.
    """
    try:
        check_key(relpath)
    except InvalidKeyError as exc:
        return str(exc).rsplit(": ", 1)[-1]
    return None


def display_path(relpath: str) -> str:
    """``relpath`` as printable text: bytes of a name that are not UTF-8 (decoded with
    ``surrogateescape``) shown as ``\\xNN``."""
    return os.fsencode(relpath).decode("utf-8", "backslashreplace")
