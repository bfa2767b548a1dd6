"""``EvalStore``: evaluation runs on any storage, in the tinker-cookbook layout.

The API, the models and the bytes on storage are those of
``tinker_cookbook.stores.eval_store.EvalStore`` (``tinker-cookbook`` 0.6.1): a
tree written by either implementation reads back identically through the other.
The package, one job per module::

    models.py   RunMetadata, BenchmarkResult, StoredTrajectory, StoredTurn
    layout.py   where each file lives (the tree), names, parsing of the bytes
    aio.py      how reads reach a storage: awaited, bounded concurrency
    reader.py   EvalStoreReader: every read, once, async; sync twins through the bridge
    __init__    EvalStore = the reads + the writes (this module)

Writes are synchronous and run in the caller's thread: on the local disk of
a training host they are the writer's hot path, so no event loop is involved
(they may be called from inside a coroutine). Reads are async at the core; the
sync read methods go through the storage bridge and may not be called from
inside a running event loop (await the ``a*`` twins there).

A run id made by :meth:`EvalStore.create_run` is
``{checkpoint_name or "base"}_{YYYYmmdd_HHMMSS}_{6 hex digits}`` (local time).

Warnings go to the stdlib logger ``evalsyncd.store``; this package never
configures logging.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime
from typing import Any

from evalsyncd.catalog import (
    CatalogError,
    build_catalog,
    parse_catalog,
    read_catalog_bytes,
    write_catalog_bytes,
)
from evalsyncd.errors import RunEvictedError
from evalsyncd.evicted import MARKER_NAME
from evalsyncd.storage import Backend
from evalsyncd.store.aio import MISSING
from evalsyncd.store.layout import (
    LineSplitter,
    check_name,
    check_new_name,
    parse_json_object,
    parse_model,
)
from evalsyncd.store.models import BenchmarkResult, RunMetadata, StoredTrajectory, StoredTurn
from evalsyncd.store.reader import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_CONCURRENCY, EvalStoreReader

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_CONCURRENCY",
    "BenchmarkResult",
    "EvalStore",
    "EvalStoreReader",
    "RunMetadata",
    "StoredTrajectory",
    "StoredTurn",
]

logger = logging.getLogger("evalsyncd.store")

# Private names that evalsyncd.restore and the tests know from before the split.
_check_name = check_name
_LineSplitter = LineSplitter


def _now() -> datetime:
    """The creation time of runs (local, naive, as the reference); tests replace it."""
    return datetime.now()


def _short_id() -> str:
    """The random suffix of generated run ids; tests replace it."""
    return uuid.uuid4().hex[:6]


class EvalStore(EvalStoreReader):
    """Evaluation runs across checkpoints, on any :class:`~evalsyncd.storage.Storage`.

    Writers on training hosts use a local directory (the daemon mirrors it);
    readers may point the same class at a bucket. The reads, their arguments
    and their async twins are those of :class:`EvalStoreReader`; this class
    adds the writes, which run in the caller's thread (see the module docstring).
    """

    # -- run management ---------------------------------------------------------------

    def create_run(
        self,
        model_name: str,
        benchmarks: list[str],
        checkpoint_path: str | None = None,
        checkpoint_name: str | None = None,
        config: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> str:
        """Create a run: write its ``metadata.json``, then append to ``runs.jsonl``.

        Args:
            model_name: the evaluated model.
            benchmarks: benchmark names the run will hold.
            checkpoint_path: where the checkpoint lives, if any.
            checkpoint_name: the checkpoint's label; also the first part of a
                generated run id (``"base"`` when ``None``).
            config: free-form run configuration (``{}`` when ``None``).
            run_id: the run's id; generated as
                ``{checkpoint_name or "base"}_{YYYYmmdd_HHMMSS}_{6 hex}`` when ``None``.

        Returns:
            The run id.

        Raises:
            ValueError: the run id or a benchmark name is not a valid path segment,
                or starts with ``.`` (hidden: never mirrored; see
                :func:`~evalsyncd.store.layout.check_new_name`); nothing is written.
            StorageError: the storage failed.
        """
        for name in benchmarks:
            check_new_name("benchmark", name)
        if run_id is None:
            ts = _now().strftime("%Y%m%d_%H%M%S")
            run_id = f"{checkpoint_name or 'base'}_{ts}_{_short_id()}"
        check_new_name("run_id", run_id)
        metadata_path = self._layout.metadata(run_id)
        self._check_not_evicted(run_id)

        metadata = RunMetadata(
            run_id=run_id,
            model_name=model_name,
            checkpoint_path=checkpoint_path,
            checkpoint_name=checkpoint_name,
            benchmarks=benchmarks,
            config=config or {},
            timestamp=_now().isoformat(),
        )
        self._write_json(metadata.to_dict(), metadata_path)
        self._append_jsonl(
            {
                "run_id": run_id,
                "timestamp": metadata.timestamp,
                "model": model_name,
                "checkpoint": checkpoint_name,
            },
            self._layout.index(),
        )
        logger.info("created eval run %s", run_id)
        return run_id

    def run_dir(self, run_id: str) -> str:
        """The local directory of a run, as a string (``LocalStorage`` only).

        Raises:
            RuntimeError: the storage is not local (use :meth:`url` instead).
            ValueError: invalid run id.
        """
        path = self._layout.run(run_id)
        root = self.storage.local_root if isinstance(self.storage, Backend) else None
        if root is None:
            raise RuntimeError(
                f"run_dir() needs a local storage, not {type(self.storage).__name__}; "
                f"the run is at {self.storage.url(path)} (use EvalStore.url())"
            )
        return str(root / path)

    def finalize_run(self, run_id: str) -> RunMetadata:
        """Copy each benchmark's ``score`` from its ``result.json`` into ``metadata.json``.

        Benchmarks without a result that parses as a JSON object are left out
        of ``scores`` (as the reference). Reads and writes run in this thread.

        Returns:
            The updated metadata (also written back).

        Raises:
            FileNotFoundError: the run has no (parseable) ``metadata.json``.
            ValueError: invalid run id.
            StorageError: the storage failed.
        """
        path = self._layout.metadata(run_id)
        self._check_not_evicted(run_id)
        metadata = parse_model(RunMetadata, self._read_json_here(path), self.storage.url(path))
        if metadata is None:
            raise FileNotFoundError(f"run {run_id} not found at {self.storage.url(path)}")
        for benchmark in metadata.benchmarks:
            try:
                result_path = self._layout.result(run_id, benchmark)
            except ValueError as exc:
                logger.warning("finalize_run %s: skipping benchmark: %s", run_id, exc)
                continue
            result = self._read_json_here(result_path)
            if result:
                metadata.scores[benchmark] = result.get("score", 0.0)
        self._write_json(metadata.to_dict(), path)
        logger.info("finalized eval run %s: %s", run_id, metadata.scores)
        return metadata

    def delete_run(self, run_id: str) -> None:
        """Delete a run's files; idempotent (no error if already gone).

        The run's entry leaves the run catalog (``.evalsyncd/catalog.json``,
        when there is one) first, then ``metadata.json`` goes, so an
        interrupted delete leaves no half-run in ``list_runs`` (even where the
        storage keeps empty directories in its listings); calling again
        finishes the job. The ``runs.jsonl`` index is append-only and keeps
        the run's line.

        Raises:
            ValueError: invalid run id.
            StorageError: the storage failed.
        """
        layout, storage = self._layout, self.storage
        self._drop_from_catalog(run_id)
        storage.remove(layout.metadata(run_id))
        storage.remove(layout.summary(run_id))
        for name in storage.list_dir(layout.run(run_id)):
            try:
                result_path = layout.result(run_id, name)
            except ValueError:
                continue
            traj_path = layout.trajectories(run_id, name)
            if not storage.exists(result_path) and not storage.exists(traj_path):
                continue
            storage.remove(result_path)
            storage.remove(traj_path)
            storage.remove_dir(layout.benchmark(run_id, name))
        storage.remove(layout.run(run_id, MARKER_NAME))  # an evicted run's marker
        storage.remove_dir(layout.run(run_id))

    # -- writes (for the eval runner) -----------------------------------------------------

    def write_result(self, run_id: str, result: BenchmarkResult) -> None:
        """Write ``runs/{run_id}/{result.name}/result.json`` (replacing it atomically).

        Raises:
            ValueError: invalid run id or benchmark name (nothing is written).
            RunEvictedError: the run was evicted from the local disk (restore it first).
            StorageError: the storage failed.
        """
        check_new_name("benchmark", result.name)
        path = self._layout.result(run_id, result.name)
        self._check_not_evicted(run_id)
        self._write_json(result.to_dict(), path)

    def write_trajectory(self, run_id: str, benchmark: str, traj: StoredTrajectory) -> None:
        """Append one line to the benchmark's ``trajectories.jsonl``.

        One ``append`` call per line: on ``LocalStorage`` concurrent writers,
        in threads or processes, never tear or interleave lines.

        Raises:
            ValueError: invalid run id or benchmark name (nothing is written).
            RunEvictedError: the run was evicted from the local disk (restore it first).
            StorageError: the storage failed.
        """
        check_new_name("benchmark", benchmark)
        path = self._layout.trajectories(run_id, benchmark)
        self._check_not_evicted(run_id)
        self._append_jsonl(traj.to_dict(), path)

    def write_summary(self, run_id: str, results: dict[str, BenchmarkResult]) -> None:
        """Write ``summary.json``: per benchmark, score and example counts.

        Raises:
            ValueError: invalid run id.
            RunEvictedError: the run was evicted from the local disk (restore it first).
            StorageError: the storage failed.
        """
        self._check_not_evicted(run_id)
        summary = {
            name: {
                "score": r.score,
                "num_examples": r.num_examples,
                "num_correct": r.num_correct,
                "num_errors": r.num_errors,
            }
            for name, r in results.items()
        }
        self._write_json(summary, self._layout.summary(run_id))

    # -- raw I/O of the write path (in this thread) ---------------------------------------

    def _check_not_evicted(self, run_id: str) -> None:
        """Refuse a write to a run evicted from the local disk (one local ``stat``).

        Raises:
            RunEvictedError: names the run, its mirrors and ``evalsyncd restore``.
        """
        if self._local_root is None:
            return
        if not (self._local_root / self._layout.run(run_id, MARKER_NAME)).exists():
            return
        try:
            marker = self.eviction_marker(run_id)
            mirrors = ", ".join(marker.mirrors) if marker is not None else "its mirror"
        except ValueError:
            mirrors = "its mirror"
        raise RunEvictedError(
            f"run {run_id} was evicted from the local disk ({self.url()}); its files are in "
            f"{mirrors}. Bring it back before writing to it: "
            f"evalsyncd restore MIRROR {run_id} --root {self._local_root}",
            run_id=run_id,
        )

    def _write_json(self, data: dict[str, Any], path: str) -> None:
        self.storage.write(path, json.dumps(data, indent=2).encode("utf-8"))

    def _append_jsonl(self, record: dict[str, Any], path: str) -> None:
        # One append call per record: on LocalStorage one O_APPEND write(2), so
        # concurrent writers never tear or interleave lines.
        self.storage.append(path, (json.dumps(record) + "\n").encode("utf-8"))

    def _read_json_here(self, path: str) -> dict[str, Any] | None:
        """A JSON object read in this thread, for the write path (``None``: missing or bad)."""
        try:
            data: bytes | None = self.storage.read(path)
        except MISSING:
            data = None
        return parse_json_object(data, self.storage.url(path))

    def _drop_from_catalog(self, run_id: str) -> None:
        """Rewrite the catalog without ``run_id`` (no-op without a catalog or that entry)."""
        check_name("run_id", run_id)
        data = read_catalog_bytes(self.storage, self.prefix)
        if data is None:
            return
        url = self.storage.url(self._layout.catalog())
        try:
            catalog = parse_catalog(data, url)
        except CatalogError as exc:
            logger.warning("replacing an unreadable run catalog with an empty one: %s", exc)
            write_catalog_bytes(self.storage, build_catalog({}), self.prefix)
            return
        if run_id not in catalog.entries:
            return
        kept = {k: e.data for k, e in catalog.entries.items() if k != run_id and e.intact}
        write_catalog_bytes(self.storage, build_catalog(kept), self.prefix)
