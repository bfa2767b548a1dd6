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
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from evalsyncd.evicted import MARKER_NAME
from evalsyncd.store import EvalStore, _check_name

__all__ = ["RestoreConflictError", "RestoreResult", "restore_run"]


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
    """

    run_dir: Path
    files: list[str]
    bytes: int
    already_present: bool
    index_appended: bool


def _walk(store: EvalStore, rel: str) -> list[str]:
    """Relative paths of every object under ``runs/{id}/{rel}`` (depth first, sorted)."""
    out: list[str] = []
    base = f"{store.prefix}/" if store.prefix else ""
    for name in store.storage.list_dir(f"{base}{rel}"):
        if name.startswith("."):
            continue  # temporary files of atomic writes
        path = f"{rel}/{name}"
        if store.storage.exists(f"{base}{path}"):
            out.append(path)
        else:
            out.extend(_walk(store, path))
    return out


def _index_line(store: EvalStore, run_id: str, metadata: bytes) -> bytes:
    base = f"{store.prefix}/" if store.prefix else ""
    try:
        data = store.storage.read(f"{base}runs.jsonl")
    except FileNotFoundError:
        data = b""
    for line in data.split(b"\n")[:-1]:  # complete lines only
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("run_id") == run_id:
            return line.rstrip(b"\r") + b"\n"
    m = json.loads(metadata)
    rec = {
        "run_id": run_id,
        "timestamp": m.get("timestamp"),
        "model": m.get("model_name"),
        "checkpoint": m.get("checkpoint_name"),
    }
    return (json.dumps(rec) + "\n").encode("utf-8")


def _local_has_line(index: Path, run_id: str) -> bool:
    try:
        data = index.read_bytes()
    except FileNotFoundError:
        return False
    for line in data.split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("run_id") == run_id:
            return True
    return False


def restore_run(store: EvalStore, run_id: str, root: Path) -> RestoreResult:
    """Copy run ``run_id`` from ``store`` into the local EvalStore at ``root``.

    Args:
        store: the source store (a host prefix; any backend).
        run_id: the run to copy.
        root: the local EvalStore directory (created if missing).

    Returns:
        What was copied.

    Raises:
        FileNotFoundError: the source has no ``runs/{run_id}/metadata.json``.
        RestoreConflictError: ``root`` holds a different run with that id (the
            message names the first differing file); nothing was written.
        ValueError: invalid run id.
        StorageError: the source storage failed.
        OSError: the local root could not be written.
    """
    _check_name("run_id", run_id)
    base = f"{store.prefix}/" if store.prefix else ""
    try:
        metadata = store.storage.read(f"{base}runs/{run_id}/metadata.json")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"run {run_id} not found: no {store.url(f'runs/{run_id}/metadata.json')}"
        ) from None
    rel_paths = [p.removeprefix(f"runs/{run_id}/") for p in _walk(store, f"runs/{run_id}")]
    contents = {rel: store.storage.read(f"{base}runs/{run_id}/{rel}") for rel in rel_paths}
    contents["metadata.json"] = metadata  # the copy read first: the one the index describes
    line = _index_line(store, run_id, metadata)
    root = root.expanduser().absolute()
    run_dir = root / "runs" / run_id
    total = sum(len(b) for b in contents.values())
    already = run_dir.exists()
    if (run_dir / MARKER_NAME).exists():
        already = False
        _bring_back(run_dir, contents, store.url(f"runs/{run_id}"))
    elif already:
        _compare(run_dir, contents, store.url(f"runs/{run_id}"))
    else:
        (root / "runs").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".restore-{run_id}-", dir=root))
        try:
            for rel, data in contents.items():
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
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
    return RestoreResult(run_dir, sorted(contents), total, already, appended)


def _bring_back(run_dir: Path, contents: dict[str, bytes], source: str) -> None:
    """Put the files of an evicted run back in place, then remove its marker.

    Raises:
        RestoreConflictError: a file still on disk differs from the source's (the
            marker stays; nothing of that file is overwritten).
    """
    for rel, data in sorted(contents.items()):
        dest = run_dir / rel
        if dest.exists():
            if dest.read_bytes() != data:
                raise RestoreConflictError(
                    f"{dest} differs from {source}/{rel}: refusing to overwrite the local run"
                )
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    os.unlink(run_dir / MARKER_NAME)


def _compare(run_dir: Path, contents: dict[str, bytes], source: str) -> None:
    local = {
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)
    }
    for rel in sorted(local | set(contents)):
        where = run_dir / rel
        if rel not in contents:
            raise RestoreConflictError(
                f"{where} exists locally but not in {source}: refusing to overwrite the local run"
            )
        if rel not in local:
            raise RestoreConflictError(
                f"{where} is missing locally but in {source}: the local run differs; "
                "refusing to overwrite it"
            )
        if where.read_bytes() != contents[rel]:
            raise RestoreConflictError(
                f"{where} differs from {source}/{rel}: refusing to overwrite the local run"
            )
