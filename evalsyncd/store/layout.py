"""Where an evaluation store keeps each thing, and how its bytes are parsed.

The layout and the bytes are those of ``tinker_cookbook.stores.eval_store``
(``tinker-cookbook`` 0.6.1): a tree written by either implementation reads back
identically through the other. ``{prefix}`` is the store's prefix inside the
storage::

    {prefix}/
      runs.jsonl                        # append-only index, one line per create_run:
                                        #   {"run_id", "timestamp", "model", "checkpoint"}
      .evalsyncd/catalog.json           # the daemon's run catalog (evalsyncd.catalog)
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
``ensure_ascii`` is on).

Names: run ids and benchmark names become path segments. An empty name, one
containing ``/``, ``\\``, NUL or another control character, and ``.``/``..`` are refused with
``ValueError`` (:func:`check_name`) before any I/O; names found in listings
that break these rules are skipped.

Parsing is forgiving of what writers leave behind:

- JSONL is split on ``b"\\n"`` only; a trailing ``\\r`` (CRLF), surrounding
  whitespace and a leading UTF-8 BOM are stripped; blank lines are skipped; a
  last line without its ``\\n`` is a writer mid-append and is ignored until it
  is complete.
- Non-UTF-8 bytes: a line is decoded with ``errors="replace"`` (as the reference
  does), so each bad byte becomes U+FFFD, and a warning names the file and line.
  If the line then does not parse as JSON it is skipped like any malformed line.
- A malformed line (bad JSON, not an object, missing ``idx``/``benchmark``) is
  skipped with a warning naming the file and the 1-based line number; so is a
  line longer than :data:`MAX_LINE_BYTES`, which is dropped as it arrives
  (a reader holds at most that much of one line).
- A ``*.json`` file that does not parse reads as missing (``None``), with a warning.
- Bounds (a bucket another host wrote may hold anything): a ``*.json`` file of
  more than :data:`MAX_JSON_BYTES` is not read past that limit and raises
  :class:`~evalsyncd.errors.CorruptObjectError` naming its URL, the limit and
  the bytes seen (``list_runs`` skips such a run and reports it); JSON nested
  deeper than the interpreter can parse reads as not parsing; a
  ``metadata.json`` or ``result.json`` whose fields have the wrong types
  (``scores`` not a mapping of numbers, ...) reads as not that model.

Warnings go to the stdlib logger ``evalsyncd.store``; nothing here does I/O.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Protocol, Self, TypedDict, TypeVar

from evalsyncd.catalog import CATALOG_PATH
from evalsyncd.errors import CorruptObjectError
from evalsyncd.storage import storage_join
from evalsyncd.store.models import BenchmarkResult, RunMetadata, StoredTrajectory

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_LINE_BYTES",
    "FilterOptions",
    "JSONTooDeepError",
    "LineSplitter",
    "Skipped",
    "StoreLayout",
    "TrajectoryFilter",
    "TrajectoryParser",
    "check_json_size",
    "check_name",
    "check_new_name",
    "json_problem",
    "loads_bounded",
    "model_problem",
    "parse_json_object",
    "parse_model",
    "recency_key",
]

logger = logging.getLogger("evalsyncd.store")

MAX_JSON_BYTES = 4 * 1024 * 1024
"""Largest ``metadata.json``, ``result.json`` or ``summary.json`` a reader reads, bytes.

