"""``evalsyncd runs export``: every sample of a store or a fleet as one CSV table.

The table, ``{dir}/samples.csv`` (UTF-8, a header row, RFC 4180 quoting as
Python's :mod:`csv` writes it), has one row per sample, with the columns of
:data:`COLUMNS`:

============== =============================================================
column          meaning
============== =============================================================
run             run id
host            host prefix under the fleet prefix (``""`` for a single store)
model           the run's ``model_name``
checkpoint      its ``checkpoint_name`` (else ``checkpoint_path``, else empty)
benchmark       benchmark name
line            0-based line number in ``trajectories.jsonl``
idx             the trajectory's ``idx``
example_id      its ``example_id``
reward          its ``reward``
correct         ``1`` if ``reward > 0`` else ``0``
error           its error, cut to 500 characters (empty: none)
start           byte offset of the line in the file
length          bytes of the line (without its ``\\n``)
url             the file's URL (``start``/``length`` are a range of it)
============== =============================================================

DuckDB (``read_csv_auto``), Polars (``read_csv``) and pandas (``read_csv``)
read it as it is. Files are streamed in ranged chunks and written through
per-file part files, several files at once, then joined in order, so memory
stays bounded whatever the number of samples. Bad lines are not rows; they are
counted and the first ones reported in :class:`ExportSummary`.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from evalsyncd.errors import StorageError
from evalsyncd.fleet import Fleet, FleetRun
from evalsyncd.samples.lines import BadLine, ParsedLine
from evalsyncd.samples.reader import DEFAULT_CHUNK_SIZE, SampleReader
from evalsyncd.storage import Storage, storage_join
from evalsyncd.storage.tail import tail_damage
from evalsyncd.store.aio import bounded_map, reads_of
from evalsyncd.store.layout import StoreLayout

__all__ = ["COLUMNS", "SAMPLES_FILE", "ExportSummary", "aexport_samples"]

COLUMNS = (
    "run",
    "host",
    "model",
    "checkpoint",
    "benchmark",
    "line",
    "idx",
    "example_id",
    "reward",
    "correct",
    "error",
    "start",
    "length",
    "url",
)
"""The header of ``samples.csv``."""

SAMPLES_FILE = "samples.csv"
"""The table's file name inside the output directory."""


