"""Restore one run from a store (a bucket's host prefix) into a local EvalStore root.

``restore_run(store, run_id, root)`` copies every object under
``runs/{run_id}/`` byte for byte into ``root/runs/{run_id}/`` and appends the
run's ``runs.jsonl`` line to ``root/runs.jsonl`` when no line of that run is
there yet, so an eval that moves to another host can resume there (that
host's daemon then mirrors it like any other run).

- The files are downloaded into a temporary directory under ``root`` (a
  dot-directory, which the daemon ignores) and renamed into ``runs/`` at once:
  a crash leaves no half-restored run.
- A local run with the same id is compared file by file: identical means the
  restore is a no-op (idempotent); any difference raises
  :class:`RestoreConflictError` and nothing is written.
- A run evicted from ``root`` by the daemon's retention (its
  ``runs/{run_id}/.evicted.json`` marker, :mod:`evalsyncd.evicted`) is brought
  back in place: each missing file is written atomically (a temporary file,
  then a rename), the files still on disk must equal the source's, and the
  marker goes last; an interrupted restore is finished by running it again.
- The ``runs.jsonl`` line is the source's line as it is (its bytes); when the
  source index lacks the run, a line is made from ``metadata.json`` in the
  format ``create_run`` writes.

What another host wrote is not trusted:

- Names a local directory cannot hold safely are refused and reported in
  :attr:`RestoreResult.skipped`, by URL and reason: ``.`` and ``..`` (a key
  such as ``runs/r1/../../x`` would escape the run directory), other names
  starting with ``.`` (temporary files of atomic writes, which the daemon
  never uploads), names with ``\\`` or NUL. Nothing is ever written outside
  ``root/runs/{run_id}/``.
- Files are streamed to disk in ranged reads of :data:`CHUNK_BYTES`: memory
  does not follow their size. ``metadata.json`` is read with one read bounded
  by :data:`~evalsyncd.store.layout.MAX_JSON_BYTES`; ``runs.jsonl`` is
  streamed and a line longer than :data:`MAX_INDEX_LINE_BYTES` is skipped.
- A host whose tail log is damaged is restored from its plain objects (see
  docs/guarantees.md); the caller (``Fleet.find_run``) reports it.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from evalsyncd.evicted import MARKER_NAME
from evalsyncd.store import EvalStore, _check_name
from evalsyncd.store.layout import MAX_JSON_BYTES, Skipped, check_json_size, json_problem

__all__ = [
    "CHUNK_BYTES",
    "MAX_INDEX_LINE_BYTES",
    "RestoreConflictError",
    "RestoreResult",
    "restore_run",
]

CHUNK_BYTES = 8 * 1024 * 1024
"""Bytes per ranged read when copying a file (the memory a restore holds per file)."""

MAX_INDEX_LINE_BYTES = 64 * 1024
"""Longest ``runs.jsonl`` line a restore reads, bytes (``create_run`` writes ~150)."""


class RestoreConflictError(FileExistsError):
    """The local root already holds a different run with this id (nothing was written)."""


@dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore_run` did.

    Attributes:
        run_dir: the local run directory.
        files: relative paths (under the run directory) copied or compared.
        bytes: total size of those files, in bytes.
        already_present: the local run was already identical (nothing copied).
        index_appended: a line was appended to the local ``runs.jsonl``.
        skipped: keys under the run that were refused (not copied), with the reason.
    """

    run_dir: Path
    files: list[str]
    bytes: int
    already_present: bool
    index_appended: bool
    skipped: list[Skipped] = field(default_factory=list)


def _refusal(name: str) -> str | None:
    """Why a listed name is not restored, or ``None``."""
    if name in (".", ".."):
        return f"{name!r} would escape the run directory"
    if name.startswith("."):
        return "a dot-file (a temporary file of an atomic write; the daemon never uploads one)"
    if "\\" in name or "\x00" in name or "/" in name:
        return "not a safe file name (contains '\\', NUL or '/')"
    return None


def _walk(store: EvalStore, rel: str, skipped: list[Skipped]) -> list[str]:
    """Relative paths of every object under ``runs/{id}/{rel}`` (depth first, sorted);
    refused names go to ``skipped``."""
    out: list[str] = []
    base = f"{store.prefix}/" if store.prefix else ""
    for name in store.storage.list_dir(f"{base}{rel}"):
        path = f"{rel}/{name}"
        why = _refusal(name)
        if why is not None:
            skipped.append(Skipped(f"{store.url(rel)}/{name}", why))
            continue
        if store.storage.exists(f"{base}{path}"):
            out.append(path)
        else:
            out.extend(_walk(store, path, skipped))
    return out


def _lines(store: EvalStore, path: str) -> list[bytes]:
    """The complete lines of ``path`` up to :data:`MAX_INDEX_LINE_BYTES` each, streamed."""
    out: list[bytes] = []
    partial = b""
    too_long = False
    offset = 0
    while True:
        try:
            chunk = store.storage.read_range(path, offset, CHUNK_BYTES)
        except (FileNotFoundError, NotADirectoryError):
            return out
        offset += len(chunk)
        parts = (partial + chunk).split(b"\n")
        partial = parts.pop()
        for line in parts:
            if not too_long:
                out.append(line)
            too_long = False
        if len(partial) > MAX_INDEX_LINE_BYTES:
            partial, too_long = b"", True  # drop the rest of this line
        if len(chunk) < CHUNK_BYTES:
            return out