EvalStore writes kilobytes; parsing JSON costs up to about 20 times its size
in memory, so this bounds what one such file costs a reader (~100 MB)."""


@dataclass(frozen=True, slots=True)
class Skipped:
    """A key a reader refused, and why.

    Attributes:
        url: the object's (or the listed name's) URL.
        reason: one line: what is wrong with it.
    """

    url: str
    reason: str

    def __str__(self) -> str:
        return f"{self.url}: {self.reason}"


def check_json_size(data: bytes, where: str, limit: int = MAX_JSON_BYTES) -> bytes:
    """``data`` if it is at most ``limit`` bytes.

    Readers fetch ``limit + 1`` bytes with one ranged read, so ``data`` longer
    than ``limit`` means the object is larger than the limit.

    Raises:
        CorruptObjectError: ``data`` is longer than ``limit`` (names ``where``,
            the limit and the bytes seen).
    """
    if len(data) > limit:
        raise CorruptObjectError(
            f"{where}: larger than the limit of {limit} bytes for this file "
            f"(read {len(data)} bytes and stopped)",
            url=where,
        )
    return data


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a single safe path segment.

    Args:
        kind: what the name is, for the message (``"run_id"``, ``"benchmark"``).
        name: the candidate.

    Raises:
        ValueError: ``name`` is not a non-empty string, is ``.`` or ``..``, or
            contains ``/``, ``\\``, NUL or another control character (C0, DEL, C1:
            a name printed to a terminal must not move its cursor or erase lines).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"invalid {kind} {name!r}: must be a non-empty string")
    if name in (".", ".."):
        raise ValueError(f"invalid {kind} {name!r}: '.' and '..' are not allowed")
    for bad in ("/", "\\", "\x00"):
        if bad in name:
            raise ValueError(f"invalid {kind} {name!r}: contains {bad!r}")
    control = _CONTROL.search(name)
    if control is not None:
        raise ValueError(f"invalid {kind} {name!r}: contains a control character {control[0]!r}")
    return name


_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")
"""C0 controls, DEL and C1 controls: refused in run ids and benchmark names."""


def check_new_name(kind: str, name: object) -> str:
    """Return ``name`` if a writer may create it: :func:`check_name`, and no leading ``.``.

    A name starting with ``.`` is hidden by convention: atomic-write temporaries
    (``.metadata.json.1234.tmp``) and the ``.evalsyncd/`` area live in that
    namespace, so mirrors (evalsyncd mirrors no dot-file or dot-directory) and
    listings skip it. A run written under such a name would stay on this disk
    only, silently; writers refuse it instead (readers still read one).

    Raises:
        ValueError: the :func:`check_name` cases, or ``name`` starts with ``.``
            (the message names the rule).
    """
    check_name(kind, name)
    assert isinstance(name, str)
    if name.startswith("."):
        raise ValueError(
            f"invalid {kind} {name!r}: starts with '.'; names starting with '.' are hidden "
            "(temporaries of atomic writes, the .evalsyncd/ area): evalsyncd does not mirror "
            "them and listings skip them"
            + ("; use a checkpoint_name that does not start with '.'" if kind == "run_id" else "")
        )
    return name


@dataclass(frozen=True, slots=True)
class StoreLayout:
    """The storage paths of a store's files (see the module docstring's tree).

    Every method that takes a run id or benchmark name checks it
    (:func:`check_name`) and raises ``ValueError`` before any path is made.

    Attributes:
        prefix: the store's prefix inside the storage (``""`` for its root).
    """

    prefix: str = ""

    def path(self, *parts: str) -> str:
        """``parts`` joined under the prefix (``storage_join``)."""
        return storage_join(self.prefix, *parts)

    def index(self) -> str:
        """``runs.jsonl``."""
        return self.path("runs.jsonl")

    def runs_dir(self) -> str:
        """``runs/``, whose children are the run directories."""
        return self.path("runs")

    def catalog(self) -> str:
        """``.evalsyncd/catalog.json``, the daemon's run catalog."""
        return self.path(CATALOG_PATH)

    def run(self, run_id: str, *parts: str) -> str:
        """``runs/{run_id}/{parts...}``."""
        return self.path("runs", check_name("run_id", run_id), *parts)

    def metadata(self, run_id: str) -> str:
        """``runs/{run_id}/metadata.json``."""
        return self.run(run_id, "metadata.json")

    def summary(self, run_id: str) -> str:
        """``runs/{run_id}/summary.json``."""
        return self.run(run_id, "summary.json")

    def benchmark(self, run_id: str, benchmark: str, *parts: str) -> str:
        """``runs/{run_id}/{benchmark}/{parts...}``."""
        return self.run(run_id, check_name("benchmark", benchmark), *parts)

    def result(self, run_id: str, benchmark: str) -> str:
        """``runs/{run_id}/{benchmark}/result.json``."""
        return self.benchmark(run_id, benchmark, "result.json")

    def trajectories(self, run_id: str, benchmark: str) -> str:
        """``runs/{run_id}/{benchmark}/trajectories.jsonl``."""
        return self.benchmark(run_id, benchmark, "trajectories.jsonl")

    @staticmethod
    def runs_in(listing: Iterable[str]) -> list[str]:
        """The names of a listing of ``runs/`` that are valid run ids, in order."""
        valid = []
        for name in listing:
            try:
                valid.append(check_name("run_id", name))
            except ValueError:
                continue
        return valid

    @classmethod
    def benchmarks_in(cls, listing: Iterable[str]) -> list[str]:
        """The names of a listing of a run directory that may be benchmarks, in order."""
        return [n for n in cls.runs_in(listing) if n not in ("metadata.json", "summary.json")]


