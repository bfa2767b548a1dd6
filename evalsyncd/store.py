"""``EvalStore``: evaluation runs on any storage, in the tinker-cookbook layout.

The API, the models and the bytes on storage are those of
``tinker_cookbook.stores.eval_store.EvalStore`` (``tinker-cookbook`` 0.6.1): a
tree written by either implementation reads back identically through the other.
Storage layout (``{prefix}`` is the store's prefix inside the storage)::

    {prefix}/
      runs.jsonl                        # append-only index, one line per create_run:
                                        #   {"run_id", "timestamp", "model", "checkpoint"}
      runs/
        {run_id}/
          metadata.json                 # RunMetadata (rewritten by finalize_run)
          summary.json                  # {benchmark: {score, num_examples,
                                        #              num_correct, num_errors}}
          {benchmark}/
            result.json                 # BenchmarkResult; pass_at_k keys are strings
            trajectories.jsonl          # one StoredTrajectory per line

Formats: ``*.json`` files are ``json.dumps(obj, indent=2)`` in UTF-8 with no
trailing newline; each JSONL line is ``json.dumps(record) + "\\n"`` (ASCII, since
``ensure_ascii`` is on). A run id made by :meth:`EvalStore.create_run` is
``{checkpoint_name or "base"}_{YYYYmmdd_HHMMSS}_{6 hex digits}`` (local time).

Reading is forgiving of what writers leave behind, and strict about outages:

- JSONL is split on ``b"\\n"`` only; a trailing ``\\r`` (CRLF), surrounding
  whitespace and a leading UTF-8 BOM are stripped; blank lines are skipped; a
  last line without its ``\\n`` is a writer mid-append and is ignored until it
  is complete.
- Non-UTF-8 bytes: a line is decoded with ``errors="replace"`` (as the reference
  does), so each bad byte becomes U+FFFD, and a warning names the file and line.
  If the line then does not parse as JSON it is skipped like any malformed line.
- A malformed line (bad JSON, not an object, missing ``idx``/``benchmark``) is
  skipped with a warning naming the file and the 1-based line number.
- A ``*.json`` file that does not parse reads as missing (``None``), with a warning.
- Only "not found" (:class:`~evalsyncd.errors.ObjectNotFoundError`, i.e.
  ``FileNotFoundError``) means missing. Every other storage error, transient or
  permanent, propagates: an outage is never reported as "no runs".

Run ids and benchmark names become path segments: an empty name, one containing
``/``, ``\\``, or NUL, and ``.``/``..`` are refused with ``ValueError`` before
any I/O.

Warnings go to the stdlib logger ``evalsyncd.store``; this module never
configures logging.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from evalsyncd.catalog import (
    CATALOG_PATH,
    Catalog,
    CatalogError,
    aread_catalog_bytes,
    build_catalog,
    parse_catalog,
    read_catalog_bytes,
    write_catalog_bytes,
)
from evalsyncd.storage import AsyncStorage, LocalStorage, Storage, SupportsChild, storage_join
from evalsyncd.storage._bridge import run_sync

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_CONCURRENCY",
    "BenchmarkResult",
    "EvalStore",
    "RunMetadata",
    "StoredTrajectory",
    "StoredTurn",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_MAX_CONCURRENCY = 32
"""Default bound on concurrent storage requests of one ``list_runs`` call."""

DEFAULT_CHUNK_SIZE = 1 << 20
"""Default size in bytes of each ranged read when streaming a JSONL file (1 MiB)."""

TurnRole = Literal["user", "assistant", "environment", "grader"]
"""Roles of the turns of a stored trajectory."""


# ── Models ───────────────────────────────────────────────────────────────────


def _known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class RunMetadata:
    """Metadata of one evaluation run (``runs/{run_id}/metadata.json``).

    Attributes:
        run_id: the run's directory name.
        model_name: the evaluated model.
        checkpoint_path: where the checkpoint lives, if any.
        checkpoint_name: the checkpoint's label, if any.
        benchmarks: benchmark names the run was created for.
        timestamp: creation time, ``datetime.isoformat()`` of local time.
        config: free-form run configuration.
        scores: benchmark name to score, filled in by ``finalize_run``.
    """

    run_id: str
    model_name: str
    checkpoint_path: str | None
    checkpoint_name: str | None
    benchmarks: list[str]
    timestamp: str
    config: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a JSON-compatible dict, in field order."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunMetadata:
        """Deserialize, ignoring unknown fields (forward compatibility).

        Raises:
            TypeError: a required field is missing.
        """
        return cls(**_known_fields(cls, d))


@dataclass
class StoredTurn:
    """One turn of a stored trajectory.

    Attributes:
        role: ``"user"``, ``"assistant"``, ``"environment"`` or ``"grader"``.
        content: decoded text of the turn.
        token_count: number of tokens in the turn.
        metadata: arbitrary per-turn data.
    """

    role: TurnRole
    content: str
    token_count: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a JSON-compatible dict, in field order."""
        return {
            "role": self.role,
            "content": self.content,
            "token_count": self.token_count,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredTurn:
        """Deserialize; ``token_count`` and ``metadata`` default when absent.

        Raises:
            KeyError: ``role`` or ``content`` is missing.
        """
        return cls(
            role=d["role"],
            content=d["content"],
            token_count=d.get("token_count", 0),
            metadata=d.get("metadata", {}),
        )


@dataclass
class StoredTrajectory:
    """One evaluated example: a line of ``trajectories.jsonl``.

    Attributes:
        idx: index in the benchmark's example list.
        benchmark: benchmark name.
        example_id: stable identifier of the example across runs.
        turns: the conversation.
        reward: total reward.
        metrics: per-example metrics (e.g. ``{"correct": 1.0}``).
        logs: per-example diagnostic data.
        error: error message if the example failed, else ``None``.
        time_seconds: wall time of the example, in seconds.
    """

    idx: int
    benchmark: str
    example_id: str = ""
    turns: list[StoredTurn] = field(default_factory=list)
    reward: float = 0.0
    metrics: dict[str, float | int] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    time_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Serialize to a JSON-compatible dict with the reference key order."""
        return {
            "idx": self.idx,
            "benchmark": self.benchmark,
            "example_id": self.example_id,
            "turns": [t.to_dict() for t in self.turns],
            "reward": self.reward,
            "metrics": self.metrics,
            "logs": self.logs,
            "error": self.error,
            "time_seconds": self.time_seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredTrajectory:
        """Deserialize, with the reference defaults; unknown keys are ignored.

        Raises:
            KeyError: ``idx`` or ``benchmark`` (or a turn's ``role``/``content``) is missing.
            AttributeError, TypeError: a value has the wrong shape.
        """
        return cls(
            idx=d["idx"],
            benchmark=d["benchmark"],
            example_id=d.get("example_id", ""),
            turns=[StoredTurn.from_dict(t) for t in d.get("turns", [])],
            reward=d.get("reward", 0.0),
            metrics=d.get("metrics", {}),
            logs=d.get("logs", {}),
            error=d.get("error"),
            time_seconds=d.get("time_seconds", 0.0),
        )


@dataclass
class BenchmarkResult:
    """Aggregated result of a benchmark (``runs/{run_id}/{name}/result.json``).

    ``num_examples = num_correct + num_wrong + num_truncated + num_errors``.

    Attributes:
        name: benchmark name.
        score: raw accuracy, ``num_correct / num_examples``.
        num_examples: examples evaluated.
        num_correct: examples graded correct.
        num_errors: examples that failed with an error.
        num_truncated: examples that hit the token or context limit.
        metrics: benchmark-specific metrics.
        time_seconds: wall time of the benchmark, in seconds.
        pass_at_k: k to pass@k estimate in [0, 1]; int keys here, string keys in JSON.
    """

    name: str
    score: float
    num_examples: int
    num_correct: int
    num_errors: int = 0
    num_truncated: int = 0
    metrics: dict[str, float | int] = field(default_factory=dict)
    time_seconds: float = 0.0
    pass_at_k: dict[int, float] = field(default_factory=dict)

    @property
    def num_completed(self) -> int:
        """Examples that completed: ``num_examples - num_errors - num_truncated``."""
        return self.num_examples - self.num_errors - self.num_truncated

    @property
    def score_completed(self) -> float:
        """Accuracy on completed examples, ``num_correct / num_completed`` (0.0 if none)."""
        return self.num_correct / self.num_completed if self.num_completed > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Serialize to the JSON shape of ``result.json`` (``pass_at_k`` keys as strings)."""
        d = asdict(self)
        if d.get("pass_at_k"):
            d["pass_at_k"] = {str(k): v for k, v in d["pass_at_k"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchmarkResult:
        """Deserialize, ignoring unknown fields; ``pass_at_k`` keys become ints.

        Raises:
            TypeError: a required field is missing.
            ValueError, AttributeError: ``pass_at_k`` is not a mapping of integer keys.
        """
        known = _known_fields(cls, d)
        if "pass_at_k" in known:
            known["pass_at_k"] = {int(k): v for k, v in known["pass_at_k"].items()}
        return cls(**known)


# ── Helpers ──────────────────────────────────────────────────────────────────


def _now() -> datetime:
    """The creation time of runs (local, naive, as the reference); tests replace it."""
    return datetime.now()


def _short_id() -> str:
    """The random suffix of generated run ids; tests replace it."""
    return uuid.uuid4().hex[:6]


def _check_name(kind: str, name: object) -> str:
    """Refuse a run id or benchmark name that is not a single safe path segment."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid {kind} {name!r}: must be a non-empty string")
    if name in (".", ".."):
        raise ValueError(f"invalid {kind} {name!r}: '.' and '..' are not allowed")
    for bad in ("/", "\\", "\x00"):
        if bad in name:
            raise ValueError(f"invalid {kind} {name!r}: contains {bad!r}")
    return name


_MISSING = (FileNotFoundError, NotADirectoryError)
"""Errors that mean "this object does not exist". NotADirectoryError is what a
local path under a regular file raises: a definite answer, not an outage."""


def _parse_json_object(data: bytes, where: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        logger.warning("ignoring %s: not valid JSON (%s)", where, exc)
        return None
    if not isinstance(obj, dict):
        logger.warning("ignoring %s: JSON is a %s, not an object", where, type(obj).__name__)
        return None
    return obj


def _parse_result(d: dict[str, Any] | None, where: str) -> BenchmarkResult | None:
    if d is None:
        return None
    try:
        return BenchmarkResult.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        logger.warning("ignoring %s: not a BenchmarkResult (%s)", where, exc)
        return None


def _parse_run(d: dict[str, Any] | None, where: str) -> RunMetadata | None:
    if d is None:
        return None
    try:
        return RunMetadata.from_dict(d)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("ignoring %s: not a RunMetadata (%s)", where, exc)
        return None


def _recency_key(run: RunMetadata) -> tuple[datetime, str]:
    try:
        ts = datetime.fromisoformat(run.timestamp)
    except (TypeError, ValueError):
        ts = datetime.min
    if ts.tzinfo is not None:
        ts = ts.astimezone().replace(tzinfo=None)
    return ts, run.run_id


class _LineSplitter:
    """Turns chunks of a JSONL file into parsed records, with the policies above.

    Holds at most one incomplete line between chunks.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.lineno = 0
        self._partial = bytearray()

    def feed(self, chunk: bytes) -> Iterator[dict[str, Any]]:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._partial += chunk[start:]
                return
            if self._partial:
                self._partial += chunk[start:end]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = chunk[start:end]
            start = end + 1
            self.lineno += 1
            record = self._parse(line)
            if record is not None:
                yield record

    def close(self) -> None:
        if self._partial.strip():
            logger.debug(
                "%s: ignoring %d bytes after the last newline (a write in progress)",
                self.where,
                len(self._partial),
            )
        self._partial.clear()

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        line = line.strip()  # also drops the \r of CRLF
        if self.lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:].lstrip()  # a UTF-8 byte order mark
        if not line:
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            text = line.decode("utf-8", errors="replace")
            logger.warning(
                "%s line %d: invalid UTF-8, bad bytes replaced with U+FFFD", self.where, self.lineno
            )
        try:
            obj = json.loads(text)
        except ValueError as exc:
            logger.warning("%s line %d: skipping malformed JSON (%s)", self.where, self.lineno, exc)
            return None
        if not isinstance(obj, dict):
            logger.warning(
                "%s line %d: skipping a JSON %s (expected an object)",
                self.where,
                self.lineno,
                type(obj).__name__,
            )
            return None
        return obj


def _to_trajectory(d: dict[str, Any], where: str, lineno: int) -> StoredTrajectory | None:
    try:
        return StoredTrajectory.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        logger.warning("%s line %d: skipping a corrupted trajectory (%r)", where, lineno, exc)
        return None


def _keep(t: StoredTrajectory, correct_only: bool, incorrect_only: bool, errors_only: bool) -> bool:
    if correct_only and t.reward <= 0:
        return False
    if incorrect_only and (t.reward > 0 or t.error is not None):
        return False
    return not (errors_only and t.error is None)


async def _bounded_map(fn: Callable[[T], Awaitable[R]], items: Sequence[T], limit: int) -> list[R]:
    """``[await fn(x) for x in items]`` with at most ``limit`` calls in flight.

    On the first error the other calls are cancelled and the error is raised as is.
    """
    results: list[R | None] = [None] * len(items)
    it = iter(enumerate(items))

    async def worker() -> None:
        for i, item in it:
            results[i] = await fn(item)

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(items)))]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return results  # type: ignore[return-value]