@dataclass(slots=True)
class ExportSummary:
    """What an export wrote.

    Attributes:
        path: the CSV file.
        rows: samples written.
        files: ``trajectories.jsonl`` files read.
        bad_lines: lines skipped (not samples) or with a defect, in all files.
        problems: messages about hosts, runs or files that could not be read
            (their samples are missing from the table); the first 100 bad lines too.
        read_around: messages about what was read around: a host whose tail log is
            damaged, or whose plain object was changed by another tool under pending
            tail lines, was read from its plain objects (its newest samples may be
            missing); a key refused by the listing. The rest of the table is whole.
    """

    path: Path
    rows: int = 0
    files: int = 0
    bad_lines: int = 0
    problems: list[str] = field(default_factory=list)
    read_around: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every host, run and file was read (bad lines aside)."""
        return not any(not p.startswith("bad line: ") for p in self.problems)


async def _benchmarks(storage: Storage, prefix: str, run: FleetRun) -> list[str]:
    """The run's benchmarks: its metadata's, then any other directory of the run."""
    layout = StoreLayout(prefix)
    names = list(run.metadata.benchmarks)
    listing = await reads_of(storage).list_dir(layout.run(run.run_id))
    names += [n for n in StoreLayout.benchmarks_in(listing) if n not in names]
    return names


async def aexport_samples(
    storage: Storage,
    prefix: str,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    max_files: int = 16,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ExportSummary:
    """Write ``{out_dir}/samples.csv``: every sample of every run under ``prefix``.

    Args:
        storage: an open storage.
        prefix: a store (host prefix or local root) or a fleet prefix inside it.
        out_dir: the output directory (created if missing).
        cache_dir: passed to the per-host :class:`SampleReader` (the export itself
            does not use the index).
        max_files: files read at the same time.
        chunk_size: bytes per ranged read (memory is about ``max_files`` times two chunks).

    Returns:
        The summary; hosts, runs or files that failed are in its ``problems``.

    Raises:
        StorageError: the prefix itself could not be listed.
        OSError: the output cannot be written.
    """
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    path = out_dir / SAMPLES_FILE
    summary = ExportSummary(path)
    fleet = Fleet(storage, prefix)
    listing = await fleet.alist_runs()
    for problem in listing.problems:
        if problem.kind in ("damaged", "skipped"):
            summary.read_around.append(problem.message)
        elif problem.error is not None:
            summary.problems.append(problem.message)
    jobs: list[tuple[FleetRun, str]] = []
    readers: dict[str, SampleReader] = {}
    for run in sorted(listing.runs, key=lambda r: (r.host, r.run_id)):
        host_prefix = storage_join(prefix, run.host) if run.host else prefix
        if run.host not in readers:
            readers[run.host] = SampleReader(
                storage, cache_dir, prefix=host_prefix, chunk_size=chunk_size
            )
        try:
            names = await _benchmarks(storage, host_prefix, run)
        except (StorageError, OSError) as exc:
            summary.problems.append(f"{run.url}: {type(exc).__name__}: {exc}")
            continue
        jobs.extend((run, name) for name in names)
    parts = out_dir / f".{SAMPLES_FILE}.parts-{os.getpid()}"
    parts.mkdir(exist_ok=True)

    async def one(job: tuple[int, tuple[FleetRun, str]]) -> tuple[int, int, int, list[str]]:
        """Rows, files read (0/1), bad lines, problems of one file, into its part file."""
        n, (run, benchmark) = job
        reader = readers[run.host]
        meta = run.metadata
        checkpoint = meta.checkpoint_name or meta.checkpoint_path or ""
        url = reader.url(run.run_id, benchmark)
        rows = bad = 0
        problems: list[str] = []
        try:
            with (parts / f"{n:08d}.csv").open("w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                async for item in reader.aiter_lines(run.run_id, benchmark):
                    if isinstance(item, BadLine):
                        bad += 1
                        if len(problems) < 100:
                            problems.append(f"bad line: {item}")
                        continue
                    assert isinstance(item, ParsedLine)
                    e = item.entry
                    w.writerow(
                        (
                            run.run_id,
                            run.host,
                            meta.model_name,
                            checkpoint,
                            benchmark,
                            e.line,
                            e.idx,
                            e.example_id,
                            repr(e.reward),
                            int(e.correct),
                            e.error if e.error is not None else "",
                            e.start,
                            e.length,
                            url,
                        )
                    )
                    rows += 1
        except (StorageError, OSError, ValueError) as exc:
            return 0, 0, 0, [f"{url}: {type(exc).__name__}: {exc}"]
        return rows, int(rows > 0 or bad > 0), bad, problems

    try:
        results = await bounded_map(one, list(enumerate(jobs)), max_files)
        tmp = path.with_name(path.name + ".tmp")
        header = io.StringIO()
        csv.writer(header).writerow(COLUMNS)
        with tmp.open("wb") as out:
            out.write(header.getvalue().encode("utf-8"))
            for n, (rows, files, bad, problems) in enumerate(results):
                part = parts / f"{n:08d}.csv"
                if rows and part.exists():
                    with part.open("rb") as f:
                        shutil.copyfileobj(f, out, 256 << 10)
                summary.rows += rows
                summary.files += files
                summary.bad_lines += bad
                summary.problems += problems
        tmp.replace(path)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
    for reader in readers.values():
        # a main object changed under pending tail lines, found by this export's reads
        damage = await tail_damage(reader.storage)
        if damage is not None and not any(str(damage) in m for m in summary.read_around):
            summary.read_around.append(f"read from the plain objects: {damage}")
    return summary