# ── JSON files ─────────────────────────────────────────────────────────────────


def parse_json_object(data: bytes | None, where: str) -> dict[str, Any] | None:
    """The JSON object in ``data``, or ``None`` (with a warning naming ``where``).

    Args:
        data: the file's bytes; ``None`` (a missing file) gives ``None`` quietly.
        where: the file's URL, for the warning.
    """
    if data is None:
        return None
    obj = _loads(data, where)
    if obj is _BAD:
        return None
    if not isinstance(obj, dict):
        logger.warning("ignoring %s: JSON is a %s, not an object", where, type(obj).__name__)
        return None
    return obj


_BAD = object()


class JSONTooDeepError(ValueError):
    """JSON nested deeper than the parser's recursion limit (a hostile or broken file)."""

    def __init__(self) -> None:
        super().__init__("JSON nested too deeply")


def loads_bounded(data: str | bytes) -> Any:
    """``json.loads(data)`` for bytes read from a bucket: JSON nested deeper than the
    interpreter's recursion limit (``[[[[...`` of a hostile file) is a ``ValueError``
    like any other malformed JSON, never a ``RecursionError``.

    Every reader of JSON from a bucket parses through this one function.

    Raises:
        ValueError: not valid JSON (``UnicodeDecodeError`` for bytes that are not
            UTF-8, :class:`JSONTooDeepError` for nesting too deep).
    """
    try:
        return json.loads(data)
    except RecursionError:
        raise JSONTooDeepError() from None


def _loads(data: bytes, where: str) -> Any:
    """``json.loads(data)``, or ``_BAD`` (with a warning) for invalid or too deeply nested JSON."""
    try:
        return loads_bounded(data)
    except JSONTooDeepError:
        logger.warning("ignoring %s: JSON nested too deeply", where)
    except ValueError as exc:
        logger.warning("ignoring %s: not valid JSON (%s)", where, exc)
    return _BAD


def json_problem(data: bytes) -> str | None:
    """Why ``data`` is not a JSON object, or ``None`` when it is one (no logging)."""
    try:
        obj = loads_bounded(data)
    except JSONTooDeepError as exc:
        return str(exc)
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    return None if isinstance(obj, dict) else f"JSON is a {type(obj).__name__}, not an object"


def _is_num(v: object) -> bool:
    """A finite float, or an int a float holds (JSON integers have no bound; not a bool)."""
    if type(v) is float:
        return math.isfinite(v)
    return type(v) is int and -_FLOAT_MAX_INT <= v <= _FLOAT_MAX_INT


_FLOAT_MAX_INT = int(sys.float_info.max)


def _is_name(v: str) -> bool:
    try:
        check_name("run_id", v)
    except ValueError:
        return False
    return True