async def _both(a: Awaitable[T], b: Awaitable[R]) -> tuple[T, R]:
    """Await two awaitables concurrently; on an error, cancel the other and raise it as is."""
    ta, tb = asyncio.ensure_future(a), asyncio.ensure_future(b)
    try:
        return await ta, await tb
    except BaseException:
        for task in (ta, tb):
            task.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)
        raise


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# ── The store ────────────────────────────────────────────────────────────────


class EvalStore:
    """Evaluation runs across checkpoints, on any :class:`~evalsyncd.storage.Storage`.

    Writers on training hosts use a local directory (the daemon mirrors it);
    readers may point the same class at a bucket. See the module docstring for
    the layout and for how bad input and outages are handled.

    Args:
        storage_or_path: a storage backend, or a ``str``/``Path`` naming a local
            directory (a :class:`~evalsyncd.storage.LocalStorage` rooted there,
            created if missing).
        prefix: path of the store inside the storage (``""`` for its root).
        max_concurrency: bound on concurrent requests of ``list_runs`` and
            ``list_benchmarks`` (and their async twins).
        chunk_size: bytes per ranged read when streaming ``trajectories.jsonl``.
        use_catalog: let ``list_runs`` read the run catalog the daemon keeps at
            ``.evalsyncd/catalog.json`` (see :mod:`evalsyncd.catalog`); the
            answer is the same either way, only the number of reads differs.

    Instances hold configuration only and pickle when the storage does.
    Sync methods may be called from any thread without a running event loop;
    inside a coroutine, use the ``a*`` methods.
    """

    def __init__(
        self,
        storage_or_path: Storage | str | Path,
        prefix: str = "",
        *,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        use_catalog: bool = True,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {max_concurrency}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        if isinstance(storage_or_path, str | Path):
            self.storage: Storage = LocalStorage(Path(storage_or_path).expanduser())
        else:
            self.storage = storage_or_path
        if prefix.strip("/") and isinstance(self.storage, SupportsChild):
            # a bucket's store reads its own tail log, under its own prefix
            self.storage, prefix = self.storage.child(prefix), ""
        self.prefix = prefix
        self.max_concurrency = max_concurrency
        self.chunk_size = chunk_size
        self.use_catalog = use_catalog

    def __repr__(self) -> str:
        return f"EvalStore({self.url()!r})"

    def url(self, path: str = "") -> str:
        """A human-readable URI of ``path`` inside the store (``file://``, ``s3://``, ``gs://``)."""
        return self.storage.url(self._path(path))

    # -- paths and raw I/O ----------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return storage_join(self.prefix, *parts)

    def _run_path(self, run_id: str, *parts: str) -> str:
        return self._path("runs", _check_name("run_id", run_id), *parts)

    @property
    def _astorage(self) -> AsyncStorage | None:
        s = self.storage
        return s if isinstance(s, AsyncStorage) else None

    def _use_bridge(self) -> bool:
        """Whether sync calls should run the async implementation on the storage bridge.

        True for async-native storages (the cloud backends and wrappers of them);
        LocalStorage and sync-only storages use a thread pool instead.
        """
        return (
            self._astorage is not None
            and not isinstance(self.storage, LocalStorage)
            and not _in_running_loop()
        )

    def _read_json(self, path: str) -> dict[str, Any] | None:
        try:
            data = self.storage.read(path)
        except _MISSING:
            return None
        return _parse_json_object(data, self.storage.url(path))

    async def _aread_json(self, path: str) -> dict[str, Any] | None:
        try:
            data = await self._aread(path)
        except _MISSING:
            return None
        return _parse_json_object(data, self.storage.url(path))

    async def _aread(self, path: str) -> bytes:
        astorage = self._astorage
        if astorage is not None:
            return await astorage.aread(path)
        return await asyncio.to_thread(self.storage.read, path)

    async def _aread_range(self, path: str, offset: int, length: int) -> bytes:
        astorage = self._astorage
        if astorage is not None:
            return await astorage.aread_range(path, offset, length)
        return await asyncio.to_thread(self.storage.read_range, path, offset, length)

    async def _alist_dir(self, path: str) -> list[str]:
        astorage = self._astorage
        if astorage is not None:
            return await astorage.alist_dir(path)
        return await asyncio.to_thread(self.storage.list_dir, path)

    def _write_json(self, data: dict[str, Any], path: str) -> None:
        self.storage.write(path, json.dumps(data, indent=2).encode("utf-8"))

    def _append_jsonl(self, record: dict[str, Any], path: str) -> None:
        # One append call per record: on LocalStorage one O_APPEND write(2), so
        # concurrent writers never tear or interleave lines.
        self.storage.append(path, (json.dumps(record) + "\n").encode("utf-8"))

    def _thread_map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) <= 1 or self.max_concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(
            max_workers=min(self.max_concurrency, len(items)), thread_name_prefix="evalstore"
        ) as pool:
            return list(pool.map(fn, items))

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
            ValueError: the run id or a benchmark name is not a valid path segment
                (nothing is written).
            StorageError: the storage failed.
        """
        for name in benchmarks:
            _check_name("benchmark", name)
        if run_id is None:
            ts = _now().strftime("%Y%m%d_%H%M%S")
            run_id = f"{checkpoint_name or 'base'}_{ts}_{_short_id()}"
        metadata_path = self._run_path(run_id, "metadata.json")

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
            self._path("runs.jsonl"),
        )
        logger.info("created eval run %s", run_id)
        return run_id

    def run_dir(self, run_id: str) -> str:
        """The local directory of a run, as a string (``LocalStorage`` only).

        Raises:
            RuntimeError: the storage is not local (use :meth:`url` instead).
            ValueError: invalid run id.
        """
        path = self._run_path(run_id)
        root = getattr(self.storage, "root", None)
        if not isinstance(self.storage, LocalStorage) and not isinstance(root, Path):
            raise RuntimeError(
                f"run_dir() needs a local storage, not {type(self.storage).__name__}; "
                f"the run is at {self.storage.url(path)} (use EvalStore.url())"
            )
        assert isinstance(root, Path)
        return str(root / path)

    def finalize_run(self, run_id: str) -> RunMetadata:
        """Copy each benchmark's ``score`` from its ``result.json`` into ``metadata.json``.

        Benchmarks without a (parseable) result are left out of ``scores``.

        Returns:
            The updated metadata (also written back).

        Raises:
            FileNotFoundError: the run has no (parseable) ``metadata.json``.
            ValueError: invalid run id.
            StorageError: the storage failed.
        """
        metadata = self.read_run(run_id)
        for benchmark in metadata.benchmarks:
            try:
                _check_name("benchmark", benchmark)
            except ValueError as exc:
                logger.warning("finalize_run %s: skipping benchmark: %s", run_id, exc)
                continue
            result = self._read_json(self._run_path(run_id, benchmark, "result.json"))
            if result:
                metadata.scores[benchmark] = result.get("score", 0.0)
        self._write_json(metadata.to_dict(), self._run_path(run_id, "metadata.json"))
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
        self._drop_from_catalog(run_id)
        self.storage.remove(self._run_path(run_id, "metadata.json"))
        self.storage.remove(self._run_path(run_id, "summary.json"))
        for name in self.storage.list_dir(self._run_path(run_id)):
            try:
                _check_name("benchmark", name)
            except ValueError:
                continue
            result_path = self._run_path(run_id, name, "result.json")
            traj_path = self._run_path(run_id, name, "trajectories.jsonl")
            if not self.storage.exists(result_path) and not self.storage.exists(traj_path):
                continue
            self.storage.remove(result_path)
            self.storage.remove(traj_path)
            self.storage.remove_dir(self._run_path(run_id, name))
        self.storage.remove_dir(self._run_path(run_id))

    # -- queries ------------------------------------------------------------------------

    def list_runs(self) -> list[RunMetadata]:
        """All runs with a parseable ``metadata.json``, most recent first.

        Ordered by ``timestamp`` (then run id), newest first; the reference
        sorts by run id, which is creation order only for runs sharing a
        checkpoint label. Runs whose ``metadata.json`` is missing or does not
        parse are left out (with a warning for the latter).

        Cost: one listing of ``runs/`` plus one read of the run catalog
        (``.evalsyncd/catalog.json``, kept by the daemon; see
        :mod:`evalsyncd.catalog`), then one read per listed run the catalog
        does not cover, at most ``max_concurrency`` at a time. The listing is
        the truth: a run the catalog holds but the listing lacks (deleted) is
        never returned. A missing or corrupt catalog is ignored (with a
        warning naming its key) and every run is read individually: the
        answer is the same with or without a catalog.

        Raises:
            StorageError: the storage failed (never reported as "no runs").
        """
        if self._use_bridge():
            return run_sync(self.alist_runs())
        names = self._run_names(self.storage.list_dir(self._path("runs")))
        cat = self._read_catalog() if self.use_catalog and names else None

        def one(name: str) -> RunMetadata | None:
            path = self._run_path(name, "metadata.json")
            where = self.storage.url(path)
            data = self._from_catalog(cat, name)
            if data is None:
                return _parse_run(self._read_json(path), where)
            return _parse_run(_parse_json_object(data, where), where)

        return self._sorted_runs(self._thread_map(one, names))

    async def alist_runs(self) -> list[RunMetadata]:
        """Async :meth:`list_runs`: natively async on cloud storage (same rules and cost).

        Raises:
            StorageError: the storage failed.
        """
        catalog: Catalog | None = None
        if self.use_catalog:
            listed, catalog = await _both(
                self._alist_dir(self._path("runs")), self._aread_catalog()
            )
        else:
            listed = await self._alist_dir(self._path("runs"))
        names = self._run_names(listed)

        async def one(name: str) -> RunMetadata | None:
            path = self._run_path(name, "metadata.json")
            where = self.storage.url(path)
            data = self._from_catalog(catalog, name)
            if data is None:
                return _parse_run(await self._aread_json(path), where)
            return _parse_run(_parse_json_object(data, where), where)

        return self._sorted_runs(await _bounded_map(one, names, self.max_concurrency))

    # -- the run catalog --------------------------------------------------------------

    def _catalog_or_none(self, data: bytes | None) -> Catalog | None:
        if data is None:
            return None
        url = self.storage.url(self._path(CATALOG_PATH))
        try:
            return parse_catalog(data, url)
        except CatalogError as exc:
            logger.warning("ignoring the run catalog, reading each run instead: %s", exc)
            return None

    def _read_catalog(self) -> Catalog | None:
        return self._catalog_or_none(read_catalog_bytes(self.storage, self.prefix))

    async def _aread_catalog(self) -> Catalog | None:
        astorage = self._astorage
        if astorage is None:
            data = await asyncio.to_thread(read_catalog_bytes, self.storage, self.prefix)
        else:
            data = await aread_catalog_bytes(astorage, self.prefix)
        return self._catalog_or_none(data)

    def _drop_from_catalog(self, run_id: str) -> None:
        """Rewrite the catalog without ``run_id`` (no-op without a catalog or that entry)."""
        _check_name("run_id", run_id)
        data = read_catalog_bytes(self.storage, self.prefix)
        if data is None:
            return
        url = self.storage.url(self._path(CATALOG_PATH))
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

    def _from_catalog(self, catalog: Catalog | None, run_id: str) -> bytes | None:
        """The catalog's bytes of the run's metadata.json, or ``None`` to read it instead."""
        entry = catalog.get(run_id) if catalog is not None else None
        if entry is None:
            return None
        if not entry.intact:
            logger.warning(
                "%s: catalog entry %r does not match its size/CRC32C; reading the run",
                self.storage.url(self._path(CATALOG_PATH)),
                run_id,
            )
            return None
        return entry.data

    @staticmethod
    def _run_names(names: Iterable[str]) -> list[str]:
        valid = []
        for name in names:
            try:
                valid.append(_check_name("run_id", name))
            except ValueError:
                continue
        return valid

    @staticmethod
    def _sorted_runs(runs: Iterable[RunMetadata | None]) -> list[RunMetadata]:
        return sorted((r for r in runs if r is not None), key=_recency_key, reverse=True)

    def read_run(self, run_id: str) -> RunMetadata:
        """The metadata of one run.

        Raises:
            FileNotFoundError: no (parseable) ``metadata.json``.
            ValueError: invalid run id.
            StorageError: the storage failed.
        """
        path = self._run_path(run_id, "metadata.json")
        run = _parse_run(self._read_json(path), self.storage.url(path))
        if run is None:
            raise FileNotFoundError(f"run {run_id} not found at {self.storage.url(path)}")
        return run

    async def aread_run(self, run_id: str) -> RunMetadata:
        """Async :meth:`read_run`: natively async on cloud storage.

        Raises:
            FileNotFoundError: no (parseable) ``metadata.json``.
            ValueError: invalid run id.
            StorageError: the storage failed.
        """
        path = self._run_path(run_id, "metadata.json")
        run = _parse_run(await self._aread_json(path), self.storage.url(path))
        if run is None:
            raise FileNotFoundError(f"run {run_id} not found at {self.storage.url(path)}")
        return run

    def list_benchmarks(self, run_id: str) -> list[str]:
        """Sorted names of the run's benchmarks that have a ``result.json``.

        Raises:
            ValueError: invalid run id.
            StorageError: the storage failed.
        """
        if self._use_bridge():
            return run_sync(self._alist_benchmarks(run_id))
        names = self._benchmark_names(self.storage.list_dir(self._run_path(run_id)))
        present = self._thread_map(
            lambda n: self.storage.exists(self._run_path(run_id, n, "result.json")), names
        )
        return sorted(n for n, ok in zip(names, present, strict=True) if ok)

    async def _alist_benchmarks(self, run_id: str) -> list[str]:
        names = self._benchmark_names(await self._alist_dir(self._run_path(run_id)))

        async def exists(name: str) -> bool:
            path = self._run_path(run_id, name, "result.json")
            astorage = self._astorage
            if astorage is not None:
                return await astorage.aexists(path)
            return await asyncio.to_thread(self.storage.exists, path)

        present = await _bounded_map(exists, names, self.max_concurrency)
        return sorted(n for n, ok in zip(names, present, strict=True) if ok)

    @classmethod
    def _benchmark_names(cls, names: Iterable[str]) -> list[str]:
        return [n for n in cls._run_names(names) if n not in ("metadata.json", "summary.json")]

    def read_result(self, run_id: str, benchmark: str) -> BenchmarkResult | None:
        """A benchmark's result, or ``None`` if missing or unparseable (with a warning).

        Raises:
            ValueError: invalid run id or benchmark name.
            StorageError: the storage failed.
        """
        path = self._run_path(run_id, _check_name("benchmark", benchmark), "result.json")
        return _parse_result(self._read_json(path), self.storage.url(path))

    async def aread_result(self, run_id: str, benchmark: str) -> BenchmarkResult | None:
        """Async :meth:`read_result`: natively async on cloud storage."""
        path = self._run_path(run_id, _check_name("benchmark", benchmark), "result.json")
        return _parse_result(await self._aread_json(path), self.storage.url(path))

    def iter_trajectories(
        self,
        run_id: str,
        benchmark: str,
        *,
        correct_only: bool = False,
        incorrect_only: bool = False,
        errors_only: bool = False,
    ) -> Iterator[StoredTrajectory]:
        """Stream a benchmark's trajectories in file order, with optional filters.

        Reads ``trajectories.jsonl`` in ranges of ``chunk_size`` bytes, so memory
        stays at about one chunk plus the longest line, whatever the file size.
        A missing file yields nothing. Each chunk is fetched when the consumer
        gets there; a file appended to meanwhile is read as far as it has grown.

        Args:
            correct_only: only ``reward > 0``.
            incorrect_only: only ``reward <= 0`` without error.
            errors_only: only those with an ``error``.

        Raises:
            ValueError: invalid run id or benchmark name (raised by the call itself).
            StorageError: the storage failed.
        """
        path = self._run_path(run_id, _check_name("benchmark", benchmark), "trajectories.jsonl")
        return self._iter_jsonl(path, correct_only, incorrect_only, errors_only)

    def _iter_jsonl(
        self, path: str, correct_only: bool, incorrect_only: bool, errors_only: bool
    ) -> Iterator[StoredTrajectory]:
        where = self.storage.url(path)
        splitter = _LineSplitter(where)
        offset = 0
        while True:
            try:
                chunk = self.storage.read_range(path, offset, self.chunk_size)
            except _MISSING:
                if offset == 0:
                    return
                raise
            offset += len(chunk)
            for d in splitter.feed(chunk):
                t = _to_trajectory(d, where, splitter.lineno)
                if t is not None and _keep(t, correct_only, incorrect_only, errors_only):
                    yield t
            if len(chunk) < self.chunk_size:
                break
        splitter.close()

    def aiter_trajectories(
        self,
        run_id: str,
        benchmark: str,
        *,
        correct_only: bool = False,
        incorrect_only: bool = False,
        errors_only: bool = False,
    ) -> AsyncIterator[StoredTrajectory]:
        """Async :meth:`iter_trajectories` (``async for``): natively async ranged reads on cloud.

        Raises:
            ValueError: invalid run id or benchmark name (raised by the call itself).
            StorageError: the storage failed (raised while iterating).
        """
        path = self._run_path(run_id, _check_name("benchmark", benchmark), "trajectories.jsonl")
        return self._aiter_jsonl(path, correct_only, incorrect_only, errors_only)

    async def _aiter_jsonl(
        self, path: str, correct_only: bool, incorrect_only: bool, errors_only: bool
    ) -> AsyncIterator[StoredTrajectory]:
        where = self.storage.url(path)
        splitter = _LineSplitter(where)
        offset = 0
        while True:
            try:
                chunk = await self._aread_range(path, offset, self.chunk_size)
            except _MISSING:
                if offset == 0:
                    return
                raise
            offset += len(chunk)
            for d in splitter.feed(chunk):
                t = _to_trajectory(d, where, splitter.lineno)
                if t is not None and _keep(t, correct_only, incorrect_only, errors_only):
                    yield t
            if len(chunk) < self.chunk_size:
                break
        splitter.close()

    def read_trajectories(
        self,
        run_id: str,
        benchmark: str,
        *,
        correct_only: bool = False,
        incorrect_only: bool = False,
        errors_only: bool = False,
    ) -> list[StoredTrajectory]:
        """All of a benchmark's trajectories (``[]`` if none); see :meth:`iter_trajectories`."""
        return list(
            self.iter_trajectories(
                run_id,
                benchmark,
                correct_only=correct_only,
                incorrect_only=incorrect_only,
                errors_only=errors_only,
            )
        )

    async def aread_trajectories(
        self,
        run_id: str,
        benchmark: str,
        *,
        correct_only: bool = False,
        incorrect_only: bool = False,
        errors_only: bool = False,
    ) -> list[StoredTrajectory]:
        """Async :meth:`read_trajectories`: natively async on cloud storage."""
        return [
            t
            async for t in self.aiter_trajectories(
                run_id,
                benchmark,
                correct_only=correct_only,
                incorrect_only=incorrect_only,
                errors_only=errors_only,
            )
        ]

    def read_single_trajectory(
        self, run_id: str, benchmark: str, idx: int
    ) -> StoredTrajectory | None:
        """The first trajectory with ``idx``, or ``None``.

        Streams the file and stops at the match: O(position) I/O, O(chunk) memory.
        """
        for t in self.iter_trajectories(run_id, benchmark):
            if t.idx == idx:
                return t
        return None

    def read_summary(self, run_id: str) -> dict[str, Any] | None:
        """The run's ``summary.json``, or ``None`` if missing or unparseable.

        Raises:
            ValueError: invalid run id.
            StorageError: the storage failed.
        """
        return self._read_json(self._run_path(run_id, "summary.json"))

    # -- writes (for the eval runner) -----------------------------------------------------

    def write_result(self, run_id: str, result: BenchmarkResult) -> None:
        """Write ``runs/{run_id}/{result.name}/result.json`` (replacing it atomically).

        Raises:
            ValueError: invalid run id or benchmark name (nothing is written).
            StorageError: the storage failed.
        """
        path = self._run_path(run_id, _check_name("benchmark", result.name), "result.json")
        self._write_json(result.to_dict(), path)

    def write_trajectory(self, run_id: str, benchmark: str, traj: StoredTrajectory) -> None:
        """Append one line to the benchmark's ``trajectories.jsonl``.

        One ``append`` call per line: on ``LocalStorage`` concurrent writers,
        in threads or processes, never tear or interleave lines.

        Raises:
            ValueError: invalid run id or benchmark name (nothing is written).
            StorageError: the storage failed.
        """
        path = self._run_path(run_id, _check_name("benchmark", benchmark), "trajectories.jsonl")
        self._append_jsonl(traj.to_dict(), path)

    def write_summary(self, run_id: str, results: dict[str, BenchmarkResult]) -> None:
        """Write ``summary.json``: per benchmark, score and example counts.

        Raises:
            ValueError: invalid run id.
            StorageError: the storage failed.
        """
        summary = {
            name: {
                "score": r.score,
                "num_examples": r.num_examples,
                "num_correct": r.num_correct,
                "num_errors": r.num_errors,
            }
            for name, r in results.items()
        }
        self._write_json(summary, self._run_path(run_id, "summary.json"))