def _record(line: bytes) -> object:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _index_line(store: EvalStore, run_id: str, metadata: dict[str, object]) -> bytes:
    base = f"{store.prefix}/" if store.prefix else ""
    for line in _lines(store, f"{base}runs.jsonl"):  # complete lines only
        rec = _record(line)
        if isinstance(rec, dict) and rec.get("run_id") == run_id:
            return line.rstrip(b"\r") + b"\n"
    rec = {
        "run_id": run_id,
        "timestamp": metadata.get("timestamp"),
        "model": metadata.get("model_name"),
        "checkpoint": metadata.get("checkpoint_name"),
    }
    return (json.dumps(rec) + "\n").encode("utf-8")


def _local_has_line(index: Path, run_id: str) -> bool:
    try:
        data = index.read_bytes()
    except FileNotFoundError:
        return False
    for line in data.split(b"\n"):
        rec = _record(line)
        if isinstance(rec, dict) and rec.get("run_id") == run_id:
            return True
    return False


def _download(store: EvalStore, key: str, dest: Path) -> int:
    """Copy the object ``key`` to ``dest`` in ranged reads; returns its size in bytes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = 0
    with open(dest, "wb") as f:
        while True:
            chunk = store.storage.read_range(key, offset, CHUNK_BYTES)
            f.write(chunk)
            offset += len(chunk)
            if len(chunk) < CHUNK_BYTES:
                return offset


def restore_run(store: EvalStore, run_id: str, root: Path) -> RestoreResult:
    """Copy run ``run_id`` from ``store`` into the local EvalStore at ``root``.

    Args:
        store: the source store (a host prefix; any backend).
        run_id: the run to copy.
        root: the local EvalStore directory (created if missing).

    Returns:
        What was copied, and the keys refused (:attr:`RestoreResult.skipped`).

    Raises:
        FileNotFoundError: the source has no ``runs/{run_id}/metadata.json``, or
            it is not a JSON object.
        RestoreConflictError: ``root`` holds a different run with that id (the
            message names the first differing file); nothing was written.
        ValueError: invalid run id.
        CorruptObjectError: ``metadata.json`` is larger than
            :data:`~evalsyncd.store.layout.MAX_JSON_BYTES` (a ``StorageError``).
        StorageError: the source storage failed.
        OSError: the local root could not be written.
    """
    _check_name("run_id", run_id)
    base = f"{store.prefix}/" if store.prefix else ""
    where = store.url(f"runs/{run_id}/metadata.json")
    try:
        metadata = store.storage.read_range(
            f"{base}runs/{run_id}/metadata.json", 0, MAX_JSON_BYTES + 1
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"run {run_id} not found: no {where}") from None
    check_json_size(metadata, where)
    problem = json_problem(metadata)
    if problem is not None:
        raise FileNotFoundError(f"run {run_id} not found: {where}: {problem}")
    skipped: list[Skipped] = []
    rel_paths = [p.removeprefix(f"runs/{run_id}/") for p in _walk(store, f"runs/{run_id}", skipped)]
    line = _index_line(store, run_id, json.loads(metadata))
    root = root.expanduser().absolute()
    run_dir = root / "runs" / run_id
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".restore-{run_id}-", dir=root))
    try:
        total = 0
        for rel in rel_paths:
            if rel != "metadata.json":
                total += _download(store, f"{base}runs/{run_id}/{rel}", tmp / rel)
        # the copy read first: the one the index line describes
        (tmp / "metadata.json").write_bytes(metadata)
        total += len(metadata)
        files = sorted({*rel_paths, "metadata.json"})
        already = run_dir.exists()
        if (run_dir / MARKER_NAME).exists():  # evicted by retention: back in place
            already = False
            _bring_back(run_dir, tmp, files, store.url(f"runs/{run_id}"))
            shutil.rmtree(tmp, ignore_errors=True)
        elif already:
            _compare(run_dir, tmp, files, store.url(f"runs/{run_id}"))
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            (root / "runs").mkdir(parents=True, exist_ok=True)
            os.rename(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index = root / "runs.jsonl"
    appended = False
    if not _local_has_line(index, run_id):
        fd = os.open(index, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        appended = True
    return RestoreResult(run_dir, files, total, already, appended, skipped)


def _bring_back(run_dir: Path, fetched: Path, files: list[str], source: str) -> None:
    """Put the files of an evicted run back in place from ``fetched`` (a directory on
    the same filesystem), then remove its marker.

    Raises:
        RestoreConflictError: a file still on disk differs from the source's (the
            marker stays; nothing of that file is overwritten).
    """
    for rel in files:
        dest, new = run_dir / rel, fetched / rel
        if dest.exists():
            if not filecmp.cmp(dest, new, shallow=False):
                raise RestoreConflictError(
                    f"{dest} differs from {source}/{rel}: refusing to overwrite the local run"
                )
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(new, "rb") as f:
            os.fsync(f.fileno())
        os.replace(new, dest)
    os.unlink(run_dir / MARKER_NAME)


def _compare(run_dir: Path, fetched: Path, files: list[str], source: str) -> None:
    local = {
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)
    }
    for rel in sorted(local | set(files)):
        where = run_dir / rel
        if rel not in files:
            raise RestoreConflictError(
                f"{where} exists locally but not in {source}: refusing to overwrite the local run"
            )
        if rel not in local:
            raise RestoreConflictError(
                f"{where} is missing locally but in {source}: the local run differs; "
                "refusing to overwrite it"
            )
        if not filecmp.cmp(where, fetched / rel, shallow=False):
            raise RestoreConflictError(
                f"{where} differs from {source}/{rel}: refusing to overwrite the local run"
            )