def _is_opt_str(v: object) -> bool:
    return v is None or isinstance(v, str)


def _shape_problem(model: type, d: dict[str, Any]) -> str | None:
    """Why ``d`` has the wrong field types for ``model`` (readers format these fields)."""
    checks: dict[str, Callable[[Any], bool]]
    if model is RunMetadata:
        checks = {
            "run_id": lambda v: isinstance(v, str) and _is_name(v),
            "model_name": lambda v: isinstance(v, str),
            "checkpoint_path": _is_opt_str,
            "checkpoint_name": _is_opt_str,
            "timestamp": lambda v: isinstance(v, str),
            "benchmarks": lambda v: isinstance(v, list) and all(isinstance(b, str) for b in v),
            "config": lambda v: isinstance(v, dict),
            "scores": lambda v: (
                isinstance(v, dict) and all(isinstance(k, str) and _is_num(x) for k, x in v.items())
            ),
        }
    elif model is BenchmarkResult:
        checks = {
            "name": lambda v: isinstance(v, str),
            "score": _is_num,
            "num_examples": _is_num,
            "num_correct": _is_num,
            "num_errors": _is_num,
            "num_truncated": _is_num,
            "metrics": lambda v: isinstance(v, dict),
            "time_seconds": _is_num,
            "pass_at_k": lambda v: isinstance(v, dict),
        }
    else:
        return None
    for name, ok in checks.items():
        if name in d and not ok(d[name]):
            return f"field {name!r} has a wrong type or value ({type(d[name]).__name__})"
    return None


class _Model(Protocol):
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self: ...


M = TypeVar("M", bound=_Model)

_BAD_SHAPE = (KeyError, TypeError, ValueError, AttributeError)
"""What ``from_dict`` raises for a JSON object of the wrong shape."""


def parse_model(model: type[M], d: dict[str, Any] | None, where: str) -> M | None:
    """``model.from_dict(d)``, or ``None`` if ``d`` is ``None`` or of the wrong shape (with a warning).

    Args:
        model: :class:`RunMetadata` or :class:`BenchmarkResult` (a ``from_dict`` class).
        d: a parsed ``*.json`` file (:func:`parse_json_object`).
        where: the file's URL, for the warning.
    """
    if d is None:
        return None
    problem = _shape_problem(model, d)
    if problem is not None:
        logger.warning("ignoring %s: not a %s (%s)", where, model.__name__, problem)
        return None
    try:
        return model.from_dict(d)
    except _BAD_SHAPE as exc:
        logger.warning("ignoring %s: not a %s (%s)", where, model.__name__, exc)
        return None


def model_problem(model: type[M], data: bytes) -> str | None:
    """Why ``data`` does not parse as ``model`` (one line), or ``None`` when it does (no logging)."""
    problem = json_problem(data)
    if problem is not None:
        return problem
    d = json.loads(data)
    problem = _shape_problem(model, d)
    if problem is not None:
        return f"not a {model.__name__}: {problem}"
    try:
        model.from_dict(d)
    except _BAD_SHAPE as exc:
        return f"not a {model.__name__}: {exc}"
    return None


def recency_key(run: RunMetadata) -> tuple[datetime, str]:
    """Sort key of ``list_runs``: creation time (naive local; unparseable: oldest), then id."""
    try:
        ts = datetime.fromisoformat(run.timestamp)
    except (TypeError, ValueError):
        ts = datetime.min
    if ts.tzinfo is not None:
        ts = ts.astimezone().replace(tzinfo=None)
    return ts, run.run_id


# ── JSONL files ────────────────────────────────────────────────────────────────


MAX_LINE_BYTES = 256 * 1024 * 1024
"""Longest JSONL line a reader parses, bytes: a longer one is skipped with a warning,
having held at most this much (the daemon mirrors lines of any length; 64 MiB lines
are tested end to end)."""


class LineSplitter:
    """Turns chunks of a JSONL file into parsed records, with the policies above.

    Holds at most one incomplete line between chunks, of at most ``max_line_bytes``:
    a longer line is dropped as it arrives and skipped with a warning.

    Args:
        where: the file's URL, for warnings.
        max_line_bytes: the longest line parsed, bytes.

    Attributes:
        lineno: 1-based number of the last complete line split off.
    """

    def __init__(self, where: str, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.where = where
        self.lineno = 0
        self.max_line_bytes = max_line_bytes
        self._partial = bytearray()
        self._dropped = 0  # bytes of the current line dropped (it is too long)

    def feed(self, chunk: bytes) -> Iterator[dict[str, Any]]:
        """The records of the lines that ``chunk`` completes (lazily: ``lineno`` follows)."""
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._partial += chunk[start:]
                if len(self._partial) > self.max_line_bytes:
                    self._dropped += len(self._partial)
                    self._partial.clear()
                return
            if self._dropped:
                self.lineno += 1
                logger.warning(
                    "%s line %d: skipping a line of %d bytes, longer than the limit of %d",
                    self.where,
                    self.lineno,
                    self._dropped + len(self._partial) + end - start,
                    self.max_line_bytes,
                )
                self._dropped = 0
                self._partial.clear()
                start = end + 1
                continue
            if self._partial:
                self._partial += chunk[start:end]
                line = bytes(self._partial)
                self._partial.clear()
            else:
                line = chunk[start:end]
            start = end + 1
            self.lineno += 1
            if len(line) > self.max_line_bytes:
                logger.warning(
                    "%s line %d: skipping a line of %d bytes, longer than the limit of %d",
                    self.where,
                    self.lineno,
                    len(line),
                    self.max_line_bytes,
                )
                continue
            record = self._parse(line)
            if record is not None:
                yield record

    def close(self) -> None:
        """End of file: drop an unfinished last line (a write in progress)."""
        self._dropped = 0
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
            obj = loads_bounded(text)
        except JSONTooDeepError:
            logger.warning("%s line %d: skipping JSON nested too deeply", self.where, self.lineno)
            return None
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


@dataclass(frozen=True, slots=True)
class TrajectoryFilter:
    """Which trajectories a read keeps (all of them by default).

    Attributes:
        correct_only: only ``reward > 0``.
        incorrect_only: only ``reward <= 0`` without error.
        errors_only: only those with an ``error``.
    """

    correct_only: bool = False
    incorrect_only: bool = False
    errors_only: bool = False

    def keep(self, t: StoredTrajectory) -> bool:
        """Whether ``t`` passes every filter that is on."""
        if self.correct_only and t.reward <= 0:
            return False
        if self.incorrect_only and (t.reward > 0 or t.error is not None):
            return False
        return not (self.errors_only and t.error is None)


class FilterOptions(TypedDict, total=False):
    """The filter keywords of the trajectory reads (see :class:`TrajectoryFilter`)."""

    correct_only: bool
    incorrect_only: bool
    errors_only: bool


class TrajectoryParser:
    """A ``trajectories.jsonl``, chunk by chunk, to the trajectories a filter keeps.

    Args:
        where: the file's URL, for warnings.
        which: the filter.
    """

    def __init__(self, where: str, which: TrajectoryFilter) -> None:
        self.lines = LineSplitter(where)
        self.which = which

    def feed(self, chunk: bytes) -> Iterator[StoredTrajectory]:
        """The kept trajectories of the lines ``chunk`` completes, in file order (lazily)."""
        lines, keep = self.lines, self.which.keep
        for d in lines.feed(chunk):
            try:
                t = StoredTrajectory.from_dict(d)
            except _BAD_SHAPE as exc:
                logger.warning(
                    "%s line %d: skipping a corrupted trajectory (%r)",
                    lines.where,
                    lines.lineno,
                    exc,
                )
                continue
            if keep(t):
                yield t

    def close(self) -> None:
        """End of file (see :meth:`LineSplitter.close`)."""
        self.lines.close()
